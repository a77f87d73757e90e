"""DoRA, trained biases (bias='lora_only' / 'all') and LoRA on the output embedding, per row, against PEFT: rows
carrying them beside rows that do not, in one batch, at weights (docs/contract.md), and through prefill, decode and
the prefix cache; and the refusals of what is not served, each with its reason."""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil

import httpx
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import LoraLayer
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, ByT5Tokenizer, Qwen2Config

from server.adapters.merges import Merge
from server.adapters.store import AdapterStore
from server.config import Settings
from server.demo import tiny
from server.engine.runner import ModelRunner, PromptSequence
from server.errors import AdapterInvalid, ValidationError
from server.model import encode_prompt
from tests.conftest import ATOL, DEVICE, DTYPE, dtype_name, greedy_logits, needs_float32, private_model
from tests.families import build_family
from tests.reference import canonical, reference_greedy, reference_model

IDS = [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]
SYSTEM = [3 + (11 * j) % 200 for j in range(40)]  # two full blocks (16 tokens each) and 8 tokens


def _dora(targets, **extra) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=targets, init_lora_weights=False, **extra)


def _lora(targets, **extra) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **extra)


# family -> {adapter: config}; and which adapters of the family's usual store join them
ADAPTERS = {
    "llama": {
        "dora": _dora(["q_proj", "v_proj", "down_proj"]),
        "dora.b": LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["q_proj", "o_proj", "up_proj"]),
    },
    # Qwen2: biases on q, k and v
    "qwen2": {
        "dora.bias": _dora(["q_proj", "k_proj", "o_proj"], bias="lora_only"),
        "lora.bias-all": _lora(["v_proj", "o_proj"], bias="all"),  # q's and k's biases saved as untargeted `.bias`
        "lora.head": _lora(["q_proj", "lm_head"]),  # saves lm_head.base_layer.weight
        "lora.mlp": _lora(["gate_proj", "up_proj"]),
    },
    "qwen2-tied": {
        "lora.head": _lora(["v_proj", "lm_head"]),
        "dora.head": _dora(["q_proj", "lm_head"]),
    },
    "gpt2": {"dora": _dora(["c_attn", "c_fc"], bias="lora_only", fan_in_fan_out=True)},
}
JOINING = {
    "llama": ["lora", "oft", "adalora", "loha", "shira", "lokr"],
    "qwen2": ["lora", "oft", "lokr"],
    "gpt2": ["lora", "adalora"],
}

COMBINATIONS = {
    "llama": [
        [],
        ["dora"],
        ["lora"],
        ["lora", "dora"],  # in one LoRA wrapper, the plain LoRA first: DoRA rescales it too (as in PEFT)
        ["dora", "lora"],
        ["dora", "dora.b"],
        ["oft", "dora", "adalora"],
        ["shira", "dora.b", "loha"],
    ],
    "qwen2": [
        [],
        ["dora.bias"],
        ["lora.bias-all"],
        ["lora.head"],
        ["oft", "dora.bias"],
        ["lora.mlp", "lora.bias-all"],
        ["lora", "lora.head", "dora.bias"],
    ],
    "qwen2-tied": [[], ["lora.head"], ["dora.head"], ["lora.head", "dora.head"]],
    "gpt2": [[], ["dora"], ["lora", "dora"], ["dora", "adalora"], ["lora"]],
}


def _save(model_dir, config: LoraConfig, out, seed: int) -> None:
    """Weights as training leaves them: A and B small, DoRA's magnitudes off the norms, trained biases moved."""
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.05 * torch.randn_like(param))
            elif "lora_" in name:
                param.mul_(0.15)
            elif param.requires_grad and name.endswith("bias"):
                param.add_(0.05 * torch.randn_like(param))
    tiny.save_peft(model, out, "x")


def _tied_qwen2(directory):
    torch.manual_seed(0)
    config = tiny.config(
        hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2, positions=256, architecture=Qwen2Config
    )
    config.tie_word_embeddings = True
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    model.save_pretrained(directory)
    ByT5Tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def worlds(world_factory, tmp_path_factory):
    """worlds(family) -> (model folder, store, runner, registry), built once per family."""
    built: dict = {}

    def make(family: str):
        if family not in built:
            root = tmp_path_factory.mktemp(f"dora-{family}")
            store = root / "store"
            store.mkdir()
            if family in ("llama", "qwen2"):
                world = world_factory(family)
                model_dir, source = world.model_dir, world.store
            elif family == "gpt2":
                model_dir, source, _ = build_family(root, "gpt2")
            else:
                model_dir, source = _tied_qwen2(root / "qwen2-tied"), None
            for name in JOINING.get(family, []):
                shutil.copytree(source / name, store / name)
            for seed, (name, config) in enumerate(ADAPTERS[family].items(), start=11):
                _save(model_dir, config, store / name, seed)
            built[family] = (model_dir, store, *_runner(model_dir, store))
        return built[family]

    return make


