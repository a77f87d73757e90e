from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn

from server.adapters.registry import AdapterRegistry
from server.adapters.store import AdapterStore
from server.app import create_app
from server.config import Settings
from server.engine.runner import ModelRunner
from server.model import load_model, load_tokenizer
from tests.builders import build_base, build_store

REPO = Path(__file__).resolve().parents[1]


@dataclass
class World:
    """A tiny base model on disk and a store of adapters built for it."""

    architecture: str
    model_dir: Path
    store: Path

    def settings(self, **overrides) -> Settings:
        values = {"model": str(self.model_dir), "adapters_dir": self.store, "device": "cpu", "dtype": "float32"}
        return Settings(**{**values, **overrides})

    def runner(self, dtype=None) -> tuple[ModelRunner, AdapterRegistry, object]:
        """A private model with its registry, driven from the calling thread (no engine thread)."""
        import torch

        dtype = dtype or torch.float32
        model = load_model(self.model_dir, torch.device("cpu"), dtype)
        registry = AdapterRegistry(model, AdapterStore(self.store), torch.device("cpu"), dtype)
        return ModelRunner(model, registry.context), registry, load_tokenizer(self.model_dir)


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
