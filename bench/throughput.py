"""Throughput of mixed-adapter serving against its ceiling and the obvious server, side by side in one run.

    python -m bench.throughput [--shape bench|small|0.5b]           (make bench-throughput)

Contenders, each behind real HTTP on loopback with 16 concurrent clients (32-token prompts, greedy):
  (a) mixserve, each client with its own combination of 1-3 adapters
  (b) mixserve, the same load without adapters: the ceiling
  (c) the obvious server: one PeftMixedModel, a lock, set_adapter (canonical order) + generate per request
  (w) mixserve, (a)'s mixed-types requests with a random weight per adapter per request (uniform in [0.2, 1.5],
      seeded): weighted / unweighted, interleaved with (a) on the same server (issue 15's target >= 0.97)
once with mixes of every type and once with LoRA-only mixes. The obvious server's greedy answers are compared with
mixserve's for the same requests. Shapes:
  bench  Llama 512 x 8 layers; 4 LoRA r16, 2 LoHa r8, 1 LoKr, 1 OFT; 128 requests of 32 new tokens
  small  Qwen2-style 384 x 6 layers, and 0.5b  Qwen2.5-0.5B's shape (random weights): bench.mixed_decode's seven
         adapters (LoRA r8, r16, r32, LoRA r16 on attention, LoHa r4, LoKr r4, OFT block 32); 64 requests of 24
Beside a/b, the ideal from arithmetic: base FLOPs / (base + each client's own adapters' FLOPs).
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench import mixed_decode
from bench.common import (
    ADAPTERS,
    HEADER,
    LORAS,
    Process,
    Result,
    build_bench_model,
    combinations,
    describe_run,
    mixserve,
    prompt,
    run_load,
)

CLIENTS, PROMPT_TOKENS = 16, 32
WEIGHTED = "(w) mixserve, mixed, weighted"
ADAPTER_BYTES: dict[str, int] = {}  # as the server reports them


def weight_bytes(model_dir: Path) -> int:
    """Bytes of the base model's Linear weights: what a decode step reads at least."""
    from torch import nn
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, nn.Linear))


def bodies(combos: list[list[str]], requests: int, new_tokens: int) -> list[list[dict]]:
    per_client = [[] for _ in combos]
    for i in range(requests):
        client = i % len(combos)
        per_client[client].append(
            {
                "inputs": prompt(i, PROMPT_TOKENS),
                "adapters": combos[client],
                "parameters": {"max_new_tokens": new_tokens, "details": True},
            }
        )
    return per_client


def weighted(per_client: list[list[dict]], seed: int = 3, low: float = 0.2, high: float = 1.5) -> list[list[dict]]:
    """The same requests, each adapter at a random weight: {"name", "weight"} objects (README, "Weighted mixes")."""
    rng = random.Random(seed)
    return [
        [
            {**body, "adapters": [{"name": n, "weight": round(rng.uniform(low, high), 3)} for n in body["adapters"]]}
            for body in client
        ]
        for client in per_client
    ]


def serve_obvious(model_dir: str, store: str, names: str) -> None:
    """(c): what one writes first. set_adapter walks the whole model and the lock serialises every request. names:
    the workload's adapters, comma-separated (the store may hold other benches' too)."""
    import torch
    import uvicorn
    from fastapi import FastAPI
    from peft import PeftConfig, PeftMixedModel
    from transformers import AutoModelForCausalLM, ByT5Tokenizer

    from server.adapters.kinds import CANONICAL_ORDER

    tokenizer = ByT5Tokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    configs = {name: PeftConfig.from_pretrained(Path(store) / name) for name in sorted(names.split(","))}

    def canonical(names: list[str]) -> list[str]:
        return sorted(names, key=lambda n: CANONICAL_ORDER.index(str(configs[n].peft_type).split(".")[-1]))

    model = None
    # PEFT nests each type's wrapper in the order adapters are loaded (the first innermost): loaded in canonical
    # order, every combination is composed as the contract says (an OFT loaded last would rotate LoRA's input too)
    for name in canonical(list(configs)):
        config = configs[name]
        if model is None:
            model = PeftMixedModel(base, config, name)
        model.load_adapter(str(Path(store) / name), name)
    model.eval()
    # as mixserve, never ids past the tokenizer (the 0.5b shape's vocabulary is Qwen's, its tokenizer bytes)
    options: dict = {"do_sample": False}
    if base.config.vocab_size > len(tokenizer):
        options["suppress_tokens"] = list(range(len(tokenizer), base.config.vocab_size))

    lock = threading.Lock()
    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.post("/generate")
    def generate(body: dict) -> dict:
        ids = torch.tensor([tokenizer.encode(body["inputs"], add_special_tokens=False)])
        generation = {**options, "max_new_tokens": body["parameters"]["max_new_tokens"]}
        with lock, torch.inference_mode():
            if body.get("adapters"):
                model.set_adapter(canonical(body["adapters"]))
                out = model.generate(ids, **generation)
            else:
                with model.disable_adapter():
                    out = model.generate(ids, **generation)
        generated = out[0, ids.shape[1] :].tolist()
        return {
            "generated_text": tokenizer.decode(generated),
            "details": {"generated_tokens": len(generated), "tokens": [{"id": i} for i in generated]},
        }

    sock = socket.socket(fileno=int(os.environ["MIXSERVE_LISTEN_FD"]))  # bench.common.Process's socket
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


