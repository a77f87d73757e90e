"""Continuous batching: rows with different combinations share forward passes and still equal the reference."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest
import torch

from server.adapters.combination import Combination
from server.adapters.registry import NoRoom
from server.engine.kv_cache import BlockPool
from server.engine.sampling import SamplingParams
from server.engine.scheduler import Scheduler
from server.engine.sequence import GenerationRequest
from server.errors import AdapterLoadFailed, CacheTooSmall
from server.model import encode_prompt
from server.state import ServerState
from tests.builders import ADAPTERS
from tests.conftest import ATOL, EXACT
from tests.reference import reference_greedy, reference_logits

SIX = list(ADAPTERS)


@pytest.fixture(scope="module")
def state(llama):
    # preloaded: a wave waiting for its adapters to load would let the rows before it finish first
    state = ServerState.start(llama.settings(max_batch_size=8, preload=",".join(SIX)))
    yield state
    state.stop()


def _request(state, prompt: str, names: list[str], new_tokens: int, rid: str = "r") -> GenerationRequest:
    ids = encode_prompt(state.tokenizer, prompt)
    return GenerationRequest(rid, ids, Combination(tuple(names)), SamplingParams(max_new_tokens=new_tokens))


def _assert_matches_reference(world, seq) -> None:
    names, prompt = list(seq.request.adapters.names), seq.request.prompt_ids
    if EXACT:  # in reduced precision a near-tie may go either way: the logprobs below still hold
        assert seq.tokens == reference_greedy(world.model_dir, world.store, names, prompt, len(seq.tokens))
    # every generated token's logprob equals the reference's log-softmax at that position
    logits = reference_logits(world.model_dir, world.store, names, prompt + seq.tokens[:-1]).float()
    expected = logits[len(prompt) - 1 :].log_softmax(-1).gather(1, torch.tensor(seq.tokens)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(seq.logprobs), expected, atol=ATOL, rtol=0)


def test_rows_with_0_1_2_and_6_adapters_joining_mid_generation_equal_the_reference(state, llama):
    first_wave = [
        ("Short.", []),
        ("A somewhat longer prompt about cats", ["lora"]),
        ("Mid length prompt", ["oft", "loha"]),
        ("Everything at once, please!", SIX),
    ]
    second_wave = [
        ("Late joiner with a long prompt to pad the batch out", ["shira", "lokr"]),
        ("x", ["adalora"]),
        ("Another late one", SIX[::-1]),
        ("Base again", []),
    ]

    async def run():
        engine = state.engine
        firsts = [engine.submit(_request(state, p, n, 24, f"a{i}")) for i, (p, n) in enumerate(first_wave)]
        streams = [h.stream() for h in firsts]
        for stream in streams:  # the first wave is decoding before the second arrives
            for _ in range(3):
                await anext(stream)
        seconds = [engine.submit(_request(state, p, n, 16, f"b{i}")) for i, (p, n) in enumerate(second_wave)]
        for stream in streams:
            async for _ in stream:
                pass
        return [h.seq for h in firsts], [await h.result() for h in seconds]

    firsts, seconds = asyncio.run(run())
    assert min(s.admitted_at for s in seconds) < min(s.finished_at for s in firsts), "the waves should overlap"
    for seq in firsts + seconds:
        _assert_matches_reference(llama, seq)


def test_same_request_alone_and_in_a_crowd_is_identical(state):
    async def run(crowd: int):
        crowd_combos = [["lora", "lokr"][: i % 3] for i in range(crowd)]
        handles = [state.engine.submit(_request(state, f"crowd {i}", c, 12)) for i, c in enumerate(crowd_combos)]
        target = state.engine.submit(_request(state, "The target", ["oft", "adalora", "shira"], 12))
        results = [await h.result() for h in handles]
        return await target.result(), results

    alone, _ = asyncio.run(run(0))
    crowded, others = asyncio.run(run(7))
    assert crowded.tokens == alone.tokens and crowded.logprobs == pytest.approx(alone.logprobs, abs=ATOL)
    assert len({tuple(s.tokens) for s in others}) > 1


def test_row_without_adapters_among_every_type_equals_it_alone(state):
    """Decode on CPU runs a mixed layer's operations on one thread; a row without adapters runs the base alone."""

    async def run(crowd: list[list[str]]):
        handles = [state.engine.submit(_request(state, f"crowd {i}", c, 12)) for i, c in enumerate(crowd)]
        target = state.engine.submit(_request(state, "The target", [], 12))
        results = [await h.result() for h in handles]
        return await target.result(), results

    alone, _ = asyncio.run(run([]))
    crowded, _ = asyncio.run(run([["oft", "lora"], ["lokr", "adalora"], ["shira"], ["oft", "adalora", "shira"]]))
    assert crowded.tokens == alone.tokens and crowded.logprobs == pytest.approx(alone.logprobs, abs=ATOL)


