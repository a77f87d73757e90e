"""Decode attention that reads the paged KV cache where it lies, instead of gathering each row's blocks.

In a decode pass, each row's query attends to its own blocks of the pool: `flex_attention` over the whole pool seen
as one sequence of slots, with a block mask built on the device from the rows' tables each step. A row lists the
blocks wholly inside what its query sees (its window, or all it holds) as full, which flex reads without evaluating
mask_mod, and its first and last as partial, where mask_mod compares a slot's position with the row's start and end;
every other block of the pool is skipped. Each KV head's query heads are its queries (grouped-query attention; flex's
CUDA kernels take grouped heads only in powers of two).

flex_attention runs compiled (its eager form scores every slot of the pool): one graph per layer shape, for a batch
of a fixed number of rows (the engine's largest; a smaller batch is padded with rows that read one slot of the zero
block). Compiling takes seconds to tens of seconds on a CPU, so it runs on a thread of its own once the model's
self-check has passed, and is checked there against a plain computation; until then decode passes gather blocks as
before (PagedCache). Serving never compiles: a call runs with torch's stance `fail_on_recompile`, and a call that would
compile, or fails, turns paged attention off for good (logged) and its pass runs again gathered. Prefill passes
always gather (SDPA).

Taken only where the model computes attention through transformers' SDPA function (which this one calls for
everything that is not a paged decode), and not for ALiBi models (their bias comes from a padding mask).
"""

from __future__ import annotations

import logging
import threading
import time

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from server.engine.attention import MaskLayout
from server.engine.kv_cache import BLOCK_SIZE, PagedCache, _ShapeProbe

log = logging.getLogger(__name__)
NAME = "mixserve_paged"  # the attention implementation the model is switched to
Q_BLOCK = 128  # the mask's query tile: one tile holds a row's queries (its KV head's query heads)
CHECK_ROWS = 5  # rows of the check run after compiling (the rest of the batch padding)
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}  # of the check, absolute


class PagedAttentionError(RuntimeError):
    """flex_attention failed, or would have compiled, in a decode pass: the pass runs again gathered."""


class PagedMask(BlockMask):
    """The block mask of one kind of layer (full, or one sliding window) for one decode pass, and what the attention
    function needs beside it. Passed to the model as its attention mask: transformers hands a 4D BlockMask through."""

    paged: PagedAttention
    ndim = 4  # what some models read of a mask before transformers hands it through
    plain: BlockMask  # the same, as a BlockMask itself: the compiled function is called with it, not guarded on ours


