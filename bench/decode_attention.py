"""One decode step's attention over the paged KV cache, per layer: the server's two ways, contenders interleaved in
one run.

    python -m bench.decode_attention [--device cuda] [--dtype bfloat16] [--quick] [--rounds 15] [--lengths 128 512]
        [--pool-tokens N]

Qwen2.5-0.5B's attention (14 heads, 2 KV heads, head dim 64), 16 rows, one query each, of mixed lengths: the
longest at 128, 512 and 2048 tokens, the others drawn below it. Keys and values lie in one layer's block pool as
PagedCache keeps it (`[blocks + 1, 16, kv_heads, dim]`, block 0 zero), of --pool-tokens tokens (default: the CPU
server's default cache, 32 requests of 5,120 tokens); each row's blocks drawn at random among the pool's first twice
as many blocks as the rows hold (the pool hands out its lowest free blocks first). Contenders:

  (a) gather + SDPA   what a decode pass does by default: PagedCache gathers each row's blocks (`index_select`) up to
                      the longest row, and transformers' `sdpa_attention_forward` runs over them with the runner's
                      additive mask (`MaskLayout.masks`) hiding each row's positions past its own length
  (b) paged           MIXSERVE_PAGED_ATTENTION=on: the server's PagedAttention (server/engine/paged_attention.py),
                      compiled and checked as the server does at start, for 16 rows: flex_attention over the whole
                      pool, reading each row's blocks in place through the block mask it builds each step
  (c) (a) compiled    on CUDA only: (a) under torch.compile(mode="reduce-overhead") (CUDA graphs), the pool's
                      tensors marked static so that a replay does not copy them

Printed per length: the median µs of one layer's call of each, with what it builds once per step (the additive mask;
the block masks) timed apart as `setup`, its ratio to (a), the largest |difference| from (a)'s output, and the seconds
of its first calls (`first s`: for a compiled contender its compile, less what inductor's on-disk cache already
holds; for (b) the server's compile and check). The pass's writes of its new keys and values are the same whatever
reads them and are left out. A contender that fails (a compile error, or the server turning paged attention off)
prints its one-line error and the run goes on; the exit status is 0 unless (a) fails.

--quick (what the suite runs): one short length, a small pool, few rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from types import SimpleNamespace

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from bench.common import add_device_arguments, describe_run, synchronize
from server.engine.attention import MaskLayout
from server.engine.kv_cache import BLOCK_SIZE, PagedCache, blocks_for
from server.engine.paged_attention import PagedAttention
from server.engine.runner import DEFAULT_CACHE_TOKENS

ROWS, HEADS, KV_HEADS, DIM = 16, 14, 2, 64
LENGTHS, QUICK_LENGTHS = (128, 512, 2048), (40,)
CALLS, QUICK_CALLS = 10, 2  # per contender and round; a round's time / calls is one sample
QUICK_POOL_TOKENS = 4096
LAYOUT = MaskLayout({None: None})  # full attention


class Step:
    """One decode step's inputs at one longest length: the pool, the rows' tables, lengths and queries."""

    def __init__(self, longest: int, pool_tokens: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        lengths = torch.randint(1, longest + 1, (ROWS,), generator=generator)
        lengths[0] = longest
        held = [blocks_for(int(n)) for n in lengths]
        blocks = max(blocks_for(pool_tokens), 2 * sum(held))
        shape = torch.Size((KV_HEADS, DIM))
        self.cache = PagedCache({0: (shape, shape)}, blocks, dtype, device)
        started = time.perf_counter()
        self.paged = self._paged()  # its check takes blocks of the pool: before the rows' are filled
        self.compile_s = time.perf_counter() - started
        region = 2 * sum(held)  # where the rows' blocks lie: the pool's lowest, as it hands them out
        for pool in (self.cache.keys[0], self.cache.values[0]):
            pool[1 : region + 1] = torch.randn(region, *pool.shape[1:], generator=generator).to(device, dtype)
        drawn = (torch.randperm(region, generator=generator)[: sum(held)] + 1).split(held)
        table = torch.zeros(ROWS, blocks_for(longest), dtype=torch.long)  # padded with the zero block
        for row, own in enumerate(drawn):
            table[row, : len(own)] = own
        self.longest, self.table = longest, table.to(device)
        self.positions = (lengths - 1).to(device)
        write = table[torch.arange(ROWS), (lengths - 1) // BLOCK_SIZE] * BLOCK_SIZE + (lengths - 1) % BLOCK_SIZE
        self.cache.begin_decode(write.to(device), self.table.flatten(), longest)
        self.query = torch.randn(ROWS, HEADS, 1, DIM, generator=generator).to(device, dtype)
        self.module = SimpleNamespace(num_key_value_groups=HEADS // KV_HEADS, is_causal=True, layer_idx=0)
        self.device, self.dtype = device, dtype

    def _paged(self) -> PagedAttention | str:
        """(b): the server's, compiled and checked as at start; or why it failed."""
        try:
            return PagedAttention.compiled(self.cache, LAYOUT, ROWS, HEADS)
        except Exception as error:  # a contender that does not compile is a result, not a crash
            return one_line(error)

    # (a)
    def additive_mask(self) -> torch.Tensor:
        return LAYOUT.masks(self.positions[:, None], ROWS, self.longest, self.dtype)

    def gathered(self, mask: torch.Tensor) -> torch.Tensor:
        """[rows, 1, heads, dim]: (a), as the model's attention runs it on what PagedCache.update returns."""
        keys = self.cache._gather(self.cache.keys[0], ROWS)  # [rows, kv_heads, longest, dim]
        values = self.cache._gather(self.cache.values[0], ROWS)
        out, _ = sdpa_attention_forward(self.module, self.query, keys, values, mask, scaling=DIM**-0.5)
        return out


