"""Adapter lifecycle: loads off the hot path and single-flight, memory budget and host tier, hot reload,
failed loads, the load/unload API, preloads."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from server.adapters.mixing import _threads
from server.adapters.store import AdapterStore
from server.errors import AdapterLoadFailed
from server.model import encode_prompt
from tests.conftest import on_cpu_only, private_model
from tests.reference import reference_greedy

PROMPT = "Adapters come and go"


@pytest.fixture()
def store(llama, tmp_path) -> Path:
    """A store of its own (tests write into it): copies of some of llama's adapters."""
    root = tmp_path / "store"
    for name in ("lora", "oft", "loha", "lokr", "shira", "adalora", "lora.patterns"):
        shutil.copytree(llama.store / name, root / name)
    return root


def start(serve, llama, store, **settings):
    return serve(llama.settings(adapters_dir=store, **{"load_retry_seconds": 0.2, **settings}))


def count_reads(server) -> list[str]:
    """Names read from disk from now on (the loader's only way to the files)."""
    reads, store = [], server.state.store
    original = store.read

    def read(name):
        reads.append(name)
        return original(name)

    store.read = read
    return reads


def generate(server, adapters, tokens=8, **parameters) -> httpx.Response:
    body = {"inputs": PROMPT, "adapters": adapters, "parameters": {"max_new_tokens": tokens, **parameters}}
    return httpx.post(f"{server.url}/generate", json=body, timeout=120)


def listed(server) -> dict[str, dict]:
    return {a["name"]: a for a in httpx.get(f"{server.url}/adapters").json()["adapters"]}


def expected_text(server, world, store, names, tokens) -> str:
    ids = encode_prompt(server.state.tokenizer, PROMPT)
    out = reference_greedy(world.model_dir, store, names, ids, tokens)
    return server.state.tokenizer.decode(out, skip_special_tokens=True)


class Stream:
    """A long streamed request in a thread: its text once done."""

    def __init__(self, server, adapters, tokens=150):
        self.first = threading.Event()
        self.events: list[dict] = []
        body = {
            "inputs": PROMPT,
            "adapters": adapters,
            "parameters": {"max_new_tokens": tokens, "ignore_eos_token": True},
        }
        self.thread = threading.Thread(target=self._run, args=(server.url, body), daemon=True)
        self.thread.start()
        assert self.first.wait(60), "the stream did not start"

    def _run(self, url, body):
        with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    self.events.append(json.loads(line[5:]))
                    self.first.set()

    def text(self) -> str:
        self.thread.join(120)
        return self.events[-1]["generated_text"]


def test_concurrent_requests_for_a_cold_adapter_load_it_once(serve, llama, store):
    server = start(serve, llama, store)
    reads = count_reads(server)

    async def burst():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            body = {"inputs": PROMPT, "adapters": ["loha", "oft"], "parameters": {"max_new_tokens": 4}}
            return await asyncio.gather(*(client.post("/generate", json=body) for _ in range(12)))

    responses = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses)
    assert len({r.json()["generated_text"] for r in responses}) == 1
    assert sorted(reads) == ["loha", "oft"]
    states = listed(server)
    assert states["loha"]["state"] == "loaded" and states["loha"]["last_load_ms"] > 0


def test_requests_without_the_loading_adapter_keep_decoding(serve, llama, store):
    server = start(serve, llama, store)
    original = server.state.store.read

    def slow_read(name):
        if name == "shira":
            time.sleep(1.5)
        return original(name)

    server.state.store.read = slow_read
    stream = Stream(server, ["lora"], tokens=120)
    tokens_before = len(stream.events)
    started = time.monotonic()
    slow = generate(server, ["shira"], tokens=2)
    assert slow.status_code == 200 and time.monotonic() - started >= 1.5
    assert len(stream.events) > tokens_before + 10, "the running stream stalled during the load"
    stream.text()