class PagedAttention:
    """Compiles flex_attention for one model's cache, in the background, then builds each decode pass's masks."""

    def __init__(self, cache: PagedCache, layout: MaskLayout, rows: int, heads: int, scales: set[float | None]):
        """rows: the most rows a decode pass has; heads: query heads per layer; scales: the layers' score scales."""
        self.cache, self.layout, self.rows, self.scales = cache, layout, rows, scales
        kv_heads, self.dim = next(iter(cache.shapes.values()))[0]
        self.kv_heads, self.group = kv_heads, heads // kv_heads  # each KV head's query heads
        self.state = "compiling"  # then "on", or "off: why"
        self._flex = torch.compile(flex_attention, dynamic=False)
        self._lock = threading.Lock()  # held by a decode pass using the compiled function, or by the compile
        self._thread: threading.Thread | None = None

    @classmethod
    def for_model(cls, model, probe, cache: PagedCache, layout: MaskLayout, rows: int) -> PagedAttention | None:
        """Switches the model's attention to NAME where it can take it; None (logged) where it cannot. probe(cache):
        one token through the model (the scales its layers pass are compiled in)."""
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
        else:
            model.set_attn_implementation(NAME)
            scales = _scales_passed(probe)
            if not scales:
                why = "no layer's attention reached transformers' attention functions"
        if why is not None:
            log.info("paged decode attention off: %s; decode passes gather each row's blocks", why)
            return None
        return cls(cache, layout, rows, heads, scales)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._compile, name="mixserve-paged-attention", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> str:
        """The state once the compile has ended (benches and tests)."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.state

    def turn_off(self, why: str) -> None:
        if not self.state.startswith("off"):
            log.error("paged decode attention turned off: %s; decode passes gather each row's blocks", why)
        self.state = f"off: {why}"

    def begin(self, rows: int) -> bool:
        """Whether a decode pass of `rows` rows reads the cache in place; if so, end() must follow."""
        if self.state != "on" or rows > self.rows:
            return False
        return self._lock.acquire(blocking=False)

    def end(self) -> None:
        self._lock.release()

    def masks(self, table: torch.Tensor, positions: torch.Tensor):
        """The model's attention_mask argument for a decode pass: table [rows, width] each row's blocks (padded with
        the zero block), positions [rows] each row's query's; on the device."""
        try:
            if len(self.layout.windows) == 1:
                return self._mask(table, positions, next(iter(self.layout.windows.values())))
            return {kind: self._mask(table, positions, window) for kind, window in self.layout.windows.items()}
        except Exception as exc:
            raise PagedAttentionError(f"building the block masks: {exc!r}") from exc

    def _mask(self, table: torch.Tensor, positions: torch.Tensor, window: int | None) -> PagedMask:
        """Every row lists as many full blocks as the row with the fewest (flex's CPU kernel reads the lists of a
        batch whose rows list different numbers as if each row could hold any slot of the pool: time in the pool's
        size), and as many partial ones as the row with the most: its first, its last, its other blocks past the
        full ones, then the zero block, which mask_mod hides. Padding rows list the zero block."""
        rows, width = table.shape
        device, slots = table.device, self.cache.pool.total + 1
        end = positions + 1
        start = (end - window).clamp(min=0) if window else torch.zeros_like(end)
        first, last = start // BLOCK_SIZE, positions // BLOCK_SIZE
        inner = (last - first - 1).clamp(min=0)  # blocks wholly seen: those between the first and the last
        full_count = inner.min()
        columns = torch.arange(width, device=device)
        full = torch.zeros(self.rows, 1, 1, slots, dtype=torch.int32, device=device)
        after = table.gather(1, (columns + first[:, None] + 1).clamp(max=width - 1))  # the blocks past the first
        full[:rows, 0, 0, :width] = torch.where(columns < full_count, after, 0)
        partial = torch.zeros_like(full)
        partial[:rows, 0, 0, 0] = table.gather(1, first[:, None])[:, 0]
        partial[:rows, 0, 0, 1] = torch.where(last > first, table.gather(1, last[:, None])[:, 0], 0)
        if width > 2:
            extra = columns[: width - 2]
            past = table.gather(1, (extra + first[:, None] + 1 + full_count).clamp(max=width - 1))
            partial[:rows, 0, 0, 2:width] = torch.where(extra < (inner - full_count)[:, None], past, 0)
        counts = torch.stack([2 + (inner - full_count).max(), full_count]).to(torch.int32)
        partial_count, full_count = counts.view(2, 1, 1, 1).repeat(1, self.rows, 1, 1)
        # a block's index in its row's table: the same in every table holding it (a cached prefix)
        index = torch.zeros(slots, dtype=torch.int32, device=device)
        index[table.flatten()] = columns.to(torch.int32).repeat(rows)
        starts = torch.zeros(self.rows, dtype=torch.int32, device=device)
        ends = torch.zeros_like(starts)
        starts[:rows], ends[:rows] = start, end

        def mask_mod(b, h, q, kv):
            position = index[kv // BLOCK_SIZE] * BLOCK_SIZE + kv % BLOCK_SIZE
            return (kv >= BLOCK_SIZE) & (starts[b] <= position) & (position < ends[b])

        parts = {
            "kv_num_blocks": partial_count,
            "kv_indices": partial,
            "full_kv_num_blocks": full_count,
            "full_kv_indices": full,
            "BLOCK_SIZE": (Q_BLOCK, BLOCK_SIZE),
            "mask_mod": mask_mod,
            "seq_lengths": (self.group, slots * BLOCK_SIZE),
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
        padded[:rows] = query.reshape(rows, self.kv_heads, self.group, dim)
        try:
            with torch.compiler.set_stance(stance):
                out = self._flex(padded, _as_sequence(keys), _as_sequence(values), block_mask=mask.plain, scale=scaling)
        except Exception as exc:
            raise PagedAttentionError(f"flex_attention on layer {layer}: {exc!r}") from exc
        return out[:rows].reshape(rows, heads, 1, dim).transpose(1, 2).contiguous()

    def _compile(self) -> None:
        """Compiles the function (at the first call) and checks it against a plain computation; then on."""
        started = time.monotonic()
        try:
            with torch.inference_mode():  # as the passes call it: the compiled code is guarded on it
                for scale in self.scales:
                    with self._lock:
                        worst = self._check(scale)
                    if not worst <= TOLERANCE.get(self.cache.dtype, 2e-2):
                        raise AssertionError(f"{worst:.3g} off a plain computation")
        except Exception as exc:
            self.turn_off(f"compiling flex_attention failed: {exc!r}")
            return
        self.state = "on"
        log.info("paged decode attention on: flex_attention compiled and checked in %.1f s", time.monotonic() - started)

    def _check(self, scale: float | None) -> float:
        """The largest difference of the compiled function from each row's own slots' plain attention, on scratch
        pools shaped as the cache's (the graph is specialised to their shape, not to the pools): up to CHECK_ROWS rows
        of random lengths, each holding the same number of blocks, without a window and with one."""
        generator = torch.Generator().manual_seed(0)
        pool = self.cache.keys[next(iter(self.cache.keys))]
        device, dtype = pool.device, pool.dtype
        blocks = min(self.cache.pool.total, 4 * CHECK_ROWS)
        rows = min(CHECK_ROWS, self.rows, blocks)
        held = blocks // rows
        with torch.inference_mode(pool.is_inference()):  # as the pool's (the compiled code is guarded on it)
            keys, values = torch.empty_like(pool), torch.empty_like(pool)  # pages untouched but for the blocks drawn
        for scratch in (keys, values):
            scratch[: blocks + 1] = torch.randn(blocks + 1, *pool.shape[1:], generator=generator).to(device, dtype)
        table = (torch.randperm(blocks, generator=generator)[: rows * held] + 1).view(rows, held)
        positions = torch.randint(0, held * BLOCK_SIZE, (rows,), generator=generator)
        query = torch.randn(rows, self.kv_heads * self.group, 1, self.dim, generator=generator).to(device, dtype)
        worst = 0.0
        for window in (None, int(torch.randint(1, 3 * BLOCK_SIZE, (), generator=generator))):
            mask = self._mask(table.to(device), positions.to(device), window)
            out = self._attend(query, keys, values, mask, scale, "(check)", stance="default")  # [rows, 1, heads, dim]
            for row in range(rows):
                end = int(positions[row]) + 1
                start = max(0, end - window) if window else 0
                slots = (table[row, :, None] * BLOCK_SIZE + torch.arange(BLOCK_SIZE)).flatten()[start:end].to(device)
                k, v = (t.flatten(0, 1)[slots].transpose(0, 1).float() for t in (keys, values))  # [kv_heads, n, dim]
                q = query[row, :, 0].float().view(self.kv_heads, self.group, self.dim)
                expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
                got = out[row, 0].float().view(self.kv_heads, self.group, self.dim)
                worst = max(worst, float((got - expected).abs().max()))
        return worst


def _as_sequence(pool: torch.Tensor) -> torch.Tensor:
    """[blocks + 1, BLOCK_SIZE, heads, dim] -> [1, heads, slots, dim] (a view)."""
    return pool.flatten(0, 1).transpose(0, 1).unsqueeze(0)


_probing = threading.local()  # while _scales_passed probes the model on this thread: the scales its layers pass


def _scales_passed(probe) -> set[float | None]:
    """The scales the model's layers pass to the attention function (some scale their queries themselves and pass
    1), seen in one token's pass (probe)."""
    _probing.scales = set()
    try:
        probe(_ShapeProbe())
        return _probing.scales
    finally:
        _probing.scales = None


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """The model's attention: a paged decode pass's (its mask a PagedMask), else transformers' SDPA."""
    if getattr(_probing, "scales", None) is not None:
        _probing.scales.add(scaling)
    if isinstance(attention_mask, PagedMask):
        if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None or dropout:
            raise PagedAttentionError("attention with a softcap, sinks or dropout is not paged")
        return attention_mask.paged.attend(module, query, attention_mask, scaling), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


AttentionInterface.register(NAME, attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)  # the masks the model builds itself (a pass without the cache)
