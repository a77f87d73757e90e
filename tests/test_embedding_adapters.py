"""Adapters on whole modules (server/adapters/modules.py): LoRA on input embeddings, modules_to_save and trainable
tokens, on Llama (untied head), Qwen2 (tied embeddings) and GPT-2 (`wte`), each row of mixed batches held to PEFT;
Gemma's scaled embedding (tied) for the embedding LoRA and token rows only."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from peft import LoHaConfig, LoraConfig, OFTConfig, PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, ByT5Tokenizer, GemmaConfig, GPT2Config, Qwen2Config

from server.adapters.merges import Merge, compute
from server.adapters.store import AdapterStore
from server.config import Settings
from server.demo import tiny
from server.engine.runner import ModelRunner, PromptSequence
from server.errors import AdapterInvalid, ValidationError
from server.model import encode_prompt
from tests.conftest import ATOL, DEVICE, DTYPE, dtype_name, needs_float32, private_model
from tests.reference import reference_greedy, reference_model

BASES = {
    "llama": lambda: tiny.config(hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2, positions=256),
    "qwen2-tied": lambda: tiny.config(
        hidden=64,
        intermediate=96,
        layers=2,
        heads=4,
        kv_heads=2,
        positions=256,
        architecture=Qwen2Config,
        tie_word_embeddings=True,
    ),
    "gpt2": lambda: GPT2Config(
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=256,
        vocab_size=384,
        eos_token_id=1,
        pad_token_id=0,
        bos_token_id=None,
        tie_word_embeddings=False,
    ),
}
GEMMA = lambda: tiny.config(  # embed_scale: the embedding's output times sqrt(hidden)
    hidden=64,
    intermediate=96,
    layers=1,
    heads=4,
    kv_heads=2,
    positions=256,
    architecture=GemmaConfig,
    head_dim=16,
    tie_word_embeddings=True,
)
EMBEDDING = {"llama": "embed_tokens", "qwen2-tied": "embed_tokens", "gpt2": "wte", "gemma-tied": "embed_tokens"}
NORM = {"llama": "norm", "qwen2-tied": "norm", "gpt2": "ln_f", "gemma-tied": "norm"}
ATTN = {"llama": ["q_proj"], "qwen2-tied": ["q_proj"], "gpt2": ["c_attn"], "gemma-tied": ["q_proj"]}


def adapters(arch: str) -> dict:
    emb, attn = EMBEDDING[arch], ATTN[arch]
    found = {
        "emb": (LoraConfig(r=4, lora_alpha=8, target_modules=[emb, *attn], init_lora_weights=False), 0.3),
        "emb-rs": (LoraConfig(r=2, lora_alpha=4, use_rslora=True, target_modules=[emb], init_lora_weights=False), 0.5),
        "copies": (
            LoraConfig(
                r=4,
                lora_alpha=8,
                target_modules=attn,
                modules_to_save=["lm_head", emb, NORM[arch]],
                init_lora_weights=False,
            ),
            0.9,
        ),
        "emb-copy": (
            LoraConfig(r=2, lora_alpha=4, target_modules=attn, modules_to_save=[emb], init_lora_weights=False),
            0.8,
        ),
        "head": (
            LoraConfig(r=2, lora_alpha=4, target_modules=attn, modules_to_save=["lm_head"], init_lora_weights=False),
            1.1,
        ),
        "tokens": (
            LoraConfig(
                r=4, lora_alpha=8, target_modules=attn, trainable_token_indices=[3, 40, 41, 97], init_lora_weights=False
            ),
            0.3,
        ),
        "plain": (LoraConfig(r=4, lora_alpha=8, target_modules=attn, init_lora_weights=False), 0.3),
    }
    if arch == "qwen2-tied":  # PEFT adapts the tied lm_head with the embedding's LoRA (see the test)
        for name, targets in (("emb-tie", [emb, *attn]), ("head-tie", ["lm_head"])):
            found[name] = (
                LoraConfig(
                    r=4, lora_alpha=8, target_modules=targets, ensure_weight_tying=True, init_lora_weights=False
                ),
                0.3,
            )
        norm_tie = LoraConfig(r=2, lora_alpha=4, target_modules=attn, modules_to_save=["norm"], init_lora_weights=False)
        found["norm-tie"] = (dataclasses.replace(norm_tie, ensure_weight_tying=True), 0.8)
    if arch == "gemma-tied":  # what embed_scale touches
        return {name: found[name] for name in ("emb", "tokens")}
    if arch != "gpt2":  # PEFT builds OFT on Linear layers, not on GPT-2's Conv1D
        found["oft"] = (OFTConfig(r=0, oft_block_size=16, target_modules=["v_proj"], init_weights=False), 0.3)
        found["loha"] = (LoHaConfig(r=2, alpha=4, target_modules=["k_proj", "q_proj"], init_weights=False), 1.0)
    return found


_worlds: dict = {}


def _build(arch: str, tmp_path_factory) -> tuple:
    """(arch, model_dir, store): the tiny base and its adapters, built once per session."""
    if arch not in _worlds:
        root = tmp_path_factory.mktemp(arch)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(BASES[arch]() if arch in BASES else GEMMA())
        with torch.no_grad():  # wider logits: clear greedy choices (tied: the embedding too, as the head it is)
            model.get_output_embeddings().weight.mul_(4 if arch.endswith("-tied") else 20)
            if arch == "gemma-tied":  # layers that add as much as the embedding: its scale shows past the last norm
                for layer in model.model.layers:
                    layer.self_attn.o_proj.weight.mul_(10)
                    layer.mlp.down_proj.weight.mul_(10)
        model.save_pretrained(root / "base")
        ByT5Tokenizer().save_pretrained(root / "base")
        for seed, (name, (config, scale)) in enumerate(adapters(arch).items(), start=1):
            tiny.save_adapter(root / "base", config, root / "store" / name, seed=seed, base_name="base", scale=scale)
        _worlds[arch] = (arch, root / "base", root / "store")
    return _worlds[arch]


@pytest.fixture(scope="module", params=list(BASES))
def world(request, tmp_path_factory):
    return _build(request.param, tmp_path_factory)


def _runner(world):
    _, model_dir, store = world
    model, registry = private_model(model_dir, AdapterStore(store))
    return ModelRunner(model, registry.context), registry


PROMPTS = [
    [5, 3, 40, 7, 41, 9, 11, 97, 13, 3, 17, 19, 23, 29, 31, 37, 40, 41],
    [40, 41, 42, 3, 3, 8],
    [97, 2, 3, 40, 6],
]


def _run_batch(world, combos: list[dict], steps: int = 3, cache_scope: bool = False, runner=None, prompts=PROMPTS):
    """Every combination ({name: weight}) as one row of a batch, prefilled and decoded together (greedy); each step's
    logits of each row against PEFT's for that row alone (one PEFT forward per row over the whole text)."""
    _, model_dir, store = world
    runner, registry = runner or _runner(world)
    seqs = []
    for i, combo in enumerate(combos):
        loaded = registry.load_blocking(list(combo)) if combo else []
        scope = repr(sorted(combo.items())).encode() if cache_scope else None
        seq = PromptSequence(prompts[i % len(prompts)], tuple(a.slot for a in loaded), scope)
        seq.weights = tuple(combo[a.name] for a in loaded)
        seqs.append(seq)
    ours = [[] for _ in seqs]
    logits = runner.prefill(seqs)
    for step in range(steps + 1):
        for seq, row, mine in zip(seqs, logits, ours, strict=True):
            mine.append(row.cpu())
            seq.tokens.append(int(row.argmax()))
        if step < steps:
            logits = runner.decode()
    base = reference_model(model_dir, store, [])
    for seq, combo, mine in zip(seqs, combos, ours, strict=True):
        runner.release(seq)
        ids = seq.request.prompt_ids + seq.tokens[:-1]
        weights = {n: w for n, w in combo.items() if w != 1}
        with torch.no_grad():
            expected = reference_model(model_dir, store, list(combo), weights=weights)(
                torch.tensor([ids], device=DEVICE)
            )
        expected = expected.logits[0, len(seq.request.prompt_ids) - 1 :].cpu()
        assert (torch.stack(mine) - expected).abs().max() <= ATOL, combo
        if combo:  # the adapters move this row's logits: a row left on the base would not pass unseen
            with torch.no_grad():
                alone = base(torch.tensor([ids], device=DEVICE)).logits[0, len(seq.request.prompt_ids) - 1 :].cpu()
            assert (alone - expected).abs().max() > 1e-3, combo
    return runner, registry