def test_eviction_under_a_tiny_budget_spares_the_adapter_in_use(serve, llama, store):
    server = start(serve, llama, store, max_loaded_adapters=2, host_cache=0)
    stream = Stream(server, ["lora"], tokens=150)
    assert generate(server, ["oft"]).status_code == 200
    assert generate(server, ["loha"]).status_code == 200  # no room: oft (idle) goes, lora (in use) stays
    states = listed(server)
    assert states["lora"]["state"] == "loaded" and states["loha"]["state"] == "loaded"
    assert "oft" not in states or states["oft"]["state"] == "available"
    assert stream.text() == expected_text(server, llama, store, ["lora"], 150)
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "mixserve:adapter_evictions_total 1.0" in metrics


def test_a_request_needing_more_room_than_exists_waits_for_running_ones(serve, llama, store):
    server = start(serve, llama, store, max_loaded_adapters=1)
    stream = Stream(server, ["lora"], tokens=100)
    started = time.monotonic()
    other = generate(server, ["oft"], tokens=3)  # waits until the stream releases lora
    assert other.status_code == 200
    stream.text()
    assert len(stream.events) == 100
    assert int(other.headers["x-queue-time"]) >= 0.5 * (time.monotonic() - started) * 1e3  # it waited, queued
    assert other.json()["generated_text"] == expected_text(server, llama, store, ["oft"], 3)


def test_host_tier_brings_an_evicted_adapter_back_without_reading_disk(serve, llama, store):
    server = start(serve, llama, store, max_loaded_adapters=1, host_cache="100MB")
    reads = count_reads(server)
    first = generate(server, ["lokr"]).json()["generated_text"]
    assert generate(server, ["adalora"]).status_code == 200
    assert listed(server)["lokr"]["state"] == "host"
    again = generate(server, ["lokr"]).json()["generated_text"]
    assert again == first == expected_text(server, llama, store, ["lokr"], 8)
    assert reads == ["lokr", "adalora"]
    assert listed(server)["lokr"]["state"] == "loaded" and listed(server)["adalora"]["state"] == "host"


def _replace(store: Path, name: str, source: Path) -> None:
    """Overwrites name's files in place, config first, as a careless writer would."""
    for file in ("adapter_config.json", "adapter_model.safetensors"):
        (store / name / file).write_bytes((source / file).read_bytes())


def test_hot_reload_while_a_request_on_the_old_version_streams(serve, llama, store):
    shutil.copytree(store / "lora", store / "hot")
    server = start(serve, llama, store)
    old_version = (generate(server, ["hot"]), listed(server)["hot"]["version"])[1]
    stream = Stream(server, ["hot"], tokens=150)
    _replace(store, "hot", llama.store / "lora.patterns")
    new = generate(server, ["hot"], tokens=10)
    assert new.json()["generated_text"] == expected_text(server, llama, llama.store, ["lora.patterns"], 10)
    assert listed(server)["hot"]["version"] != old_version
    assert stream.text() == expected_text(server, llama, llama.store, ["lora"], 150)  # finished on the old one


def test_a_corrupt_new_version_leaves_the_old_one_serving(serve, llama, store):
    shutil.copytree(store / "oft", store / "hot")
    server = start(serve, llama, store)
    before = generate(server, ["hot"]).json()["generated_text"]
    weights = store / "hot" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # half-written
    during = generate(server, ["hot"])
    assert during.status_code == 200 and during.json()["generated_text"] == before
    entry = listed(server)["hot"]
    assert entry["state"] == "loaded" and "cannot read adapter_model.safetensors" in entry["error"]
    _replace(store, "hot", llama.store / "oft.by-rank")  # the writer finishes, with a new version
    time.sleep(0.3)  # past the retry delay
    after = generate(server, ["hot"], tokens=8)
    assert after.json()["generated_text"] == expected_text(server, llama, llama.store, ["oft.by-rank"], 8)
    assert "error" not in listed(server)["hot"]