def _runner(model_dir, store):
    model, registry = private_model(model_dir, AdapterStore(store))
    return ModelRunner(model, registry.context), registry


def _load(registry, store, weights: dict) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """(slots, weights) of a combination, in canonical order."""
    names = canonical(store, list(weights))
    adapters = registry.load_blocking(names)
    return tuple(a.slot for a in adapters), tuple(weights[a.name] for a in adapters)


def _hooked(model, store, weights: dict, model_dir):
    """model (PEFT's, canonical order) with each DoRA adapter at a weight w other than 1 computing
    r + w * (DoRA(r) - r) (docs/contract.md), and each trained bias b' at w as b + w * (b' - b) (b: the base's)."""
    names = canonical(store, list(weights))
    base = dict(AutoModelForCausalLM.from_pretrained(model_dir).named_parameters())
    for i, name in enumerate(names):
        w, internal = weights[name], f"a{i}"
        config = json.loads((store / name / "adapter_config.json").read_text())
        if w == 1 or config["peft_type"] != "LORA":
            continue
        if config.get("use_dora"):
            for module in model.modules():
                if isinstance(module, LoraLayer) and internal in module.lora_magnitude_vector:
                    assert list(module.lora_A) == [internal], "the hook takes the whole LoRA wrapper"
                    module.register_forward_hook(lambda m, args, out, w=w: (r := m.base_layer(args[0])) + w * (out - r))
        if config.get("bias", "none") != "none":
            with torch.no_grad():
                for key, param in model.named_parameters():
                    plain = key.removeprefix("base_model.model.").replace(".base_layer", "")
                    if key.endswith(".bias") and plain in base and not torch.equal(param.cpu(), base[plain]):
                        param.copy_(base[plain].to(param) + w * (param - base[plain].to(param)))
    return model


@torch.no_grad()
def _reference(model_dir, store, ids: list[int], weights: dict) -> torch.Tensor:
    """PEFT's logits of ids for the combination at its weights: the additive types scaled as tests/reference.py
    does (LoRA's A and B with trained biases too), DoRA and trained biases as _hooked."""
    names = list(weights)
    scaled = {n: w for n, w in weights.items() if not _is_dora(store, n)}
    model = reference_model(model_dir, store, names, DTYPE, scaled)
    model = _hooked(model, store, weights, model_dir) if names else model
    return model(torch.tensor([ids], device=DEVICE)).logits[0].cpu()


def _is_dora(store, name: str) -> bool:
    return bool(json.loads((store / name / "adapter_config.json").read_text()).get("use_dora"))


@pytest.mark.parametrize("family", list(COMBINATIONS))
def test_every_row_of_a_mixed_batch_equals_peft(worlds, family):
    model_dir, store, runner, registry = worlds(family)
    combos = COMBINATIONS[family]
    loaded = [_load(registry, store, dict.fromkeys(names, 1.0)) for names in combos]
    ours = runner.score(torch.tensor([IDS] * len(combos)), [slots for slots, _ in loaded]).cpu()
    base = _reference(model_dir, store, IDS, {})
    for names, row in zip(combos, ours, strict=True):
        expected = _reference(model_dir, store, IDS, dict.fromkeys(names, 1.0))
        if names:
            assert (expected - base).abs().max() > 1e-2, f"{names} should change the output"
        torch.testing.assert_close(row, expected, atol=ATOL, rtol=0, msg=lambda m, n=names: f"{n}: {m}")


