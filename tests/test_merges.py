"""Merged adapters (server/adapters/merges.py): each strategy equals PEFT's add_weighted_adapter on the same LoRA
adapters (DARE with the documented per-module seeds), a merge is computed once and cached as an adapter, a new
version of a source makes a new merge, a merge mixes with other types, and what cannot be merged is refused."""

from __future__ import annotations

import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora.model import LoraModel
from transformers import AutoModelForCausalLM

from server.adapters.merges import Merge, MergingStore, merge_seed
from server.demo import tiny
from server.engine.runner import ModelRunner
from server.model import encode_prompt, load_tokenizer
from tests.conftest import ATOL, DEVICE, DTYPE, private_model
from tests.reference import reference_logits

PROMPT = "Merge these adapters, please."
SOURCES = {  # name: (config, seed, scale); m1 and m2 share r (and some targets), m3 has another rank and rsLoRA
    "m1": (
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
        41,
    ),
    "m2": (LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "o_proj"], init_lora_weights=False), 42),
    "m3": (
        LoraConfig(r=6, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "up_proj"], init_lora_weights=False),
        43,
    ),
}
MERGES = [
    Merge.of("ties", [("m1", 0.7), ("m2", 0.5)], density=0.5),
    Merge.of("ties", [("m1", 1.0), ("m2", -0.6)], density=0.3, majority_sign_method="frequency"),
    Merge.of("dare_linear", [("m1", 0.8), ("m2", 1.2)], density=0.4),
    Merge.of("dare_ties", [("m1", 0.5), ("m2", 0.5)], density=0.6),
    Merge.of("dare_ties", [("m2", 1.0), ("m1", -0.4)], density=0.2, majority_sign_method="frequency"),
    Merge.of("magnitude_prune", [("m1", 0.9), ("m2", 0.4)], density=0.5),
    Merge.of("linear", [("m1", 0.5), ("m2", 1.5)]),
    Merge.of("cat", [("m1", 0.5), ("m3", -1.0)]),
    Merge.of("svd", [("m1", 1.0), ("m3", 0.5)]),
    Merge.of("ties_svd", [("m1", 1.0), ("m3", 0.7)], density=0.5),
    Merge.of("dare_linear_svd", [("m3", 0.6), ("m1", 1.1)], density=0.5),
    Merge.of("dare_ties_svd", [("m1", 0.3), ("m3", 0.9)], density=0.7),
    Merge.of("magnitude_prune_svd", [("m1", 1.0), ("m3", 1.0)], density=0.4),
    Merge.of("dare_ties", [("m1", 0.5)], density=0.5),  # one adapter: PEFT merges it linearly
]


@pytest.fixture(scope="module")
def world(llama, tmp_path_factory):
    """The llama world's store plus three LoRA adapters to merge."""
    store = tmp_path_factory.mktemp("merge-store")
    for name in ("oft", "loha", "lora.rs-bias"):
        shutil.copytree(llama.store / name, store / name)
    for name, (config, seed) in SOURCES.items():
        tiny.save_adapter(llama.model_dir, config, store / name, seed=seed, base_name=llama.model_dir.name, scale=0.5)
    return llama.model_dir, store


@pytest.fixture(scope="module")
def scorer(world):
    model_dir, store = world
    model, registry = private_model(model_dir, MergingStore(store))
    yield ModelRunner(model, registry.context), registry, encode_prompt(load_tokenizer(model_dir), PROMPT)
    registry.close()


def _score(scorer, names: list[str]) -> torch.Tensor:
    runner, registry, ids = scorer
    adapters = registry.load_blocking(names)
    return runner.score(torch.tensor([ids]), [tuple(a.slot for a in adapters)], [(1.0,) * len(adapters)])[0].cpu()


