"""What DoRA and trained-bias rows cost, and what they cost the rows beside them: decode and prefill of one batch,
in-process (no HTTP), contenders interleaved in one run.

    python -m bench.dora [--shape small|0.5b] [--device cuda] [--dtype bfloat16] [--quick]   (make bench-dora)

16 rows on bench/mixed_decode.py's Qwen2-style model (biases on q, k, v). 12 rows each carry 1-3 of four LoRAs
(r8, r16, r32 on all linear layers, r16 on attention); the other 4 carry one more adapter, r16 on all linear layers:
(b) a plain LoRA, (a) the same as DoRA, (a') the plain LoRA with trained biases (bias='all'). a/b is what 4 DoRA rows
cost the batch: every row's step time, so the 12 others' throughput. Then all 16 rows with (d) the plain LoRA and
(c) the DoRA one: c/d is what DoRA costs a row against the same LoRA without it. Contenders run in turns, round
after round (the first round warms up); timed on a GPU by the wall clock, on the CPU by the process's CPU time (what
a shared machine's other processes disturb least). Printed: tokens/s (median of the rounds), the operator calls of
one decode step (torch profiler, after the rounds), and the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig

from bench.common import add_device_arguments, combinations, describe_run, device_name, synchronize
from bench.mixed_decode import (
    PROMPT_TOKENS,
    ROWS,
    SHAPES,
    STEPS,
    BenchRow,
    profile_step,
    registry_order,
    save_base,
    step,
)
from server.adapters.registry import AdapterRegistry
from server.adapters.store import AdapterStore
from server.demo.tiny import save_adapter
from server.engine.runner import ModelRunner
from server.engine.sampling import sample
from server.model import load_model


def _lora(r: int, targets="all-linear", **extra) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False, **extra)


ADAPTERS = {
    "lora-r8": _lora(8),
    "lora-r16": _lora(16),
    "lora-r32": _lora(32),
    "lora-attn": _lora(16, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    "twin": _lora(16),
    "dora": _lora(16, use_dora=True),
    "bias": _lora(16, bias="all"),
}
LORAS = ["lora-r8", "lora-r16", "lora-r32", "lora-attn"]
EXTRA_ROWS = 4


def build(root: Path, shape: str) -> tuple[Path, Path]:
    model_dir, store = root / f"dora-model-{shape}", root / f"dora-adapters-{shape}"
    if (store / "bias" / "adapter_config.json").is_file():
        return model_dir, store
    save_base(model_dir, SHAPES[shape])
    for seed, (name, peft_config) in enumerate(ADAPTERS.items()):
        save_adapter(model_dir, peft_config, store / name, seed=seed, base_name=shape, scale=0.2)
    return model_dir, store


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["small", "0.5b"], default="small")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--quick", action="store_true", help="a tiny model, one round: checks that it runs")
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    shape, rounds = ("quick", 1) if args.quick else (args.shape, args.rounds)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print(describe_run())
    others = combinations(LORAS, ROWS - EXTRA_ROWS, seed=2)
    contenders = {
        "(b) 4 LoRA rows": others + [["twin"]] * EXTRA_ROWS,
        "(a) 4 DoRA rows": others + [["dora"]] * EXTRA_ROWS,
        "(a') 4 bias rows": others + [["bias"]] * EXTRA_ROWS,
        "(d) 16 LoRA rows": [["twin"]] * ROWS,
        "(c) 16 DoRA rows": [["dora"]] * ROWS,
    }
    prompts = [[(7 * i + 13 * r) % 250 + 3 for i in range(PROMPT_TOKENS)] for r in range(ROWS)]
    decode: dict[str, list[float]] = {name: [] for name in contenders}
    prefill: dict[str, list[float]] = {name: [] for name in contenders}
    ops: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, store = build(args.workdir or Path(tmp), shape)
        model = load_model(model_dir, device, dtype)
        registry = AdapterRegistry(model, AdapterStore(store), device, dtype)
        runner = ModelRunner(model, registry.context)
        loaded = {a.name: a for a in registry.load_blocking(list(ADAPTERS))}
        clock = time.perf_counter if device.type == "cuda" else time.process_time
        for round_ in range(rounds + 1):
            for name, combos in contenders.items():
                rows = [
                    BenchRow(p, tuple(loaded[n].slot for n in registry_order(registry, c)))
                    for p, c in zip(prompts, combos, strict=True)
                ]
                synchronize(device)
                started = clock()
                for row, choice in zip(rows, sample(rows, runner.prefill(rows)), strict=True):
                    row.tokens.append(choice.token)
                synchronize(device)
                prefilled = clock()
                for _ in range(STEPS):
                    step(runner, rows)
                synchronize(device)
                if round_:
                    prefill[name].append(ROWS * PROMPT_TOKENS / (prefilled - started))
                    decode[name].append(ROWS * STEPS / (clock() - prefilled))
                if round_ == rounds:
                    ops[name] = profile_step(runner, rows, device)[0]
                for row in rows:
                    runner.release(row)
        registry.close()

    sizes = SHAPES[shape]
    print(
        f"model: Qwen2-style hidden {sizes['hidden']} x {sizes['layers']} layers, {args.dtype}, {device_name(device)};"
        f" {ROWS} rows, {rounds} rounds (median), {'wall' if device.type == 'cuda' else 'CPU'} time"
    )
    print(f"{'':20s} {'decode tok/s':>13s} {'prefill tok/s':>14s} {'ops/step':>9s}")
    d = {name: statistics.median(values) for name, values in decode.items()}
    p = {name: statistics.median(values) for name, values in prefill.items()}
    for name in contenders:
        print(f"{name:20s} {d[name]:13.0f} {p[name]:14.0f} {ops[name]:9d}")
    for label, a, b in [
        ("a/b (4 DoRA rows beside 12 LoRA rows)", "(a) 4 DoRA rows", "(b) 4 LoRA rows"),
        ("a'/b (4 trained-bias rows)", "(a') 4 bias rows", "(b) 4 LoRA rows"),
        ("c/d (a DoRA row against its LoRA)", "(c) 16 DoRA rows", "(d) 16 LoRA rows"),
    ]:
        print(f"{label:40s} decode {d[a] / d[b]:.3f}  prefill {p[a] / p[b]:.3f}")


if __name__ == "__main__":
    main()