def test_stream_yields_each_token_once_in_order(state):
    async def run():
        handle = state.engine.submit(_request(state, "Stream me", ["loha"], 10))
        events = [event async for event in handle.stream()]
        return events, handle.seq

    events, seq = asyncio.run(run())
    assert [e.index for e in events] == list(range(len(seq.tokens)))
    assert [e.token for e in events] == seq.tokens


def test_cancelled_request_leaves_the_batch_at_the_next_step(state):
    async def run():
        handle = state.engine.submit(_request(state, "Cancel me", ["lora"], 500))
        stream = handle.stream()
        await anext(stream)
        handle.cancel()
        with pytest.raises(asyncio.CancelledError):
            async for _ in stream:
                pass
        return handle.seq

    seq = asyncio.run(run())
    assert len(seq.tokens) < 50
    assert state.engine.running == 0


def test_client_disconnect_frees_its_row(serve, llama, monkeypatch):
    """The client goes away while its request is decoding. After its first token, every pass waits until the
    request is cancelled: it cannot finish, whatever the machine's speed; only the disconnect frees its row."""
    server = serve(llama.settings())
    engine, model, handles = server.state.engine, server.state.engine.model, []
    submit, original = engine.submit, model.forward

    def forward(*args, **kwargs):
        deadline = time.monotonic() + 60
        while handles and handles[0].seq.tokens and not handles[0].seq.cancelled and time.monotonic() < deadline:
            time.sleep(0.01)
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "submit", lambda gen: handles.append(submit(gen)) or handles[-1])
    monkeypatch.setattr(model, "forward", forward)
    body = json.dumps(
        {"inputs": "Long one", "adapters": ["oft"], "parameters": {"max_new_tokens": 240, "ignore_eos_token": True}}
    ).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as client:
        client.sendall(
            b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        deadline = time.monotonic() + 60
        while not (handles and handles[0].seq.tokens) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert handles[0].seq.tokens, "the request did not start decoding"
    deadline = time.monotonic() + 60
    while handles[0].seq.finished_at is None and time.monotonic() < deadline:
        time.sleep(0.01)
    seq = handles[0].seq
    assert seq.cancelled and seq.finish_reason is None and len(seq.tokens) < 240
    deadline = time.monotonic() + 10
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.running == 0
    monkeypatch.undo()
    with server.client() as client:
        assert client.post("/generate", json={"inputs": "next", "parameters": {"max_new_tokens": 2}}).status_code == 200


def test_full_queue_gets_429_with_retry_after(serve, llama):
    server = serve(llama.settings(max_batch_size=1, max_queue=2))
    body = {"inputs": "busy", "parameters": {"max_new_tokens": 200}}

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            first = asyncio.create_task(client.post("/generate", json=body))
            deadline = time.monotonic() + 60  # the others arrive once it runs, whatever the machine's speed
            while server.state.engine.running == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            rest = await asyncio.gather(*(client.post("/generate", json=body) for _ in range(7)))
            return [await first, *rest]

    responses = asyncio.run(run())
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) >= 3 and 429 in statuses, statuses
    rejected = next(r for r in responses if r.status_code == 429)
    assert rejected.headers["retry-after"] == "1"
    assert rejected.json()["error_type"] == "overloaded"


def test_no_combination_waits_behind_later_requests(serve, llama):
    """A rare combination behind a flood of another: served before everything submitted after it."""
    server = serve(llama.settings(max_batch_size=2, max_queue=100))

    async def run():
        engine = server.state.engine
        before = [engine.submit(_request(server.state, f"flood {i}", ["lora"], 20)) for i in range(12)]
        rare = engine.submit(_request(server.state, "rare", ["oft", "shira", "lokr"], 20))
        after = [engine.submit(_request(server.state, f"flood {i}", ["lora"], 20)) for i in range(12)]
        for handle in before + [rare] + after:
            await handle.result()
        return rare.seq, [h.seq for h in before], [h.seq for h in after]

    rare, before, after = asyncio.run(run())
    assert rare.admitted_at <= min(s.admitted_at for s in after)
    assert rare.finished_at < max(s.finished_at for s in after)
    assert max(s.admitted_at for s in before) <= rare.admitted_at


