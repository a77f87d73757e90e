"""Throughput of mixed-adapter serving against its ceiling and the obvious server, side by side in one run.

    python -m bench.throughput            (make bench-throughput)

Contenders, each behind real HTTP on loopback with 16 concurrent clients (32-token prompts, 32 new tokens, greedy):
  (a) mixserve, each client with its own combination of 1-3 adapters
  (b) mixserve, the same load without adapters: the ceiling
  (c) the obvious server: one PeftMixedModel, a lock, set_adapter + generate per request
once with mixes of every type (4 LoRA r16, 2 LoHa r8, 1 LoKr, 1 OFT) and once with LoRA-only mixes.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
from pathlib import Path

import httpx

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


def serve_obvious(model_dir: str, store: str, port: int) -> None:
    """(c): what one writes first. set_adapter walks the whole model and the lock serialises every request."""
    import torch
    import uvicorn
    from fastapi import FastAPI
    from peft import PeftConfig, PeftMixedModel
    from transformers import AutoModelForCausalLM, ByT5Tokenizer

    tokenizer = ByT5Tokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    names = sorted(p.name for p in Path(store).iterdir())
    model = None
    for name in names:
        path = Path(store) / name
        if model is None:
            model = PeftMixedModel(base, PeftConfig.from_pretrained(path), name)
        model.load_adapter(str(path), name)
    model.eval()
    lock = threading.Lock()
    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.post("/generate")
    def generate(body: dict) -> dict:
        ids = torch.tensor([tokenizer.encode(body["inputs"], add_special_tokens=False)])
        new_tokens = body["parameters"]["max_new_tokens"]
        with lock, torch.inference_mode():
            if body.get("adapters"):
                model.set_adapter(body["adapters"])
                out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
            else:
                with model.disable_adapter():
                    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
        generated = out[0, ids.shape[1] :].tolist()
        return {"generated_text": tokenizer.decode(generated), "details": {"generated_tokens": len(generated)}}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def merged(name: str, rounds: list[Result]) -> Result:
    """All rounds' requests; throughput is the median round's."""
    out = Result(name)
    for r in rounds:
        out.latencies += r.latencies
        out.ttfts += r.ttfts
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


def run_obvious(
    model_dir: Path, store: Path, loads: dict[str, list[list[dict]]], warm: bool = True
) -> dict[str, Result]:
    results = {}
    with Process(["-m", "bench.throughput", "--serve-obvious", str(model_dir), str(store)]) as obvious:
        for name, load in loads.items():
            if warm:
                run_load("warm-up", obvious.url, [b[:1] for b in load[:2]], path="/generate", stream=False)
            results[name] = run_load(name, obvious.url, load, path="/generate", stream=False)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="mixserve contenders run interleaved, this many times")
    parser.add_argument(
        "--obvious-requests",
        type=int,
        default=16,
        help="(c) serves one request at a time at a steady rate; fewer requests measure it as well",
    )
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--workdir", type=Path, help="keep the bench model here (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help="a small model and load: checks that it runs")
    parser.add_argument("--serve-obvious", nargs=2, metavar=("MODEL", "STORE"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_obvious:
        serve_obvious(*args.serve_obvious, args.port)
        return

    if args.quick:
        args.requests, args.rounds, args.obvious_requests, args.new_tokens = CLIENTS, 1, 2, 8
    print(describe_run())
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, store = build_bench_model(args.workdir or Path(tmp), quick=args.quick)
        shape = "128 x 2 layers (quick)" if args.quick else "512 x 8 layers"
        print(f"bench model: Llama hidden {shape}, float32, CPU; adapters: {', '.join(ADAPTERS)}")
        print(
            f"load: {CLIENTS} clients, {PROMPT_TOKENS}-token prompts, {args.new_tokens} new tokens, greedy;"
            f" {args.requests} requests per round, {args.rounds} rounds for mixserve;"
            f" {args.obvious_requests} requests for the obvious server\n"
        )
        mixed = combinations(list(ADAPTERS), CLIENTS, seed=1)
        lora = combinations(LORAS, CLIENTS, seed=2)
        served = run_mixserve(
            model_dir,
            store,
            {
                "(b) mixserve, no adapters": bodies([[]] * CLIENTS, args.requests, args.new_tokens),
                "(a) mixserve, mixed types": bodies(mixed, args.requests, args.new_tokens),
                "(a) mixserve, LoRA only": bodies(lora, args.requests, args.new_tokens),
            },
            args.rounds,
            warm=not args.quick,
        )
        naive = run_obvious(
            model_dir,
            store,
            {
                "(c) obvious server, mixed types": bodies(mixed, args.obvious_requests, args.new_tokens),
                "(c) obvious server, LoRA only": bodies(lora, args.obvious_requests, args.new_tokens),
            },
            warm=not args.quick,
        )
        print()
        print(HEADER)
        for result in [*served.values(), *naive.values()]:
            print(result.row())
        print()
        base = served["(b) mixserve, no adapters"].tokens_per_second
        base_bytes = weight_bytes(model_dir)
        for kind, combos, target in (("mixed types", mixed, 0.70), ("LoRA only", lora, 0.85)):
            a = served[f"(a) mixserve, {kind}"].tokens_per_second
            c = naive[f"(c) obvious server, {kind}"].tokens_per_second
            extra = sum(ADAPTER_BYTES[n] for n in {n for combo in combos for n in combo})
            print(
                f"{kind:12s} a/b = {a / base:5.2f} (target >= {target:.2f})   a/c = {a / c:6.1f} (target >= 20)"
                f"   decode reads {base_bytes / 1e6:.0f} MB base + {extra / 1e6:.0f} MB adapters:"
                f" a/b <= {base_bytes / (base_bytes + extra):.2f} where bandwidth bounds the step"
            )


if __name__ == "__main__":
    main()
