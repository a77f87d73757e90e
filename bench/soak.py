"""Soak: many clients, mixed combinations (0-4 adapters), streamed and not, with faults injected mid-run.

    python -m bench.soak                      # 32 clients, 2000 requests, on the demo model and adapters
    python -m bench.soak --requests 200 --clients 8

The server runs in a subprocess on loopback, over a copy of the store. Each distinct request (prompt, combination,
length) is first sent alone; then the soak; then alone again. A third of the way in, one adapter is replaced by a
new version, one is corrupted, one is deleted; 10% of streaming clients disconnect after their first token and 1% of
bodies are malformed. Every response must be a documented outcome, and each greedy answer must equal the one the
same request got alone (the bleed check): before the faults' versions or after them for requests using an adapter
a fault touched, and both for the others. Prints counts by outcome, latency, resident memory and what each fault
affected; exits non-zero if a request was lost, failed unexpectedly or bled.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from safetensors.torch import load_file, save_file

from bench.common import REPO, add_device_arguments, describe_run, mixserve
from server.config import DEMO_MODEL_DIR
from server.demo.corpus import prompts


@dataclass(frozen=True)
class Spec:
    prompt: str
    adapters: tuple[str, ...]
    tokens: int

    def body(self) -> dict:
        return {"inputs": self.prompt, "adapters": list(self.adapters), "parameters": {"max_new_tokens": self.tokens}}


@dataclass
class Outcome:
    spec: Spec | None  # None: a malformed body
    kind: str  # ok | disconnected | http <status> | error <type> | transport
    text: str | None = None
    seconds: float = 0.0
    after_faults: bool = False


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def send(client: httpx.AsyncClient, spec: Spec, stream: bool, disconnect: bool) -> Outcome:
    started = time.perf_counter()
    try:
        if not stream:
            response = await client.post("/generate", json=spec.body())
            if response.status_code != 200:
                return Outcome(spec, f"http {response.status_code}", response.text)
            return Outcome(spec, "ok", response.json()["generated_text"], time.perf_counter() - started)
        async with client.stream("POST", "/generate_stream", json=spec.body()) as response:
            if response.status_code != 200:
                return Outcome(spec, f"http {response.status_code}", (await response.aread()).decode())
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    return Outcome(spec, f"error {event['error_type']}", event["error"])
                if disconnect:
                    return Outcome(spec, "disconnected")  # leaving the block closes the connection
                if event.get("generated_text") is not None:
                    return Outcome(spec, "ok", event["generated_text"], time.perf_counter() - started)
        return Outcome(spec, "error stream ended without a final event")
    except httpx.HTTPError as exc:
        return Outcome(spec, "transport", repr(exc))


async def malformed(client: httpx.AsyncClient, rng: random.Random) -> Outcome:
    body = rng.choice([b"{", b'{"inputs": 5}', b'{"inputs": "x", "parameters": {"max_new_tokens": -1}}', b"\xff"])
    response = await client.post("/generate", content=body, headers={"content-type": "application/json"})
    return Outcome(None, f"http {response.status_code}", response.text)


async def alone(url: str, specs: list[Spec]) -> dict[Spec, str]:
    """Each spec sent by itself: the answer it gets without company."""
    answers = {}
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        for spec in specs:
            outcome = await send(client, spec, stream=False, disconnect=False)
            answers[spec] = outcome.text if outcome.kind == "ok" else outcome.kind
    return answers


def inject_faults(store: Path, replaced: str, corrupted: str, deleted: str) -> None:
    weights = store / replaced / "adapter_model.safetensors"
    tensors = {name: tensor * 1.5 for name, tensor in load_file(weights).items()}
    save_file(tensors, weights.with_suffix(".new"))
    weights.with_suffix(".new").replace(weights)  # a new version, swapped in atomically
    damaged = store / corrupted / "adapter_model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    shutil.rmtree(store / deleted)


async def soak(url: str, plan: list[tuple], clients: int, at: int, faults) -> tuple[list[Outcome], float]:
    outcomes: list[Outcome] = []
    pending = collections.deque(plan)
    faulted = asyncio.Event()
    rng = random.Random(1)

    async def client_loop(client: httpx.AsyncClient) -> None:
        while pending:
            spec, stream, disconnect, bad = pending.popleft()
            outcome = await (malformed(client, rng) if bad else send(client, spec, stream, disconnect))
            outcome.after_faults = faulted.is_set()
            outcomes.append(outcome)
            if len(outcomes) >= at and not faulted.is_set():
                faulted.set()
                faults()

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        return outcomes, time.perf_counter() - started


def judge(outcome: Outcome, before: dict, after: dict, touched: dict[str, str]) -> str:
    """'fine: ...' or 'BAD: ...' for one outcome."""
    if outcome.spec is None:
        refused = outcome.kind in ("http 400", "http 422")  # 400: not even text (FastAPI's own check)
        return f"fine: malformed body refused ({outcome.kind})" if refused else f"BAD: malformed got {outcome.kind}"
    if outcome.kind == "disconnected":
        return "fine: client disconnected mid-stream"
    faults = {touched[name] for name in outcome.spec.adapters if name in touched}
    if outcome.kind == "ok":
        answers = {before[outcome.spec], after[outcome.spec]} if faults else {before[outcome.spec]}
        if not faults and after[outcome.spec] != before[outcome.spec]:
            return "BAD: its answer alone changed, though no fault touched its adapters"
        if outcome.text not in answers:
            return "BAD: answer differs (bleed)"
        if before[outcome.spec] == after[outcome.spec]:
            return "fine: answer equals the one alone"
        version = "before" if outcome.text == before[outcome.spec] else "after"
        return f"fine: answer equals the one alone {version} the faults"
    if outcome.kind == "http 429":
        return "fine: 429 overloaded"
    if outcome.kind in ("http 404", "error adapter_not_found") and "deleted" in faults:
        return "fine: 404, adapter deleted"
    if outcome.kind in ("http 424", "error adapter_load") and "corrupted" in faults:
        return "fine: 424, adapter corrupted"
    return f"BAD: {outcome.kind}: {(outcome.text or '')[:200]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--model", type=Path, default=DEMO_MODEL_DIR)
    parser.add_argument("--store", type=Path, default=REPO / "adapters_store")
    parser.add_argument("--distinct", type=int, default=200, help="distinct requests (each checked alone twice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="300 requests, 16 clients, 40 distinct")
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.clients, args.distinct = 300, 16, 40
    print(describe_run(args.device, args.dtype))
    rng = random.Random(args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        shutil.copytree(args.store, store)
        names = sorted(p.name for p in store.iterdir() if (p / "adapter_config.json").is_file())
        replaced, corrupted, deleted = rng.sample(names, 3)
        touched = {replaced: "replaced", corrupted: "corrupted", deleted: "deleted"}
        texts = prompts(max(8, args.distinct // 4), seed=args.seed)
        specs = list(
            dict.fromkeys(
                Spec(
                    rng.choice(texts), tuple(rng.sample(names, rng.randint(0, min(4, len(names))))), rng.randint(8, 32)
                )
                for _ in range(args.distinct)
            )
        )
        plan = []
        for _ in range(args.requests):
            stream = rng.random() < 0.5
            plan.append((rng.choice(specs), stream, stream and rng.random() < 0.1, rng.random() < 0.01))

        with mixserve(args.model, store, args.device, args.dtype, max_queue=args.requests) as server:
            pid = server.process.pid
            before = asyncio.run(alone(server.url, specs))
            rss_start = rss_mib(pid)
            outcomes, seconds = asyncio.run(
                soak(
                    server.url,
                    plan,
                    args.clients,
                    args.requests // 3,
                    lambda: inject_faults(store, replaced, corrupted, deleted),
                )
            )
            rss_end = rss_mib(pid)
            after = asyncio.run(alone(server.url, specs))
            metrics = httpx.get(f"{server.url}/metrics").text
            running = next(
                float(line.split()[-1])
                for line in metrics.splitlines()
                if line.startswith("mixserve:num_requests_running")
            )

    verdicts = [judge(o, before, after, touched) for o in outcomes]
    lost = args.requests - len(outcomes)
    latencies = sorted(o.seconds for o in outcomes if o.kind == "ok")
    print(f"soak: {args.requests} requests, {args.clients} clients, {len(specs)} distinct, {seconds:.1f} s")
    print(f"faults after {args.requests // 3} responses: replaced {replaced}, corrupted {corrupted}, deleted {deleted}")
    print("\noutcomes:")
    for verdict, count in collections.Counter(verdicts).most_common():
        print(f"  {count:5d}  {verdict}")
    print(f"  {lost:5d}  lost (no response)")
    print("\nby fault (requests after the faults, naming the adapter):")
    for name, fault in touched.items():
        hit = [
            v for o, v in zip(outcomes, verdicts, strict=True) if o.after_faults and o.spec and name in o.spec.adapters
        ]
        print(f"  {fault:9s} {name:10s} {dict(collections.Counter(hit))}")
    spared = [
        v
        for o, v in zip(outcomes, verdicts, strict=True)
        if o.after_faults and o.spec and not set(o.spec.adapters) & set(touched)
    ]
    print(f"  untouched combinations after the faults: {dict(collections.Counter(spared))}")
    if latencies:
        p50, p99 = statistics.median(latencies), latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        print(f"\nlatency of answered requests: p50 {p50 * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms")
    print(f"resident memory: {rss_start:.0f} MiB at start, {rss_end:.0f} MiB at end ({rss_end / rss_start:.2f}x)")
    print(f"rows running after the soak: {running:.0f}")
    bad = sum(v.startswith("BAD") for v in verdicts)
    print(f"\nRESULT: {'PASS' if not bad and not lost and not running else 'FAIL'} ({bad} bad, {lost} lost)")
    return 0 if not bad and not lost and not running else 1


if __name__ == "__main__":
    sys.exit(main())