def test_module_adapters_alone_and_beside_rows_without_them(world):
    _run_batch(
        world, [{"emb": 1.0}, {}, {"copies": 1.0}, {"tokens": 1.0}, {"head": 1.0}, {"plain": 1.0}, {"emb-copy": 1.0}]
    )


def test_module_adapters_mixed_with_other_types_and_weights(world):
    arch = world[0]
    other = "oft" if arch != "gpt2" else "plain"
    _run_batch(
        world,
        [
            {"emb": 0.5, other: 1.0},
            {"emb-rs": -1.5, "emb": 1.0},
            {"copies": 1.0, other: 1.0},
            {"tokens": 1.0, other: 0.7},
            {},
            {"head": 1.0, "emb": 2.0},
            {"tokens": 1.0, "loha": 0.5, "oft": 1.0} if arch != "gpt2" else {"tokens": 1.0, "plain": 0.5},
            {"emb": 1.0, "loha": 1.0, "oft": -0.5} if arch != "gpt2" else {"emb": -1.0},
        ],
    )


def test_module_adapters_with_prefix_caching(world):
    """The same prompt under the base and under each adapter, twice: the second time each row finds its own
    combination's blocks cached (an embedding adapter changes every layer's keys and values) and still gets its
    own answer."""
    combos = [{}, {"emb": 1.0}, {"tokens": 1.0}, {"copies": 1.0}]
    shared = [PROMPTS[0] + PROMPTS[1] + PROMPTS[2]]  # 29 tokens: one full block to cache
    runner = _run_batch(world, combos, steps=1, cache_scope=True, prompts=shared)
    assert runner[0].prefix_cache and runner[0].prefix_hit_tokens == 0
    _run_batch(world, combos, steps=1, cache_scope=True, runner=runner, prompts=shared)
    assert runner[0].prefix_hit_tokens == 16 * len(combos)


