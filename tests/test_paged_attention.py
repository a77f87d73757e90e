"""Paged decode attention (server/engine/paged_attention.py, MIXSERVE_PAGED_ATTENTION): flex_attention reading each
row's blocks where they lie, compiled when the runner starts. Exact against PEFT on every family that takes it, with
rows joining and leaving, windows crossed and prefixes cached; off, with the reason, on those that cannot take it;
a pass whose attention fails, or would compile, runs again gathered, and it stays off."""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch
from torch.overrides import TorchFunctionMode
from transformers import MistralConfig

from server.adapters.combination import Combination
from server.adapters.store import AdapterStore
from server.config import Settings
from server.engine.paged_attention import MIN_LENGTH, PagedAttention
from server.engine.runner import ModelRunner, PromptSequence
from server.engine.sampling import SamplingParams
from server.engine.sequence import GenerationRequest
from server.model import encode_prompt
from server.state import ServerState
from tests.conftest import ATOL, DEVICE, DTYPE, dtype_name, private_model
from tests.families import DECODER, FAMILIES, build_family
from tests.reference import reference_logits

# the families whose attention cannot read the cache in place: ALiBi's bias comes from a padding mask, Gemma 2's
# softcap is not SDPA's (transformers runs it eagerly), Falcon's attention does not go through transformers'
# attention functions
GATHERED = {"bloom", "falcon", "falcon-new", "falcon-alibi", "gemma2"}
ROWS = 4  # the most rows a decode pass has: the compiled batch


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    model_dir, store, built = build_family(tmp_path_factory.mktemp(request.param), request.param)
    model, registry = private_model(model_dir, AdapterStore(store))
    runner = _paged(model, registry)
    yield request.param, model_dir, store, built, runner, registry
    registry.close()


def _paged(model, registry, rows: int = ROWS) -> ModelRunner:
    """A runner with paged attention for passes of any length (the tests' rows are short)."""
    runner = ModelRunner(model, registry.context, paged_rows=rows)
    if runner.paged is not None:
        runner.paged.min_length = 0
    return runner


def _slots(registry, names: list[str]) -> tuple[int, ...]:
    return tuple(a.slot for a in registry.load_blocking(names)) if names else ()


def _drive(runner: ModelRunner, seqs: list[PromptSequence]) -> dict:
    """Greedy logits of each sequence, prefill's then each decode's: three prefilled together, one of them leaving
    after two steps, a fourth joining (its first blocks cached from the first), then a fifth; the batch's
    composition changes at nearly every step."""
    logits_of = {seq: [] for seq in seqs}

    def take(rows, logits):
        for seq, row in zip(rows, logits, strict=True):
            logits_of[seq].append(row.float().cpu())
            seq.tokens.append(int(row.argmax()))

    take(seqs[:3], runner.prefill(seqs[:3]))
    for step in range(8):
        if step == 2:
            runner.release(seqs[1])
        if step == 3:
            take([seqs[3]], runner.prefill([seqs[3]]))
        if step == 5:
            take([seqs[4]], runner.prefill([seqs[4]]))
        rows = list(runner.rows)
        take(rows, runner.decode())
    for seq in list(runner.rows):
        runner.release(seq)
    return logits_of


