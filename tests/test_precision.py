"""bfloat16 and float16: held to PEFT's reference in the same dtype, and no row ever sees another row's overflow.

Numerics: adapter weights are kept in the serving dtype (as vLLM and LoRAX do; OFT's generator is float32, see the
last test), where PEFT keeps some in float32; the difference is of the order of the dtype's own rounding (measured:
PEFT in bfloat16 differs from PEFT in float32 by up to 0.125 in logprobs on these models, and from us by up to
0.14), so the tolerances below are stated per dtype, and greedy tokens must be the reference's wherever it has no
near-tie (and its second choice where it has).
"""

from __future__ import annotations

import asyncio
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from server.adapters.combination import Combination
from server.adapters.store import AdapterStore
from server.engine.sampling import SamplingParams
from server.engine.sequence import GenerationRequest
from server.errors import AdapterInvalid
from server.model import encode_prompt
from server.state import ServerState
from tests.builders import ADAPTERS
from tests.conftest import private_model
from tests.reference import reference_logits

TOLERANCE = {torch.bfloat16: 0.3, torch.float16: 0.04}  # |logprob - reference logprob|
NEAR_TIE = {torch.bfloat16: 0.25, torch.float16: 0.05}  # a smaller top-2 gap in the reference's logits is a tie
SIX = list(ADAPTERS)
PROMPTS = ["The quick brown fox jumps over the lazy dog.", "Hello there, how are you?", "Mixing adapters"]
NEW_TOKENS = 8


