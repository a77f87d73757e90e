"""Bad adapters on disk: each refused with a clear 4xx naming the reason; the model keeps no trace; serving goes on."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoHaConfig, LoraConfig, PrefixTuningConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, ByT5Tokenizer, LlamaConfig

from server.adapters.build import _check_rank
from server.adapters.kinds import KINDS
from server.adapters.kinds.base import LayerShape
from server.adapters.kinds.lora import LoraLayer
from server.adapters.mixing import MixedLinear
from server.adapters.store import AdapterStore
from server.demo.tiny import save_adapter
from server.engine.runner import ModelRunner
from server.errors import AdapterInvalid
from server.model import encode_prompt
from tests.conftest import private_model
from tests.reference import reference_greedy

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def _copy(store: Path, source: str, name: str) -> Path:
    shutil.copytree(store / source, store / name)
    return store / name


def _edit_weights(folder: Path, edit) -> None:
    tensors = load_file(folder / WEIGHTS)
    edit(tensors)
    save_file(tensors, folder / WEIGHTS)


def _save_peft(model_dir: Path, config, out: Path) -> None:
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
    model.save_pretrained(out)


@pytest.fixture(scope="module")
def broken(llama, tmp_path_factory) -> Path:
    """A store holding the good adapters of `llama` and one broken adapter per failure mode."""
    root = tmp_path_factory.mktemp("broken")
    store = root / "store"
    shutil.copytree(llama.store, store)

    (_copy(store, "lora", "no-config") / CONFIG).unlink()
    (_copy(store, "lora", "no-weights") / WEIGHTS).unlink()
    folder = _copy(store, "lora", "truncated")
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])
    (_copy(store, "lora", "garbage") / WEIGHTS).write_bytes(os.urandom(4096))
    (_copy(store, "lora", "bad-json") / CONFIG).write_text("{not json")
    folder = _copy(store, "lora", "unknown-type")
    (folder / CONFIG).write_text(json.dumps({**json.loads((folder / CONFIG).read_text()), "peft_type": "FOO"}))
    _edit_weights(_copy(store, "lora", "nan"), lambda t: next(iter(t.values())).fill_(float("nan")))
    _edit_weights(
        _copy(store, "lora", "missing-module"), lambda t: [t.pop(k) for k in list(t) if ".layers.1.mlp.down_proj." in k]
    )
    # fails on the last module only: everything before it would have been attached by a naive loader
    _edit_weights(
        _copy(store, "lora", "wrong-shape-last"),
        lambda t: t.update({k: torch.zeros(7, 4) for k in t if ".layers.1.mlp.down_proj.lora_B" in k}),
    )
    folder = _copy(store, "lora", "pickle-only")
    torch.save(load_file(folder / WEIGHTS), folder / "adapter_model.bin")
    (folder / WEIGHTS).unlink()

    _save_peft(
        llama.model_dir,
        IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
        store / "ia3",
    )
    _save_peft(llama.model_dir, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), store / "prefix")
    folder = _copy(store, "lora", "alora")  # activated LoRA: a variant whose forward is not LoRA's
    (folder / CONFIG).write_text(
        json.dumps({**json.loads((folder / CONFIG).read_text()), "alora_invocation_tokens": [5]})
    )
    save_adapter(
        llama.model_dir,
        LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["mlp"]),
        store / "saves-a-block",
        1,
        "x",
    )
    # over the default MIXSERVE_MAX_LORA_RANK (64)
    save_adapter(llama.model_dir, LoraConfig(r=65, target_modules=["q_proj", "down_proj"]), store / "rank-65", 1, "x")
    save_adapter(
        llama.model_dir, LoraConfig(r=65, target_modules=["q_proj"], lora_bias=True), store / "rank-65-bias", 1, "x"
    )
    folder = _copy(store, "lora", "not-linear")
    (folder / CONFIG).write_text(json.dumps({**json.loads((folder / CONFIG).read_text()), "target_modules": ["mlp"]}))

    other = root / "other-base"
    tokenizer = ByT5Tokenizer()
    AutoModelForCausalLM.from_config(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    ).save_pretrained(other)
    save_adapter(other, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), store / "other-base", 1, "x")

    outside = root / "outside"
    shutil.copytree(llama.store / "lora", outside)
    (store / "escape").symlink_to(outside, target_is_directory=True)
    (store / "alias").symlink_to(store / "lora", target_is_directory=True)  # inside the store: fine
    return store


# 422: the adapter cannot be served as it is (names, files, config, type, fit to the base); 424: reading it failed
CASES = {
    "no-config": (422, "adapter_config.json is missing"),
    "no-weights": (422, "adapter_model.safetensors is missing"),
    "truncated": (424, "cannot read adapter_model.safetensors"),
    "garbage": (424, "cannot read adapter_model.safetensors"),
    "bad-json": (422, "cannot read adapter_config.json"),
    "unknown-type": (422, "adapter type 'FOO' cannot be mixed; supported types: SHIRA, OFT, LORA, ADALORA, LOHA, LOKR"),
    "ia3": (422, "adapter type 'IA3' cannot be mixed"),
    "prefix": (422, "adapter type 'PREFIX_TUNING' cannot be mixed"),
    "nan": (422, "NaN or infinity"),
    "missing-module": (422, "no weights for targeted module(s) model.layers.1.mlp.down_proj"),
    "wrong-shape-last": (422, "model.layers.1.mlp.down_proj: lora_B.weight has shape (7, 4), the base layer needs"),
    "pickle-only": (422, "set MIXSERVE_ALLOW_PICKLE=1"),
    "alora": (422, "alora_invocation_tokens: a LoRA variant whose forward pass is not LoRA's"),
    "saves-a-block": (422, "modules_to_save: model.layers.0.mlp is a block of layers (LlamaMLP)"),
    "not-linear": (422, "only Linear, Conv1D and (for LoRA) Embedding layers are supported"),
    "rank-65": (422, ": LORA rank 65 exceeds MIXSERVE_MAX_LORA_RANK (64)"),
    "rank-65-bias": (422, ": LORA rank 65 exceeds MIXSERVE_MAX_LORA_RANK (64)"),  # not pooled: capped all the same
    "other-base": (422, "does not fit the base model at model.layers.0.self_attn.q_proj"),
    "escape": (422, "resolves outside the adapter store"),
    "../lora": (422, "invalid adapter name"),
    "..": (422, "invalid adapter name"),
    "/etc": (422, "invalid adapter name"),
    "a/b": (404, "adapter 'a/b' not found"),  # a namespaced name: valid, not in the store
    "a//b": (422, "invalid adapter name"),
    "a/../lora": (422, "invalid adapter name"),
    "a/b/c/d/e": (422, "invalid adapter name"),  # namespaces nest 4 deep at most
    "lora/": (422, "invalid adapter name"),
    "": (422, "invalid adapter name"),
    "not-there": (404, "adapter 'not-there' not found"),
}


@pytest.fixture(scope="module")
def server(serve, llama, broken):
    return serve(llama.settings(adapters_dir=broken))


@pytest.mark.parametrize("name", CASES, ids=lambda n: n or "empty")
def test_bad_adapter_is_refused_and_leaves_no_trace(server, llama, name):
    status, reason = CASES[name]
    with server.client() as client:
        response = client.post(
            "/generate", json={"inputs": "Hi", "adapters": [name], "parameters": {"max_new_tokens": 2}}
        )
        assert response.status_code == status, response.text
        body = response.json()
        assert reason in body["error"], body
        assert set(body) == {"error", "error_type"}
        assert not any(isinstance(m, MixedLinear) for m in server.state.engine.model.modules())
        listed = client.get("/adapters").json()["adapters"]
        assert all(a["state"] == "error" and not a["loaded"] for a in listed), listed
        if status == 424:
            assert next(a for a in listed if a["name"] == name)["error"] == body["error"]
        ok = client.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 4}})
        assert ok.status_code == 200
    ids = encode_prompt(server.state.tokenizer, "Hi")
    expected = reference_greedy(llama.model_dir, llama.store, [], ids, 4)
    assert ok.json()["generated_text"] == server.state.tokenizer.decode(expected, skip_special_tokens=True)


def test_symlink_inside_the_store_and_listing_with_errors(server):
    with server.client() as client:
        assert (
            client.post(
                "/generate", json={"inputs": "Hi", "adapters": ["alias"], "parameters": {"max_new_tokens": 2}}
            ).status_code
            == 200
        )
        listed = {a["name"]: a for a in client.get("/adapters", params={"all": "true"}).json()["adapters"]}
        assert listed["alias"]["loaded"] is True
        assert listed["bad-json"]["loaded"] is False and "cannot read" in listed["bad-json"]["error"]
        assert listed["ia3"]["type"] == "IA3"
        assert "escape" in listed


def test_pickle_loads_when_allowed_and_matches_safetensors(llama, broken):
    model, registry = private_model(llama.model_dir, AdapterStore(broken, allow_pickle=True))
    runner = ModelRunner(model, registry.context)
    ids = torch.tensor([[5, 6, 7, 8]])
    from_pickle = runner.score(ids, [tuple(a.slot for a in registry.load_blocking(["pickle-only"]))])
    from_safetensors = runner.score(ids, [tuple(a.slot for a in registry.load_blocking(["lora"]))])
    assert torch.equal(from_pickle, from_safetensors)


def test_the_rank_cap_builds_a_loha_over_it_dense_and_names_a_merges_rank():
    shape, r = LayerShape(256, 256), 9  # 81 ranks: pooled (factorised) where it is cheaper, unless over the cap
    tensors = {"hada_w1_a": torch.randn(256, r), "hada_w1_b": torch.randn(r, 256)}
    tensors |= {"hada_w2_a": torch.randn(256, r), "hada_w2_b": torch.randn(r, 256)}
    config = LoHaConfig(r=r, alpha=r, target_modules=["q_proj"])
    pooled = KINDS["LOHA"].build(config, "q_proj", shape, tensors, torch.float32)
    dense = KINDS["LOHA"].build(config, "q_proj", replace(shape, max_pooled_ranks=64), tensors, torch.float32)
    assert pooled.low_rank is not None and dense.low_rank is None
    x = torch.randn(3, 256)
    torch.testing.assert_close(dense.delta(x), pooled.delta(x), atol=1e-4, rtol=1e-5)
    _check_rank("loha", KINDS["LOHA"], "q_proj", dense, 64)  # served
    merged = LoraLayer(torch.randn(80, 256), torch.randn(256, 80), None, 1.0)
    with pytest.raises(AdapterInvalid, match=r"rank 80 \(a merge's: cat adds its sources' ranks.*ask the operator"):
        _check_rank("merge:cat(a@1,b@1)", KINDS["LORA"], "q_proj", merged, 64)