def peft_merged(model_dir, store, merge: Merge, monkeypatch) -> PeftModel:
    """PEFT's add_weighted_adapter on the merge's sources, with torch's RNG seeded by merge_seed(name, module) right
    before each module's merge: the seeding convention of server/adapters/merges.py."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPE).eval()
    names = merge.names
    model = PeftModel.from_pretrained(base, store / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(store / name, adapter_name=name)
    module_names = {id(m): n for n, m in model.base_model.model.named_modules()}

    def seeded(original):
        def run(self, *args, **kwargs):
            target = next(a for a in args if id(a) in module_names)  # the LoRA layer being merged
            torch.manual_seed(merge_seed(merge.name, module_names[id(target)]))
            return original(self, *args, **kwargs)

        return run

    for method in (
        "_generalized_task_arithmetic_weighted_adapter",
        "_svd_generalized_task_arithmetic_weighted_adapter",
    ):
        monkeypatch.setattr(LoraModel, method, seeded(getattr(LoraModel, method)))
    options = {"density": merge.density, "majority_sign_method": merge.majority_sign_method}
    model.add_weighted_adapter(names, [w for _, w in merge.sources], "merged", merge.strategy, **options)
    model.set_adapter("merged")
    return model.eval().to(DEVICE)


@pytest.mark.parametrize("merge", MERGES, ids=[m.name for m in MERGES])
def test_a_merge_equals_peft_add_weighted_adapter(scorer, world, merge, monkeypatch):
    ours = _score(scorer, [merge.name])
    reference = peft_merged(*world, merge, monkeypatch)
    with torch.no_grad():
        expected = reference(torch.tensor([scorer[2]], device=DEVICE)).logits[0].cpu()
    plain = _score(scorer, [merge.names[0]])
    assert (expected - plain).abs().max() > 1e-3, "the merge should differ from its first adapter"
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


def test_dare_draws_the_same_masks_each_time_and_others_for_another_merge(world):
    merging = MergingStore(world[1])
    name = Merge.of("dare_linear", [("m1", 1.0), ("m2", 1.0)], density=0.5).name
    first, again = merging.read(name), merging.read(name)
    assert first.version == again.version
    assert all(torch.equal(t, again.tensors[k]) for k, t in first.tensors.items())
    other = merging.read(Merge.of("dare_linear", [("m1", 1.0), ("m2", 1.0)], density=0.51).name)
    assert not all(torch.equal(t, other.tensors[k]) for k, t in first.tensors.items())


def test_a_merge_mixes_with_other_types_in_one_request(scorer, world, monkeypatch, tmp_path):
    model_dir, store = world
    merge = Merge.of("ties", [("m1", 0.7), ("m2", 0.5)], density=0.5)
    ours = _score(scorer, ["oft", merge.name, "loha"])
    peft_merged(model_dir, store, merge, monkeypatch).save_pretrained(tmp_path, selected_adapters=["merged"])
    for name in ("oft", "loha"):
        shutil.copytree(store / name, tmp_path / name)
    expected = reference_logits(model_dir, tmp_path, ["oft", "merged", "loha"], scorer[2])
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


def test_a_merge_is_computed_once_cached_under_the_budget_and_new_when_a_source_changes(world, tmp_path):
    model_dir, source_store = world
    store = tmp_path / "store"
    for name in ("m1", "m2", "oft"):
        shutil.copytree(source_store / name, store / name)
    merging = MergingStore(store)
    reads = []
    original = merging.read
    merging.read = lambda name: reads.append(name) or original(name)
    model, registry = private_model(model_dir, merging, max_loaded=1)
    name = Merge.of("ties", [("m1", 1.0), ("m2", 0.5)], density=0.5).name
    try:
        (merged,) = registry.load_blocking([name])
        assert registry.load_blocking([name]) == [merged] and reads == [name]  # computed once, kept
        info = registry.describe(name)
        assert info["state"] == "loaded" and info["type"] == "LORA" and info["bytes"] == merged.nbytes > 0
        registry.load_blocking(["oft"])  # one adapter at a time: the merge is evicted, least recently used
        assert registry.describe(name)["state"] != "loaded"
        (again,) = registry.load_blocking([name])
        assert again.built.version == merged.built.version and reads == [name, "oft", name]
        tiny.save_adapter(model_dir, SOURCES["m2"][0], store / "m2", seed=7, base_name=model_dir.name, scale=0.5)
        (changed,) = registry.load_blocking([name])  # a new version of a source: a new merge
        assert changed.built.version != merged.built.version and reads == [name, "oft", name, name]
    finally:
        registry.close()


@pytest.mark.parametrize(
    ("merged", "reason"),
    [
        ({"ids": ["m1", "loha"], "merge_strategy": "ties", "density": 0.5}, "loha is LOHA, merges combine LoRA"),
        ({"ids": ["m1", "m3"], "merge_strategy": "ties", "density": 0.5}, "ranks differ (m1: r=4, m3: r=6)"),
        ({"ids": ["m1", "lora.rs-bias"], "merge_strategy": "cat"}, "lora.rs-bias has a LoRA bias"),
        ({"ids": ["m1", "m2"], "merge_strategy": "dare_ties"}, "needs a density in (0, 1]"),
        ({"ids": ["m1", "m2"], "merge_strategy": "ties", "density": 1.5}, "needs a density in (0, 1]"),
        ({"ids": ["m1", "m2"], "merge_strategy": "best"}, "merge_strategy 'best' is not one of"),
        ({"ids": ["m1", "m2"], "weights": [1.0], "merge_strategy": "ties", "density": 0.5}, "2 ids and 1 weights"),
        ({"ids": ["m1", "missing"], "merge_strategy": "cat"}, "missing"),
        ({"ids": ["m1", "m2"], "weights": [1e19, 1.0], "merge_strategy": "cat"}, "finite numbers from -10 to 10"),
    ],
)
def test_what_cannot_be_merged_is_refused_with_the_reason(served, merged, reason):
    """merged_adapters, LoRAX's form; refused with 422 (404 for a missing adapter) and the reason."""
    with served.client() as client:
        response = client.post("/generate", json={"inputs": "x", "parameters": {"merged_adapters": merged}})
    assert response.status_code in (404, 422), response.text
    assert reason in response.text, response.text