def _generate(state, rows: list[tuple[str, list[str] | dict[str, float]]]):
    """rows: (prompt, adapter names, or {name: weight} in canonical order)."""
    requests = [
        GenerationRequest(
            f"r{i}",
            encode_prompt(state.tokenizer, prompt),
            Combination(tuple(names), tuple(names.values()) if isinstance(names, dict) else ()),
            SamplingParams(NEW_TOKENS),
        )
        for i, (prompt, names) in enumerate(rows)
    ]

    async def run_all():
        return await asyncio.gather(*(state.engine.generate(r) for r in requests))

    return asyncio.run(run_all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_mixed_batch_in_reduced_precision_matches_peft_in_that_dtype(llama, dtype):
    combinations = [[]] + [[name] for name in SIX] + [SIX, ["oft", "lora"], ["lokr", "loha", "shira"]]
    combinations += [{"oft": 0.5, "lora": -0.7}, {"shira": 0.6, "adalora": 1.4, "loha": 0.3, "lokr": -1.2}]
    rows = [(PROMPTS[i % len(PROMPTS)], names) for i, names in enumerate(combinations)]
    state = ServerState.start(llama.settings(dtype=str(dtype).removeprefix("torch."), max_batch_size=16))
    try:
        seqs = _generate(state, rows)
    finally:
        state.stop()
    for seq in seqs:
        names, prompt = list(seq.request.adapters.names), seq.request.prompt_ids
        weights = dict(zip(names, seq.request.adapters.weights, strict=True))
        # the reference reads our tokens (teacher forcing), so every step is compared, near-ties or not
        logits = reference_logits(llama.model_dir, llama.store, names, prompt + seq.tokens[:-1], dtype, weights)
        logits = logits[len(prompt) - 1 :].float()
        expected = logits.log_softmax(-1).gather(1, torch.tensor(seq.tokens)[:, None])[:, 0]
        assert torch.isfinite(torch.tensor(seq.logprobs)).all()
        torch.testing.assert_close(torch.tensor(seq.logprobs), expected, atol=TOLERANCE[dtype], rtol=0)
        for step, token in enumerate(seq.tokens):
            top2 = logits[step].topk(2)
            near_tie = top2.values[0] - top2.values[1] < NEAR_TIE[dtype]
            assert token == int(top2.indices[0]) or (near_tie and token == int(top2.indices[1])), (names, step)


def _scaled_copy(source, target, scale_a: float, scale_b: float) -> None:
    shutil.copytree(source, target)
    tensors = load_file(target / "adapter_model.safetensors")
    for key, tensor in tensors.items():
        tensors[key] = tensor.sign() * scale_a if "lora_A" in key else tensor * scale_b
    save_file(tensors, target / "adapter_model.safetensors")


def test_weights_that_overflow_float16_are_refused_with_the_reason(llama, tmp_path):
    store = tmp_path / "store"
    _scaled_copy(llama.store / "lora", store / "huge", 3e5, 1.0)
    _, registry = private_model(llama.model_dir, AdapterStore(store), torch.float16)
    with pytest.raises(AdapterInvalid, match="weights overflow float16"):
        registry.load_blocking(["huge"])


def test_a_row_never_sees_the_overflow_of_another_rows_adapter(llama, tmp_path):
    """Weights that fit float16 but whose products overflow it: that row's output is its own; its neighbours'
    are exactly what they are beside a same-shaped adapter that does not overflow."""
    store = tmp_path / "store"
    shutil.copytree(llama.store, store)
    _scaled_copy(llama.store / "lora", store / "overflowing", 6e4, 1e-3)
    settings = llama.settings(dtype="float16", adapters_dir=store, preload="lokr,oft,lora,overflowing")
    state = ServerState.start(settings)  # all resident: both batches are admitted and run alike
    try:
        tame = _generate(state, [(PROMPTS[0], []), (PROMPTS[1], ["lokr", "oft"]), (PROMPTS[2], ["lora"])])
        beside = _generate(state, [(PROMPTS[0], []), (PROMPTS[1], ["lokr", "oft"]), (PROMPTS[2], ["overflowing"])])
    finally:
        state.stop()
    assert not torch.isfinite(torch.tensor(beside[2].logprobs)).all(), "the fixture should overflow"
    for before, after in zip(tame, beside[:2]):
        assert after.tokens == before.tokens
        assert after.logprobs == before.logprobs


def test_a_finished_rows_overflow_never_reaches_the_next_occupant_of_its_slot(llama, tmp_path):
    """Keys past a row's own length are hidden by adding -inf, which hides no NaN: a freed slot must be clean."""
    store = tmp_path / "store"
    store.mkdir()
    _scaled_copy(llama.store / "lora", store / "overflowing", 6e4, 1e-3)
    pair = [(PROMPTS[0][:2], []), (PROMPTS[1], [])]  # a short row decoded beside a longer one
    state = ServerState.start(llama.settings(dtype="float16", adapters_dir=store, preload="overflowing"))
    try:
        fresh = _generate(state, pair)
        poisoned = _generate(state, [("x" * 60, ["overflowing"])])
        after = _generate(state, pair)
    finally:
        state.stop()
    assert not torch.isfinite(torch.tensor(poisoned[0].logprobs)).all(), "the fixture should overflow"
    for before, again in zip(fresh, after, strict=True):
        assert again.tokens == before.tokens
        assert again.logprobs == before.logprobs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("neumann", [False, True], ids=["exact", "neumann"])
def test_oft_at_a_weight_is_its_float32_rotation_cast_once(dtype, neumann):
    """PEFT keeps adapter weights in float32 (autocast_adapter_dtype): R(w) = Cayley(w Q) is computed from the float32
    generator and cast to the serving dtype once. Tolerance: none, it is the same computation."""
    from peft import OFTConfig

    from server.adapters.kinds.base import LayerShape
    from server.adapters.kinds.oft import OFTKind, _cayley

    torch.manual_seed(0)
    size, in_features = 8, 64
    generator = torch.randn(in_features // size, size * (size - 1) // 2) * 0.3
    config = OFTConfig(r=0, oft_block_size=size, use_cayley_neumann=neumann, target_modules=["q"])
    layer = OFTKind().build(config, "q", LayerShape(in_features, in_features), {"oft_R.weight": generator}, dtype)
    for weight in (0.5, -1.5):
        expected = _cayley(generator * weight, size, in_features, neumann, config.num_cayley_neumann_terms)
        torch.testing.assert_close(layer.rotation(weight), expected.to(dtype), atol=0, rtol=0)
