"""The adapter path's cost in the engine itself: decode and prefill of one mixed batch against the same batch
without adapters, in-process (no HTTP), contenders interleaved in one run.

    python -m bench.mixed_decode [--shape small|0.5b] [--device cuda] [--dtype bfloat16] [--quick]
        [--quantization bnb-nf4|bnb-fp4|bnb-int8|int8-weight-only]   (the base quantized at load: README, "Quantized base")
        [--paged-attention] [--prompt-tokens N]
    (make bench-mixed)

16 rows, each with its own combination of 1-3 adapters drawn from seven (LoRA r8, r16, r32 on all linear layers,
LoRA r16 on attention only, LoHa r4, LoKr r4, OFT block size 32), or, for the LoRA-only line, from the four LoRAs;
the "16 idle" line runs the LoRA-only rows with 16 more LoRA r16 adapters resident that no row uses (loaded for its
rounds only): what a server holding many tenants' adapters pays for those a batch does not use.
32-token prompts (--prompt-tokens), 24 decode steps (each: the runner's decode pass and the engine's sampling,
greedy), random weights. --paged-attention adds the no-adapter and mixed contenders again on a second runner whose
decode attention reads the cache in place at every length (MIXSERVE_PAGED_ATTENTION=on, whose runner gathers below
paged_attention.MIN_LENGTH tokens; compiled before the rounds; a/b stays against the base's rows decoding
gathered).
Shapes: Qwen2-style hidden 384 x 6 layers (6 heads, 2 KV heads, MLP 1024), or Qwen2.5-0.5B's (896 x 24, 14 heads,
2 KV heads, MLP 4864, its 151,936-token vocabulary).

Each contender's rows run beside the base's (on a runner of their own), step for step, the two alternating which
goes first: a round is both prefills and STEPS steps of each (after a warm-up of each contender). Printed per
contender: decode and prefill tokens/s (medians over its rounds), and a/b = with adapters / without, the median over
rounds of the base's seconds over the contender's in the same round, so that a change of the machine's load during
the run lands on both sides of a ratio (timing contenders one after the other measured it). It does not make a/b
independent of the load: under other jobs a step of many one-thread operations (the adapters', "CPU threads" in the
README) and one of fewer two-thread ones (the base's) slow down unlike, so state ratios measured on a quiet machine
(the load average is printed at the start and the end). Also printed: what unloading one of the 16 idle adapters
took (median and most; the engine's thread does it at a step boundary: each moves the spans after it down in its
rank pools). Beside a/b, two bounds on
it: the ideal from arithmetic, base FLOPs / (base + each row's own adapters' FLOPs), averaged over the rows; and the
bound from memory, the bytes of the base's linear weights / (those + the bytes of every adapter some row uses), as a
step reads each of those at least once: a decode step whose layers are bound by memory traffic (16 rows of a large
model on a CPU; a GPU at small batches) cannot beat it however its products are arranged. Then the profile of one
decode step (torch profiler, after the timed rounds): operator calls (every `aten::` call, nested ones included),
kernels launched (on a GPU), and scalar syncs, the points where the host waits for the device's values: item /
float / int / bool of a tensor (`aten::_local_scalar_dense`), data-dependent shapes (`aten::nonzero`: boolean
indexing; `aten::_unique2`), and `.tolist()` of a tensor on the model's device (counted by a TorchFunctionMode, as
the profiler does not see it); and H2D copies per step: copies of host data to the model's device (`.to(device)` of
a host tensor, `torch.tensor(..., device=)`; counted on CPU too, where they copy nothing); and GFLOP/step, the
FLOPs of the step's matrix products (the profiler's formulas, and 2 M K N for the in-place `addmm_` / `baddbmm_` it
has none for): the arithmetic a contender does, exact where timings are noise. On CPU, `torch.multinomial` checks its
input with two `_local_scalar_dense` (no wait on a CPU); these rows are greedy. (Compiled steps: bench.compile_step.)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, OFTConfig
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM, ByT5Tokenizer, GenerationConfig, Qwen2Config

from bench.common import add_device_arguments, combinations, describe_run, device_name, synchronize
from server.adapters.registry import AdapterRegistry
from server.adapters.store import AdapterStore
from server.demo.tiny import config as tiny_config
from server.demo.tiny import save_adapter
from server.engine.runner import ModelRunner, PromptSequence
from server.engine.sampling import SamplingParams, TokenChooser, sample
from server.model import load_model
from server.quantization import MODES, base_bytes

ROWS, PROMPT_TOKENS, STEPS = 16, 32, 24
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
ADAPTERS = {
    "lora-r8": (LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False), 0.3),
    "lora-r16": (LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False), 0.3),
    "lora-r32": (LoraConfig(r=32, lora_alpha=64, target_modules="all-linear", init_lora_weights=False), 0.2),
    "lora-attn": (LoraConfig(r=16, lora_alpha=32, target_modules=ATTENTION, init_lora_weights=False), 0.3),
    "loha-r4": (LoHaConfig(r=4, alpha=4, target_modules="all-linear", init_weights=False), 0.5),
    "lokr-r4": (LoKrConfig(r=4, alpha=4, target_modules="all-linear", init_weights=False), 0.3),
    "oft-32": (OFTConfig(r=0, oft_block_size=32, target_modules="all-linear", init_weights=False), 0.3),
}
LORAS = ["lora-r8", "lora-r16", "lora-r32", "lora-attn"]
# LoRA r16 adapters on all linear layers, resident but used by no row: the "(a) LoRA, 16 idle" contender's. Their
# names sort between lora-r16's and lora-r32's, so that their ranks lie between those the rows use in every pool
IDLE = [f"lora-r16-idle-{i:02d}" for i in range(16)]
SHAPES = {
    "small": dict(hidden=384, intermediate=1024, layers=6, heads=6, kv_heads=2),
    "0.5b": dict(hidden=896, intermediate=4864, layers=24, heads=14, kv_heads=2, vocab_size=151936),
    "quick": dict(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2),
}


def save_base(model_dir: Path, sizes: dict) -> None:
    """A Qwen2-style model of these sizes (tiny_config's, and vocab_size), untied, random weights from seed 0, with a
    byte tokenizer (bench.throughput's servers read it); the benches' adapters are saved against it."""
    torch.manual_seed(0)
    sizes = dict(sizes)
    vocab = sizes.pop("vocab_size", None)
    config = tiny_config(**sizes, architecture=Qwen2Config, tie_word_embeddings=False)
    if vocab:
        config.vocab_size = vocab
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    model.save_pretrained(model_dir)
    ByT5Tokenizer().save_pretrained(model_dir)


def build(root: Path, shape: str) -> tuple[Path, Path]:
    model_dir, store = root / f"mixed-decode-model-{shape}", root / f"mixed-decode-adapters-{shape}"
    if not (model_dir / "tokenizer_config.json").is_file():
        save_base(model_dir, SHAPES[shape])
    adapters = {**ADAPTERS, **dict.fromkeys(IDLE, ADAPTERS["lora-r16"])}
    for seed, (name, (peft_config, scale)) in enumerate(adapters.items()):
        if not (store / name / "adapter_config.json").is_file():
            save_adapter(model_dir, copy.deepcopy(peft_config), store / name, seed=seed, base_name=shape, scale=scale)
    return model_dir, store


def layer_flops(layer) -> int:
    """Multiply-adds per token of one adapter on one layer, as this server computes it."""
    if layer.low_rank is not None:
        a, b, _ = layer.low_rank
        return a.numel() + b.numel()
    tensors = layer.tensors()
    if layer.rotates_input:  # blocks [n, s, s]: one s x s matmul per block
        return tensors[0].numel()
    if hasattr(layer, "w1"):  # LoKr: W1 (X W2^T), X [c, d]
        (a, c), (d, b) = layer.w1.shape, layer.w2_t.shape
        return c * d * b + a * c * b
    return sum(t.numel() for t in tensors)


def adapter_flops(registry: AdapterRegistry, names: list[str]) -> dict[str, int]:
    """Multiply-adds per token of each adapter on every layer it targets (loads them)."""
    loaded = registry.load_blocking(names)
    return {a.name: sum(layer_flops(layer) for layer in a.built.layers.values()) for a in loaded}


def base_flops(model: nn.Module) -> int:
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))  # any storage


def ideal_ratio(base: int, flops: dict[str, int], combos: list[list[str]]) -> float:
    """Base FLOPs / (base + each row's own adapters' FLOPs), averaged over the rows."""
    return statistics.mean(base / (base + sum(flops[n] for n in combo)) for combo in combos)


def linear_bytes(model: nn.Module) -> int:
    """Bytes of the base's linear weights: what every decode step reads whole (the embedding only at its rows)."""
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, nn.Linear))