@pytest.mark.parametrize(
    "family, name", [("llama", "dora"), ("qwen2", "dora.bias"), ("qwen2", "lora.bias-all"), ("gpt2", "dora")]
)
def test_alone_equals_peft_model(worlds, family, name):
    """The adapter alone through PeftModel (not the mixed model): PeftModel.from_pretrained replaces the biases."""
    model_dir, store, runner, registry = worlds(family)
    slots, _ = _load(registry, store, {name: 1.0})
    ours = runner.score(torch.tensor([IDS]), [slots])[0].cpu()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPE), store / name)
    with torch.no_grad():
        expected = model.eval().to(DEVICE)(torch.tensor([IDS], device=DEVICE)).logits[0].cpu()
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "family, name", [("llama", "dora"), ("qwen2", "dora.bias"), ("qwen2", "lora.bias-all"), ("qwen2", "lora.head")]
)
def test_weights(worlds, family, name):
    """w = 0 is the base, w = 1 PEFT's, others docs/contract.md's definition; rows at several weights in one batch,
    beside an OFT row of the same adapter at another weight."""
    model_dir, store, runner, registry = worlds(family)
    rows = [{name: 0.0}, {name: 1.0}, {name: 0.5}, {name: -0.7}, {"oft": 1.0, name: 0.25}]
    loaded = [_load(registry, store, {n: w for n, w in r.items() if w}) for r in rows]
    ours = runner.score(torch.tensor([IDS] * len(rows)), [s for s, _ in loaded], [w for _, w in loaded]).cpu()
    torch.testing.assert_close(ours[0], _reference(model_dir, store, IDS, {}), atol=ATOL, rtol=0)
    for weights, row in zip(rows[1:], ours[1:], strict=True):
        torch.testing.assert_close(row, _reference(model_dir, store, IDS, weights), atol=ATOL, rtol=0)


# Rows joining one a step while the oldest leaves (the batch's composition changes at every decode step, so every
# layer's plan is built anew from the plan shared by the layers with the same adapters): DoRA and trained biases at
# weights, beside OFT, LoKr at weights (each row's factors selected from its layer's stacks) and the other types. A
# DoRA adapter at a weight other than 1 has its LoRA wrapper to itself (the reference's hook takes the whole wrapper).
CHANGING = {
    "llama": [
        {"dora": 0.5, "lokr": 0.7},
        {"oft": -0.6, "dora.b": -0.7, "loha": 1.0},
        {},
        {"lora": 1.0, "dora": 1.0, "lokr": -1.5},
        {"oft": 1.0, "dora": 1.0, "dora.b": 1.0, "lokr": 1.0},
        {"shira": 1.0, "dora": -0.4, "adalora": 1.0, "lokr": 0.25},
    ],
    "qwen2": [
        {"dora.bias": 0.5, "lokr": 0.7},
        {"oft": -0.6, "lora.bias-all": 0.5},
        {},
        {"lora": 1.0, "dora.bias": 1.0, "lokr": -1.5},
        {"oft": 1.0, "lora.bias-all": 1.0, "lokr": 1.0, "lora.mlp": 1.0},
        {"dora.bias": -0.4, "lora.mlp": 1.0, "lokr": 0.25},
    ],
}


