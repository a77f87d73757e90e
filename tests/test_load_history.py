"""The same combination gives the same output whatever was loaded, unloaded or reloaded before."""

from __future__ import annotations

import torch

from server.adapters.mixing import MixedLinear
from server.engine.model import encode_prompt
from tests.reference import reference_logits

COMBINATION = ["lokr", "lora", "oft", "shira", "loha"]
PROMPT = "Load order must not matter."


def _logits(runner, registry, ids, names):
    adapters = registry.load_blocking(names)
    return runner.score(torch.tensor([ids]), [tuple(a.slot for a in adapters)])[0]


def test_three_load_histories_give_identical_outputs(llama):
    histories = [
        list(COMBINATION),
        ["adalora", "shira", "loha", "oft.by-rank", "oft", "lora", "lokr"],
        ["oft", "lora.rs-bias", "lokr"],  # then: unload and reload, see below
    ]
    outputs = []
    for i, history in enumerate(histories):
        runner, registry, tokenizer = llama.runner()
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
    assert torch.equal(outputs[0], outputs[1])
    assert torch.equal(outputs[0], outputs[2])
    expected = reference_logits(llama.model_dir, llama.store, COMBINATION, ids)
    torch.testing.assert_close(outputs[0], expected, atol=1e-5, rtol=0)


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