def read_bytes(layer) -> int:
    """Bytes of one adapter on one layer that a decode step reads: OFT's rotation blocks, not its generator."""
    tensors = layer.tensors()[:1] if layer.rotates_input else layer.tensors()
    return sum(t.numel() * t.element_size() for t in tensors)


def memory_bound(base: int, sizes: dict[str, int], combos: list[list[str]]) -> float:
    """Base bytes / (base + the bytes of every adapter some row uses): each is read at least once a step."""
    return base / (base + sum(sizes[n] for n in {n for combo in combos for n in combo}))


class BenchRow(PromptSequence):
    """A greedy request as the engine's sampler reads it."""

    def __init__(self, prompt_ids: list[int], slots: tuple[int, ...]):
        super().__init__(prompt_ids, slots)
        self.request.params = SamplingParams()
        self.chooser = TokenChooser(self.request.params)
        self.constraint = None


def step(runner: ModelRunner, rows: list[BenchRow]) -> None:
    """One decode step as the engine runs it: the pass, then the sampling of every row."""
    for row, choice in zip(rows, sample(rows, runner.decode()), strict=True):
        row.tokens.append(choice.token)


BASE = "(b) no adapters"
IDLE_CONTENDER = f"(a) LoRA, {len(IDLE)} idle"
SERVER = str(Path(__file__).resolve().parents[1] / "server")
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::_unique2")


