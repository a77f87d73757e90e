"""The paged KV cache: blocks return to the pool whatever ends a request, and a preempted sequence resumes exactly."""

from __future__ import annotations

import asyncio

import pytest
import torch
from prometheus_client import generate_latest

from server.adapters.combination import Combination
from server.engine.kv_cache import BLOCK_SIZE, BlockPool
from server.engine.runner import PromptSequence
from server.engine.sampling import SamplingParams
from server.engine.sequence import GenerationRequest
from server.errors import CacheTooSmall, MixserveError
from server.metrics import Metrics
from server.model import encode_prompt
from server.state import ServerState
from tests.conftest import ATOL, EXACT, greedy_logits
from tests.reference import reference_logits

COMBOS = [[], ["lora"], ["oft", "loha"], ["lokr", "shira", "adalora"]]


def _prompt(i: int, n: int) -> list[int]:
    return [3 + (7 * i + 13 * j) % 200 for j in range(n)]


def _request(i: int, n: int, new_tokens: int, names: list[str], **params) -> GenerationRequest:
    params = {"max_new_tokens": new_tokens, "ignore_eos": True, **params}
    return GenerationRequest(f"r{i}", _prompt(i, n), Combination(tuple(names)), SamplingParams(**params))


@pytest.fixture(scope="module")
def small(llama):
    """A cache of 12 blocks (192 tokens), for requests of at most 48 + 64 tokens: rows must take turns."""
    probe = ServerState.start(llama.settings(max_batch_size=2))
    block_bytes = probe.engine.runner.cache.block_bytes
    probe.stop()
    settings = llama.settings(
        max_batch_size=8, max_input_tokens=48, max_new_tokens=64, kv_cache_memory=12 * block_bytes
    )
    state = ServerState.start(settings)
    assert state.engine.runner.cache.pool.total == 12
    yield state
    state.stop()


def test_the_pool_hands_out_its_lowest_free_blocks_and_takes_them_back():
    pool, a, b = BlockPool(4), object(), object()
    assert pool.allocate(a, BLOCK_SIZE + 4) == [1, 2]  # block 0 is the zero block, never handed out
    assert pool.allocate(b, 1) == [3]
    assert pool.allocate(a, BLOCK_SIZE + 5) == []  # still within its second block
    assert pool.missing(a, 2 * BLOCK_SIZE + 1) == 1
    assert pool.allocate(a, 2 * BLOCK_SIZE + 1) == [4]
    with pytest.raises(MemoryError):
        pool.allocate(b, BLOCK_SIZE + 1)
    pool.deallocate(a)
    assert (pool.free, pool.used) == (3, 1)
    assert pool.allocate(b, BLOCK_SIZE + 1) == [1]
    pool.deallocate(b)
    pool.deallocate(b)  # twice: nothing more
    assert pool.free == pool.total == 4


def test_a_cache_too_small_for_one_request_is_refused_at_start(llama):
    with pytest.raises(RuntimeError, match="MIXSERVE_KV_CACHE_MEMORY holds 16 tokens"):
        ServerState.start(llama.settings(max_input_tokens=16, max_new_tokens=16, kv_cache_memory=10000))


def test_preempted_sequences_resume_with_the_reference_tokens(small, llama):
    """Six requests of 60 tokens in a cache of 192: the youngest are preempted, recomputed when readmitted, and
    every one still gives the reference's greedy tokens and logprobs; each stream sends each token once."""
    engine = small.engine
    before = engine.preemptions
    requests = [_request(i, 20 + 2 * i, 40, COMBOS[i % len(COMBOS)]) for i in range(6)]

    async def run():
        handles = [engine.submit(r) for r in requests]

        async def events(handle):
            return [event async for event in handle.stream()]

        streams = await asyncio.gather(*(events(h) for h in handles))
        return [h.seq for h in handles], streams

    seqs, streams = asyncio.run(run())
    assert engine.preemptions > before, "the cache should have been too small for all six at once"
    for seq, events in zip(seqs, streams, strict=True):
        assert [e.index for e in events] == list(range(40)) and [e.token for e in events] == seq.tokens
        names, prompt = list(seq.request.adapters.names), seq.request.prompt_ids
        logits = reference_logits(llama.model_dir, llama.store, names, prompt + seq.tokens[:-1])[len(prompt) - 1 :]
        logits = logits.float()
        assert seq.tokens == logits.argmax(-1).tolist() or not EXACT, names  # reduced precision: near-ties
        expected = logits.log_softmax(-1).gather(1, torch.tensor(seq.tokens)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(seq.logprobs), expected, atol=ATOL, rtol=0)
    pool = engine.runner.cache.pool
    assert pool.free == pool.total


