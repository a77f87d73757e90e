"""The prefix cache: a request computes only what follows the cached blocks of an earlier prompt's prefix, exactly,
and only within the same tenant, adapters, adapter versions and weights; cached blocks are evicted, least recently
released first, when the pool needs them."""

from __future__ import annotations

import asyncio
import shutil

import httpx
import pytest
import torch
from prometheus_client import generate_latest

from server.adapters.combination import Combination
from server.engine.kv_cache import BLOCK_SIZE, BlockPool, chain_keys
from server.engine.runner import PromptSequence
from server.engine.sampling import SamplingParams
from server.engine.sequence import GenerationRequest
from server.metrics import Metrics
from server.model import encode_prompt
from server.state import ServerState
from tests.conftest import ATOL, greedy_logits
from tests.reference import reference_greedy, reference_logits
from tests.test_kv_cache import streamed_in_waves

SYSTEM = [3 + (11 * j) % 200 for j in range(40)]  # two full blocks and 8 tokens
MIX = {"oft": 1.0, "lora": 0.5, "loha": -0.7}  # in canonical order
SYSTEM_TEXT = "You are a helpful assistant. Answer briefly and exactly, in one line. "  # 70 tokens


def _prompt(i: int, n: int) -> list[int]:
    return [3 + (7 * i + 13 * j) % 200 for j in range(n)]


# --- the pool


def test_cached_blocks_are_shared_kept_free_and_evicted_least_recently_released_first():
    pool, a, b, c = BlockPool(4), object(), object(), object()
    keys = chain_keys(b"scope", list(range(3 * BLOCK_SIZE)), 3)
    pool.allocate(a, 3 * BLOCK_SIZE + 1)  # blocks 1..4
    pool.register(a, keys)
    assert pool.lookup(keys) == [1, 2, 3] and pool.lookup(keys[:1]) == [1]
    pool.attach(b, pool.lookup(keys[:2]))
    assert pool.free == 0 and pool.cached == 3
    pool.deallocate(a)
    assert pool.free == 2 and pool.used == 2  # block 4 to the heap, block 3 cached but free; 1 and 2 still b's
    pool.deallocate(b)
    assert pool.free == 4 and pool.used == 0 and pool.cached == 3
    assert pool.allocate(c, 1) == [4]  # the heap first
    assert pool.allocate(c, BLOCK_SIZE + 1) == [3]  # then the chain's tail, released first
    assert pool.lookup(keys) == [1, 2] and pool.cached == 2
    pool.deallocate(c)
    assert pool.free == pool.total and pool.lookup(keys) == [1, 2]


def test_chain_keys_depend_on_the_scope_and_every_earlier_token():
    tokens = list(range(2 * BLOCK_SIZE))
    keys = chain_keys(b"a", tokens, 2)
    assert chain_keys(b"b", tokens, 2)[0] != keys[0]
    assert chain_keys(b"a", [99, *tokens[1:]], 2)[1] != keys[1]
    assert chain_keys(b"a", tokens + [5], 2) == keys


# --- exactness in the runner


@pytest.fixture(scope="module")
def runner(llama):
    runner, registry, _ = llama.runner()
    return runner, registry


def _sequence(registry, weights: dict, prompt: list[int], scope: bytes) -> PromptSequence:
    adapters = registry.load_blocking(list(weights))
    seq = PromptSequence(prompt, tuple(a.slot for a in adapters), scope)
    seq.weights = tuple(weights[a.name] for a in adapters)
    return seq


