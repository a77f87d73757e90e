"""A quantized base (README, "Quantized base"): every type and mixes on it equal PEFT on a float model whose Linear
weights are the quantized model's dequantized weights; LoRA equals PEFT's own PeftModel on the same quantized model
(PEFT's bitsandbytes LoRA layers); a row's output does not depend on its batch; bad settings fail at start."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel
from peft.utils.integrations import dequantize_module_weight
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, GPT2Config

from server.adapters.combination import Combination
from server.adapters.registry import AdapterRegistry
from server.adapters.store import AdapterStore
from server.config import Settings
from server.demo import tiny
from server.engine.runner import ModelRunner
from server.engine.sampling import SamplingParams
from server.engine.sequence import GenerationRequest
from server.model import encode_prompt, load_model, load_tokenizer
from server.quantization import BACKENDS, QuantizationError, base_bytes, quantization_of, quantized
from server.state import ServerState
from tests import builders
from tests.builders import ADAPTERS
from tests.conftest import DTYPE
from tests.reference import reference_greedy, reference_logits

# held to PEFT on the dequantized base in float32 (below); bfloat16 on a quantized base is served, not held to a
# reference (README, "Quantized base")
pytestmark = pytest.mark.skipif(DTYPE != torch.float32, reason="a quantized base is held to its float32 reference")
CPU, F32 = torch.device("cpu"), torch.float32
TYPES = list(ADAPTERS)
# |ours - PEFT on the dequantized float base| on logits (|logits| < 20 on these models). bitsandbytes 4-bit computes
# F.linear(x, dequantized W) in float32 (server/quantization.py turns its bfloat16 CPU kernel off): the float32
# contract. torchao's int8 weight-only scales after the product (x W_int8^T * s): float32 rounding of another order,
# within it too (5.7e-6 measured). bitsandbytes int8 also quantizes each token's activations to int8 (after a cast
# to float16): it is not the dequantized weights' function, and its own tolerance is the one it shows against that
# reference (0.12 measured).
TOLERANCE = {"bnb-nf4": 1e-5, "bnb-fp4": 1e-5, "int8-weight-only": 1e-5, "bnb-int8": 0.25}
COMBINATIONS = [[t] for t in TYPES] + [TYPES, ["shira", "oft", "lora"], ["lokr", "loha", "adalora"]]
PROMPT = "The quick brown fox jumps over the lazy dog."


def _runs(mode: str):
    package = BACKENDS[mode]
    try:
        __import__(package)
    except Exception as exc:  # noqa: BLE001 - not installed, or no kernels for this machine
        return pytest.param(mode, marks=pytest.mark.skip(reason=f"{package} cannot run here: {exc!r}"))
    return mode


def dequantized_copy(model_dir, mode: str, out) -> tuple[Path, list[str]]:
    """The float model at model_dir with each Linear weight that `mode` quantizes replaced by its dequantized weight.
    Read from a model of its own (quantizing is deterministic): PEFT's dequantize_module_weight re-creates a
    bitsandbytes int8 weight, which loses its scales for the layer's next forward."""
    quantized_model = load_model(model_dir, CPU, F32, mode)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=F32)
    layers = [name for name, m in quantized_model.named_modules() if quantized(m)]
    with torch.no_grad():
        for name in layers:
            model.get_submodule(name).weight.copy_(dequantize_module_weight(quantized_model.get_submodule(name)))
    model.save_pretrained(out)
    return out, layers


@dataclass
class Quantized:
    mode: str
    model: torch.nn.Module
    runner: ModelRunner
    registry: AdapterRegistry
    reference_dir: Path  # the float model with the dequantized weights
    layers: list[str]  # the quantized ones
    ids: list[int]
    base: torch.Tensor  # the reference's logits without adapters


@pytest.fixture(scope="module")
def quantized_base(llama, tmp_path_factory):
    """quantized_base(mode): the llama world's base quantized in that mode, with its registry and reference."""
    made: dict[str, Quantized] = {}

    def make(mode: str) -> Quantized:
        if mode not in made:
            model = load_model(llama.model_dir, CPU, F32, mode)
            registry = AdapterRegistry(model, AdapterStore(llama.store), CPU, F32)
            out = tmp_path_factory.mktemp(mode) / "dequantized"
            reference_dir, layers = dequantized_copy(llama.model_dir, mode, out)
            ids = encode_prompt(load_tokenizer(llama.model_dir), PROMPT)
            base = reference_logits(reference_dir, llama.store, [], ids)
            runner = ModelRunner(model, registry.context)
            made[mode] = Quantized(mode, model, runner, registry, reference_dir, layers, ids, base)
        return made[mode]

    return make


