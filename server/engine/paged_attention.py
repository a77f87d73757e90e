"""Decode attention that reads the paged KV cache where it lies, instead of gathering each row's blocks.

In a decode pass, each row's query attends to its own blocks of the pool: `flex_attention` over the whole pool seen
as one sequence of slots, with a block mask built on the device from the rows' tables each step. A row lists the
blocks its query sees (those of its window, or all it holds); every other block of the pool is skipped. On a CPU the
blocks wholly inside are listed as full, which flex reads without evaluating mask_mod, and the first and last as
partial, where mask_mod compares a slot's position with the row's start and end; on a GPU every listed block is
partial (flex's CUDA decoding kernel, given full blocks, splits the whole pool's length among its programs rather
than the blocks listed). Each KV head's query heads are its queries (grouped-query attention; flex's CUDA kernels take
grouped heads only in powers of two), each query scaled before (one graph whatever scale a layer passes).

flex_attention runs compiled (its eager form scores every slot of the pool): one graph, for a batch of a fixed
number of rows (the engine's largest; a smaller batch is padded with rows that see nothing) over the pool's shape. It
is compiled when the runner starts, after the model's self-check, and checked against a plain computation on blocks
of the pool itself (taken from it and given back, zeroed): seconds to tens of seconds before the server starts, and
none after. Serving never compiles: a call runs with torch's stance `fail_on_recompile`, and a call that would
compile, or fails, turns paged attention off for good (logged) and its pass runs again gathered. Decode passes whose
longest row is under MIN_LENGTH tokens gather, and prefill passes always do (SDPA).

Taken only where the model computes attention through transformers' SDPA function (which this one calls for
everything that is not a paged decode), and not for ALiBi models (their bias comes from a padding mask).
"""

from __future__ import annotations

import logging
import time

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from server.engine.attention import MaskLayout
from server.engine.kv_cache import BLOCK_SIZE, PagedCache

log = logging.getLogger(__name__)
NAME = "mixserve_paged"  # the attention implementation the model is switched to
Q_BLOCK = 128  # the mask's query tile: one tile holds a row's queries (its KV head's query heads)
CHECK_ROWS = 5  # rows of the check run after compiling (the rest of the batch padding)
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}  # of the check, absolute
# A decode pass whose longest row is shorter gathers: there the block masks and each call's guards cost more than the
# gather's copy (README, "Paged attention": in the step 0.87-0.96 of the gather at 56-536 tokens, 1.34-1.55x at 2,072
# on this CPU; the threshold lies between, not measured at)
MIN_LENGTH = 1024


class PagedAttentionError(RuntimeError):
    """flex_attention failed, or would have compiled, in a decode pass: the pass runs again gathered."""


class PagedMask(BlockMask):
    """The block mask of one kind of layer (full, or one sliding window) for one decode pass, and what the attention
    function needs beside it. Passed to the model as its attention mask: transformers hands a 4D BlockMask through."""

    paged: PagedAttention
    ndim = 4  # what some models read of a mask before transformers hands it through
    plain: BlockMask  # the same, as a BlockMask itself: the compiled function is called with it, not guarded on ours


