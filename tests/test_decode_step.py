"""The decode step's fixed shapes: low-rank adapters in per-layer rank pools, rows selecting their own ranks with
per-row tensors. Rows join and leave at every step, adapters attach while rows run (the pools grow), and every row
stays PEFT's, alone, at every step."""

from __future__ import annotations

import torch

from server.engine.runner import PromptSequence
from server.model import encode_prompt
from tests.reference import reference_logits

ATOL = 1e-5
# (prompt, {adapter: weight}), joining one per step; lora.patterns has other ranks and scales on some layers
ROWS = [
    ("The first row.", {"lora": 1.0}),
    ("Base only", {}),
    ("Mixing every kind", {"shira": 1.0, "oft": 1.0, "lora": 1.0, "adalora": 1.0, "loha": 1.0, "lokr": 1.0}),
    ("Weighted", {"lora": 0.5, "loha": -1.25}),
    ("x", {"adalora": 1.0, "lora.patterns": 1.0}),
    ("A longer prompt for a late row", {"lora.patterns": 0.7, "lokr": 1.0}),
    ("LoHa alone", {"loha": 1.0}),
    ("Two LoRAs", {"lora": 1.0, "lora.patterns": 1.0}),
]
FIRST_LOADED = ["lora", "shira", "oft", "lokr"]  # the others attach while rows decode


def _sequence(registry, prompt: str, weights: dict[str, float], tokenizer) -> PromptSequence:
    loaded = registry.load_blocking(list(weights)) if weights else []
    seq = PromptSequence(encode_prompt(tokenizer, prompt), tuple(a.slot for a in loaded))
    seq.weights = tuple(weights[a.name] for a in loaded)
    return seq


def test_rows_joining_and_leaving_every_step_each_equal_the_reference(llama):
    runner, registry, tokenizer = llama.runner()
    registry.load_blocking(FIRST_LOADED)
    pending = list(ROWS)
    running: list[tuple[PromptSequence, dict, list[torch.Tensor]]] = []
    done: list[tuple[PromptSequence, dict, list[torch.Tensor]]] = []
    capacities = set()
    for step in range(12):
        if pending:  # one row joins
            prompt, weights = pending.pop(0)
            seq = _sequence(registry, prompt, weights, tokenizer)
            logits = runner.prefill([seq])[0]
            seq.tokens.append(int(logits.argmax()))
            running.append((seq, weights, [logits]))
        if step % 2 and len(running) > 2:  # and every other step the oldest leaves
            done.append(running.pop(0))
            runner.release(done[-1][0])
        logits = runner.decode()
        assert [seq for seq, _, _ in running] == runner.rows
        for (seq, _, seen), row in zip(running, logits, strict=True):
            seen.append(row)
            seq.tokens.append(int(row.argmax()))
        capacities |= {m.pool.capacity for m in runner.model.modules() if hasattr(m, "pool")}
    for seq, _, _ in running:
        runner.release(seq)
    assert len(capacities) > 2, "adapters attached while rows ran should have grown the pools"
    for seq, weights, seen in done + running:
        prompt = seq.request.prompt_ids
        expected = reference_logits(
            llama.model_dir, llama.store, list(weights), prompt + seq.tokens[:-1], weights=weights
        )[len(prompt) - 1 :]
        torch.testing.assert_close(torch.stack(seen), expected, atol=ATOL, rtol=0)
        assert seq.tokens == expected.argmax(-1).tolist()


def test_a_freed_span_is_reused_and_what_it_held_never_reaches_a_row(llama):
    """A detached adapter's ranks go back to the pool; a row never reads them, even where they are not finite
    (they are selected out, not multiplied by zero), and the next adapter copied there overwrites them."""
    runner, registry, tokenizer = llama.runner()
    registry.load_blocking(["lora", "adalora"])
    pools = [m.pool for m in runner.model.modules() if hasattr(m, "pool") and m.pool.spans]
    with torch.inference_mode():
        for pool in pools:  # the worst an adapter could leave behind
            for start, width, _ in pool.spans.values():
                pool.a_t[:, start : start + width] = float("inf")
                pool.b_t[start : start + width] = float("nan")
    assert registry.unload("lora", set()) and registry.unload("adalora", set())
    rows = [("Base only", {}), ("Weighted", {"loha": -1.25}), ("Again", {"lora": 0.5, "loha": 1.0})]
    seqs = [_sequence(registry, prompt, weights, tokenizer) for prompt, weights in rows]
    seen = [[row] for row in runner.prefill(seqs)]
    for _ in range(2):
        for seq, logits in zip(seqs, seen, strict=True):
            seq.tokens.append(int(logits[-1].argmax()))
        for logits, row in zip(seen, runner.decode(), strict=True):
            logits.append(row)
    for seq, (_, weights), logits in zip(seqs, rows, seen, strict=True):
        prompt = seq.request.prompt_ids
        expected = reference_logits(llama.model_dir, llama.store, list(weights), prompt + seq.tokens, weights=weights)
        torch.testing.assert_close(torch.stack(logits), expected[len(prompt) - 1 :], atol=ATOL, rtol=0)