@pytest.mark.parametrize("mode", [_runs(m) for m in BACKENDS])
def test_the_backend_quantized_every_decoder_linear(quantized_base, mode):
    q = quantized_base(mode)
    assert quantization_of(q.model) == mode
    assert len(q.layers) == 2 * 7  # q k v o gate up down in each of 2 layers; the head and embeddings stay float
    assert base_bytes(q.model) < base_bytes(AutoModelForCausalLM.from_pretrained(q.reference_dir))


# every type alone and mixed on a 4-bit base; on the other modes, the mixes of every type (what differs between
# modes is only the base layer's forward)
CASES = [(_runs("bnb-nf4"), names) for names in COMBINATIONS] + [
    (_runs(mode), names) for mode in BACKENDS if mode != "bnb-nf4" for names in (TYPES, ["shira", "oft", "lora"])
]


@pytest.mark.parametrize(
    ("mode", "names"), CASES, ids=[f"{m if isinstance(m, str) else m.values[0]}-{'+'.join(n)}" for m, n in CASES]
)
def test_every_type_and_mix_equals_peft_on_the_dequantized_base(quantized_base, llama, mode, names):
    q = quantized_base(mode)
    adapters = q.registry.load_blocking(names)
    ours = q.runner.score(torch.tensor([q.ids]), [tuple(a.slot for a in adapters)])[0]
    expected = reference_logits(q.reference_dir, llama.store, names, q.ids)
    assert (expected - q.base).abs().max() > 1e-2, "the combination should change the output"
    torch.testing.assert_close(ours, expected, atol=TOLERANCE[mode], rtol=0)