def test_no_block_leaks_after_hundreds_of_requests_with_cancels_and_faults(small):
    """300 requests through a cache too small for them all: some cancelled after their first token, some failing in
    prefill (a poisoned prompt) or in decode (a poisoned first token); every block is back in the pool after."""
    engine, model = small.engine, small.engine.model
    poison = 250  # no prompt of _prompt holds it
    original = model.forward

    def forward(*args, input_ids=None, **kwargs):
        if input_ids is not None and bool((input_ids == poison).any()):
            raise RuntimeError("injected fault")
        return original(*args, input_ids=input_ids, **kwargs)

    def request(i: int) -> GenerationRequest:
        names = COMBOS[i % len(COMBOS)]
        if i % 11 == 3:  # fails in its prefill
            return GenerationRequest(f"p{i}", [*_prompt(i, 8), poison], Combination(tuple(names)), SamplingParams())
        bias = {poison: 100.0} if i % 13 == 5 else {}  # its first token fails the decode that feeds it
        return _request(i, 8 + i % 40, 1 + i % 24, names, logit_bias=bias)

    model.forward = forward
    try:
        outcomes = streamed_in_waves(engine, request, 300, 30, cancel=lambda i: i % 7 == 2)
    finally:
        model.forward = original
    assert {"done", "cancelled"} <= set(outcomes) and any(o.startswith("failed") for o in outcomes), outcomes
    assert engine.preemptions > 0
    pool = engine.runner.cache.pool
    assert (pool.free, pool.used, engine.running, engine.queued) == (pool.total, 0, 0, 0)
    assert not pool.tables and not engine.scheduler.waiting
    assert [a.name for a in small.registry.loaded() if a.refs] == []  # preempted ones gave their adapters back too
    metrics = Metrics()
    metrics.watch(small)
    text = generate_latest(metrics.registry).decode()
    assert "mixserve:kv_cache_usage_perc 0.0" in text and "mixserve:kv_cache_blocks_total 12.0" in text
    assert f"mixserve:num_preemptions_total {float(engine.preemptions)}" in text


def test_a_preempted_request_cancelled_while_it_waits_gives_back_its_adapters(small):
    """Two requests that outgrow the cache together: the younger is preempted, and its client goes away while it
    waits to be recomputed: it fails as cancelled, its adapters released; the older one runs to its end."""
    engine = small.engine
    make_room = engine._make_room

    def make_room_then_cancel():
        make_room()
        for seq in engine._preempted:
            seq.cancelled = True

    async def run():
        older = engine.submit(_request(0, 48, 64, ["lora"]))
        younger = engine.submit(_request(1, 48, 64, ["oft", "loha"]))
        finished = await older.result()
        with pytest.raises(asyncio.CancelledError):
            await younger.result()
        return finished, younger.seq

    engine._make_room = make_room_then_cancel
    try:
        older, younger = asyncio.run(run())
    finally:
        del engine._make_room
    assert len(older.tokens) == 64 and 0 < len(younger.tokens) < 64
    pool = engine.runner.cache.pool
    assert pool.free == pool.total and not engine._preempted and engine.queued == 0
    assert [a.name for a in small.registry.loaded() if a.refs] == []


def test_a_preempted_request_the_whole_cache_cannot_hold_fails_and_gives_back_its_adapters(llama):
    """A request that outgrows the cache alone (the engine takes it unchecked) is preempted, and refused when it
    would be readmitted; the adapters it held are released."""
    probe = ServerState.start(llama.settings(max_batch_size=2))
    block_bytes = probe.engine.runner.cache.block_bytes
    probe.stop()
    state = ServerState.start(llama.settings(max_input_tokens=48, max_new_tokens=64, kv_cache_memory=8 * block_bytes))
    try:
        with pytest.raises(CacheTooSmall):
            asyncio.run(state.engine.generate(_request(0, 40, 200, ["lora"])))
        assert state.engine.preemptions == 1
        assert [a.name for a in state.registry.loaded() if a.refs] == []
        pool = state.engine.runner.cache.pool
        assert pool.free == pool.total and not state.engine._preempted
    finally:
        state.stop()


def streamed_in_waves(engine, request, total: int, wave: int, cancel) -> list[str]:
    """Submits request(i) for i in 0..total-1, `wave` at a time, each streamed to its end: per request "done",
    "cancelled" (where cancel(i): cancelled at its first event) or "failed: <the error>"."""

    async def one(i: int) -> str:
        handle = engine.submit(request(i))
        try:
            async for _ in handle.stream():
                if cancel(i):
                    handle.cancel()
        except asyncio.CancelledError:
            return "cancelled"
        except MixserveError as exc:
            return f"failed: {exc!r}"
        return "done"

    async def run() -> list[str]:
        outcomes = []
        for start in range(0, total, wave):
            outcomes += await asyncio.gather(*(one(i) for i in range(start, start + wave)))
        return outcomes

    return asyncio.run(run())


def test_decode_reading_keys_up_to_a_length_bucket_gives_the_same_logits(llama):
    """ModelRunner.decode_length_bucket (bench.compile_step's fixed shapes): keys read past each row's length, up to
    the bucket, are masked; rows of different lengths, with and without adapters, crossing a bucket's end."""
    runner, registry, tokenizer = llama.runner()
    slots = [tuple(a.slot for a in registry.load_blocking(names)) for names in ([], ["lora"], ["oft", "lokr"])]
    prompts = ["A short one.", "A somewhat longer prompt than the first, by a few words.", "Third."]

    def logits(bucket: int) -> list[torch.Tensor]:
        runner.decode_length_bucket = bucket
        rows = [PromptSequence(encode_prompt(tokenizer, p), s) for p, s in zip(prompts, slots, strict=True)]
        return greedy_logits(runner, rows, 12)

    exact, bucketed = logits(1), logits(16)
    assert runner.cache._length % 16 == 0  # the bucket was read
    for row, (a, b) in enumerate(zip(exact, bucketed, strict=True)):
        assert torch.allclose(a, b, atol=ATOL, rtol=0), (row, float((a - b).abs().max()))