def test_each_family_decodes_paged_as_peft(family):
    name, model_dir, store, built, runner, registry = family
    if name in GATHERED:
        assert runner.paged is None
        return
    assert runner.paged is not None and runner.paged.off is None
    combos = [built[:2], built[:1], [], built[:2], built[::-1]]
    vocab = runner.model.config.vocab_size
    prompts = [[(5 * i + 7 * n + 3) % (vocab - 3) + 3 for i in range(n)] for n in (40, 23, 9, 0, 17)]
    prompts[3] = prompts[0][:32] + [4, 5, 6]  # its first two blocks cached by the first's prefill
    scope = b"paged-attention test"
    seqs = [
        PromptSequence(prompt, _slots(registry, names), cache_scope=scope if i in (0, 3) else None)
        for i, (prompt, names) in enumerate(zip(prompts, combos, strict=True))
    ]
    paged_passes = []
    takes = runner.paged.takes
    runner.paged.takes = lambda *a: paged_passes.append(takes(*a)) or paged_passes[-1]
    try:
        logits_of = _drive(runner, seqs)
    finally:
        del runner.paged.takes
    assert paged_passes and all(paged_passes), "every decode pass should have read the cache in place"
    assert runner.paged.off is None, runner.paged.off  # none ran again gathered
    assert runner.prefix_hit_tokens == 32
    for seq, names in zip(seqs, combos, strict=True):
        prompt = seq.request.prompt_ids
        expected = reference_logits(model_dir, store, names, prompt + seq.tokens[:-1])[len(prompt) - 1 :]
        got = torch.stack(logits_of[seq])
        assert got.shape == expected.shape
        assert (got - expected.float()).abs().max() <= ATOL, (name, names)


def test_a_window_of_whole_blocks_with_one_query_per_kv_head(tmp_path):
    """The families' windows (6 tokens) hold no whole block, and their one-query-per-KV-head models no window: here
    a 40-token window over rows of up to 130 tokens (full blocks inside it, partial ones at its ends), every row
    listing as many full blocks as the row with the fewest."""
    config = MistralConfig(sliding_window=40, **{**DECODER, "num_key_value_heads": DECODER["num_attention_heads"]})
    model_dir, store, built = build_family(tmp_path, "mistral", config=config)
    model, registry = private_model(model_dir, AdapterStore(store))
    runner = _paged(model, registry)
    assert runner.paged.same_counts == (DEVICE == "cpu")
    vocab = model.config.vocab_size
    prompts = [[(3 * i + 5 * n) % (vocab - 3) + 3 for i in range(n)] for n in (130, 70, 33, 0, 5)]
    prompts[3] = prompts[0][:48] + [4, 5]
    combos = [built[:1], [], built[::-1], built[:1], built[1:2]]
    seqs = [
        PromptSequence(prompt, _slots(registry, names), cache_scope=b"w" if i in (0, 3) else None)
        for i, (prompt, names) in enumerate(zip(prompts, combos, strict=True))
    ]
    logits_of = _drive(runner, seqs)
    assert runner.paged.off is None and runner.prefix_hit_tokens == 48
    for seq, names in zip(seqs, combos, strict=True):
        prompt = seq.request.prompt_ids
        expected = reference_logits(model_dir, store, names, prompt + seq.tokens[:-1])[len(prompt) - 1 :]
        assert (torch.stack(logits_of[seq]) - expected.float()).abs().max() <= ATOL, names
    registry.close()


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    model_dir, store, built = build_family(tmp_path_factory.mktemp("mistral"), "mistral")
    model, registry = private_model(model_dir, AdapterStore(store))
    yield model_dir, store, built, model, registry
    registry.close()


def _prefilled(runner: ModelRunner, registry, names: list[str], lengths=(20, 7)) -> list[PromptSequence]:
    seqs = [PromptSequence([3 + i % 50 for i in range(n)], _slots(registry, names)) for n in lengths]
    for seq, row in zip(seqs, runner.prefill(seqs), strict=True):
        seq.tokens.append(int(row.argmax()))
    return seqs


def _assert_as_peft(model_dir, store, names, seqs, logits) -> None:
    for seq, row in zip(seqs, logits, strict=True):
        expected = reference_logits(model_dir, store, names, seq.request.prompt_ids + seq.tokens)[-1]
        assert (row.float().cpu() - expected.float()).abs().max() <= ATOL


def test_a_failing_pass_runs_again_gathered_and_paged_attention_stays_off(mistral, caplog):
    model_dir, store, built, model, registry = mistral
    runner = _paged(model, registry)
    seqs = _prefilled(runner, registry, built[:1])

    def fails(*args, **kwargs):
        raise RuntimeError("injected")

    runner.paged._flex = fails
    with caplog.at_level(logging.ERROR, logger="server.engine.paged_attention"):
        logits = runner.decode()
    assert "injected" in runner.paged.off and "paged decode attention turned off" in caplog.text
    assert not runner.paged.takes(1, 10_000)
    _assert_as_peft(model_dir, store, built[:1], seqs, logits)


