"""The paths that only a GPU takes, run on the CPU where they can be: the host tier's pinned copies (through a fake
allocator and event), and a device error that no request caused (the exception injected). On a GPU
(MIXSERVE_TEST_DEVICE=cuda) the tests marked so run the real pinned memory and CUDA events."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

import server.state
from server.adapters import host
from server.adapters import registry as registry_module
from server.engine.fatal import device_fatal
from tests.conftest import DEVICE, on_cpu_only

PROMPT = "The quick brown fox"


class FakeEvent:
    def __init__(self, log: list):
        self.log = log
        log.append("record")

    def synchronize(self) -> None:
        self.log.append("wait")


@pytest.fixture
def fake_pinning(monkeypatch) -> list:
    """Pinned allocations and CUDA events without a GPU: plain host memory, and events that log their use."""
    log: list = []

    def allocate(nbytes: int, pin: bool) -> torch.Tensor:
        log.append(("allocate", nbytes, pin))
        return torch.empty(nbytes, dtype=torch.uint8)

    monkeypatch.setattr(host, "_allocate", allocate)
    monkeypatch.setattr(host, "_recorded_event", lambda: FakeEvent(log))
    monkeypatch.setattr(registry_module, "release_cached", lambda: log.append("release"))
    return log


def test_an_adapter_leaves_the_device_in_one_pinned_buffer_and_is_read_after_its_event(llama, fake_pinning):
    _, registry, _ = llama.runner()
    built = registry.load_blocking(["lora"])[0].built
    copy = built.to_host(pin=True)
    ((_, nbytes, pinned),) = [entry for entry in fake_pinning if entry[0] == "allocate"]
    assert pinned and fake_pinning[-1] == "record"  # the copies are queued, then the event
    storage = copy.host.buffer.untyped_storage().data_ptr()
    for name, layer in copy.layers.items():
        original = built.layers[name]
        for ours, theirs in zip(layer.tensors(), original.tensors(), strict=True):
            assert ours.untyped_storage().data_ptr() == storage and ours.data_ptr() % host.ALIGNMENT == 0
            assert torch.equal(ours, theirs.cpu()) and ours.dtype == theirs.dtype
        assert len(layer.tensors()) == len(original.tensors())  # a tensor held twice is still one
    assert nbytes == sum(-(-t.nbytes // 64) * 64 for layer in built.layers.values() for t in layer.tensors())
    assert copy.host.nbytes == host.pinned_bytes(nbytes) == built.host_nbytes(pin=True)
    assert copy.host.nbytes >= nbytes > copy.host.nbytes // 2  # a power of two: what the allocator takes

    back = copy.to(torch.device("meta"))  # any device but the CPU: the copy back waits for the event first
    assert fake_pinning[-1] == "wait" and back.host is None
    copy.to(torch.device("meta"))
    assert fake_pinning.count("wait") == 1  # waited once


def test_pinned_bytes_are_the_allocators_power_of_two_blocks():
    assert [host.pinned_bytes(n) for n in (0, 1, 4096, 4097, 3 << 20)] == [1, 1, 4096, 8192, 4 << 20]


@on_cpu_only("it pretends the CPU registry's device is a GPU; on one, test_pinned_host_tier_on_the_gpu runs")
def test_the_host_tier_counts_the_bytes_it_pins_as_allocated(llama, fake_pinning):
    _, registry, _ = llama.runner()
    first, second = registry.load_blocking(["lora", "lokr"])
    pinned = [a.built.host_nbytes(pin=True) for a in (first, second)]
    registry.device = torch.device("cuda")  # only where the host tier decides what to pin: nothing runs on it
    registry.host_cache = sum(pinned) - 1  # both fit when counted by their tensors' bytes, not when pinned
    assert first.nbytes + second.nbytes <= registry.host_cache
    for adapter in (first, second):
        registry._evict(adapter)
    assert registry.describe("lokr")["state"] == "host" and registry.describe("lora")["state"] != "host"
    assert "release" in fake_pinning  # the dropped copy's block goes back to the system
    assert second.built.host.nbytes == pinned[1] <= registry.host_cache


@pytest.mark.skipif(DEVICE != "cuda", reason="pinned memory and CUDA events need a GPU")
def test_pinned_host_tier_on_the_gpu(llama):
    _, registry, _ = llama.runner()
    built = registry.load_blocking(["lora"])[0].built
    before = torch.cuda.host_memory_stats()["active_bytes.current"]  # pinned blocks handed out (rounded)
    copy = built.to_host(pin=True)
    assert copy.host.buffer.is_pinned() and copy.host.event is not None
    copy.host.wait()
    taken = torch.cuda.host_memory_stats()["active_bytes.current"] - before
    assert taken == copy.host.nbytes, "what the host tier counts is what the allocator took"
    back = copy.to(torch.device("cuda"))
    for name, layer in back.layers.items():
        for ours, theirs in zip(layer.tensors(), built.layers[name].tensors(), strict=True):
            assert torch.equal(ours, theirs)


@pytest.mark.parametrize(
    ("error", "fatal"),
    [
        (torch.AcceleratorError("CUDA error: an illegal memory access was encountered"), True),
        (RuntimeError("CUDA error: device-side assert triggered"), True),
        (RuntimeError("CUDA error: uncorrectable ECC error encountered"), True),
        (RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx( handle, ...)`"), True),
        (RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"), True),
        (RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered"), True),
        (RuntimeError("CUDA driver error: unspecified launch failure"), True),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),
        (RuntimeError("CUDA error: out of memory"), False),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
        (ValueError("CUDA error: not a device's"), False),
    ],
    ids=str,
)
def test_device_errors_are_told_from_a_requests_own(error, fatal):
    assert device_fatal(error) is fatal


def _stream(server, new_tokens: int = 40) -> list[dict]:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": new_tokens, "ignore_eos_token": True}}
    with httpx.Client(base_url=server.url, timeout=120) as client:
        with client.stream("POST", "/generate_stream", json=body) as response:
            assert response.status_code == 200
            return [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")]


def test_a_device_error_fails_every_request_with_503_and_the_replica_exits(serve, llama, monkeypatch):
    exits = []
    monkeypatch.setattr(server.state, "exit_soon", lambda: exits.append(1))
    running = serve(llama.settings())
    runner = running.state.engine.runner

    def decode():  # the first decode after the prompt's pass meets a poisoned device
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(runner, "decode", decode)
    events = _stream(running)
    assert "token" in events[0] and events[-1]["error_type"] == "unavailable", events
    assert "device failed" in events[-1]["error"] and "illegal memory access" in events[-1]["error"]
    assert exits == [1]
    with httpx.Client(base_url=running.url, timeout=30) as client:
        for path in ("/health", "/ready"):
            response = client.get(path)
            assert response.status_code == 503 and set(response.json()) == {"error", "error_type"}, path
        late = client.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}})
        assert late.status_code == 503 and "being replaced" in late.json()["error"]


def test_out_of_memory_stays_the_failure_of_the_pass_that_met_it(serve, llama, monkeypatch):
    exits = []
    monkeypatch.setattr(server.state, "exit_soon", lambda: exits.append(1))
    running = serve(llama.settings())
    runner, failures = running.state.engine.runner, [1]
    original = runner.decode

    def decode():
        if failures:
            failures.pop()
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original()

    monkeypatch.setattr(runner, "decode", decode)
    events = _stream(running, new_tokens=8)
    assert not failures and len(events) == 8 and "error" not in events[-1]
    assert exits == [] and httpx.get(f"{running.url}/health", timeout=30).status_code == 200


def test_a_device_error_in_prompt_scoring_is_no_requests_fault():
    """Scoring prompts (echo with logprobs) hands a device error up to the engine, as prefill and decode do, instead
    of failing the prompts one by one on a broken device."""
    from types import SimpleNamespace

    from server.engine.passes import IsolatedPasses

    def score(*args):
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    runner = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(vocab_size=16)), pad_id=0, score=score)
    failed = []
    passes = IsolatedPasses(runner, lambda seq, exc: failed.append(seq), lambda seq: None)
    seqs = [SimpleNamespace(request=SimpleNamespace(prompt_ids=[1, 2, 3]), slots=(), weights=()) for _ in range(2)]
    with pytest.raises(torch.AcceleratorError):
        passes._score_prompts(seqs)
    assert failed == []
