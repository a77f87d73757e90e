"""One decode step's attention over the paged KV cache, per layer: what mixserve does today against flex_attention
reading the block tables directly, contenders interleaved in one run.

    python -m bench.decode_attention [--device cuda] [--dtype bfloat16] [--quick] [--rounds 15] [--lengths 128 512]

Qwen2.5-0.5B's attention (14 heads, 2 KV heads, head dim 64), 16 rows, one query each, of mixed lengths: the
longest at 128, 512 and 2048 tokens, the others drawn below it. Keys and values lie in one layer's block pool as
PagedCache keeps it (`[blocks + 1, 16, kv_heads, dim]`, block 0 zero; twice the blocks the rows hold, so that
other sequences' blocks lie between theirs), each row's table drawn at random from it. Contenders:

  (a) gather + SDPA   what a decode pass does today: PagedCache gathers each row's blocks (`index_select`) up to the
                      longest row, and transformers' `sdpa_attention_forward` runs over them with the runner's
                      additive mask (`MaskLayout.masks`) hiding each row's positions past its own length
  (b) flex paged      `flex_attention` (compiled; once per length, its compile time printed apart) of the rows'
                      queries `[rows, heads, 1, dim]` against the whole pool viewed as one sequence `[1, kv_heads,
                      slots, dim]`, with a BlockMask whose kv_indices are each row's table (torch's
                      `_paged_attention.py` does the same): each row reads only its own blocks
  (c) (a) compiled    on CUDA only: (a) under torch.compile(mode="reduce-overhead") (CUDA graphs), the pool's
                      tensors marked static so that a replay does not copy them
  (d) flex, full blocks
                      (b) with each row's blocks but its last listed as full blocks, which flex's kernels read
                      without evaluating mask_mod (what create_block_mask makes of a mask), its last as partial

Printed per length: the median µs of one layer's call of each (the step's masks built once per step, as the
runner does, and timed apart as `setup`; flex's includes a Python loop over the rows' tables that a server would
keep up to date instead), its ratio to (a), the largest |difference| from (a)'s output, and the seconds of its
first calls (`first s`: for a compiled contender, its compile at that length, less what inductor's on-disk cache
already holds). The pass's writes of its new keys and values are the same whatever reads them and are left out.
A contender that fails (a compile error) prints its one-line error and the run goes on; the exit status is 0
unless (a) fails.

--quick (what the suite runs): one short length, few rounds, and on the CPU flex_attention uncompiled (torch's
eager path, which materialises every slot's score: slow, but the same semantics, so the difference column still
checks the block mask); the non-quick run compiles it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from types import SimpleNamespace

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from bench.common import add_device_arguments, describe_run, synchronize
from server.engine.attention import MaskLayout
from server.engine.kv_cache import BLOCK_SIZE, PagedCache, blocks_for

ROWS, HEADS, KV_HEADS, DIM = 16, 14, 2, 64
LENGTHS, QUICK_LENGTHS = (128, 512, 2048), (40,)
CALLS, QUICK_CALLS = 10, 2  # per contender and round; a round's time / calls is one sample
GROUP = HEADS // KV_HEADS  # query heads per KV head: flex sees them as that many queries of one KV head
Q_BLOCK = 128  # the mask's query tile: one tile holds a row's GROUP queries


class Step:
    """One decode step's inputs at one longest length: the pool, the rows' tables, lengths and queries."""

    def __init__(self, longest: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        lengths = torch.randint(1, longest + 1, (ROWS,), generator=generator)
        lengths[0] = longest
        held = [blocks_for(int(n)) for n in lengths]
        blocks = 2 * sum(held)
        shape = torch.Size((KV_HEADS, DIM))
        self.cache = PagedCache({0: (shape, shape)}, blocks, dtype, device)
        for pool in (self.cache.keys[0], self.cache.values[0]):
            pool[1:] = torch.randn(pool[1:].shape, generator=generator).to(device, dtype)
        drawn = (torch.randperm(blocks, generator=generator)[: sum(held)] + 1).split(held)
        width = blocks_for(longest)
        table = torch.zeros(ROWS, width, dtype=torch.long)  # padded with the zero block, as PagedCache._table
        for row, own in enumerate(drawn):
            table[row, : len(own)] = own
        self.lengths, self.held, self.table = lengths.to(device), torch.tensor(held), table
        self.longest, self.blocks = longest, blocks
        positions = (lengths - 1).to(device)
        write = table[torch.arange(ROWS), positions.cpu() // BLOCK_SIZE] * BLOCK_SIZE + positions.cpu() % BLOCK_SIZE
        self.cache.begin_decode(write.to(device), table.flatten().to(device), longest)
        self.query = torch.randn(ROWS, HEADS, 1, DIM, generator=generator).to(device, dtype)
        self.device, self.dtype = device, dtype

    # (a)
    def additive_mask(self) -> torch.Tensor:
        positions = self.lengths - 1
        return MaskLayout({None: None}).masks(positions[:, None], ROWS, self.longest, self.dtype)

    def gathered(self, mask: torch.Tensor) -> torch.Tensor:
        """[rows, heads, 1, dim]: (a), as the model's attention runs it on what PagedCache.update returns."""
        keys = self.cache._gather(self.cache.keys[0], ROWS)  # [rows, kv_heads, longest, dim]
        values = self.cache._gather(self.cache.values[0], ROWS)
        module = SimpleNamespace(num_key_value_groups=HEADS // KV_HEADS, is_causal=True)
        out, _ = sdpa_attention_forward(module, self.query, keys, values, mask, scaling=DIM**-0.5)
        return out.transpose(1, 2)

    # (b)
    def block_mask(self, full: bool = False) -> BlockMask:
        """Row r reads kv blocks table[r, :held[r]] of the pool; mask_mod hides what is not its own on its own (a
        slot of a listed block past the row's length): torch's eager path ignores the block lists, its kernels skip
        unlisted blocks. A block's index in a table is the same in every table holding it (a prefix), so one map
        from block to index in its table serves every row. full: every block but each row's last is listed as full
        (its kernels then skip mask_mod there), the last as partial; else every block as partial."""
        device, table, width = self.device, self.table.to(self.device), self.table.shape[1]
        listed = self.blocks + 1  # kv_indices spans the pool: the eager path turns it into a dense [.., pool] mask
        held = self.held.to(device, torch.int32).view(ROWS, 1, 1)
        every = torch.zeros(ROWS, 1, 1, listed, dtype=torch.int32, device=device)
        every[:, 0, 0, :width] = table
        index_in_table = torch.zeros(listed, dtype=torch.long)
        for row, count in enumerate(self.held.tolist()):
            index_in_table[self.table[row, :count]] = torch.arange(count)
        index_in_table, lengths = index_in_table.to(device), self.lengths

        def mask_mod(b, h, q, kv):
            block = kv // BLOCK_SIZE
            index = index_in_table[block]
            return (table[b, index] == block) & (index * BLOCK_SIZE + kv % BLOCK_SIZE < lengths[b])

        if full:
            last = torch.zeros_like(every)
            last[:, 0, 0, 0] = table.gather(1, (held.view(ROWS, 1) - 1).long())[:, 0]
            partial, full_blocks = (torch.ones_like(held), last), (held - 1, every)
        else:
            partial, full_blocks = (held, every), (None, None)
        return BlockMask.from_kv_blocks(
            *partial,
            *full_blocks,
            BLOCK_SIZE=(Q_BLOCK, BLOCK_SIZE),
            mask_mod=mask_mod,
            seq_lengths=(GROUP, listed * BLOCK_SIZE),
            compute_q_blocks=False,  # what only the backward pass reads
        )

    def paged(self, attend: Callable, block_mask: BlockMask) -> torch.Tensor:
        """[rows, heads, 1, dim]: (b), the whole pool as one sequence of slots; each KV head's GROUP query heads as
        GROUP queries (flex's decoding kernels take grouped heads only in powers of two: 14 / 2 is 7)."""
        keys, values = _as_sequence(self.cache.keys[0]), _as_sequence(self.cache.values[0])
        queries = self.query.view(ROWS, KV_HEADS, GROUP, DIM)
        return attend(queries, keys, values, block_mask=block_mask, scale=DIM**-0.5).view(ROWS, HEADS, 1, DIM)


def _as_sequence(pool: torch.Tensor) -> torch.Tensor:
    """[blocks + 1, BLOCK_SIZE, heads, dim] -> [1, heads, slots, dim] (a view)."""
    return pool.flatten(0, 1).transpose(0, 1).unsqueeze(0)


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
    parser.add_argument("--quick", action="store_true", help="one short length, 2 rounds; flex uncompiled on CPU")
    parser.add_argument("--workdir", help="unused (the benchmarks' common flag; this one builds nothing on disk)")
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    lengths, rounds, calls = (QUICK_LENGTHS, 2, QUICK_CALLS) if args.quick else (LENGTHS, args.rounds, CALLS)
    lengths = args.lengths or lengths
    compile_flex = not (args.quick and device.type == "cpu")
    print(describe_run(device, args.dtype))
    print(
        f"decode attention, one layer: {ROWS} rows, {HEADS} heads, {KV_HEADS} KV heads, head dim {DIM},"
        f" block {BLOCK_SIZE}; {rounds} rounds of {calls} calls; flex "
        + ("compiled" if compile_flex else "uncompiled (--quick on CPU: torch's eager path; the full run compiles)")
    )
    print(
        f"{'longest':>7s} {'contender':21s} {'median us':>10s} {'/ (a)':>6s} {'max |diff|':>11s}"
        f" {'setup us':>9s} {'first s':>10s}"
    )
    flex = torch.compile(flex_attention, dynamic=False) if compile_flex else flex_attention
    with torch.inference_mode():
        for longest in lengths:
            measure(Step(longest, device, dtype), flex, rounds, calls)
    return 0


def measure(step: Step, flex: Callable, rounds: int, calls: int) -> None:
    """Prints one length's lines; raises if (a) fails."""
    device = step.device
    mask, block_mask, full_mask = step.additive_mask(), step.block_mask(), step.block_mask(full=True)
    setup = {
        "(a) gather + SDPA": step.additive_mask,
        "(b) flex paged": step.block_mask,
        "(d) flex, full blocks": lambda: step.block_mask(full=True),
    }
    contenders: dict[str, Callable[[], torch.Tensor]] = {
        "(a) gather + SDPA": lambda: step.gathered(mask),
        "(b) flex paged": lambda: step.paged(flex, block_mask),
        "(d) flex, full blocks": lambda: step.paged(flex, full_mask),
    }
    if device.type == "cuda":
        for pool in (step.cache.keys[0], step.cache.values[0]):
            torch._dynamo.mark_static_address(pool)
        graphed = torch.compile(step.gathered, mode="reduce-overhead", dynamic=False)
        contenders["(c) (a) compiled"] = lambda: graphed(mask)
        setup["(c) (a) compiled"] = setup["(a) gather + SDPA"]
    reference = contenders["(a) gather + SDPA"]().float()
    found: dict[str, dict] = {}
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
        first = time.perf_counter() - started
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