class Waiting:
    """What the scheduler reads of a waiting request."""

    def __init__(self, n: int = 2, adapters: tuple[str, ...] = ()):
        self.request = GenerationRequest("f", [1] * n, Combination(adapters), SamplingParams())
        self.cancelled = False
        self.num_tokens = n


ROOMY = BlockPool(1000)


def test_scheduler_admits_in_order_within_batch_and_token_budget():
    Fake = Waiting

    def ready(seq, protected):
        return True

    def lengths(seqs):
        return [len(s.request.prompt_ids) for s in seqs]

    scheduler = Scheduler(max_batch_size=4, max_batch_tokens=100)
    for n in (30, 30, 30, 500, 5):
        scheduler.add(Fake(n))
    assert lengths(scheduler.admit(0, ready, ROOMY)[0]) == [30, 30, 30]
    assert lengths(scheduler.admit(3, ready, ROOMY)[0]) == [500]  # the oldest goes, alone
    assert scheduler.admit(4, ready, ROOMY) == ([], [])
    assert lengths(scheduler.admit(0, ready, ROOMY)[0]) == [5]


def test_scheduler_admits_what_the_cache_holds_and_refuses_what_it_never_can():
    """A prompt is admitted when its blocks fit beside a block for each running row's next token; one longer than
    the whole cache is refused (422) rather than left waiting."""
    pool = BlockPool(10)  # 160 tokens
    scheduler = Scheduler(max_batch_size=8, max_batch_tokens=1000)
    for n in (64, 48, 40, 161, 16):  # 4, 3, 3 blocks; 161 tokens: 11 blocks
        scheduler.add(Waiting(n))
    admitted, failed = scheduler.admit(1, lambda seq, protected: True, pool)  # one running: 9 blocks to give
    assert [s.num_tokens for s in admitted] == [64, 48]  # 4 + 1 and 3 + 1 (the next decode's blocks) of 9
    assert not failed
    admitted, failed = scheduler.admit(0, lambda seq, protected: True, pool)
    assert [s.num_tokens for s in admitted] == [40, 16]
    assert [(s.num_tokens, type(e)) for s, e in failed] == [(161, CacheTooSmall)]
    assert failed[0][1].status_code == 422


def test_scheduler_skips_loading_requests_and_stops_at_one_short_of_memory():
    def Fake(adapter):  # noqa: N802
        return Waiting(2, (adapter,))

    seen = []

    def ready(seq, protected):
        seen.append((seq.request.adapters.names[0], set(protected)))
        state = seq.request.adapters.names[0]
        if state == "loading":
            return False
        if state == "no-room":
            raise NoRoom(state)
        if state == "broken":
            raise AdapterLoadFailed("broken")
        return True

    scheduler = Scheduler(max_batch_size=8, max_batch_tokens=1000)
    for adapter in ("loading", "ok", "broken", "no-room", "later"):
        scheduler.add(Fake(adapter))
    admitted, failed = scheduler.admit(0, ready, ROOMY)
    assert [str(s.request.adapters) for s in admitted] == ["ok"]
    assert [str(s.request.adapters) for s, _ in failed] == ["broken"]
    assert [str(s.request.adapters) for s in scheduler.waiting] == ["loading", "no-room", "later"]
    assert ("later", {"loading"}) not in seen  # nothing behind the request short of memory was tried
    assert ("ok", {"loading"}) in seen  # adapters of older waiting requests are protected


def test_scheduler_keeps_an_unexpected_error_with_the_request_that_raised_it():
    def Fake(adapter):  # noqa: N802
        return Waiting(2, (adapter,))

    def ready(seq, protected):
        if str(seq.request.adapters) == "crash":
            raise OSError("stat failed")
        return True

    scheduler = Scheduler(max_batch_size=8, max_batch_tokens=1000)
    for adapter in ("ok", "crash", "later"):
        scheduler.add(Fake(adapter))
    admitted, failed = scheduler.admit(0, ready, ROOMY)
    assert [str(s.request.adapters) for s in admitted] == ["ok", "later"]
    assert [(str(s.request.adapters), type(e)) for s, e in failed] == [("crash", OSError)]
    assert not scheduler.waiting