def test_a_failed_load_fails_only_its_requests_and_is_retried(serve, llama, store):
    shutil.copytree(store / "lora", store / "broken")
    (store / "broken" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    server = start(serve, llama, store, load_retry_seconds=2.0)  # long enough for a loaded CI machine
    reads = count_reads(server)

    async def mixed():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:

            def body(adapters):
                return {"inputs": PROMPT, "adapters": adapters, "parameters": {"max_new_tokens": 4}}

            return await asyncio.gather(
                *(
                    client.post("/generate", json=body(a))
                    for a in (["broken"], ["lora"], ["broken", "oft"], [], ["oft"])
                )
            )

    statuses = [r.status_code for r in asyncio.run(mixed())]
    assert statuses == [424, 200, 424, 200, 200]
    assert reads.count("broken") == 1  # single-flight for the failing load too
    failed = generate(server, ["broken"])
    assert failed.json()["error_type"] == "adapter_load" and reads.count("broken") == 1  # within the retry delay
    time.sleep(2.1)
    shutil.copyfile(llama.store / "lora" / "adapter_model.safetensors", store / "broken" / "adapter_model.safetensors")
    assert generate(server, ["broken"]).status_code == 200 and reads.count("broken") == 2


def test_load_and_unload_api(serve, llama, store):
    server = start(serve, llama, store)
    url = server.url
    loaded = httpx.post(f"{url}/adapters/loha/load", timeout=60)
    assert loaded.status_code == 200 and loaded.json()["state"] == "loaded" and loaded.json()["bytes"] > 0
    assert httpx.post(f"{url}/adapters/nope/load").status_code == 404
    assert httpx.post(f"{url}/adapters/..%2Fx/load").status_code in (404, 422)
    stream = Stream(server, ["loha"], tokens=120)
    busy = httpx.delete(f"{url}/adapters/loha")
    assert busy.status_code == 409 and busy.json()["error_type"] == "adapter_in_use"
    stream.text()
    assert httpx.delete(f"{url}/adapters/loha").json() == {"name": "loha", "unloaded": True}
    assert "loha" not in listed(server)
    assert httpx.delete(f"{url}/adapters/loha").status_code == 404
    assert generate(server, ["loha"]).status_code == 200  # loads again
    everything = {a["name"]: a for a in httpx.get(f"{url}/adapters", params={"all": "true"}).json()["adapters"]}
    assert everything["oft"]["state"] == "available" and everything["oft"]["type"] == "OFT"


def test_preloaded_adapters_are_resident_before_the_first_request(serve, llama, store):
    server = start(serve, llama, store, preload="lora,oft")
    states = listed(server)
    assert states["lora"]["state"] == states["oft"]["state"] == "loaded"


def test_an_adapter_larger_than_the_memory_budget_is_refused(serve, llama, store):
    server = start(serve, llama, store, adapter_memory="1KB")
    response = generate(server, ["lora"])
    assert response.status_code == 422 and "MIXSERVE_ADAPTER_MEMORY" in response.json()["error"]


def test_files_changing_during_a_read_are_not_taken_as_an_adapter(store, monkeypatch):
    adapters = AdapterStore(store)
    signatures = iter([("a",), ("b",)])
    monkeypatch.setattr(adapters, "signature", lambda name: next(signatures))
    with pytest.raises(AdapterLoadFailed, match="changed while being read"):
        adapters.read("lora")


def test_a_combination_that_can_never_fit_is_refused_at_once(serve, llama, store, caplog):
    """More adapters than can be resident, or more bytes together than the budget: 422 naming the limit and the
    numbers, not a request stalled at the head of the queue with everything behind it."""
    caplog.set_level(logging.WARNING)
    counted = start(serve, llama, store, max_loaded_adapters=1, request_timeout=30)
    assert counted.state.settings.max_adapters_per_request == 1  # clamped, and said so at start
    assert "MIXSERVE_MAX_ADAPTERS_PER_REQUEST (8) exceeds MIXSERVE_MAX_LOADED_ADAPTERS (1)" in caplog.text
    too_many = generate(counted, ["lora", "oft"])
    assert too_many.status_code == 422
    assert "2 adapters requested; at most 1" in too_many.json()["error"]
    assert "MIXSERVE_MAX_LOADED_ADAPTERS" in too_many.json()["error"]

    sizes = {name: httpx.post(f"{counted.url}/adapters/{name}/load").json()["bytes"] for name in ("lora", "oft")}
    budget = max(sizes.values())  # each fits alone, not both together
    server = start(serve, llama, store, adapter_memory=budget, request_timeout=30)
    started = time.monotonic()
    response = generate(server, ["lora", "oft"])
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert f"{sum(sizes.values())} bytes" in error and f"MIXSERVE_ADAPTER_MEMORY is {budget} bytes" in error
    assert generate(server, []).status_code == 200 and generate(server, ["oft"]).status_code == 200
    assert time.monotonic() - started < 25 and server.state.engine.queued == 0


def test_the_engine_refuses_too_many_adapters_even_past_the_edge(serve, llama, store):
    from server.adapters.combination import Combination
    from server.engine.sampling import SamplingParams
    from server.engine.sequence import GenerationRequest
    from server.errors import ValidationError

    server = start(serve, llama, store, max_loaded_adapters=1)
    ids = encode_prompt(server.state.tokenizer, PROMPT)

    async def submit():
        handle = server.state.engine.submit(
            GenerationRequest("r", ids, Combination(("lora", "oft")), SamplingParams(2))
        )
        return await asyncio.wait_for(handle.result(), 30)

    with pytest.raises(ValidationError, match="MIXSERVE_MAX_LOADED_ADAPTERS allows 1"):
        asyncio.run(submit())
    assert server.state.engine.queued == 0


def test_the_registry_changes_its_entries_only_under_its_lock(llama):
    """Listings iterate the entries under the lock on other threads: every insertion must hold it."""
    _, registry, _ = llama.runner()

    class Guarded(dict):
        def __setitem__(self, key, value):
            assert registry._lock.locked(), f"{key} added without the lock"
            super().__setitem__(key, value)

        def setdefault(self, key, default=None):
            assert key in self or registry._lock.locked(), f"{key} added without the lock"
            return super().setdefault(key, default)

    registry._entries = Guarded()
    assert [a.name for a in registry.load_blocking(["oft", "lora"])] == ["oft", "lora"]


def test_listings_during_first_loads_never_fail(serve, llama, tmp_path):
    """Never-seen adapters arriving while /adapters, /info and /metrics are read in a loop (bounded, loopback)."""
    store = tmp_path / "store"
    names = [f"ns/a{i:02d}" for i in range(24)]
    for name in names:
        shutil.copytree(llama.store / "lora", store / name)
    server = serve(llama.settings(adapters_dir=store))
    errors: list = []
    done = threading.Event()

    def lister():
        with httpx.Client(base_url=server.url, timeout=60) as client:
            for _ in range(2000):
                if done.is_set():
                    return
                for path in ("/adapters", "/adapters?all=true", "/info", "/metrics"):
                    response = client.get(path)
                    if response.status_code != 200:
                        errors.append((path, response.status_code, response.text))

    async def first_loads():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 1}}
            return await asyncio.gather(*(client.post("/generate", json={**body, "adapters": [n]}) for n in names))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # more thread switches inside the iterations
    listers = [threading.Thread(target=lister) for _ in range(3)]
    try:
        for thread in listers:
            thread.start()
        responses = asyncio.run(first_loads())
    finally:
        done.set()
        for thread in listers:
            thread.join(60)
        sys.setswitchinterval(interval)
    assert [r.status_code for r in responses] == [200] * len(names)
    assert errors == []
    assert set(names) <= set(listed(server))


