"""The same combination gives the same output whatever was loaded, unloaded or reloaded before."""

from __future__ import annotations

import pytest
import torch

from server.adapters.mixing import MixedLinear
from server.engine.runner import PromptSequence
from server.model import encode_prompt
from tests.reference import reference_logits
from tests.test_precision import TOLERANCE

COMBINATION = ["lokr", "lora", "oft", "shira", "loha"]
PROMPT = "Load order must not matter."
DECODE_STEPS = 4


def _logits(runner, registry, ids, names):
    adapters = registry.load_blocking(names)
    return runner.score(torch.tensor([ids]), [tuple(a.slot for a in adapters)])[0].cpu()


def _decoded(runner, registry, ids, names) -> torch.Tensor:
    """Logits of the prefill and of DECODE_STEPS decode passes (feeding back the argmax), beside a base row."""
    slots = tuple(a.slot for a in registry.load_blocking(names))
    rows = [PromptSequence(ids, slots), PromptSequence(ids[:-3])]
    steps = [runner.prefill(rows)]
    for _ in range(DECODE_STEPS):
        for row, logits in zip(rows, steps[-1]):
            row.tokens.append(int(logits.argmax()))
        steps.append(runner.decode())
    for row in rows:
        runner.release(row)
    return torch.stack([step[0] for step in steps]).cpu(), rows[0].tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_three_load_histories_give_identical_outputs(llama, dtype):
    histories = [
        list(COMBINATION),
        ["adalora", "shira", "loha", "oft.by-rank", "oft", "lora", "lokr"],
        ["oft", "lora.rs-bias", "lokr"],  # then: unload and reload, see below
    ]
    outputs, decoded = [], []
    for i, history in enumerate(histories):
        runner, registry, tokenizer = llama.runner(dtype)
        ids = encode_prompt(tokenizer, PROMPT)
        for name in history:
            registry.load_blocking([name])
        if i == 2:
            registry.unload("oft", set())
            registry.unload("lokr", set())
            for name in ["shira", "lokr", "loha", "oft", "lora"]:
                registry.load_blocking([name])
            registry.unload("lora.rs-bias", set())
        outputs.append(_logits(runner, registry, ids, COMBINATION))
        decoded.append(_decoded(runner, registry, ids, COMBINATION))
    for output, (steps, tokens) in zip(outputs[1:], decoded[1:]):
        assert torch.equal(outputs[0], output)
        assert torch.equal(decoded[0][0], steps) and decoded[0][1] == tokens
    steps, tokens = decoded[0]
    expected = reference_logits(llama.model_dir, llama.store, COMBINATION, ids + tokens, dtype)
    atol = 1e-5 if dtype == torch.float32 else TOLERANCE[dtype]
    torch.testing.assert_close(
        outputs[0].float().log_softmax(-1), expected[: len(ids)].float().log_softmax(-1), atol=atol, rtol=0
    )
    torch.testing.assert_close(
        steps.float().log_softmax(-1), expected[len(ids) - 1 :].float().log_softmax(-1), atol=atol, rtol=0
    )


def test_unloading_everything_restores_the_base_model(llama):
    runner, registry, tokenizer = llama.runner()
    ids = encode_prompt(tokenizer, PROMPT)
    before = _logits(runner, registry, ids, [])
    for name in COMBINATION:
        registry.load_blocking([name])
    assert any(isinstance(m, MixedLinear) for m in runner.model.modules())
    for name in COMBINATION:
        registry.unload(name, set())
    assert not any(m.adapters for m in runner.model.modules() if isinstance(m, MixedLinear))
    assert registry.loaded() == []
    assert torch.equal(_logits(runner, registry, ids, []), before)


def test_request_order_within_a_type_is_kept(llama):
    runner, registry, _ = llama.runner()
    names = registry.load_blocking(["oft.by-rank", "lora", "oft", "lora.patterns"])
    assert [a.name for a in names] == ["oft.by-rank", "oft", "lora", "lora.patterns"]