def test_gemma_scaled_embedding(tmp_path_factory):
    """Gemma multiplies its embedding's output by embed_scale: PEFT scales an embedding LoRA's delta and the
    trainable tokens' replaced rows by it too."""
    _run_batch(_build("gemma-tied", tmp_path_factory), [{"emb": 1.0}, {}, {"tokens": 1.0}, {"emb": -0.5}])


def test_tied_embeddings_with_ensure_weight_tying(tmp_path_factory):
    """LoRA targeting a tied embedding with ensure_weight_tying=True: PEFT adapts both the input embedding and lm_head
    (with the embedding's A and B, transposed) and saves both; the row is held to PeftModel's answer (PeftMixedModel
    does not tie), beside a row without it. A saved norm with ensure_weight_tying involves no tied module: served."""
    world = _build("qwen2-tied", tmp_path_factory)
    _, model_dir, store = world
    runner, registry = _runner(world)
    ids = torch.tensor([PROMPTS[0]] * 2)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPE).eval()
    with torch.no_grad():
        alone = base.to(DEVICE)(ids.to(DEVICE)).logits[0].cpu()
    for name in ("emb-tie", "head-tie", "norm-tie"):
        (adapter,) = registry.load_blocking([name])
        ours = runner.score(ids, [(adapter.slot,), ()]).cpu()
        reference = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPE), store / name
        ).eval()
        if name != "norm-tie":
            assert hasattr(reference.base_model.model.lm_head, "lora_A"), "PEFT tied no LoRA to lm_head"
        with torch.no_grad():
            expected = reference.to(DEVICE)(ids[:1].to(DEVICE)).logits[0].cpu()
        assert (ours[0] - expected).abs().max() <= ATOL, name
        assert (ours[1] - alone).abs().max() <= ATOL, name
        assert (alone - expected).abs().max() > 1e-3, name


def test_replaced_modules_at_weight_one_alone_and_counted_whole(tmp_path_factory):
    """A module that an adapter replaces serves at weight 1 and with no other adapter on it; a saved lm_head and
    embedding are vocab x hidden each, what the residency budget counts (tied: two copies). One architecture: neither
    depends on it."""
    from server.adapters.modules import check_combination

    runner, registry = _runner(_build("qwen2-tied", tmp_path_factory))
    copies, head, emb = registry.load_blocking(["copies", "head", "emb"])
    with pytest.raises(ValidationError, match="weight must be 1"):
        check_combination([head], [0.5])
    with pytest.raises(ValidationError, match="also change it"):
        check_combination([copies, head], [1.0, 1.0])
    with pytest.raises(ValidationError, match="also change it"):
        check_combination([copies, emb], [1.0, 1.0])
    check_combination([head, emb], [1.0, 0.5])
    vocab, hidden = runner.model.get_output_embeddings().weight.shape
    assert copies.nbytes >= 2 * vocab * hidden * runner.model.dtype.itemsize


def _resave(world, name: str, new: str, edit) -> str:
    _, _, store = world
    (store / new).mkdir(exist_ok=True)
    config = json.loads((store / name / "adapter_config.json").read_text())
    tensors = load_file(store / name / "adapter_model.safetensors")
    edit(config, tensors)
    (store / new / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, store / new / "adapter_model.safetensors")
    return new