@pytest.mark.parametrize("family", list(CHANGING))
def test_rows_stay_peft_s_while_the_batch_changes_at_every_decode_step(worlds, family):
    model_dir, store, runner, registry = worlds(family)
    pending = list(enumerate(CHANGING[family]))
    running: list[tuple[PromptSequence, dict, list[torch.Tensor]]] = []
    done: list[tuple[PromptSequence, dict, list[torch.Tensor]]] = []
    compositions = []
    for _ in range(len(CHANGING[family]) + 2):  # the last steps only take rows out, down to one
        if len(running) > 2 or (not pending and len(running) > 1):
            done.append(running.pop(0))
            runner.release(done[-1][0])
        if pending:
            i, weights = pending.pop(0)
            slots, row_weights = _load(registry, store, weights)
            seq = PromptSequence(SYSTEM[: 9 + 5 * i], slots)
            seq.weights = row_weights
            logits = runner.prefill([seq])[0].cpu()
            seq.tokens.append(int(logits.argmax()))
            running.append((seq, weights, [logits]))
        compositions.append(tuple(id(seq) for seq, _, _ in running))
        for (seq, _, seen), row in zip(running, runner.decode().cpu(), strict=True):
            seen.append(row)
            seq.tokens.append(int(row.argmax()))
    for seq, _, _ in running:
        runner.release(seq)
    assert all(a != b for a, b in itertools.pairwise(compositions)), compositions
    for seq, weights, seen in done + running:
        prompt = seq.request.prompt_ids
        expected = _reference(model_dir, store, prompt + seq.tokens[:-1], weights)[len(prompt) - 1 :]
        torch.testing.assert_close(torch.stack(seen), expected, atol=ATOL, rtol=0, msg=lambda m, w=weights: f"{w}: {m}")
        assert seq.tokens == expected.argmax(-1).tolist(), weights


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_decode_steps_with_the_prefix_cache_equal_peft(worlds, family):
    """Prefill, then decode steps (where the low-rank parts come from the rank pool), with a prompt's first blocks
    cached by an earlier request of the same combination: every row equals PEFT's logits at every step."""
    model_dir, store, runner, registry = worlds(family)
    dora = "dora" if family == "llama" else "dora.bias"
    mix = {"oft": 1.0, dora: 0.5}
    rows = [
        (mix, SYSTEM + [9, 8, 7]),
        ({}, SYSTEM[:20]),
        ({dora: 1.0}, SYSTEM[:25]),
        ({"lora": 1.0}, SYSTEM[:12]),
        ({"lora": 1.0, dora: 1.0}, SYSTEM[:30]),
    ]
    if family == "qwen2":
        rows.append(({"lora.bias-all": -0.5, "lora.head": 1.0}, SYSTEM[:18]))

    def sequence(weights: dict, prompt: list[int]) -> PromptSequence:
        slots, row_weights = _load(registry, store, weights)
        seq = PromptSequence(prompt, slots, json.dumps(weights, sort_keys=True).encode())
        seq.weights = row_weights
        return seq

    assert runner.prefix_cache
    greedy_logits(runner, [sequence(mix, SYSTEM + [1, 2])], 1)
    hits = runner.prefix_hit_tokens
    seqs = [sequence(w, p) for w, p in rows]
    logits = greedy_logits(runner, seqs, 4)
    assert runner.prefix_hit_tokens > hits
    for (weights, prompt), ours, seq in zip(rows, logits, seqs, strict=True):
        expected = _reference(model_dir, store, prompt + seq.tokens[:-1], weights)[len(prompt) - 1 :]
        torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0, msg=lambda m, w=weights: f"{w}: {m}")


def test_two_trained_biases_on_one_layer_add_their_deltas(worlds):
    """PEFT keeps one bias per layer (the adapter loaded last wins, for every request): mixserve adds each row's
    adapters' bias deltas (docs/contract.md), which equals PEFT where only one adapter carries a layer's bias."""
    _, store, runner, registry = worlds("qwen2")
    rows = [{"lora.bias-all": 1.0}, {"dora.bias": 1.0}, {"lora.bias-all": 1.0, "dora.bias": 1.0}, {}]
    slots = tuple(_load(registry, store, r)[0] for r in rows)
    k_proj = "model.layers.0.self_attn.k_proj"  # lora.bias-all trains its bias only; dora.bias is DoRA there too
    wrapper = runner.model.get_submodule(k_proj)
    x = torch.randn(1, 3, wrapper.in_features, device=DEVICE, dtype=DTYPE).repeat(len(rows), 1, 1)
    with torch.no_grad(), registry.context.use(runner._plan(slots, None, gather=True)):
        y = wrapper(x)
    alone = [y[i] - y[3] for i in range(3)]
    assert alone[0].abs().max() > 1e-2 and alone[1].abs().max() > 1e-2
    torch.testing.assert_close(alone[2], alone[0] + alone[1], atol=ATOL, rtol=0)