def timed(run: Callable[[], object], device: torch.device, calls: int) -> float:
    """Seconds of one call: calls in a row, then the device's queued work, divided."""
    synchronize(device)
    started = time.perf_counter()
    for _ in range(calls):
        run()
    synchronize(device)
    return (time.perf_counter() - started) / calls


def one_line(error: BaseException) -> str:
    """The error's type and first line, and a compiler's first `error:` line when there is one."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    said = f"{type(error).__name__}: {lines[0][:160] if lines else ''}"
    detail = next((line.split("error:", 1)[1].strip() for line in lines[1:] if "error:" in line), None)
    return said + (f" ({detail[:160]})" if detail else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--lengths", type=int, nargs="+", help=f"the longest row's, one run each (default {LENGTHS})")
    parser.add_argument("--pool-tokens", type=int, help=f"the pool's size (default {DEFAULT_CACHE_TOKENS})")
    parser.add_argument("--quick", action="store_true", help="one short length, a small pool, 2 rounds")
    parser.add_argument("--workdir", help="unused (the benchmarks' common flag; this one builds nothing on disk)")
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    lengths, rounds, calls = (QUICK_LENGTHS, 2, QUICK_CALLS) if args.quick else (LENGTHS, args.rounds, CALLS)
    lengths = args.lengths or lengths
    pool_tokens = args.pool_tokens or (QUICK_POOL_TOKENS if args.quick else DEFAULT_CACHE_TOKENS)
    print(describe_run(device, args.dtype))
    print(
        f"decode attention, one layer: {ROWS} rows, {HEADS} heads, {KV_HEADS} KV heads, head dim {DIM},"
        f" block {BLOCK_SIZE}; a pool of {pool_tokens} tokens; {rounds} rounds of {calls} calls"
    )
    print(
        f"{'longest':>7s} {'contender':21s} {'median us':>10s} {'/ (a)':>6s} {'max |diff|':>11s}"
        f" {'setup us':>9s} {'first s':>10s}"
    )
    with torch.inference_mode():
        for longest in lengths:
            measure(Step(longest, pool_tokens, device, dtype), rounds, calls)
    return 0


def measure(step: Step, rounds: int, calls: int) -> None:
    """Prints one length's lines; raises if (a) fails."""
    device = step.device
    mask = step.additive_mask()
    setup = {"(a) gather + SDPA": step.additive_mask}
    contenders: dict[str, Callable[[], torch.Tensor]] = {"(a) gather + SDPA": lambda: step.gathered(mask)}
    compiling = {"(b) paged": step.compile_s}
    paged = step.paged
    if isinstance(paged, PagedAttention):
        block_mask = paged.masks(step.table, step.positions)
        setup["(b) paged"] = lambda: paged.masks(step.table, step.positions)
        contenders["(b) paged"] = lambda: paged.attend(step.module, step.query, block_mask, DIM**-0.5)
    if device.type == "cuda":
        for pool in (step.cache.keys[0], step.cache.values[0]):
            torch._dynamo.mark_static_address(pool)
        graphed = torch.compile(step.gathered, mode="reduce-overhead", dynamic=False)
        contenders["(c) (a) compiled"] = lambda: graphed(mask)
        setup["(c) (a) compiled"] = setup["(a) gather + SDPA"]
    reference = contenders["(a) gather + SDPA"]().float()
    found: dict[str, dict] = {} if isinstance(paged, PagedAttention) else {"(b) paged": {"error": paged}}
    for name, run in contenders.items():
        synchronize(device)
        started = time.perf_counter()
        try:
            out = run().float().clone()  # (float32: the same tensor, which a CUDA graph's next replay overwrites)
            run()  # reduce-overhead records its graph at the second call
            synchronize(device)
        except Exception as error:  # a contender that does not compile is a result, not a crash
            if name.startswith("(a)"):
                raise
            found[name] = {"error": one_line(error)}
            continue
        first = compiling.get(name, time.perf_counter() - started)
        found[name] = {"samples": [], "diff": float((out - reference).abs().max()), "compile": first}
    alive = {name: run for name, run in contenders.items() if "error" not in found[name]}
    for _ in range(rounds):
        for name, run in alive.items():
            found[name]["samples"].append(timed(run, device, calls))
    base = statistics.median(found["(a) gather + SDPA"]["samples"])
    for name, result in found.items():
        if "error" in result:
            print(f"{step.longest:7d} {name:21s} failed: {result['error']}")
            continue
        median = statistics.median(result["samples"])
        setup_us = timed(setup[name], device, calls) * 1e6
        compiled = f"{result['compile']:10.1f}" if not name.startswith("(a)") else f"{'-':>10s}"
        print(
            f"{step.longest:7d} {name:21s} {median * 1e6:10.1f} {median / base:6.2f} {result['diff']:11.2e}"
            f" {setup_us:9.0f} {compiled}",
            flush=True,
        )


if __name__ == "__main__":
    raise SystemExit(main())