class CountTransfers(TorchFunctionMode):
    """Counts the host <-> device transfers the profiler does not name: `.tolist()` of a tensor on the device (a copy
    to the host and a wait) and mixserve's copies in of host data (`Tensor.to(device)` of a host tensor,
    `torch.tensor(..., device=device)` called from server/). On CPU the same calls are counted, though they copy
    nothing, so that the number means the same; transformers' `.to(x.device)` of its own buffers is left out (on a
    GPU those are there already)."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device, self.tolist, self.copies_in = device, 0, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.tolist and args[0].device.type == self.device.type:
            self.tolist += 1
        elif sys._getframe(1).f_code.co_filename.startswith(SERVER):
            self.copies_in += _copies_in(func, args, kwargs, self.device)
        return func(*args, **kwargs)


def _copies_in(func, args, kwargs, device: torch.device) -> bool:
    if func is torch.Tensor.to and args[0].device.type == "cpu":
        target = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (torch.device, str))), None))
        return target is not None and torch.device(target).type == device.type
    target = kwargs.get("device") if func in (torch.tensor, torch.as_tensor) else None
    return target is not None and torch.device(target).type == device.type


def profile_step(runner: ModelRunner, rows: list[BenchRow], device: torch.device) -> tuple:
    """(operator calls, kernels launched, scalar syncs, copies in, FLOPs of its matrix products) of one decode
    step. A runner with paged attention is profiled without CountTransfers (its compiled code is guarded on the
    TorchFunctionMode stack: a mode makes it refuse and turn paged attention off): its syncs and copies in are not
    counted (None; the profiler alone would miss `.tolist()`)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    counting = runner.paged is None
    with (
        profile(activities=activities, with_flops=True, record_shapes=True) as prof,
        CountTransfers(device) if counting else contextlib.nullcontext() as transfers,
    ):
        step(runner, rows)
        synchronize(device)
    events = prof.events()
    ops = sum(1 for e in events if e.name.startswith("aten::"))
    kernels = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    syncs = sum(1 for e in events if e.name in SYNC_OPS) + transfers.tolist if counting else None
    flops = sum(_flops(e) for e in events if e.device_type == torch.autograd.DeviceType.CPU)
    return ops, kernels, syncs, transfers.copies_in if counting else None, flops