def test_rows_at_different_offsets_in_one_batch_equal_the_reference_and_the_cache_off(runner, llama):
    """A prompt cached, then one batch: rows starting after two cached blocks, after one, and after none (another
    combination; a prompt of exactly one block, whose last token's block is never shared), with weights."""
    runner, registry = runner
    other = {"lokr": 1.0, "shira": 1.0}
    rows = [
        (MIX, SYSTEM + [9, 8, 7, 6, 5]),
        (other, _prompt(1, 30)),
        (MIX, SYSTEM[:20]),
        (MIX, SYSTEM[: BLOCK_SIZE + 1]),
        (MIX, SYSTEM[:BLOCK_SIZE]),
    ]
    scopes = {id(MIX): b"mix", id(other): b"other"}

    def run(cached: bool) -> tuple[list[torch.Tensor], int]:
        runner.prefix_cache = cached
        greedy_logits(runner, [_sequence(registry, MIX, SYSTEM + [1, 2, 3], b"mix")], 2)
        hits = runner.prefix_hit_tokens
        seqs = [_sequence(registry, w, p, scopes[id(w)]) for w, p in rows]
        logits = greedy_logits(runner, seqs, 4)
        return logits, runner.prefix_hit_tokens - hits, [s.tokens for s in seqs]

    try:
        off, off_hits, off_tokens = run(False)
        on, on_hits, on_tokens = run(True)
    finally:
        runner.prefix_cache = True
    assert (off_hits, on_hits) == (0, 2 * BLOCK_SIZE + BLOCK_SIZE + BLOCK_SIZE)
    assert on_tokens == off_tokens
    for (weights, prompt), ours, without, tokens in zip(rows, on, off, on_tokens, strict=True):
        torch.testing.assert_close(ours, without, atol=ATOL, rtol=0)
        names = list(weights)
        expected = reference_logits(llama.model_dir, llama.store, names, prompt + tokens[:-1], weights=weights)
        torch.testing.assert_close(ours, expected[len(prompt) - 1 :], atol=ATOL, rtol=0)
    pool = runner.cache.pool
    assert pool.free == pool.total and pool.cached > 0 and not pool.tables


# --- scopes, through the engine


@pytest.fixture(scope="module")
def state(llama):
    state = ServerState.start(llama.settings(max_batch_size=8))
    yield state
    state.stop()


def _request(rid: str, prompt: list[int], weights: dict, new_tokens: int = 6, **params) -> GenerationRequest:
    combination = Combination(tuple(weights), tuple(weights.values()))
    params = {"max_new_tokens": new_tokens, "ignore_eos": True, **params}
    return GenerationRequest(rid, prompt, combination, SamplingParams(**params))


def _hits(engine, request: GenerationRequest):
    before = engine.runner.prefix_hit_tokens
    seq = asyncio.run(engine.generate(request))
    return engine.runner.prefix_hit_tokens - before, seq


def test_a_prefix_is_shared_by_the_same_combination_only(state, llama):
    engine = state.engine
    assert _hits(engine, _request("first", SYSTEM + [4], MIX))[0] == 0
    cases = [
        ("another combination", {"oft": 1.0, "lora": 0.5}, 0),
        ("other weights", {"oft": 1.0, "lora": 0.6, "loha": -0.7}, 0),
        ("no adapters", {}, 0),
        ("the same", MIX, 2 * BLOCK_SIZE),
    ]
    for label, weights, expected_hits in cases:
        hits, seq = _hits(engine, _request(label, SYSTEM + [5, 6], weights))
        assert hits == expected_hits, label
        reference = reference_greedy(llama.model_dir, llama.store, list(weights), SYSTEM + [5, 6], 6, weights)
        assert seq.tokens == reference, label


def _generate_text(server, key: str | None, adapters, tokens: int = 6) -> tuple[int, str]:
    """(prefix cache hit tokens, generated text) of one /generate call."""
    runner = server.state.engine.runner
    before = runner.prefix_hit_tokens
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"inputs": SYSTEM_TEXT + "Hi", "adapters": adapters, "parameters": {"max_new_tokens": tokens}}
    response = httpx.post(f"{server.url}/generate", json=body, headers=headers, timeout=120)
    assert response.status_code == 200, response.text
    return runner.prefix_hit_tokens - before, response.json()["generated_text"]


def _expected_text(server, llama, store, names: list[str], tokens: int = 6) -> str:
    tokenizer = server.state.tokenizer
    ids = encode_prompt(tokenizer, SYSTEM_TEXT + "Hi")
    return tokenizer.decode(reference_greedy(llama.model_dir, store, names, ids, tokens), skip_special_tokens=True)


def test_a_prefix_is_never_shared_across_tenants(serve, llama):
    server = serve(llama.settings(api_keys="tenant-one-key,tenant-two-key"))
    first = _generate_text(server, "tenant-one-key", ["lora"])
    again = _generate_text(server, "tenant-one-key", ["lora"])
    other = _generate_text(server, "tenant-two-key", ["lora"])
    assert (first[0], again[0], other[0]) == (0, 4 * BLOCK_SIZE, 0)
    assert first[1] == again[1] == other[1] == _expected_text(server, llama, llama.store, ["lora"])