def test_capacity_is_not_counted_from_the_store_on_every_scrape(serve, llama, store):
    server = start(serve, llama, store)
    walks, names = [], server.state.store.names
    server.state.store.names = lambda: walks.append(1) or names()
    for _ in range(5):
        assert 'max_lora="7"' in httpx.get(f"{server.url}/metrics").text
    assert len(walks) <= 1


def test_the_store_listing_reads_configs_off_the_event_loop_and_only_when_they_change(serve, llama, store):
    server = start(serve, llama, store)
    adapters, reads = server.state.store, []
    read_config = adapters.read_config
    adapters.read_config = lambda name: reads.append((name, threading.current_thread())) or read_config(name)
    first = httpx.get(f"{server.url}/adapters", params={"all": "true"}).json()["adapters"]
    assert len(reads) == len(first) == 7 and server.thread not in {thread for _, thread in reads}
    assert {a["name"]: a["type"] for a in first}["oft"] == "OFT"
    reads.clear()
    assert httpx.get(f"{server.url}/adapters", params={"all": "true"}).json()["adapters"] == first
    assert reads == []
    config = store / "oft" / "adapter_config.json"
    config.write_text(config.read_text().replace('"OFT"', '"IA3"') + "\n")  # a new size: a new signature
    changed = {a["name"]: a for a in httpx.get(f"{server.url}/adapters", params={"all": "true"}).json()["adapters"]}
    assert [name for name, _ in reads] == ["oft"] and changed["oft"]["type"] == "IA3"