def merged(name: str, rounds: list[Result]) -> Result:
    """All rounds' requests; throughput is the median round's."""
    out = Result(name)
    for r in rounds:
        out.latencies += r.latencies
        out.ttfts += r.ttfts
        out.answers.update(r.answers)
    middle = sorted(rounds, key=lambda r: r.tokens_per_second)[len(rounds) // 2]
    out.tokens, out.seconds = middle.tokens, middle.seconds
    return out


def run_mixserve(
    model_dir: Path, store: Path, loads: dict[str, list[list[dict]]], rounds: int, warm: bool = True
) -> dict[str, Result]:
    """Every load once per round on one server, interleaved, so that machine noise hits all contenders alike."""
    results: dict[str, list[Result]] = {name: [] for name in loads}
    with mixserve(model_dir, store, max_batch_size=CLIENTS) as server:
        for load in loads.values() if warm else ():  # warm-up: loads the adapters, warms the kernels
            run_load("warm-up", server.url, [bodies[:1] for bodies in load])
        for _ in range(rounds):
            for name, load in loads.items():
                results[name].append(run_load(name, server.url, load))
        loaded = httpx.get(f"{server.url}/adapters").json()["adapters"]
        ADAPTER_BYTES.update({a["name"]: a["bytes"] for a in loaded})
    for name, rs in results.items():
        print(f"  {name}: " + ", ".join(f"{r.tokens_per_second:.1f}" for r in rs) + " tok/s per round")
    return {name: merged(name, rs) for name, rs in results.items()}


def run_obvious(work: Workload, loads: dict[str, list[list[dict]]], warm: bool = True) -> dict[str, Result]:
    results = {}
    command = [
        "-m",
        "bench.throughput",
        "--serve-obvious",
        str(work.model_dir),
        str(work.store),
        ",".join(work.adapters),
    ]
    with Process(command) as obvious:
        for name, load in loads.items():
            if warm:
                run_load("warm-up", obvious.url, [b[:1] for b in load[:2]], path="/generate", stream=False)
            results[name] = run_load(name, obvious.url, load, path="/generate", stream=False)
    return results


@dataclass
class Workload:
    model_dir: Path
    store: Path
    description: str
    adapters: list[str]
    loras: list[str]
    requests: int
    new_tokens: int
    targets: tuple[float, float, float | None]  # a/b mixed, a/b LoRA only, a/c (the issues' targets)


def workload(shape: str, root: Path, quick: bool) -> Workload:
    if shape == "bench":
        model_dir, store = build_bench_model(root, quick=quick)
        size = "128 x 2 layers (quick)" if quick else "512 x 8 layers"
        return Workload(model_dir, store, f"Llama hidden {size}", list(ADAPTERS), LORAS, 128, 32, (0.70, 0.85, 20))
    sizes = mixed_decode.SHAPES[shape]
    return Workload(
        *mixed_decode.build(root, shape),
        f"Qwen2-style hidden {sizes['hidden']} x {sizes['layers']} layers",
        list(mixed_decode.ADAPTERS),
        mixed_decode.LORAS,
        64,
        24,
        (0.80, 0.90, None) if shape == "small" else (0.85, 0.90, 30),
    )


def ideal_ratios(work: Workload, combos: dict[str, list[list[str]]]) -> dict[str, float]:
    """What arithmetic allows: base FLOPs / (base + each client's adapters' FLOPs)."""
    import torch

    from server.adapters.registry import AdapterRegistry
    from server.adapters.store import AdapterStore
    from server.model import load_model

    model = load_model(work.model_dir, torch.device("cpu"), torch.float32)
    registry = AdapterRegistry(model, AdapterStore(work.store), torch.device("cpu"), torch.float32)
    try:
        flops = mixed_decode.adapter_flops(registry, work.adapters)
    finally:
        registry.close()
    base = mixed_decode.base_flops(model)
    return {kind: mixed_decode.ideal_ratio(base, flops, c) for kind, c in combos.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["bench", "small", "0.5b"], default="bench")
    parser.add_argument("--requests", type=int, help="per round (default: the shape's)")
    parser.add_argument("--rounds", type=int, default=3, help="mixserve contenders run interleaved, this many times")
    parser.add_argument(
        "--obvious-requests",
        type=int,
        default=16,
        help="(c) serves one request at a time at a steady rate; fewer requests measure it as well",
    )
    parser.add_argument("--new-tokens", type=int, help="(default: the shape's)")
    parser.add_argument("--workdir", type=Path, help="keep the bench model here (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help="a small model and load: checks that it runs")
    parser.add_argument("--serve-obvious", nargs=3, metavar=("MODEL", "STORE", "NAMES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_obvious:
        serve_obvious(*args.serve_obvious)
        return

    if args.quick:
        args.shape, args.requests, args.rounds, args.obvious_requests, args.new_tokens = "bench", CLIENTS, 1, 2, 8
    print(describe_run())
    with tempfile.TemporaryDirectory() as tmp:
        work = workload(args.shape, args.workdir or Path(tmp), args.quick)
        requests, new_tokens = args.requests or work.requests, args.new_tokens or work.new_tokens
        print(f"bench model: {work.description}, float32, CPU; adapters: {', '.join(work.adapters)}")
        print(
            f"load: {CLIENTS} clients, {PROMPT_TOKENS}-token prompts, {new_tokens} new tokens, greedy;"
            f" {requests} requests per round, {args.rounds} rounds for mixserve;"
            f" {args.obvious_requests} requests for the obvious server\n"
        )
        combos = {
            "mixed types": combinations(work.adapters, CLIENTS, seed=1),
            "LoRA only": combinations(work.loras, CLIENTS, seed=2),
        }
        served = run_mixserve(
            work.model_dir,
            work.store,
            {
                "(b) mixserve, no adapters": bodies([[]] * CLIENTS, requests, new_tokens),
                **{f"(a) mixserve, {kind}": bodies(c, requests, new_tokens) for kind, c in combos.items()},
                WEIGHTED: weighted(bodies(combos["mixed types"], requests, new_tokens)),
            },
            args.rounds,
            warm=not args.quick,
        )
        naive = run_obvious(
            work,
            {f"(c) obvious server, {kind}": bodies(c, args.obvious_requests, new_tokens) for kind, c in combos.items()},
            warm=not args.quick,
        )
        ideal = ideal_ratios(work, combos)
        print()
        print(HEADER)
        for result in [*served.values(), *naive.values()]:
            print(result.row())
        print()
        b = served["(b) mixserve, no adapters"].tokens_per_second
        base_bytes = weight_bytes(work.model_dir)
        mixed_target, lora_target, ac_target = work.targets
        for kind, target in (("mixed types", mixed_target), ("LoRA only", lora_target)):
            a, c = served[f"(a) mixserve, {kind}"], naive[f"(c) obvious server, {kind}"]
            equal = sum(a.answers.get(key) == text for key, text in c.answers.items())
            extra = sum(ADAPTER_BYTES[n] for n in {n for combo in combos[kind] for n in combo})
            print(
                f"{kind:12s} a/b = {a.tokens_per_second / b:5.2f} (ideal {ideal[kind]:.2f}, target >= {target:.2f})"
                f"   a/c = {a.tokens_per_second / c.tokens_per_second:6.1f}"
                + (f" (target >= {ac_target})" if ac_target else "")
                + f" = a/b x b/c, b/c = {b / c.tokens_per_second:5.1f}"
                f"   greedy tokens equal to (c)'s: {equal}/{len(c.answers)}"
                f"   decode reads {base_bytes / 1e6:.0f} MB base + {extra / 1e6:.0f} MB adapters"
            )
        w, a = served[WEIGHTED], served["(a) mixserve, mixed types"]
        print(
            f"weighted / unweighted = {w.tokens_per_second / a.tokens_per_second:5.2f} (target >= 0.97)"
            "   (w) against (a): the same mixed-types requests, random weights in [0.2, 1.5]"
        )


if __name__ == "__main__":
    main()
