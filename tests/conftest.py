from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn

from server.adapters.registry import AdapterRegistry
from server.adapters.store import AdapterStore
from server.app import create_app
from server.config import Settings
from server.engine.runner import ModelRunner
from server.model import load_model, load_tokenizer
from tests.builders import build_base, build_store

REPO = Path(__file__).resolve().parents[1]

# Where every test that builds a model or a server puts it (README, "GPU"): MIXSERVE_TEST_DEVICE=cuda runs the suite
# on the GPU, MIXSERVE_TEST_DTYPE=bfloat16 in that dtype. Tests that pass their own dtype (precision) keep it.
DEVICE = os.environ.get("MIXSERVE_TEST_DEVICE", "cpu")
DTYPE: torch.dtype = getattr(torch, os.environ.get("MIXSERVE_TEST_DTYPE", "float32"))
if DEVICE not in ("cpu", "cuda") or DTYPE not in (torch.float32, torch.bfloat16, torch.float16):
    raise pytest.UsageError("MIXSERVE_TEST_DEVICE: cpu or cuda; MIXSERVE_TEST_DTYPE: float32, bfloat16 or float16")
# |ours - PEFT's| on logits and logprobs in DTYPE: float32's is the contract (docs/contract.md); the reduced ones are
# test_precision's (stated there) for logprobs, the same bound for logits of the tests' models (|logits| < 60).
ATOL = {torch.float32: 1e-5, torch.bfloat16: 0.3, torch.float16: 0.04}[DTYPE]
EXACT = DTYPE == torch.float32  # greedy tokens equal the reference's: a float32 contract (test_precision: near-ties)
if DEVICE == "cuda":  # read when cuBLAS starts: its deterministic workspace (see exact_numerics)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def on_cpu_only(reason: str):
    """A test that only means something on the CPU: skipped on other devices, with the reason."""
    return pytest.mark.skipif(DEVICE != "cpu", reason=f"CPU only: {reason}")


def needs_float32(reason: str):
    return pytest.mark.skipif(not EXACT, reason=f"float32 only: {reason}")


@pytest.fixture(scope="session", autouse=True)
def exact_numerics():
    set_exact_numerics()


def set_exact_numerics() -> None:
    """On a GPU, float32 matmuls in float32 (no TF32) and deterministic kernels, so that 1e-5 against PEFT means
    there what it means on the CPU. Nothing changes on the CPU."""
    if DEVICE != "cpu":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        torch.use_deterministic_algorithms(True, warn_only=True)


@dataclass
class World:
    """A tiny base model on disk and a store of adapters built for it."""

    architecture: str
    model_dir: Path
    store: Path

    def settings(self, **overrides) -> Settings:
        values = {"model": str(self.model_dir), "adapters_dir": self.store, "device": DEVICE}
        values["dtype"] = dtype_name(DTYPE)
        return Settings(**{**values, **overrides})

    def runner(self, dtype=None) -> tuple[ModelRunner, AdapterRegistry, object]:
        """A private model with its registry, driven from the calling thread (no engine thread)."""
        model, registry = private_model(self.model_dir, AdapterStore(self.store), dtype)
        return ModelRunner(model, registry.context), registry, load_tokenizer(self.model_dir)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def greedy_logits(runner: ModelRunner, seqs: list, steps: int) -> list[torch.Tensor]:
    """Runner-level greedy generation: each row's logits at each step, [steps + 1, vocab], greedy; the rows released after."""
    out = [[] for _ in seqs]
    logits = runner.prefill(seqs)
    for step in range(steps + 1):
        for row, seq in enumerate(seqs):
            out[row].append(logits[row])
            seq.tokens.append(int(logits[row].argmax()))
        if step < steps:
            logits = runner.decode()
    for seq in seqs:
        runner.release(seq)
    return [torch.stack(rows).cpu() for rows in out]


def private_model(model_dir: Path, store, dtype: torch.dtype | None = None, **registry) -> tuple:
    """(model, registry) on the tests' device, for tests that drive them without an engine."""
    model = load_model(model_dir, torch.device(DEVICE), dtype or DTYPE)
    return model, AdapterRegistry(model, store, torch.device(DEVICE), dtype or DTYPE, **registry)


_worlds: dict[str, World] = {}


@pytest.fixture(scope="session")
def world_factory(tmp_path_factory):
    def make(architecture: str) -> World:
        if architecture not in _worlds:
            root = tmp_path_factory.mktemp(architecture)
            model_dir = build_base(root / f"tiny-{architecture}", architecture)
            _worlds[architecture] = World(architecture, model_dir, build_store(model_dir, root / "store"))
        return _worlds[architecture]

    return make


@pytest.fixture(scope="session")
def llama(world_factory) -> World:
    return world_factory("llama")


class ServerThread:
    """The real app under uvicorn on a loopback port, in a background thread."""

    def __init__(self, settings: Settings):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.app = create_app(settings)
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        self.sock.close()

    @property
    def state(self):
        return self.app.state.mixserve

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120)


@pytest.fixture(scope="session")
def serve():
    """serve(settings) -> a started ServerThread, stopped at the end of the session."""
    running: list[ServerThread] = []

    def start(settings: Settings) -> ServerThread:
        server = ServerThread(settings).__enter__()
        running.append(server)
        return server

    yield start
    for server in running:
        server.__exit__()


def run(coro):
    return asyncio.run(coro)