@pytest.fixture(scope="module")
def spiked_dir(llama, tmp_path_factory) -> Path:
    """The llama world's base with a massive-activation feature, as real LLMs have: token Z's embedding is large on
    one hidden dimension, so that the attention and MLP inputs of a row holding Z exceed LLM.int8's default outlier
    threshold (6) there."""
    out = tmp_path_factory.mktemp("spiked") / "tiny-llama-spiked"
    shutil.copytree(llama.model_dir, out)
    model = AutoModelForCausalLM.from_pretrained(llama.model_dir, dtype=F32)
    z = encode_prompt(load_tokenizer(llama.model_dir), "Z")[-1]
    with torch.no_grad():
        model.model.embed_tokens.weight[z, 7] = 1.0
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("mode", [_runs(m) for m in BACKENDS])
def test_a_row_gets_the_same_answer_in_a_mixed_batch_as_alone(llama, spiked_dir, mode):
    """Rows of different prompts, one with activations above 6: LLM.int8's outlier decomposition (threshold 6)
    would compute the columns where any row exceeds it in float16 for every row of the batch."""
    model = load_model(spiked_dir, CPU, F32, mode)
    registry = AdapterRegistry(model, AdapterStore(llama.store), CPU, F32)
    runner = ModelRunner(model, registry.context)  # its self-check at start too
    tokenizer = load_tokenizer(spiked_dir)
    prompts = [
        encode_prompt(tokenizer, p) for p in (PROMPT, "ZZZ quick brown fox jumps over the lazy dog.", PROMPT[::-1])
    ]
    assert len({len(p) for p in prompts}) == 1
    inputs = []
    hook = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, args, out: inputs.append(args[0]))
    runner.score(torch.tensor(prompts[1:2]), [()])
    hook.remove()
    assert inputs[0].abs().max() > 6, "the spike should exceed LLM.int8's default outlier threshold"
    combos = [tuple(a.slot for a in registry.load_blocking(n)) for n in ([], ["shira", "oft"], TYPES, ["loha"])]
    rows = [prompts[i % len(prompts)] for i in range(len(combos))]  # the spiked prompt with shira + oft
    together = runner.score(torch.tensor(rows), combos)
    for row, combo in enumerate(combos):
        alone = runner.score(torch.tensor([rows[row]]), [combo])[0]
        torch.testing.assert_close(together[row], alone, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", [_runs(m) for m in ("bnb-nf4", "bnb-int8")])
def test_lora_equals_peft_own_model_on_the_same_quantized_base(llama, mode):
    """PEFT wraps bitsandbytes layers in its own LoRA layers (peft.tuners.lora.bnb): the same base kernels."""
    model = load_model(llama.model_dir, CPU, F32, mode)
    registry = AdapterRegistry(model, AdapterStore(llama.store), CPU, F32)
    ids = encode_prompt(load_tokenizer(llama.model_dir), PROMPT)
    for name in ("lora", "lora.rs-bias"):
        slots = tuple(a.slot for a in registry.load_blocking([name]))
        ours = ModelRunner(model, registry.context).score(torch.tensor([ids]), [slots])[0]
        peft_model = PeftModel.from_pretrained(load_model(llama.model_dir, CPU, F32, mode), llama.store / name).eval()
        assert "bnb" in type(peft_model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")).__module__
        with torch.no_grad():
            expected = peft_model(torch.tensor([ids])).logits[0]
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", [_runs("bnb-nf4")])
def test_a_4bit_base_serves_a_mix_of_every_type_with_the_reference_tokens(llama, tmp_path, mode):
    """The engine's decode (rank pools, per-row selection) on a 4-bit base, through ServerState as the server runs it:
    greedy tokens equal PEFT's on the dequantized base, and the self-check passed at start."""
    state = ServerState.start(llama.settings(quantization=mode, dtype="float32", device="cpu"))
    try:
        assert state.quantization == mode
        reference_dir, _ = dequantized_copy(llama.model_dir, mode, tmp_path / "dequantized")
        ids = encode_prompt(state.tokenizer, PROMPT)
        for names in (TYPES, ["shira", "lora"]):
            request = GenerationRequest("q", ids, Combination(tuple(names)), SamplingParams(max_new_tokens=8))
            seq = asyncio.run(state.engine.generate(request))
            assert seq.tokens == reference_greedy(reference_dir, llama.store, names, ids, 8)[: len(seq.tokens)]
    finally:
        state.stop()


@pytest.mark.parametrize("mode", [_runs("bnb-nf4")])
def test_info_names_the_quantization_and_a_dora_adapter_gets_a_422_with_the_reason(llama, serve, tmp_path, mode):
    store = tmp_path / "store"
    for name in ("oft", "loha"):
        shutil.copytree(llama.store / name, store / name)
    dora = LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    tiny.save_adapter(llama.model_dir, dora, store / "dora", seed=5, base_name=llama.model_dir.name, scale=0.3)
    server = serve(llama.settings(quantization=mode, dtype="float32", device="cpu", adapters_dir=store))
    with server.client() as client:
        info = client.get("/info").json()
        response = client.post("/generate", json={"inputs": PROMPT, "adapters": ["oft", "loha"]})
        refused = client.post("/generate", json={"inputs": PROMPT, "adapters": ["dora"]})
        after = client.post("/generate", json={"inputs": PROMPT, "adapters": ["loha"]})
    assert info["model_quantization"] == mode and info["model_dtype"] == "float32"
    assert response.status_code == 200, response.text
    assert refused.status_code == 422, refused.text
    assert set(refused.json()) >= {"error", "error_type"}
    assert "DoRA's weight norm needs the base layer's weight in floating point" in refused.json()["error"]
    assert "serve the base unquantized (MIXSERVE_QUANTIZATION=none)" in refused.json()["error"]
    assert after.status_code == 200, after.text


def test_the_default_is_a_float_base(llama):
    assert Settings(model=str(llama.model_dir), adapters_dir=llama.store).quantization == "none"


def test_a_backend_not_installed_is_a_settings_error(llama, monkeypatch):
    monkeypatch.setattr("server.quantization.importlib.util.find_spec", lambda name: None)
    with pytest.raises(ValidationError, match="bnb-nf4 needs bitsandbytes, which is not installed"):
        llama.settings(quantization="bnb-nf4")


def test_an_unknown_mode_is_a_settings_error(llama):
    with pytest.raises(ValidationError, match="quantization"):
        llama.settings(quantization="int3")


@pytest.mark.parametrize("mode", [_runs("bnb-nf4")])
def test_a_checkpoint_saved_quantized_loads_as_saved_and_refuses_another_setting(llama, tmp_path, mode):
    saved = tmp_path / "saved-nf4"
    load_model(llama.model_dir, CPU, F32, mode).save_pretrained(saved)
    for name in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        if (llama.model_dir / name).exists():
            shutil.copy(llama.model_dir / name, saved / name)
    assert json.loads((saved / "config.json").read_text())["quantization_config"]["load_in_4bit"]
    model = load_model(saved, CPU, F32)  # no setting: as saved
    assert quantization_of(model) == mode and sum(quantized(m) for m in model.modules()) == 14
    with pytest.raises(ValidationError, match="saved quantized .* leave MIXSERVE_QUANTIZATION at none"):
        Settings(model=str(saved), adapters_dir=llama.store, quantization="bnb-int8")


def test_a_checkpoint_saved_by_a_backend_that_is_not_installed_is_a_clear_error(llama, tmp_path):
    """A GPTQ checkpoint: transformers' loader for it needs packages that are not installed here."""
    saved = tmp_path / "gptq"
    shutil.copytree(llama.model_dir, saved)
    config = json.loads((saved / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 64}
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantizationError, match=r"cannot be loaded quantized \(as saved: gptq\) on cpu: "):
        load_model(saved, CPU, F32)


def test_a_start_error_prints_its_message_alone(llama, tmp_path):
    """python -m server with a checkpoint it cannot load quantized: one line with the reason, no traceback, exit 3
    (uvicorn's start failure)."""
    saved = tmp_path / "gptq"
    shutil.copytree(llama.model_dir, saved)
    config = json.loads((saved / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 64}
    (saved / "config.json").write_text(json.dumps(config))
    command = [sys.executable, "-m", "server", "--model", str(saved), "--adapters-dir", str(llama.store)]
    command += ["--host", "127.0.0.1", "--device", "cpu"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("mixserve: cannot start: ") and "cannot be loaded quantized (as saved: gptq)" in last


@pytest.mark.parametrize("mode", [_runs("bnb-int8")])
def test_bnb_int8_does_not_log_its_float16_cast_at_every_call(llama, mode, caplog):
    model = load_model(llama.model_dir, CPU, F32, mode)
    with caplog.at_level(logging.WARNING), torch.no_grad():
        model(torch.tensor([[5, 6, 7]]))
    assert not [r for r in caplog.records if "inputs will be cast" in r.getMessage()]


@pytest.mark.parametrize("mode", [_runs("bnb-nf4")])
def test_gpt2s_conv1d_layers_are_quantized_too(tmp_path, mode):
    """transformers swaps GPT-2's Conv1D layers for bitsandbytes' Linear4bit: they serve as Linear layers."""
    path = tmp_path / "gpt2"
    config = GPT2Config(vocab_size=300, n_embd=64, n_layer=1, n_head=2, n_positions=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    model = load_model(path, CPU, F32, mode)
    assert sum(quantized(m) for m in model.modules()) == 4  # c_attn, c_proj, mlp.c_fc, mlp.c_proj


def test_shira_on_a_float_base_equals_peft_at_a_realistic_width(tmp_path, monkeypatch):
    """On a float base SHiRA builds W + S densely, as PEFT does, so that the sums round alike: base(x) + x S^T (the
    quantized path) differs from PEFT by 2e-5 to 1e-4 at this width."""
    wide = lambda: tiny.config(hidden=512, intermediate=1024, layers=2, heads=8, kv_heads=4)
    monkeypatch.setitem(builders.ARCHITECTURES, "wide", wide)
    model_dir = builders.build_base(tmp_path / "wide-llama", "wide")
    config, scale = ADAPTERS["shira"]
    tiny.save_adapter(model_dir, config, tmp_path / "store" / "shira", seed=7, base_name="wide-llama", scale=scale)
    model = load_model(model_dir, CPU, F32)
    registry = AdapterRegistry(model, AdapterStore(tmp_path / "store"), CPU, F32)
    ids = encode_prompt(load_tokenizer(model_dir), (PROMPT + " ") * 13)  # 585 tokens
    slots = tuple(a.slot for a in registry.load_blocking(["shira"]))
    ours = ModelRunner(model, registry.context).score(torch.tensor([ids]), [slots])[0]
    expected = reference_logits(model_dir, tmp_path / "store", ["shira"], ids)
    assert (expected - reference_logits(model_dir, tmp_path / "store", [], ids)).abs().max() > 1e-2
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