class PagedAttention:
    """flex_attention compiled for one model's cache, and the block masks of each decode pass."""

    def __init__(self, cache: PagedCache, layout: MaskLayout, rows: int, heads: int):
        """rows: the most rows a decode pass has; heads: query heads per layer."""
        self.cache, self.layout, self.rows = cache, layout, rows
        kv_heads, self.dim = next(iter(cache.shapes.values()))[0]
        self.kv_heads, self.group = kv_heads, heads // kv_heads  # each KV head's query heads
        self.full_blocks = cache.device.type == "cpu"
        # flex's CPU decoding kernel (one query per KV head: group 1) reads the lists of rows that list different
        # numbers of blocks as if each row could hold any slot of the pool (its time grew with the pool's size):
        # there every row lists as many full blocks as the row with the fewest, the rest as partial
        self.same_counts = self.full_blocks and self.group == 1
        self.off: str | None = None  # why paged attention is off, once it is
        self.min_length = MIN_LENGTH
        self._flex = torch.compile(flex_attention, dynamic=False)
        self._lists: dict[int | None, tuple] = {}
        # each block's index in its row's table, written in place each step for every kind of layer (mask_mod reads
        # those of the partial blocks listed): the same in every table holding it (a cached prefix)
        self._index = torch.zeros(cache.pool.total + 1, dtype=torch.int32, device=cache.device)

    def _buffers(self, window: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The block lists of the layers with this window, (partial, full) [rows, 1, 1, pool's blocks + 1], written in
        place each step: a kernel reads a row's first `count` entries only. 2 x rows x blocks x 4 bytes a window;
        full None on a GPU."""
        if window not in self._lists:
            device, blocks = self.cache.device, self.cache.pool.total + 1
            lists = [torch.zeros(self.rows, 1, 1, blocks, dtype=torch.int32, device=device) for _ in range(2)]
            self._lists[window] = (lists[0], lists[1] if self.full_blocks else None)
        return self._lists[window]

    def _place(self, table: torch.Tensor) -> None:
        """Each block of the rows' tables [rows, width] at its index in its table, for the step's masks."""
        rows, width = table.shape
        self._index[table.flatten()] = torch.arange(width, dtype=torch.int32, device=table.device).repeat(rows)

    @classmethod
    def for_model(cls, model, cache: PagedCache, layout: MaskLayout, rows: int) -> PagedAttention | None:
        """Switches the model's attention to NAME, compiles and checks, where the model can take it; None (logged)
        where it cannot, the model's attention as it was."""
        config = model.config
        heads = getattr(config, "num_attention_heads", None)
        shapes = set(cache.shapes.values())
        kv_heads = next(iter(shapes))[0][0]
        why = None
        if torch._dynamo.config.disable:  # flex_attention's eager form would score every slot of the pool
            why = "torch.compile is disabled (TORCH_COMPILE_DISABLE)"
        elif layout.padding_only:
            why = "ALiBi's bias comes from a padding mask"
        elif config._attn_implementation not in ("sdpa", NAME):
            why = f"the model computes attention as {config._attn_implementation!r}, not through SDPA"
        elif len(shapes) != 1 or len(set(next(iter(shapes)))) != 1:
            why = "its layers store keys and values of different shapes"
        elif not heads or heads % kv_heads or heads // kv_heads > Q_BLOCK:
            why = f"{heads} query heads over {kv_heads} KV heads"
        elif not model._can_set_attn_implementation():
            why = "its attention does not go through transformers' attention functions"
        if why is not None:
            log.info("paged decode attention off: %s; decode passes gather each row's blocks", why)
            return None
        started = time.monotonic()
        try:
            paged = cls.compiled(cache, layout, rows, heads)
        except Exception as exc:
            log.error("paged decode attention off: compiling or checking flex_attention failed: %r", exc)
            return None
        model.set_attn_implementation(NAME)
        log.info("paged decode attention on: flex_attention compiled and checked in %.1f s", time.monotonic() - started)
        return paged

    @classmethod
    def compiled(cls, cache: PagedCache, layout: MaskLayout, rows: int, heads: int) -> PagedAttention:
        """Compiled and checked against a plain computation on some of the cache's blocks (which must be free);
        raises where it cannot be (a compile error, a result off the plain one)."""
        paged = cls(cache, layout, rows, heads)
        worst = paged._check()
        if not worst <= TOLERANCE.get(cache.dtype, 2e-2):
            raise AssertionError(f"{worst:.3g} off a plain computation")
        return paged

    def turn_off(self, why: str) -> None:
        if self.off is None:
            log.error("paged decode attention turned off: %s; decode passes gather each row's blocks", why)
            self.off = why

    def takes(self, rows: int, length: int) -> bool:
        """Whether a decode pass of `rows` rows, the longest `length` tokens, reads the cache in place."""
        return self.off is None and rows <= self.rows and length >= self.min_length

    def masks(self, table: torch.Tensor, positions: torch.Tensor):
        """The model's attention_mask argument for a decode pass: table [rows, width] each row's blocks (padded with
        the zero block), positions [rows] each row's query's; on the device."""
        try:
            self._place(table)
            if len(self.layout.windows) == 1:
                return self._mask(table, positions, next(iter(self.layout.windows.values())))
            return {kind: self._mask(table, positions, window) for kind, window in self.layout.windows.items()}
        except Exception as exc:
            raise PagedAttentionError(f"building the block masks: {exc!r}") from exc

    def _mask(self, table: torch.Tensor, positions: torch.Tensor, window: int | None) -> PagedMask:
        """A row lists its blocks from its first seen to its last: the first and last partial, those between full
        (on a CPU: `full_blocks`), after them the zero block, which mask_mod hides, up to the counts. Padding rows
        see nothing (with `same_counts` they read the zero block as often as the rows list full blocks)."""
        rows, width = table.shape
        device = table.device
        end = positions + 1
        start = (end - window).clamp(min=0) if window else torch.zeros_like(end)
        first, last = start // BLOCK_SIZE, positions // BLOCK_SIZE
        inner = (last - first - 1).clamp(min=0)  # blocks wholly seen: those between the first and the last
        if not self.full_blocks:
            full_count = torch.zeros_like(inner)
        elif self.same_counts:
            full_count = inner.min().expand_as(inner)
        else:
            full_count = inner
        extra = inner - full_count  # listed as partial past the full ones
        columns = torch.arange(width, device=device)
        partial, full = self._buffers(window)
        index = self._index
        if full is not None:
            past_first = table.gather(1, (columns + first[:, None] + 1).clamp(max=width - 1))
            full[:rows, 0, 0, :width] = torch.where(columns < full_count[:, None], past_first, 0)
        partial[:rows, 0, 0, 0] = table.gather(1, first[:, None])[:, 0]
        partial[:rows, 0, 0, 1] = torch.where(last > first, table.gather(1, last[:, None])[:, 0], 0)
        if width > 2:
            beyond = table.gather(1, (columns[:-2] + first[:, None] + 1 + full_count[:, None]).clamp(max=width - 1))
            partial[:rows, 0, 0, 2:width] = torch.where(columns[:-2] < extra[:, None], beyond, 0)
        partial[rows:, 0, 0, 0] = 0  # padding rows: the zero block, hidden
        if full is not None and self.same_counts:
            full[rows:, 0, 0, :width] = 0  # padding rows: the zero block (their count is the rows', under width)
        counts = torch.zeros(2, self.rows, dtype=torch.int32, device=device)  # partial, full
        counts[0] = 1
        if self.same_counts:
            counts[0], counts[1] = 2 + extra.max(), full_count[0]
        else:
            counts[0, :rows], counts[1, :rows] = 2 + extra, full_count
        starts = torch.zeros(self.rows, dtype=torch.int32, device=device)
        ends = torch.zeros_like(starts)  # padding rows: nothing
        starts[:rows], ends[:rows] = start, end

        def mask_mod(b, h, q, kv):
            position = index[kv // BLOCK_SIZE] * BLOCK_SIZE + kv % BLOCK_SIZE
            return (kv >= BLOCK_SIZE) & (starts[b] <= position) & (position < ends[b])

        parts = {
            "kv_num_blocks": counts[0].view(self.rows, 1, 1),
            "kv_indices": partial,
            "full_kv_num_blocks": counts[1].view(self.rows, 1, 1) if full is not None else None,
            "full_kv_indices": full,
            "BLOCK_SIZE": (Q_BLOCK, BLOCK_SIZE),
            "mask_mod": mask_mod,
            "seq_lengths": (self.group, partial.shape[-1] * BLOCK_SIZE),
            "compute_q_blocks": False,  # what only a backward pass reads
        }
        mask = PagedMask.from_kv_blocks(**parts)
        mask.paged, mask.plain = self, BlockMask.from_kv_blocks(**parts)
        return mask

    def attend(self, module, query: torch.Tensor, mask: BlockMask, scaling: float | None) -> torch.Tensor:
        """[rows, 1, heads, dim]: the queries [rows, heads, 1, dim] of layer module.layer_idx against its pools."""
        layer = module.layer_idx
        return self._attend(query, self.cache.keys[layer], self.cache.values[layer], mask, scaling, layer)

    def _attend(self, query, keys, values, mask, scaling, layer, stance="fail_on_recompile") -> torch.Tensor:
        rows, heads, _, dim = query.shape
        padded = query.new_zeros(self.rows, self.kv_heads, self.group, dim)
        scale = dim**-0.5 if scaling is None else scaling
        padded[:rows] = query.reshape(rows, self.kv_heads, self.group, dim) * scale
        try:
            with torch.compiler.set_stance(stance):
                out = self._flex(padded, _as_sequence(keys), _as_sequence(values), block_mask=mask.plain, scale=1.0)
        except Exception as exc:
            raise PagedAttentionError(f"flex_attention on layer {layer}: {exc!r}") from exc
        return out[:rows].reshape(rows, heads, 1, dim).transpose(1, 2).contiguous()

    @torch.inference_mode()  # as the passes call it: the compiled code is guarded on it
    def _check(self) -> float:
        """Compiles the function (its first call) and returns its largest difference from each row's own slots'
        plain attention: up to CHECK_ROWS rows of random lengths, without a window and with one, their blocks taken
        from the pool (unused yet: the runner has just started) and given back zeroed."""
        generator = torch.Generator().manual_seed(0)
        layer = next(iter(self.cache.keys))
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        device, dtype = keys.device, keys.dtype
        rows = min(CHECK_ROWS, self.rows, self.cache.pool.total)
        held = min(4, self.cache.pool.total // rows)
        owners = [object() for _ in range(rows)]
        try:
            for owner in owners:
                self.cache.allocate(owner, held * BLOCK_SIZE)
            table = torch.tensor([self.cache.pool.tables[owner] for owner in owners])
            blocks = table.flatten().to(device)
            for pool in (keys, values):
                pool[blocks] = torch.randn(len(blocks), *pool.shape[1:], generator=generator).to(device, dtype)
            positions = torch.randint(0, held * BLOCK_SIZE, (rows,), generator=generator)
            query = torch.randn(rows, self.kv_heads * self.group, 1, self.dim, generator=generator).to(device, dtype)
            scale = float(torch.rand((), generator=generator)) + 0.1  # any: scaled before the call
            worst = 0.0
            self._place(table.to(device))
            for window in dict.fromkeys([*self.layout.windows.values(), 1 + int(positions.max()) // 2]):
                mask = self._mask(table.to(device), positions.to(device), window)
                out = self._attend(query, keys, values, mask, scale, "(check)", stance="default")
                for row in range(rows):
                    end = int(positions[row]) + 1
                    start = max(0, end - window) if window else 0
                    slots = (table[row, :, None] * BLOCK_SIZE + torch.arange(BLOCK_SIZE)).flatten()[start:end]
                    k, v = (t.flatten(0, 1)[slots.to(device)].transpose(0, 1).float() for t in (keys, values))
                    q = query[row, :, 0].float().view(self.kv_heads, self.group, self.dim)
                    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
                    got = out[row, 0].float().view(self.kv_heads, self.group, self.dim)
                    worst = max(worst, float((got - expected).abs().max()))
            return worst
        finally:
            self._lists = {w: lists for w, lists in self._lists.items() if w in self.layout.windows.values()}
            for owner in owners:
                if owner in self.cache.pool.tables:
                    self.cache.zero(torch.tensor(self.cache.pool.tables[owner], device=device))
                self.cache.free(owner)


def _as_sequence(pool: torch.Tensor) -> torch.Tensor:
    """[blocks + 1, BLOCK_SIZE, heads, dim] -> [1, heads, slots, dim] (a view)."""
    return pool.flatten(0, 1).transpose(0, 1).unsqueeze(0)


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """The model's attention: a paged decode pass's (its mask a PagedMask), else transformers' SDPA."""
    if isinstance(attention_mask, PagedMask):
        if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None or dropout:
            raise PagedAttentionError("attention with a softcap, sinks or dropout is not paged")
        return attention_mask.paged.attend(module, query, attention_mask, scaling), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


AttentionInterface.register(NAME, attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)  # the masks the model builds itself (a pass without the cache)