def _flops(event) -> int:
    """The profiler's FLOPs of a matrix product, and those of the in-place ones it has no formula for."""
    if event.flops:
        return event.flops
    if event.name in ("aten::addmm_", "aten::baddbmm_"):  # self [(B,) M, N] += [(B,) M, K] @ [(B,) K, N]
        out, left = event.input_shapes[0], event.input_shapes[1]
        return 2 * math.prod(out) * left[-1]
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["small", "0.5b"], default="small")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--quick", action="store_true", help="a tiny model, one round: checks that it runs")
    parser.add_argument("--quantization", choices=MODES, default="none", help="the base's, as MIXSERVE_QUANTIZATION")
    parser.add_argument("--paged-attention", action="store_true", help="also with MIXSERVE_PAGED_ATTENTION=on")
    parser.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS)
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    shape, rounds = ("quick", 1) if args.quick else (args.shape, args.rounds)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print(describe_run(device, args.dtype))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, store = build(args.workdir or Path(tmp), shape)
        model = load_model(model_dir, device, dtype, args.quantization)
        resident = base_bytes(model)
        registry = AdapterRegistry(model, AdapterStore(store), device, dtype)
        runner = ModelRunner(model, registry.context)
        base = base_flops(model)
        flops = adapter_flops(registry, list(ADAPTERS))
        loaded = {a.name: a for a in registry.load_blocking(list(ADAPTERS))}
        weight_bytes = linear_bytes(model)
        adapter_bytes = {name: sum(map(read_bytes, a.built.layers.values())) for name, a in loaded.items()}
        mixed, lora = combinations(list(ADAPTERS), ROWS, seed=1), combinations(LORAS, ROWS, seed=2)
        contenders = {
            BASE: [[]] * ROWS,
            "(a) mixed types": mixed,
            "(a) LoRA only": lora,
            IDLE_CONTENDER: lora,  # the same rows, with IDLE loaded for its rounds only
        }
        # the base's rows decode on a runner of their own, beside each contender's rows, step for step
        base_runner = ModelRunner(model, registry.context)
        runners = dict.fromkeys(contenders, runner) | {BASE: base_runner}
        if args.paged_attention:
            paged = ModelRunner(model, registry.context, paged_rows=ROWS)
            if paged.paged is not None:
                paged.paged.min_length = 0  # at every length (the server's gathers below MIN_LENGTH tokens)
            print(f"paged attention: {'on' if paged.paged else 'off (see the log)'}")
            runners |= {"(b) no adapters, paged": paged, "(a) mixed types, paged": paged}
            contenders |= {"(b) no adapters, paged": [[]] * ROWS, "(a) mixed types, paged": mixed}
        prompt_tokens = args.prompt_tokens
        prompts = [[(7 * i + 13 * r) % 250 + 3 for i in range(prompt_tokens)] for r in range(ROWS)]

        def start(name: str) -> tuple[list[BenchRow], float]:
            """name's rows, prefilled, and the seconds that took."""
            rows = [
                BenchRow(p, tuple(loaded[n].slot for n in registry_order(registry, c)))
                for p, c in zip(prompts, contenders[name], strict=True)
            ]
            synchronize(device)
            started = time.perf_counter()
            for row, choice in zip(rows, sample(rows, runners[name].prefill(rows)), strict=True):
                row.tokens.append(choice.token)
            synchronize(device)
            return rows, time.perf_counter() - started

        def timed_step(name: str, rows: list[BenchRow]) -> None:
            synchronize(device)
            started = time.perf_counter()
            step(runners[name], rows)
            synchronize(device)
            seconds[name]["decode"][-1] += time.perf_counter() - started

        # seconds per round: each contender's prefill and STEPS decode steps, and the base's paired with them
        seconds = {name: {"prefill": [], "decode": []} for name in contenders}
        paired = {name: {"prefill": [], "decode": []} for name in contenders}  # the base's, in the same rounds
        profiles: dict[str, tuple[int, int, int, int]] = {}
        unloads: list[float] = []  # seconds, each of IDLE's

        @contextlib.contextmanager
        def loaded_for(name: str):
            """IDLE resident while name's rows run, if name is IDLE_CONTENDER."""
            if name == IDLE_CONTENDER:
                registry.load_blocking(IDLE)
            try:
                yield
            finally:
                if name == IDLE_CONTENDER:
                    for idle in IDLE[::2] + IDLE[1::2]:  # every other one first: each moves those after it down
                        started = time.perf_counter()
                        registry.unload(idle, set())
                        synchronize(device)
                        unloads.append(time.perf_counter() - started)

        def release(name: str, rows: list[BenchRow]) -> None:
            for row in rows:
                runners[name].release(row)

        for name in contenders:  # warm: each runner's first passes, and each contender's plans
            with loaded_for(name):
                rows, _ = start(name)
                for _ in range(2):
                    step(runners[name], rows)
                release(name, rows)
        for round_ in range(rounds):
            for name in contenders:
                if name == BASE:
                    continue
                with loaded_for(name):
                    first, second = (BASE, name) if round_ % 2 == 0 else (name, BASE)
                    rows = {}
                    for which in (first, second):
                        rows[which], prefill = start(which)
                        seconds[which]["prefill"].append(prefill)
                        seconds[which]["decode"].append(0.0)
                    for i in range(STEPS):  # alternating which goes first, so that neither gains from the other
                        for which in (first, second) if i % 2 == 0 else (second, first):
                            timed_step(which, rows[which])
                    for key in ("prefill", "decode"):
                        paired[name][key].append(seconds[BASE][key][-1])
                    for which, own in rows.items():
                        release(which, own)
        for name in contenders:  # one step of each profiled
            with loaded_for(name):
                rows, _ = start(name)
                step(runners[name], rows)  # warm
                profiles[name] = profile_step(runners[name], rows, device)
                release(name, rows)
        registry.close()

    sizes = SHAPES[shape]
    print(
        f"model: Qwen2-style hidden {sizes['hidden']} x {sizes['layers']} layers, {args.dtype}, {device_name(device)};"
        f" {ROWS} rows; base {args.quantization}, {resident / 2**20:.0f} MiB resident"
    )
    print(
        f"{'':20s} {'decode tok/s':>13s} {'a/b':>6s} {'ideal':>6s} {'bytes':>6s} {'prefill tok/s':>14s} {'a/b':>6s}"
        f" {'ops/step':>9s} {'x base':>7s} {'kernels':>8s} {'syncs':>6s} {'H2D copies':>11s} {'GFLOP/step':>11s}"
    )
    b_ops = profiles[BASE][0]
    for name, combos in contenders.items():
        ideal, bound = ideal_ratio(base, flops, combos), memory_bound(weight_bytes, adapter_bytes, combos)
        own = seconds[name]
        d, p = (
            ROWS * STEPS / statistics.median(own["decode"]),
            ROWS * prompt_tokens / statistics.median(own["prefill"]),
        )
        # a/b: the median over rounds of the base's seconds over the contender's, in the same round (interleaved)
        d_ratio, p_ratio = (
            1.0 if name == BASE else statistics.median(b / a for b, a in zip(paired[name][key], own[key], strict=True))
            for key in ("decode", "prefill")
        )
        line = f"{name:20s} {d:13.0f} {d_ratio:6.2f} {ideal:6.2f} {bound:6.2f} {p:14.0f} {p_ratio:6.2f}"
        ops, kernels, syncs, copies, step_flops = profiles[name]
        syncs, copies = ("-" if n is None else str(n) for n in (syncs, copies))
        line += f" {ops:9d} {ops / b_ops:7.2f} {kernels:8d} {syncs:>6s} {copies:>11s} {step_flops / 1e9:11.3f}"
        print(line)
    print(
        f"unloading one of the {len(IDLE)} idle adapters ({len(ADAPTERS)} others resident): median"
        f" {statistics.median(unloads) * 1e3:.1f} ms, most {max(unloads) * 1e3:.1f} ms ({len(unloads)} unloads);"
        f" load average at the end {os.getloadavg()[0]:.2f}"
    )


def registry_order(registry: AdapterRegistry, names: list[str]) -> list[str]:
    """names in canonical order (what the engine's resolve gives)."""
    return [a.name for a in registry.resolve(names, set())]


if __name__ == "__main__":
    main()