class _Passing(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_a_pass_that_would_compile_runs_gathered_instead(mistral):
    """What the compiled code is guarded on changes (here a TorchFunctionMode around the pass, as a profiler's
    counter in a bench): the call is refused, not compiled while a request waits."""
    model_dir, store, built, model, registry = mistral
    runner = _paged(model, registry)
    seqs = _prefilled(runner, registry, built[:1])
    with _Passing():
        logits = runner.decode()
    assert "fail_on_recompile" in runner.paged.off
    _assert_as_peft(model_dir, store, built[:1], seqs, logits)


def test_a_batch_past_the_compiled_rows_or_shorter_than_min_length_gathers(mistral):
    *_, model, registry = mistral
    runner = _paged(model, registry, rows=2)
    pool = runner.cache.pool  # the start's check gave back the blocks it took (2 rows of 4: the lowest), zeroed
    assert pool.used == 0 and pool.cached == 0 and not pool.tables
    assert all(not t[: 1 + 2 * 4].any() for t in (*runner.cache.keys.values(), *runner.cache.values.values()))
    seqs = _prefilled(runner, registry, [], lengths=(20, 7, 11))
    used = []
    takes = runner.paged.takes
    runner.paged.takes = lambda *a: used.append(takes(*a)) or used[-1]
    for seq, row in zip(seqs, runner.decode(), strict=True):  # three rows: more than were compiled
        seq.tokens.append(int(row.argmax()))
    runner.release(seqs[0])
    runner.decode()
    assert used == [False, True] and runner.paged.off is None
    runner.paged.min_length = MIN_LENGTH  # the server's: short passes gather
    assert not runner.paged.takes(1, MIN_LENGTH - 1) and runner.paged.takes(1, MIN_LENGTH)


def test_a_check_that_fails_leaves_the_model_as_it_was(mistral, monkeypatch, caplog):
    model_dir, store, *_ = mistral
    model, registry = private_model(model_dir, AdapterStore(store))
    monkeypatch.setattr(PagedAttention, "_check", lambda self: 1.0)
    with caplog.at_level(logging.ERROR, logger="server.engine.paged_attention"):
        runner = ModelRunner(model, registry.context, paged_rows=ROWS)
    registry.close()
    assert runner.paged is None and model.config._attn_implementation == "sdpa"
    assert "1 off a plain computation" in caplog.text


def test_the_setting_reaches_the_engine(tmp_path):
    model_dir, store, built = build_family(tmp_path, "qwen2-window")
    settings = Settings(
        model=str(model_dir),
        adapters_dir=store,
        device=DEVICE,
        dtype=dtype_name(DTYPE),
        max_batch_size=ROWS,
        paged_attention=True,
    )
    state = ServerState.start(settings)
    try:
        paged = state.engine.runner.paged
        assert paged is not None and paged.off is None and paged.rows == ROWS
        paged.min_length = 0  # the request is short
        taken = []
        takes = paged.takes
        paged.takes = lambda *a: taken.append(takes(*a)) or taken[-1]
        prompt = encode_prompt(state.tokenizer, "The quick brown fox jumps over the lazy dog.")
        request = GenerationRequest(
            "r0", prompt, Combination((built[0],), (1.0,)), SamplingParams(max_new_tokens=6, ignore_eos=True)
        )
        seq = asyncio.run(state.engine.generate(request))
        expected = reference_logits(model_dir, store, [built[0]], prompt + seq.tokens[:-1])[len(prompt) - 1 :]
        assert seq.tokens == expected.argmax(-1).tolist()
        # compiled on the thread that started the server, served on the engine's: still the same graph
        assert taken and all(taken) and paged.off is None, paged.off
    finally:
        state.stop()
    assert Settings(model=str(model_dir)).paged_attention is False  # off unless asked: not faster on the CPU