@on_cpu_only("the model's intra-op threads are the CPU's")
def test_loader_threads_yield_to_the_model_and_leave_its_threads_alone(llama):
    """Loads must not stall running streams: loader threads run at a lower priority (Linux), and nothing they do
    changes the model's intra-op threads (torch's thread count is process-wide for threads not yet started)."""
    import os

    import torch

    from server.adapters.loader import LOADER_NICENESS
    from server.state import ServerState

    threads = torch.get_num_threads()
    state = ServerState.start(llama.settings(preload="lora"))  # a load before the engine's first pass
    try:
        niceness = state.registry.loader._pool.submit(
            lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        ).result(timeout=30)
        assert niceness == min(19, os.getpriority(os.PRIO_PROCESS, 0) + LOADER_NICENESS)
        assert state.engine.call(torch.get_num_threads).result(timeout=30) == threads
    finally:
        state.stop()


def test_a_cancelled_wait_for_a_load_fails_no_other(llama):
    _, registry, _ = llama.runner()
    cancelled, waiting = registry.ensure("lora"), registry.ensure("lora")
    cancelled.cancel()
    deadline = time.monotonic() + 60
    while not waiting.done() and time.monotonic() < deadline:
        registry.poll()
        time.sleep(0.005)
    assert waiting.result(timeout=0).name == "lora"
    registry.close()


def test_shutdown_answers_waits_for_loads(llama):
    from server.errors import ShuttingDown

    _, registry, _ = llama.runner()
    waiting = registry.ensure("oft")
    registry.close()
    with pytest.raises(ShuttingDown):
        waiting.result(timeout=5)


def test_a_loader_thread_started_inside_an_adapted_layer_keeps_torchs_thread_count(llama):
    """An adapted layer runs its small operations on one thread by setting torch's count on the model's thread, which
    also sets the count a thread starting torch work meanwhile takes for good: a loader thread must not keep it."""
    outside = torch.get_num_threads()
    torch.set_num_threads(3)  # not 1, and not what the machine gives by default
    try:
        _model, registry = private_model(llama.model_dir, AdapterStore(llama.store))
        try:
            with _threads(1):  # as MixedLinear does on the model's thread
                loader_threads = registry.loader._pool.submit(torch.get_num_threads).result(timeout=60)
        finally:
            registry.close()
    finally:
        torch.set_num_threads(outside)
    assert loader_threads == 3