def test_a_prefix_is_never_shared_across_versions_of_an_adapter(serve, llama, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(llama.store / "lora", store / "hot")
    server = serve(llama.settings(adapters_dir=store))
    assert _generate_text(server, None, ["hot"])[0] == 0
    assert _generate_text(server, None, ["hot"])[0] == 4 * BLOCK_SIZE
    for file in ("adapter_config.json", "adapter_model.safetensors"):  # a new version, in place
        (store / "hot" / file).write_bytes((llama.store / "lora.patterns" / file).read_bytes())
    hits, text = _generate_text(server, None, ["hot"])
    assert hits == 0 and text == _expected_text(server, llama, llama.store, ["lora.patterns"])
    assert _generate_text(server, None, ["hot"]) == (4 * BLOCK_SIZE, text)


# --- eviction and accounting


@pytest.fixture(scope="module")
def small(llama):
    """A cache of 12 blocks (192 tokens), for requests of at most 48 + 64 tokens."""
    probe = ServerState.start(llama.settings(max_batch_size=2))
    block_bytes = probe.engine.runner.cache.block_bytes
    probe.stop()
    settings = llama.settings(
        max_batch_size=8, max_input_tokens=48, max_new_tokens=64, kv_cache_memory=12 * block_bytes
    )
    state = ServerState.start(settings)
    yield state
    state.stop()


def test_a_thousand_requests_through_a_small_cache_evict_cached_blocks_and_leak_none(small):
    """Requests on two system prompts and two combinations through 12 blocks: cached blocks are reused and evicted,
    none is ever short for admission, some requests are cancelled, some preempted; after, every block is free and
    nothing holds an adapter."""
    engine, pool = small.engine, small.engine.runner.cache.pool
    combos = [{"lora": 1.0}, {"oft": 1.0, "loha": 0.5}]
    systems = [_prompt(100 + k, 40) for k in range(2)]
    hits, preemptions, evictions = engine.runner.prefix_hit_tokens, engine.preemptions, []
    take = pool._take

    def take_counting_evictions():
        evictions.append(not pool._free)
        return take()

    def request(i: int) -> GenerationRequest:
        prompt = systems[i % 2][: 17 + i % 24] + _prompt(i, 1 + i % 7)
        return _request(f"e{i}", prompt, combos[(i // 2) % 2], 60 if i % 10 == 0 else 1 + i % 6)

    pool._take = take_counting_evictions
    try:
        outcomes = streamed_in_waves(engine, request, 1000, 50, cancel=lambda i: i % 9 == 4)
    finally:
        del pool._take
    assert set(outcomes) == {"done", "cancelled"}, {o for o in outcomes if o not in ("done", "cancelled")}
    assert engine.runner.prefix_hit_tokens > hits and any(evictions) and engine.preemptions > preemptions
    assert (pool.free, pool.used, engine.running, engine.queued) == (pool.total, 0, 0, 0)
    assert not pool.tables and 0 < pool.cached <= pool.total
    assert [a.name for a in small.registry.loaded() if a.refs] == []


# --- the setting and the metrics


def test_the_metrics_count_hits_and_the_setting_turns_the_cache_off(llama):
    for setting, hits in (("on", 2 * BLOCK_SIZE), ("off", 0)):
        state = ServerState.start(llama.settings(prefix_cache=setting))
        try:
            for rid in ("a", "b"):
                asyncio.run(state.engine.generate(_request(rid, SYSTEM + [4], {"lora": 1.0})))
            metrics = Metrics()
            metrics.watch(state)
            text = generate_latest(metrics.registry).decode()
        finally:
            state.stop()
        assert f"mixserve:prefix_cache_hits_total {float(hits)}" in text, setting
        queried = 2 * (len(SYSTEM) + 1) if setting == "on" else 0
        assert f"mixserve:prefix_cache_queries_total {float(queried)}" in text, setting
        cached = 2 if setting == "on" else 0
        assert f"mixserve:prefix_cache_blocks {float(cached)}" in text, setting