def test_refusals_say_why(world):
    arch = world[0]
    emb = EMBEDDING[arch]
    prefix = "base_model.model." + ("transformer." if arch == "gpt2" else "model.")
    key = f"{prefix}{emb}.base_layer.weight"

    def other_base(config, tensors):  # (PEFT saves the base embedding of embed_tokens, not of GPT-2's wte)
        tensors[key] = torch.randn(384, 64)

    def resized(config, tensors):
        tensors[key] = torch.randn(388, 64)

    def resized_copy(config, tensors):
        k = f"{prefix}{emb}.weight"
        tensors[k] = torch.cat([tensors[k], tensors[k][:4]])

    def nan_in_head(config, tensors):
        tensors["base_model.model.lm_head.weight"][3, 5] = float("nan")

    def loha_on_embedding(config, tensors):
        config.update(peft_type="LOHA", alpha=4, target_modules=[emb])

    cases = {
        _resave(world, "emb", "emb.other-base", other_base): "differs from the served base",
        _resave(world, "emb", "emb.resized", resized): "expects a base model with 388 tokens, the served one has 384",
        _resave(world, "copies", "copies.resized", resized_copy): "resized vocabulary",
        _resave(
            world, "emb", "emb.loha", loha_on_embedding
        ): "^adapter .emb.loha.: LOHA on the embedding .* is not served",
        _resave(world, "head", "head.nan", nan_in_head): "lm_head: the saved copy or token rows contain NaN",
    }
    if arch == "qwen2-tied":
        tying = _resave(
            world, "tokens", "tokens.tying", lambda config, tensors: config.update(ensure_weight_tying=True)
        )
        cases[tying] = "re-save the adapter with ensure_weight_tying=False"
    _, registry = _runner(world)
    for name, reason in cases.items():
        with pytest.raises(AdapterInvalid, match=reason):
            registry.load_blocking([name])
    assert registry.load_blocking(["emb"])  # the server keeps serving


def test_merges_refuse_module_adapters_with_the_reason(world):
    store = AdapterStore(world[2])
    merge = Merge.parse("merge:ties(copies@1,plain@1;density=0.5,majority_sign_method=total)")
    with pytest.raises(ValidationError, match="they have no delta to merge"):
        merge.check_configs({n: store.read(n).config for n in merge.names})
    merge = Merge.parse("merge:cat(emb-rs@1,plain@1)")
    with pytest.raises(ValidationError, match=f"LoRA on the embedding .*{EMBEDDING[world[0]]}"):
        compute(merge, {n: store.read(n) for n in merge.names})


@needs_float32("greedy tokens equal the reference's")
def test_served_over_http_with_prefix_caching(serve, tmp_path_factory):
    """The real server (prefix cache on), on the tied model (the runner tests above hold every architecture): a long
    prompt under the base, then under each module adapter, each equal to PEFT's greedy answer; what cannot be
    composed is a 422 with the reason, refused before its adapters are made resident (two at most: a refused one
    would have evicted a resident one), and the server keeps serving."""
    _, model_dir, store = _build("qwen2-tied", tmp_path_factory)
    server = serve(
        Settings(
            model=str(model_dir), adapters_dir=store, device=DEVICE, dtype=dtype_name(DTYPE), max_loaded_adapters=2
        )
    )
    registry = server.state.engine.registry
    prompt = "A prompt long enough to fill two blocks of the cache, then some."
    tokenizer = server.state.tokenizer
    ids = encode_prompt(tokenizer, prompt)
    with server.client() as client:
        for names in ([], ["emb"], ["tokens"], ["copies"], ["head", "emb"], []):
            body = {"inputs": prompt, "adapters": names, "parameters": {"max_new_tokens": 6, "details": True}}
            response = client.post("/generate", json=body)
            assert response.status_code == 200, response.text
            tokens = [t["id"] for t in response.json()["details"]["tokens"]]
            assert tokens == reference_greedy(model_dir, store, names, ids, 6)[: len(tokens)], names
        resident = {a.name for a in registry.loaded()}
        assert resident == {"head", "emb"}
        for adapters, reason in (([{"name": "head", "weight": 0.5}], "weight must be 1"), (["copies", "head"], "also")):
            response = client.post("/generate", json={"inputs": prompt, "adapters": adapters})
            assert response.status_code == 422 and reason in response.json()["error"], response.text
            assert set(response.json()) == {"error", "error_type"}
            assert {a.name for a in registry.loaded()} == resident
    assert server.state.engine.runner.prefix_hit_tokens > 0  # the last request found the first one's blocks


def test_evicted_and_reloaded_module_adapters_answer_the_same(world):
    """One adapter resident at a time: each load evicts the other to the host tier, and it comes back the same."""
    _, model_dir, store = world
    model, registry = private_model(model_dir, AdapterStore(store), max_loaded=1, host_cache=2**30)
    runner = ModelRunner(model, registry.context)
    ids = torch.tensor([PROMPTS[0]])
    first = {}
    for name in ["copies", "emb", "tokens", "copies", "emb", "tokens"]:
        (adapter,) = registry.load_blocking([name])
        logits = runner.score(ids, [(adapter.slot,)])[0].cpu()
        assert len(registry.loaded()) == 1
        if name in first:
            assert torch.equal(logits, first[name]), name
        else:
            first[name] = logits
            with torch.no_grad():
                expected = reference_model(model_dir, store, [name])(ids.to(DEVICE)).logits[0].cpu()
            assert (logits - expected).abs().max() <= ATOL, name
