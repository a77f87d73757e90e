"""Shared by the benchmarks: the bench model and adapters, servers on loopback, and the HTTP load."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, OFTConfig
from transformers import ByT5Tokenizer, GenerationConfig, LlamaForCausalLM

from server.demo import tiny

REPO = Path(__file__).resolve().parents[1]
LORAS = [f"lora-{i}" for i in range(4)]
ADAPTERS = {
    **{
        name: (LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False), 0.3)
        for name in LORAS
    },
    **{f"loha-{i}": (LoHaConfig(r=8, alpha=8, target_modules="all-linear", init_weights=False), 0.5) for i in range(2)},
    "lokr-0": (LoKrConfig(r=8, alpha=8, target_modules="all-linear", init_weights=False), 0.3),
    "oft-0": (OFTConfig(r=0, oft_block_size=32, target_modules="all-linear", init_weights=False), 0.3),
}


def describe_run(device: str | torch.device | None = None, dtype: str | None = None) -> str:
    """What produced a result, for the first line of every benchmark's output: with the machine's load average
    over the last minute (other jobs on its cores move every timing), and the device (its name, and CUDA's version)
    and dtype the benchmark runs on, when given."""
    try:
        found = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        commit = found.stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    line = (
        f"mixserve {commit}, torch {torch.__version__}, {torch.get_num_threads()} threads,"
        f" python {platform.python_version()}, {platform.machine()}, load average {os.getloadavg()[0]:.2f}"
    )
    if device is not None:
        cuda = f", CUDA {torch.version.cuda}" if torch.device(device).type == "cuda" else ""
        line += f"; on {device_name(device)}{cuda}" + (f" in {dtype}" if dtype else "")
    return line


def add_device_arguments(parser) -> None:
    """--device and --dtype, as every benchmark takes them (defaults: the CPU in float32)."""
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def synchronize(device: str | torch.device) -> None:
    """Waits for the device's queued work, so that a timer stopped after it measures that work."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def build_bench_model(root: Path, quick: bool = False) -> tuple[Path, Path]:
    """The batching issue's model: Llama-style, hidden 512, 8 layers (~25M parameters), random, float32; with
    4 LoRA r16, 2 LoHa r8, 1 LoKr and 1 OFT on all linear modules. Reused when already built under root.
    quick: hidden 128, 2 layers (to check that a benchmark still runs, not to measure)."""
    model_dir, store = (root / "model-quick", root / "adapters-quick") if quick else (root / "model", root / "adapters")
    if (store / "oft-0" / "adapter_config.json").is_file():
        return model_dir, store
    torch.manual_seed(0)
    if quick:
        config = tiny.config(hidden=128, intermediate=384, layers=2, heads=4, kv_heads=4)
    else:
        config = tiny.config(hidden=512, intermediate=1376, layers=8, heads=8, kv_heads=8)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    model.save_pretrained(model_dir)
    ByT5Tokenizer().save_pretrained(model_dir)
    for seed, (name, (adapter_config, scale)) in enumerate(ADAPTERS.items(), start=1):
        tiny.save_adapter(model_dir, adapter_config, store / name, seed=seed, base_name="bench", scale=scale)
    return model_dir, store


def listening_socket() -> socket.socket:
    """A TCP socket bound to a free loopback port, to hand to a server process (MIXSERVE_LISTEN_FD): the port is
    never free between choosing it and serving on it, so concurrent servers and clients cannot take it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.set_inheritable(True)
    return sock


class Process:
    """A server in a subprocess on a loopback port, stopped on exit."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None):
        with listening_socket() as sock:
            self.port = sock.getsockname()[1]
            self.url = f"http://127.0.0.1:{self.port}"
            clean = {k: v for k, v in os.environ.items() if not k.startswith("MIXSERVE_")}
            self.log = open(REPO / "bench" / f".server-{os.getpid()}-{self.port}.log", "w")  # noqa: SIM115
            self.process = subprocess.Popen(
                [sys.executable, *args],
                cwd=REPO,
                env={**clean, **(env or {}), "MIXSERVE_LISTEN_FD": str(sock.fileno())},
                stdout=self.log,
                stderr=subprocess.STDOUT,
                pass_fds=[sock.fileno()],
            )

    def __enter__(self) -> Process:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited; see {self.log.name}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError("server did not start")

    def __exit__(self, *exc) -> None:
        died = self.process.poll()  # before we stop it: a server that exited on its own is a fault to show
        self.process.terminate()
        self.process.wait(timeout=60)
        self.log.close()
        if died is not None:
            tail = Path(self.log.name).read_text(errors="replace")[-8000:]
            print(f"server on port {self.port} exited by itself with {died}; its log ends:\n{tail}", file=sys.stderr)
            return
        Path(self.log.name).unlink(missing_ok=True)


def mixserve(model_dir: Path, store: Path, device: str = "cpu", dtype: str = "float32", **settings) -> Process:
    """The server in a subprocess, on device in dtype (a benchmark's --device and --dtype)."""
    env = {
        "MIXSERVE_MODEL": str(model_dir),
        "MIXSERVE_ADAPTERS_DIR": str(store),
        "MIXSERVE_DEVICE": device,
        "MIXSERVE_DTYPE": dtype,
        "MIXSERVE_LOG_LEVEL": "warning",
    }
    env.update({f"MIXSERVE_{k.upper()}": str(v) for k, v in settings.items()})
    return Process(["-m", "server"], env)


def combinations(pool: list[str], clients: int, seed: int = 0) -> list[list[str]]:
    """One combination of 1-3 adapters per client, drawn from pool."""
    rng = random.Random(seed)
    return [rng.sample(pool, 1 + i % 3) for i in range(clients)]


def prompt(i: int, tokens: int = 32) -> str:
    """A prompt of exactly `tokens` bytes (one token each for the byte-level tokenizer)."""
    words = "the quick brown fox jumps over a lazy dog while seven red birds sing".split()
    text = " ".join(words[(i + j) % len(words)] for j in range(tokens))
    return text[:tokens]


@dataclass
class Result:
    name: str
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    errors: int = 0
    answers: dict[tuple, list[int]] = field(default_factory=dict)  # (inputs, adapters) -> generated token ids

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds

    def row(self) -> str:
        def q(values, p):
            return f"{statistics.quantiles(values, n=100)[p - 1] * 1e3:8.0f}" if len(values) > 1 else "       -"

        return (
            f"{self.name:34s} {len(self.latencies):4d} {self.tokens:6d} {self.tokens_per_second:8.1f}"
            f" {q(self.latencies, 50)} {q(self.latencies, 95)} {q(self.ttfts, 50)} {q(self.ttfts, 95)}"
        )


HEADER = (
    f"{'contender':34s} {'req':>4s} {'tokens':>6s} {'tok/s':>8s} {'p50 ms':>8s} {'p95 ms':>8s}"
    f" {'ttft p50':>8s} {'ttft p95':>8s}"
)


async def _one(client: httpx.AsyncClient, path: str, body: dict, result: Result, stream: bool) -> None:
    key = (body["inputs"], json.dumps(body.get("adapters", []), sort_keys=True))  # names, or {name, weight}
    started = time.perf_counter()
    if stream:
        async with client.stream("POST", path, json=body) as response:
            response.raise_for_status()
            first, ids = None, []
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    raise RuntimeError(event["error"])
                first = first or time.perf_counter()
                ids.append(event["token"]["id"])
                if event.get("generated_text") is not None:
                    result.tokens += event["index"] + 1
                    result.answers[key] = ids
        result.ttfts.append(first - started)
    else:
        response = await client.post(path, json=body)
        response.raise_for_status()
        details = response.json()["details"]
        result.tokens += details["generated_tokens"]
        result.answers[key] = [token["id"] for token in details["tokens"]]
    result.latencies.append(time.perf_counter() - started)


async def _load(url: str, path: str, per_client: list[list[dict]], result: Result, stream: bool) -> None:
    async def client_loop(client: httpx.AsyncClient, bodies: list[dict]) -> None:
        for body in bodies:
            try:
                await _one(client, path, body, result, stream)
            except (httpx.HTTPError, RuntimeError) as exc:
                print(f"  request failed: {exc!r}", file=sys.stderr)
                result.errors += 1

    limits = httpx.Limits(max_connections=len(per_client))
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client, bodies) for bodies in per_client))
        result.seconds = time.perf_counter() - started


def run_load(
    name: str, url: str, per_client: list[list[dict]], path: str = "/generate_stream", stream: bool = True
) -> Result:
    """Each client sends its own requests one after another; all clients at once."""
    result = Result(name)
    asyncio.run(_load(url, path, per_client, result, stream))
    if result.errors:
        raise RuntimeError(f"{name}: {result.errors} requests failed")
    return result
