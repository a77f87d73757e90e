"""What compiling the decode step would give at best: the same 16 rows decoding eager and under torch.compile, each
on torch's threads and on one thread, in one process, contenders interleaved.

    python -m bench.compile_step [--shape small|0.5b] [--rounds N] [--device cuda] [--dtype bfloat16] [--quick]

The best case for a compiler: one batch composition for the whole run (the pass's plans are built by an eager step
first, so the trace reads them and never their building), and the same shapes at every step: attention reads the
keys up to 64 positions (`ModelRunner.decode_length_bucket`, masked past each row's length; every contender alike),
so the model's forward is compiled once per composition (mode reduce-overhead on CUDA: CUDA graphs, captured once
and replayed). A server's batches change
composition, and each new composition is a new plan the trace guards on: serving compiled would need the adapters as
data (README, "The decode step"); this measures what that work could win, before anyone does it.

Workloads (bench.mixed_decode's): 16 rows without adapters, and 16 rows of mixed types. Contenders per workload:
eager as the server runs it (adapted layers switch their small operations to one thread on CPU), eager on one
thread, compiled, compiled on one thread (CPU only). Printed per contender: decode tokens/s and its ratio to eager,
and for the compiled ones the seconds of their first round (not timed: compiling, then its steps), the graphs dynamo
made, and the largest difference of its logits from eager's over the timed steps; on CUDA, the times inductor
skipped CUDA graphs (`cudagraph_skips`: then the compiled step ran without capture).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch._dynamo

from bench.common import add_device_arguments, combinations, describe_run, device_name, synchronize
from bench.mixed_decode import ADAPTERS, PROMPT_TOKENS, ROWS, SHAPES, BenchRow, build, registry_order, step
from server.adapters.mixing import _threads
from server.adapters.registry import AdapterRegistry
from server.adapters.store import AdapterStore
from server.engine.runner import ModelRunner
from server.engine.sampling import sample
from server.model import load_model

STEPS = 16
LENGTH_BUCKET = 64  # >= the 32-token prompts + 2 + STEPS: one bucket for the whole run


def decode(
    runner: ModelRunner, rows: list[BenchRow], forward, steps: int, device, planned=lambda: None
) -> tuple[float, torch.Tensor]:
    """(seconds of `steps` decode steps under `forward`, their logits): after a prefill and one eager step, so that
    the rows' plans exist before any trace (then `planned()`)."""
    model, eager = runner.model, runner.model.forward
    for row, choice in zip(rows, sample(rows, runner.prefill(rows)), strict=True):
        row.tokens.append(choice.token)
    step(runner, rows)
    planned()
    model.forward = forward
    logits = []
    try:
        synchronize(device)
        started = time.perf_counter()
        for _ in range(steps):
            out = runner.decode()
            logits.append(out.clone())  # a CUDA graph's replay overwrites its last outputs
            for row, token in zip(rows, out.argmax(-1).tolist(), strict=True):
                row.tokens.append(token)
        synchronize(device)
        seconds = time.perf_counter() - started
    finally:
        model.forward = eager
        for row in rows:
            runner.release(row)
    return seconds, torch.stack(logits).float().cpu()


