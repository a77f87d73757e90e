"""What adapters on whole modules cost in the engine (server/adapters/modules.py), in-process, contenders interleaved
in one run: a batch of LoRA rows, against the same batch where one row's adapter adds to that same LoRA (every
Linear layer) a saved `lm_head` copy (`modules_to_save`), LoRA on the input embedding, or trainable tokens; and a
batch where every row has the copy.

    python -m bench.module_adapters [--shape small|0.5b] [--rounds 5] [--device cuda] [--dtype bfloat16] [--quick]

16 rows, 32-token prompts, 24 decode steps (the runner's decode pass and greedy sampling). Every row advances one
token per step, so a/b of a batch's tokens/s is a/b of each of its rows, the 15 rows without a module adapter
included. Each (a) is against (b) 15 + another LoRA (the odd row's adapter is then that LoRA without the module
feature), (c) against (b) 16 LoRA rows. "ms/step over b" is what the feature adds to each step: for the copy, its
own lm_head matmul (one per distinct head). Shapes: Qwen2-style hidden 384 x 6 layers with Qwen2.5's 151,936-token vocabulary (the head is
what a copy costs), or Qwen2.5-0.5B's (896 x 24).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig

from bench.common import add_device_arguments, describe_run, device_name, synchronize
from bench.mixed_decode import BenchRow, save_base, step
from server.adapters.registry import AdapterRegistry
from server.adapters.store import AdapterStore
from server.demo.tiny import save_adapter
from server.engine.runner import ModelRunner
from server.engine.sampling import sample
from server.model import load_model

ROWS, PROMPT_TOKENS, STEPS = 16, 32, 24
SHAPES = {
    "small": {"hidden": 384, "intermediate": 1024, "layers": 6, "heads": 6, "kv_heads": 2, "vocab_size": 151936},
    "0.5b": {"hidden": 896, "intermediate": 4864, "layers": 24, "heads": 14, "kv_heads": 2, "vocab_size": 151936},
    "quick": {"hidden": 128, "intermediate": 256, "layers": 2, "heads": 4, "kv_heads": 2},
}
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # PEFT's all-linear here
LORA = {"r": 16, "lora_alpha": 32, "init_lora_weights": False}
ADAPTERS = {  # the same LoRA on every Linear layer; each contender adds its one module feature
    "lora": LoraConfig(**LORA, target_modules=LINEAR),
    "lora-2": LoraConfig(**LORA, target_modules=LINEAR),  # another LoRA (its own weights): the odd row's baseline
    "head-copy": LoraConfig(**LORA, target_modules=LINEAR, modules_to_save=["lm_head"]),
    "embedding-lora": LoraConfig(**LORA, target_modules=["embed_tokens", *LINEAR]),
    "tokens": LoraConfig(**LORA, target_modules=LINEAR, trainable_token_indices=list(range(3, 11))),
}


def build(root: Path, shape: str) -> tuple[Path, Path]:
    model_dir, store = root / f"module-adapters-model-{shape}", root / f"module-adapters-{shape}"
    if all((store / name / "adapter_config.json").is_file() for name in ADAPTERS):
        return model_dir, store
    save_base(model_dir, SHAPES[shape])
    for seed, (name, peft_config) in enumerate(ADAPTERS.items()):
        save_adapter(model_dir, peft_config, store / name, seed=seed, base_name=shape, scale=0.3)
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
    print(describe_run(device, args.dtype))
    contenders = {  # each against its baseline (b): the same rows, the odd row's adapter without its module feature
        "(b) 16 LoRA rows": ["lora"] * ROWS,
        "(b) 15 + another LoRA": ["lora"] * (ROWS - 1) + ["lora-2"],
        "(a) 15 + head copy": ["lora"] * (ROWS - 1) + ["head-copy"],
        "(a) 15 + embed LoRA": ["lora"] * (ROWS - 1) + ["embedding-lora"],
        "(a) 15 + tokens": ["lora"] * (ROWS - 1) + ["tokens"],
        "(c) 16 head copies": ["head-copy"] * ROWS,
    }
    baseline = {name: "(b) 15 + another LoRA" if name.startswith("(a)") else "(b) 16 LoRA rows" for name in contenders}
    decode: dict[str, list[float]] = {name: [] for name in contenders}
    prefill: dict[str, list[float]] = {name: [] for name in contenders}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, store = build(args.workdir or Path(tmp), shape)
        model = load_model(model_dir, device, dtype)
        registry = AdapterRegistry(model, AdapterStore(store), device, dtype)
        runner = ModelRunner(model, registry.context)
        loaded = {a.name: a for a in registry.load_blocking(list(ADAPTERS))}
        head_bytes = loaded["head-copy"].nbytes
        prompts = [[(7 * i + 13 * r) % 250 + 3 for i in range(PROMPT_TOKENS)] for r in range(ROWS)]
        names = list(contenders)
        for round_ in range(rounds + 1):  # round 0 warms up; each round starts with the next contender
            for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                combos = contenders[name]
                rows = [BenchRow(p, (loaded[n].slot,)) for p, n in zip(prompts, combos, strict=True)]
                synchronize(device)
                started = time.perf_counter()
                for row, choice in zip(rows, sample(rows, runner.prefill(rows)), strict=True):
                    row.tokens.append(choice.token)
                synchronize(device)
                took_prefill = time.perf_counter() - started
                started = time.perf_counter()
                for _ in range(STEPS):
                    step(runner, rows)
                synchronize(device)
                if round_:
                    prefill[name].append(ROWS * PROMPT_TOKENS / took_prefill)
                    decode[name].append(ROWS * STEPS / (time.perf_counter() - started))
                for row in rows:
                    runner.release(row)
        registry.close()

    sizes = SHAPES[shape]
    print(
        f"model: Qwen2-style hidden {sizes['hidden']} x {sizes['layers']} layers, vocabulary"
        f" {sizes.get('vocab_size', 384)}, {args.dtype}, {device_name(device)}; {ROWS} rows, {rounds} rounds (medians);"
        f" the head-copy adapter holds {head_bytes / 2**20:.1f} MiB"
    )
    print(
        f"{'':22s} {'decode tok/s':>13s} {'a/b':>6s} {'(range)':>11s} {'ms/step over b':>15s}"
        f" {'prefill tok/s':>14s} {'a/b':>6s}"
    )
    for name in contenders:
        base = baseline[name]
        d, p = statistics.median(decode[name]), statistics.median(prefill[name])
        # a/b per round (contenders interleaved: each round's pair ran side by side), median and range
        ratios = [a / b for a, b in zip(decode[name], decode[base], strict=True)]
        spread = f"{min(ratios):.2f}-{max(ratios):.2f}"
        extra = statistics.median(ROWS / a - ROWS / b for a, b in zip(decode[name], decode[base], strict=True)) * 1e3
        prefill_ratio = statistics.median(a / b for a, b in zip(prefill[name], prefill[base], strict=True))
        print(
            f"{name:22s} {d:13.0f} {statistics.median(ratios):6.2f} {spread:>11s} {extra:15.2f} {p:14.0f}"
            f" {prefill_ratio:6.2f}"
        )


if __name__ == "__main__":
    main()