@needs_float32("greedy tokens equal the reference's")
def test_concurrent_http_requests_generate_peft_s_greedy_tokens(worlds, serve):
    """The real server: requests with DoRA, trained biases and lm_head LoRA beside others, at once (one batch),
    twice (the second time from the prefix cache), each the reference's greedy text."""
    model_dir, store, *_ = worlds("qwen2")
    server = serve(Settings(model=str(model_dir), adapters_dir=store, device=DEVICE, dtype=dtype_name(DTYPE)))
    combos = [["dora.bias"], ["lora.bias-all", "lora.mlp"], ["lora.head", "dora.bias"], [], ["oft", "dora.bias"]]
    text = "Say something short about the sea. " * 2

    parameters = {"max_new_tokens": 8, "details": True}

    async def generate_all() -> list[tuple[list[int], str]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            responses = await asyncio.gather(
                *(
                    client.post("/generate", json={"inputs": text, "adapters": c, "parameters": parameters})
                    for c in combos
                )
            )
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
        details = [r.json()["details"] for r in responses]
        return [([t["id"] for t in d["tokens"]], d["finish_reason"]) for d in details]

    hits = server.state.engine.runner.prefix_hit_tokens
    first = asyncio.run(generate_all())
    assert asyncio.run(generate_all()) == first
    assert server.state.engine.runner.prefix_hit_tokens > hits
    ids = encode_prompt(server.state.tokenizer, text)
    for names, (tokens, finish) in zip(combos, first, strict=True):
        assert tokens == reference_greedy(model_dir, store, names, ids, 8)[: len(tokens)], names
        assert len(tokens) == 8 or finish == "eos_token"


# --- the output embedding's saved copy


def test_a_saved_copy_of_lm_head_is_accepted_when_it_is_the_served_base_rounded(worlds):
    """A float32 copy of the output embedding is the served bfloat16 base exactly once rounded to bfloat16."""
    model_dir, store, *_ = worlds("qwen2")
    saved = load_file(store / "lora.head" / "adapter_model.safetensors")
    assert "base_model.model.lm_head.base_layer.weight" in saved
    _, registry = private_model(model_dir, AdapterStore(store), torch.bfloat16)
    (adapter,) = registry.load_blocking(["lora.head"])
    assert "lm_head" in adapter.built.layers


def test_a_saved_copy_of_lm_head_that_differs_from_the_base_is_refused(worlds, tmp_path):
    model_dir, store, *_ = worlds("qwen2")
    shutil.copytree(store / "lora.head", tmp_path / "other-base")
    path = tmp_path / "other-base" / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.lm_head.base_layer.weight"][3, 5] += 1e-3
    save_file(tensors, path)
    _, registry = _runner(model_dir, tmp_path)
    with pytest.raises(AdapterInvalid, match=r"copy of the base model's lm_head .*differs"):
        registry.load_blocking(["other-base"])


def test_copies_of_untargeted_embeddings_are_accepted_and_left_out(worlds, tmp_path):
    """save_embedding_layers=True saves `lm_head.weight` and `embed_tokens.weight` whether or not the adapter
    targets them."""
    model_dir, store, *_ = worlds("qwen2")
    shutil.copytree(store / "dora.bias", tmp_path / "with-copy")
    path = tmp_path / "with-copy" / "adapter_model.safetensors"
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    copies = {
        "base_model.model.lm_head.weight": base.lm_head.weight.detach().clone(),
        "base_model.model.model.embed_tokens.weight": base.model.embed_tokens.weight.detach().clone(),
    }
    save_file({**load_file(path), **copies}, path)
    runner, registry = _runner(model_dir, tmp_path)
    (adapter,) = registry.load_blocking(["with-copy"])
    assert "lm_head" not in adapter.built.layers
    ours = runner.score(torch.tensor([IDS]), [(adapter.slot,)])[0].cpu()
    torch.testing.assert_close(ours, _reference(model_dir, store, IDS, {"dora.bias": 1.0}), atol=ATOL, rtol=0)


# --- refusals say what, why and what to do


def test_trained_biases_of_layer_norms_are_refused_with_the_reason(worlds, tmp_path):
    model_dir, *_ = worlds("gpt2")
    _save(model_dir, _lora(["c_attn"], bias="all", fan_in_fan_out=True), tmp_path / "ln-bias", seed=5)
    _, registry = _runner(model_dir, tmp_path)
    with pytest.raises(AdapterInvalid, match=r"bias='all' trained the bias of .*ln.* \(LayerNorm\).*retrain"):
        registry.load_blocking(["ln-bias"])


def test_an_oft_adapter_from_before_peft_0_14_gets_peft_s_reason(worlds, tmp_path):
    _, store, *_ = worlds("llama")
    shutil.copytree(store / "oft", tmp_path / "old-oft")
    config_path = tmp_path / "old-oft" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    del config["oft_block_size"]
    config["r"] = 8
    config_path.write_text(json.dumps(config))
    _, registry = _runner(worlds("llama")[0], tmp_path)
    with pytest.raises(AdapterInvalid, match=r"OFT has been updated since PEFT 0\.14\.0.*retrain"):
        registry.load_blocking(["old-oft"])


def test_merges_refuse_dora_and_trained_biases_with_the_reason():
    merge = Merge.parse("merge:linear(a@0.5,b@0.5)")
    configs = {"a": {"peft_type": "LORA", "r": 4, "use_dora": True}, "b": {"peft_type": "LORA", "r": 4, "bias": "all"}}
    with pytest.raises(ValidationError, match=r"a is DoRA.*drops DoRA's magnitude.*b trained base biases"):
        merge.check_configs(configs)