@pytest.fixture(scope="module")
def served(serve, llama, world):
    return serve(llama.settings(adapters_dir=world[1], max_batch_size=4))


def test_a_merge_counts_as_its_adapters_against_the_per_request_limit(serve, llama, world):
    limited = serve(llama.settings(adapters_dir=world[1], max_adapters_per_request=1))
    with limited.client() as client:
        response = client.post("/generate", json={"inputs": "x", "adapters": ["merge:cat(m1@1,m2@1)"]})
    assert response.status_code == 422 and "2 adapters requested; at most 1" in response.text, response.text


def test_lorax_merged_adapters_and_the_canonical_name_serve_the_same_merge(served):
    merged = {"ids": ["m1", "m2"], "weights": [0.7, 0.5], "merge_strategy": "ties", "density": 0.5}
    name = "merge:ties(m1@0.7,m2@0.5;density=0.5,majority_sign_method=total)"
    params = {"max_new_tokens": 6, "details": True}
    with served.client() as client:
        lorax = client.post("/generate", json={"inputs": PROMPT, "parameters": {**params, "merged_adapters": merged}})
        native = client.post("/generate", json={"inputs": PROMPT, "adapters": [name, "oft"], "parameters": params})
        header = client.post("/generate", json={"inputs": PROMPT, "parameters": {**params, "adapter_id": name}})
        openai = client.post("/v1/completions", json={"model": f"oft+{name}", "prompt": PROMPT, "max_tokens": 2})
        listed = client.get("/adapters").json()["adapters"]
    assert lorax.status_code == native.status_code == header.status_code == 200, lorax.text + native.text
    assert lorax.headers["x-adapters"] == header.headers["x-adapters"] == name
    assert native.headers["x-adapters"] == openai.headers["x-adapters"] == f"oft+{name}", openai.text
    assert lorax.json()["generated_text"] == header.json()["generated_text"]
    assert any(a["name"] == name and a["type"] == "LORA" and a["tier"] == "device" for a in listed), listed


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("merge:cat(m1@1,m2@1;density=0.5)", "takes no density"),
        (
            "merge:ties(m1@1,m2@1;density=0.5)",
            "is written 'merge:ties(m1@1,m2@1;density=0.5,majority_sign_method=total)'",
        ),
        ("merge:ties(m1,m2;density=0.5)", "each adapter as <name>@<weight>"),
        ("merge:ties(m1@1,m2@1;density=0.5,seed=3)", "unknown option(s) seed"),
        ("merge:cat(m1@1,../m2@1)", "invalid adapter name '../m2'"),
    ],
)
def test_a_merge_name_is_parsed_in_its_canonical_form_only(served, name, reason):
    with served.client() as client:
        response = client.post("/generate", json={"inputs": "x", "adapters": [name]})
    assert response.status_code == 422 and reason in response.json()["error"], response.text