def step_tensors(runner: ModelRunner, registry: AdapterRegistry) -> list[torch.Tensor]:
    """What a decode step reads that stays put from step to step once its plans exist: the KV cache (written in
    place), the rank pools and the views of them a step reads, the loaded adapters' tensors, the plans' per-row
    tensors and LoKr stacks. Marked static on CUDA, a capture reads them where they are; unmarked, it copies each in
    at every replay."""
    found: dict[int, torch.Tensor] = {}

    def collect(value, depth: int = 0) -> None:
        if isinstance(value, torch.Tensor):
            found[id(value)] = value
        elif depth < 6:
            if isinstance(value, dict):
                items = list(value.values())
            elif isinstance(value, (list, tuple)):
                items = list(value)
            elif dataclasses.is_dataclass(value) and not isinstance(value, type):
                items = [getattr(value, field.name) for field in dataclasses.fields(value)]
            else:
                return
            for item in items:
                collect(item, depth + 1)

    collect([runner.cache.keys, runner.cache.values, [plan._cache for plan in runner._plans.values()]])
    for wrapper in registry.model._wrappers.values():
        pool = getattr(wrapper, "pool", None)
        if pool is not None:
            collect([pool.a, pool.b_t, pool._a_used_t, pool._b_used, pool._subset])
        collect([getattr(wrapper, "_kron", None), getattr(wrapper, "_plans", None)])
    collect([layer.tensors() for adapter in registry.loaded() for layer in adapter.built.layers.values()])
    return list(found.values())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["small", "0.5b"], default="small")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--quick", action="store_true", help="a tiny model, one round: checks that it runs")
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    shape, rounds, steps = ("quick", 1, 4) if args.quick else (args.shape, args.rounds, STEPS)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print(describe_run(device, args.dtype))
    torch._dynamo.config.cache_size_limit = 64  # every contender's graphs kept: none falls back to eager
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, store = build(args.workdir or Path(tmp), shape)
        model = load_model(model_dir, device, dtype)
        registry = AdapterRegistry(model, AdapterStore(store), device, dtype)
        runner = ModelRunner(model, registry.context)
        runner.decode_length_bucket = LENGTH_BUCKET
        loaded = {a.name: a for a in registry.load_blocking(list(ADAPTERS))}
        prompts = [[(7 * i + 13 * r) % 250 + 3 for i in range(PROMPT_TOKENS)] for r in range(ROWS)]
        workloads = {"no adapters": [[]] * ROWS, "mixed types": combinations(list(ADAPTERS), ROWS, seed=1)}
        eager = model.forward

        def planned() -> None:
            if device.type == "cuda":
                for tensor in step_tensors(runner, registry):
                    torch._dynamo.mark_static_address(tensor)

        compiled = torch.compile(eager, mode="reduce-overhead" if device.type == "cuda" else None)
        contenders = {"eager": (eager, None), "compiled": (compiled, None)}
        if device.type == "cpu":
            contenders |= {"eager, 1 thread": (eager, 1), "compiled, 1 thread": (compiled, 1)}
        seconds: dict[tuple[str, str], list[float]] = {}
        compile_seconds: dict[tuple[str, str], float] = {}
        graphs: dict[tuple[str, str], int] = {}
        logits: dict[tuple[str, str], torch.Tensor] = {}
        for round_ in range(rounds + 1):  # round 0 compiles (not timed)
            for workload, combos in workloads.items():
                for name, (forward, count) in contenders.items():
                    rows = [
                        BenchRow(p, tuple(loaded[n].slot for n in registry_order(registry, c)))
                        for p, c in zip(prompts, combos, strict=True)
                    ]
                    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
                    with _threads(count or torch.get_num_threads()):
                        took, out = decode(runner, rows, forward, steps, device, planned)
                    if round_ == 0:
                        compile_seconds[workload, name] = took
                        graphs[workload, name] = torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
                        print(
                            f"{workload}, {name}: first round {took:.1f} s, {graphs[workload, name]} graphs", flush=True
                        )
                    else:
                        seconds.setdefault((workload, name), []).append(took)
                        logits[workload, name] = out
        registry.close()

    sizes = SHAPES[shape]
    print(
        f"model: Qwen2-style hidden {sizes['hidden']} x {sizes['layers']} layers, {args.dtype},"
        f" {device_name(device)}; {ROWS} rows, {steps} decode steps a round, {rounds} rounds"
    )
    print(f"{'':30s} {'decode tok/s':>13s} {'/ eager':>8s} {'first s':>8s} {'graphs':>7s} {'max |diff|':>11s}")
    for workload in workloads:
        eager_speed = ROWS * steps / statistics.median(seconds[workload, "eager"])
        for name in contenders:
            speed = ROWS * steps / statistics.median(seconds[workload, name])
            line = f"{workload + ', ' + name:30s} {speed:13.0f} {speed / eager_speed:8.2f}"
            if name.startswith("compiled"):
                difference = float((logits[workload, name] - logits[workload, "eager"]).abs().max())
                line += f" {compile_seconds[workload, name]:8.1f} {graphs[workload, name]:7d} {difference:11.2g}"
            print(line)
    if device.type == "cuda":
        print(f"CUDA graphs skipped: {torch._dynamo.utils.counters['inductor']['cudagraph_skips']}")


if __name__ == "__main__":
    main()
