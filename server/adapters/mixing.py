"""Per-row adapter combinations on the model's Linear layers, and the wrapping of those layers in place.

For each forward pass the model runner publishes a `BatchPlan` (which adapters each batch row uses) in the
`MixingContext`. Every wrapped layer computes the base output once for the whole batch and applies each row's own
adapters, grouped by adapter rather than by row. In a decode pass, the low-rank deltas (LoRA, AdaLoRA, factorised
LoHa) of every row come from the layer's `RankPool`, a fixed-shape stack of every attached low-rank adapter's ranks
(attaching one is a copy into free ranks), in two matmuls and a selection by per-row tensors that the plan builds once
per batch composition for all the layers that share a `RankLayout`: nothing is planned per layer. LoKr adapters run in
two batched products over the rows, each row's factors selected (one `index_select` a factor) from the layer's stacks
of its LoKr factors. The other types, and every type in a prefill pass, run on the rows that use them. Which rows
those are is planned once per batch composition for all the layers with the same adapters (`_SharedPlan`); per layer
only what its own tensors give is filled in. Nothing walks the module tree per pass, and no adapter is "active"
outside the pass that asked for it.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import weakref
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from server.adapters.kinds import LayerAdapter
from server.adapters.kinds.base import LayerShape, PoolSpan
from server.adapters.kinds.lokr import LoKrLayer
from server.adapters.kinds.lora import LoraLayer, ParameterLora
from server.adapters.modules import MixedModule, ModuleAdapter
from server.engine.fatal import raise_if_device_fatal
from server.quantization import quantized

log = logging.getLogger(__name__)

_plan_ids = itertools.count()

# On CPU, adapter operations are small (a rank-sized matmul, a mask, a block rotation): on several threads each one
# costs more in waking and joining the other threads than in arithmetic, so they run on one thread, in decode and
# prefill, and so does the base layer's matmul when it is smaller than this many multiply-adds (tokens x in x out).
# Measured with bench/mixed_decode.py (README, "CPU threads").
SERIAL_BASE_MACS = 8_000_000


@contextmanager
def _threads(n: int) -> Iterator[int]:
    """torch's CPU operations on n threads inside; yields the count outside. Called on the model's thread only:
    torch.set_num_threads also sets the count that a thread starting torch work meanwhile keeps (loader threads set
    their own). Nothing under torch.compile, whose code runs on the threads it is called on (bench.compile_step)."""
    if torch.compiler.is_compiling():
        yield n
        return
    outside = torch.get_num_threads()
    if n == outside:
        yield outside
        return
    torch.set_num_threads(n)
    try:
        yield outside
    finally:
        torch.set_num_threads(outside)


class BatchPlan:
    """Rows of one forward pass (dim 0 of every layer's input), the adapter slots each uses (canonical order) and
    their weights, slot for slot (None: every weight is 1; a weight is never 0: that adapter is left out).

    Layers ask it for row selections by pattern; layers with the same adapters share one tensor per pattern.
    """

    def __init__(
        self,
        combos: tuple[tuple[int, ...], ...],
        device: torch.device,
        gather: bool = False,
        weights: tuple[tuple[float, ...], ...] | None = None,
    ):
        self.combos = combos
        self.slots = frozenset(slot for combo in combos for slot in combo)
        self.weights = weights if weights is not None else tuple((1.0,) * len(c) for c in combos)
        self.device = device
        self.gather = gather  # many tokens per row: compute each adapter on its own rows only
        self.id = next(_plan_ids)
        self._cache: dict = {}

    def mask(self, pattern: tuple[bool, ...]) -> torch.Tensor | None:
        """[rows, 1, 1]: True where pattern holds; None when it holds for every row."""
        if all(pattern):
            return None
        return self.cached(("mask", pattern), lambda: torch.tensor(pattern)[:, None, None])

    def indices(self, pattern: tuple[bool, ...]) -> torch.Tensor | None:
        """The rows where pattern holds; None when it holds for every row."""
        if all(pattern):
            return None
        return self.cached(("indices", pattern), lambda: torch.tensor([i for i, p in enumerate(pattern) if p]))

    def weighted(self, slots) -> list[tuple[tuple[int, float], ...]]:
        """Per row: (slot, weight) of its adapters that are among slots, in the row's order."""
        found: dict = {}
        for key in zip(self.combos, self.weights, strict=True):
            if key not in found:
                found[key] = tuple((s, w) for s, w in zip(*key, strict=True) if s in slots)
        return [found[key] for key in zip(self.combos, self.weights, strict=True)]

    def low_rank(self, layout: RankLayout) -> tuple[torch.Tensor, torch.Tensor, RankColumns | None] | None:
        """For the layers whose pools have this layout: (own [rows, computed] bool, True on the ranks of each row's
        own adapters; coefficients [rows, computed] float32, each row's scale times its weight there, 0 elsewhere;
        the ranks computed, RankColumns, or None for all of them); None when no row uses any of those adapters.
        Built once per layout for the whole pass."""
        key = ("rank layout", layout)
        if key not in self._cache:
            self._cache[key] = layout.row_tensors(self.combos, self.weights, self.device)
        return self._cache[key]

    def shared(self, signature: tuple, dtype: torch.dtype) -> _SharedPlan:
        """What every layer with these adapters (signature: (slot, _Traits) by slot) computing in dtype does for this
        pass, planned once for all of them."""
        key = ("shared", signature, dtype)
        if key not in self._cache:
            self._cache[key] = _SharedPlan.build(self, signature, dtype)
        return self._cache[key]

    def column(self, values: tuple[float, ...], dtype: torch.dtype) -> torch.Tensor:
        """[len(values), 1, 1]: one number per row."""
        return self.cached(("column", values, dtype), lambda: torch.tensor(values, dtype=dtype)[:, None, None])

    def cached(self, key, build):
        if key not in self._cache:
            self._cache[key] = build().to(self.device)
        return self._cache[key]


class RankLayout:
    """Where a rank pool holds each adapter: spans (slot, start, width, scale) among the `capacity` ranks computed.
    Interned by the MixingContext: the layers whose pools are laid out alike share one, and with it the per-row
    tensors of each pass."""

    def __init__(self, spans: tuple[tuple[int, int, int, float], ...], capacity: int):
        self.spans = {slot: (start, width, scale) for slot, start, width, scale in spans}
        self.capacity = capacity

    def row_tensors(self, combos, weights, device: torch.device):
        # filled in host buffers, each span a slice: a tensor's slice assignments cost an operation each
        n = self.capacity
        own, coefficients = bytearray(len(combos) * n), array("f", bytes(4 * len(combos) * n))
        used = set()
        for row, (slots, row_weights) in enumerate(zip(combos, weights, strict=True)):
            for slot, weight in zip(slots, row_weights, strict=True):
                if slot in self.spans:
                    start, width, scale = self.spans[slot]
                    at = row * n + start
                    own[at : at + width] = b"\x01" * width
                    coefficients[at : at + width] = array("f", [scale * weight]) * width  # rounded once to float32
                    used.add(slot)
        if not used:
            return None
        own_t = torch.frombuffer(own, dtype=torch.bool).view(len(combos), n)
        coefficients_t = torch.frombuffer(coefficients, dtype=torch.float32).view(len(combos), n)
        ranks = self.columns(used)
        if ranks is None:
            return own_t.to(device), coefficients_t.to(device), None
        chosen = list(ranks)
        return own_t[:, chosen].to(device), coefficients_t[:, chosen].to(device), RankColumns(ranks, device)

    def columns(self, used: set[int]) -> tuple[int, ...] | None:
        """The ranks a pass whose rows use these slots computes, in pool order (None: all `capacity`): those of the
        adapters it uses, not those of every resident adapter — or, when they fill most of the run of ranks they
        span, that run (RankPool._used then reads views, not a copy). At least MIN_CAPACITY of them (the other
        ranks are selected out; see MIN_CAPACITY)."""
        if len(used) == len(self.spans):
            return None
        ranks = sorted(k for slot in used for k in range(self.spans[slot][0], sum(self.spans[slot][:2])))
        start, end = ranks[0], ranks[-1] + 1
        if 2 * len(ranks) > end - start:
            start = max(0, min(start, self.capacity - MIN_CAPACITY))  # widened to MIN_CAPACITY where narrower
            return tuple(range(start, max(end, start + MIN_CAPACITY)))
        if len(ranks) < MIN_CAPACITY:  # padded with ranks of other adapters or free ones, which rows select out
            taken = set(ranks)
            ranks = sorted(ranks + [k for k in range(self.capacity) if k not in taken][: MIN_CAPACITY - len(ranks)])
        return tuple(ranks)


class RankColumns:
    """Ranks of the pools of a layout that a pass computes (RankLayout.columns): one run of them (read as views), or
    apart, with their index on the device (copied out by each pool once per pass plan: a pool keeps the copy for the
    RankColumns object it was made for, compared by identity)."""

    __slots__ = ("index", "ranks", "run")

    def __init__(self, ranks: tuple[int, ...], device: torch.device):
        self.ranks = ranks
        start, end = ranks[0], ranks[-1] + 1
        self.run = (start, end) if end - start == len(ranks) else None
        self.index = None if self.run else torch.tensor(ranks).to(device)


def _out_of_memory(exc: RuntimeError) -> bool:
    """Whether exc is an allocation that failed: torch.OutOfMemoryError on a device, a RuntimeError from the CPU's
    allocator. A device error after which nothing can be computed goes up."""
    raise_if_device_fatal(exc)
    return isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc)


# The smallest pool: MKL's products with fewer than 16 columns take another kernel, whose sums round otherwise, and
# a row's output must not depend on how many ranks the adapters loaded before it took.
MIN_CAPACITY = 16


class RankPool:
    """The low-rank adapters (delta(x) = B(A(x)) * scale) of one layer side by side, in fixed-shape tensors:
    A [capacity, in] and B^T [capacity, out], each adapter on a span of free ranks. Attaching copies an adapter
    into its span, which is then its only device copy (MixedLinear.attach: the adapter reads it through `factors`);
    detaching frees the span and moves the spans after it down onto it, in place (in chunks, or through one temporary
    copy where that saves many: a detach never fails for want of memory). What freed ranks held is never read again:
    rows select their own ranks, and a freed rank's B is zero. The capacity doubles
    when an adapter does not fit and halves when what is held falls to a quarter of it (down to MIN_CAPACITY; an
    empty pool frees its tensors): the only times the shapes change.

    The spans lie side by side in the order of the adapters' order keys, whatever order they were attached and
    detached in: a row's deltas are summed in the order of its ranks in the pool (the rest adds exact zeros), so that
    a combination's output does not depend on what was loaded before (tests/test_load_history.py) — bit for bit while
    a pass computes fewer than about 200 ranks: MKL splits a wider expand into blocks of ranks at fixed offsets, so
    where a span lies can then round its sum otherwise (seen: 2.4e-7, within the 1e-5 of the contract). An adapter
    that does not fit between its neighbours moves the others (a copy of the pool, as when it grows or shrinks).

    Semantics, for rows x: y += Σ over the row's adapters a of B_a(A_a(x)) * (scale_a * weight_a), computed as
    (where(own, x A^T, 0) * coefficients) B^T over the ranks of the adapters the pass's rows use (RankLayout.columns;
    resident adapters no row uses cost nothing): ranks of other rows' adapters are selected out, never multiplied by
    zero (inf x 0 is NaN); the coefficients stay float32 until the product is rounded once."""

    def __init__(self, layer: nn.Module, context: MixingContext):
        # in the layer's dtype (MixedLinear.dtype; a plain Linear's weight's)
        weight = torch.zeros(0, dtype=getattr(layer, "dtype", None) or layer.weight.dtype, device=layer.weight.device)
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.context = context
        # A row-major, so that an adapter's span is the [r, in] matrix it was: its prefill takes the same kernel
        self.a = weight.new_zeros(0, self.in_features)
        self.b_t = weight.new_zeros(0, self.out_features)
        self.zero = weight.new_zeros(())
        self.spans: dict[int, tuple[int, int, float]] = {}  # slot -> (start, width, scale)
        self.orders: dict[int, tuple] = {}  # slot -> its order key
        self.layout: RankLayout | None = None
        self._views: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}  # factors' answers until a change
        self._subset: tuple = (None, None)  # _used's (RankColumns, (A^T, B^T)), until a change

    @torch.inference_mode()  # the pool's tensors are the model's: inference tensors, whichever thread attaches
    def add(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float, order: tuple) -> None:
        """a [r, in], b [out, r]: copied into r free ranks, placed after the adapters whose order keys are smaller
        and before the others (see MixedModel.attach)."""
        width = a.shape[0]
        self.orders[slot] = order
        before = [span for s, span in self.spans.items() if self.orders[s] < order]
        after = [span for s, span in self.spans.items() if self.orders[s] > order]
        start = max((begin + w for begin, w, _ in before), default=0)
        if min((begin for begin, _, _ in after), default=self.capacity) - start < width:
            needed = self.held + width
            start = self._repack(
                self.capacity if needed <= self.capacity else max(2 * self.capacity, needed, MIN_CAPACITY), order, width
            )
        self.a[start : start + width].copy_(a)
        self.b_t[start : start + width].copy_(b.T)
        self.spans[slot] = (start, width, scale)
        self._relayout()

    @torch.inference_mode()
    def remove(self, slot: int) -> None:
        span = self.spans.pop(slot, None)
        self.orders.pop(slot, None)
        if span is None:
            return
        start, width, _ = span
        if not self.spans:  # nothing left: the memory goes back
            self.a, self.b_t = self.a.new_zeros(0, self.in_features), self.b_t.new_zeros(0, self.out_features)
            self._relayout()
            return
        self.b_t[start : start + width].zero_()  # a freed rank's B is zero: rows select it out, and 0 x 0 is 0
        try:
            # packed again: a gap would widen the run of ranks a pass computes, and change which ranks it computes
            # with the load history (tests/test_load_history.py)
            halves = self.capacity > MIN_CAPACITY and self.held <= self.capacity // 4
            if not (halves and self._repacked(max(MIN_CAPACITY, self.capacity // 2))):
                self._pack()
        finally:
            self._relayout()

    def factors(self, slot: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A [width, in], B [out, width], scale) of the adapter in slot: views of its span (valid until the pool
        next changes; the same objects until then)."""
        if slot not in self._views:
            start, width, scale = self.spans[slot]
            self._views[slot] = (self.a[start : start + width], self.b_t[start : start + width].T, scale)
        return self._views[slot]

    @property
    def capacity(self) -> int:
        return self.a.shape[0]

    @property
    def held(self) -> int:
        """Ranks that adapters occupy."""
        return sum(width for _, width, _ in list(self.spans.values()))  # a copy: metrics read it from their thread

    @property
    def nbytes(self) -> int:
        """Device memory of the pool's tensors, free ranks included."""
        return (self.a.numel() + self.b_t.numel()) * self.a.element_size()

    @property
    def held_nbytes(self) -> int:
        """Device memory of the ranks that adapters occupy: what the registry counts for them."""
        return self.held * (self.in_features + self.out_features) * self.a.element_size()

    def add_to(self, y: torch.Tensor, x: torch.Tensor, own: torch.Tensor, coefficients: torch.Tensor, columns) -> None:
        """y [rows, tokens, out] += each row's own low-rank deltas of x [rows, tokens, in] (BatchPlan.low_rank's
        own, coefficients [rows, ranks computed] and the ranks computed)."""
        if x.shape[1] != 1:  # one row of own and coefficients per token
            own, coefficients = own.repeat_interleave(x.shape[1], 0), coefficients.repeat_interleave(x.shape[1], 0)
        a_t, b = self._used(columns)
        ranks = torch.where(own, torch.mm(x.reshape(-1, self.in_features), a_t), self.zero)
        if ranks.dtype == coefficients.dtype:
            ranks.mul_(coefficients)
        else:  # the product in float32, rounded once
            ranks = (ranks * coefficients).to(ranks.dtype)
        y.view(-1, self.out_features).addmm_(ranks, b)

    def _used(self, columns: RankColumns | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(A^T [in, ranks], B^T [ranks, out]) of the ranks computed: views of the pool when they lie side by side
        (all of them, or one run), else a copy of those ranks, made once per batch composition (the last one kept,
        until the pool next changes)."""
        if columns is None:
            return self._a_used_t, self._b_used
        if self._subset[0] is not columns:
            if columns.run is not None:
                start, end = columns.run
                found = self.a[start:end].T, self.b_t[start:end]
            else:
                found = self.a.index_select(0, columns.index).T, self.b_t.index_select(0, columns.index)
            self._subset = (columns, found)
        return self._subset[1]

    def _pack(self) -> None:
        """The spans moved down side by side from rank 0, in order, in place (the B they leave zeroed); each run of
        them that moves alike is moved at once, lowest first, so that no run is written before it is read."""
        cursor, end, runs, packed = 0, max(begin + w for begin, w, _ in self.spans.values()), [], {}
        for slot, (begin, w, scale) in sorted(self.spans.items(), key=lambda item: item[1][0]):
            if begin != cursor:
                run = runs[-1] if runs else None  # (from, to, ranks)
                if run and run[0] + run[2] == begin and run[0] - run[1] == begin - cursor:  # goes on, moved alike
                    runs[-1] = (run[0], run[1], run[2] + w)
                else:
                    runs.append((begin, cursor, w))
                packed[slot] = (cursor, w, scale)
            cursor += w
        for begin, to, n in runs:
            self._moved_down(begin, to, n)
        self.spans.update(packed)  # once the data is there
        self.b_t[cursor:end].zero_()

    def _moved_down(self, begin: int, to: int, n: int) -> None:
        """Ranks [begin, begin + n) of A and B^T copied down to [to, to + n): through one temporary copy where that
        saves many chunks and there is memory for it, else in chunks no longer than the distance moved, lowest first
        (no chunk overlaps where it goes: nothing allocated, so a detach never fails for want of memory)."""
        distance = begin - to
        if n > 8 * distance:
            try:
                moved = [t[begin : begin + n].clone() for t in (self.a, self.b_t)]
            except RuntimeError as exc:
                if not _out_of_memory(exc):
                    log.exception("rank pool %d x %d: a temporary copy failed; moved in chunks", *self._shape)
            else:
                for t, run in zip((self.a, self.b_t), moved, strict=True):
                    t[to : to + n].copy_(run)
                return
        for t in (self.a, self.b_t):
            for at in range(0, n, distance):
                size = min(distance, n - at)
                t[to + at : to + at + size].copy_(t[begin + at : begin + at + size])

    def _repacked(self, capacity: int) -> bool:
        """The spans packed side by side into `capacity` ranks (a copy); False, and the pool as it was, when there is
        no memory for the copy: a detach (an eviction, which runs when memory is short) never fails for want of it."""
        try:
            self._repack(capacity)
        except RuntimeError as exc:
            level = logging.WARNING if _out_of_memory(exc) else logging.ERROR
            log.log(level, "rank pool %d x %d: not halved (%s); packed in place", *self._shape, exc, exc_info=exc)
            return False
        return True

    @property
    def _shape(self) -> tuple[int, int]:
        return self.in_features, self.out_features

    def _repack(self, capacity: int, order: tuple | None = None, width: int = 0) -> int:
        """The spans moved side by side in order into new tensors of `capacity` ranks, with `width` free ranks where
        `order` goes; returns where those start."""
        a, b_t = self.a.new_zeros(capacity, self.in_features), self.b_t.new_zeros(capacity, self.out_features)
        start, free, spans = 0, None, {}
        for slot in sorted(self.spans, key=self.orders.__getitem__):
            if free is None and order is not None and self.orders[slot] > order:
                free, start = start, start + width
            begin, w, scale = self.spans[slot]
            a[start : start + w].copy_(self.a[begin : begin + w])
            b_t[start : start + w].copy_(self.b_t[begin : begin + w])
            spans[slot] = (start, w, scale)
            start += w
        self.a, self.b_t, self.spans = a, b_t, spans  # the pool as it was until here, whatever failed before
        return start if free is None else free

    def _relayout(self) -> None:
        spans = tuple(sorted((slot, *span) for slot, span in self.spans.items()))
        # the ranks up to the last span's end are the ones computed (not the free ones after it)
        used = min(self.capacity, max([MIN_CAPACITY] + [start + width for _, start, width, _ in spans]))
        self.layout = self.context.layout(spans, used) if spans else None
        self._a_used_t, self._b_used = self.a[:used].T, self.b_t[:used]  # views made once: no operation per pass
        self._views.clear()
        self._subset = (None, None)


class MixingContext:
    """The plan of the forward pass in progress; set only by the thread that runs the model. Also where rank pools
    find the layout they share with other pools laid out alike."""

    def __init__(self) -> None:
        self.plan: BatchPlan | None = None
        self._layouts: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    def layout(self, spans: tuple, capacity: int) -> RankLayout:
        key = (spans, capacity)
        layout = self._layouts.get(key)
        if layout is None:
            layout = self._layouts[key] = RankLayout(spans, capacity)
        return layout

    @contextmanager
    def use(self, plan: BatchPlan | None) -> Iterator[None]:
        self.plan = plan if plan is not None and any(plan.combos) else None
        try:
            yield
        finally:
            self.plan = None


@dataclass
class _LayerPlan:
    """What one layer does for one BatchPlan. Row selections are None where every row takes part.

    Rows are a bool mask [B, 1, 1] or row indices (int64). In a decode pass a small op costs more in overhead than
    in arithmetic: deltas and rotations run on the whole batch and are kept on their rows by selecting with the
    mask (never by multiplying with 0/1: inf × 0 is NaN, and a row's output must not depend on its neighbours), and
    the low-rank adapters are the RankPool's, not the plan's. In a prefill pass (BatchPlan.gather) arithmetic
    dominates: each adapter runs on its own rows only. SHiRA always runs on its rows only.
    """

    rotations: list[tuple[torch.Tensor | None, list[tuple[LayerAdapter, object]]]]  # (rows, (adapter, rotation))
    sparse: list[tuple[torch.Tensor | None, list[tuple[LayerAdapter, float]]]]  # (row indices, (adapter, weight))
    # (rows, adapter, weight): one number for all its rows, or one per row of the selection ([n, 1, 1])
    other: list[tuple[torch.Tensor | None, LayerAdapter, float | torch.Tensor]]
    zero: torch.Tensor  # what torch.where puts outside the rows (a Python 0 would build a tensor per call)
    # DoRA (LoRA adapters that rescale the output so far, LayerAdapter): (row indices, scale [out], shift [out] or
    # None), float32, for rows whose first LoRA adapter here is their only DoRA one: the output so far becomes
    # y * scale - shift; and (row indices, (adapter, weight)) for the others, with all their LoRA adapters in order
    affine: list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]] = dataclasses.field(
        default_factory=list
    )
    rescales: list[tuple[torch.Tensor | None, list[tuple[LayerAdapter, float]]]] = dataclasses.field(
        default_factory=list
    )
    biases: list[tuple[torch.Tensor | None, torch.Tensor]] = dataclasses.field(default_factory=list)  # (rows, [out])
    # LoKr in a decode pass: (rows mask, w1 [rows, a, c], w2_t [rows, d, b]), see _SharedPlan.kron
    kron: list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (
            self.rotations or self.sparse or self.other or self.affine or self.rescales or self.biases or self.kron
        )


class MixedLinear(nn.Module):
    """A Linear layer of the base model plus the loaded adapters that target it (referenced, never copied).

    Semantics: see LayerAdapter; rows whose adapters do not touch this layer get the base output.
    """

    PLANS_KEPT = 4  # a prefill plan and a decode plan alternate; keep a few

    def __init__(self, base: nn.Linear, context: MixingContext, dtype: torch.dtype | None = None):
        super().__init__()
        self.base = base
        self.context = context
        self.dtype = dtype or base.weight.dtype  # what it computes in: a quantized base's weight is stored otherwise
        self.adapters: dict[int, LayerAdapter] = {}
        self.pool = RankPool(self, context)  # the low-rank adapters among them, for decode passes
        self._plans: OrderedDict[int, _LayerPlan] = OrderedDict()  # by BatchPlan.id
        # slots of the adapters the pool does not do all of (not low-rank; DoRA, trained biases): a decode pass plans
        # this layer only when a row uses one
        self._unpooled: set[int] = set()
        self._signature: tuple | None = None  # (slot, _Traits) of its adapters, by slot
        self._kron: dict | None = None  # _kron_stacks

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features if isinstance(self.base, nn.Linear) else self.base.nx  # GPT-2's Conv1D

    @property
    def out_features(self) -> int:
        return self.base.out_features if isinstance(self.base, nn.Linear) else self.base.nf

    def attach(self, slot: int, adapter: LayerAdapter, order: tuple = ()) -> None:
        # A new slot is in no plan built so far: the running batch keeps its plans (no stall at the next step).
        self.adapters[slot] = adapter
        self._signature = self._kron = None
        if adapter.low_rank is None or adapter.rescales_output or adapter.bias_delta is not None:
            self._unpooled.add(slot)
        if adapter.low_rank is not None:
            self.pool.add(slot, *adapter.low_rank, (order, slot))
            adapter.low_rank = PoolSpan(self.pool, slot)  # its own copy is dropped: the pool's is the only one

    def detach(self, slot: int, keep: bool = True) -> None:
        """keep: the adapter gets its own copy of what the pool held for it (else it is dropped: nothing reads it)."""
        adapter = self.adapters.pop(slot)
        self._signature = self._kron = None
        self._unpooled.discard(slot)
        if keep and isinstance(adapter.low_rank, PoolSpan):  # taken before the span is freed
            a, b, scale = adapter.low_rank
            fresh = torch.contiguous_format
            adapter.low_rank = (a.clone(memory_format=fresh), b.clone(memory_format=fresh), scale)
        self.pool.remove(slot)
        self._plans.clear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.context.plan
        if plan is None:
            return self.base(x)
        pooled = not plan.gather and self.pool.layout is not None
        low_rank = plan.low_rank(self.pool.layout) if pooled else None
        layer = self._layer_plan(plan) if not pooled or not self._unpooled.isdisjoint(plan.slots) else None
        if low_rank is None and (layer is None or layer.empty):
            return self.base(x)
        if x.dim() == 3:  # [rows, tokens, in]
            return self._mixed(x, layer, low_rank)
        # Layers that see the batch flattened, [rows * tokens, in] (shared experts, OPT's MLP): row by row again
        rows = len(plan.combos)
        if x.dim() != 2 or x.shape[0] % rows:
            raise RuntimeError(f"an adapter layer got input {tuple(x.shape)}, which is not {rows} rows of tokens")
        return self._mixed(x.view(rows, -1, x.shape[-1]), layer, low_rank).flatten(0, 1)

    def _mixed(self, x: torch.Tensor, layer: _LayerPlan | None, low_rank) -> torch.Tensor:
        if x.device.type != "cpu":
            return self._with_adapters(x, layer, low_rank, self._base_output)
        with _threads(1) as threads:
            if x.shape[0] * x.shape[1] * self.in_features * self.out_features < SERIAL_BASE_MACS:
                return self._with_adapters(x, layer, low_rank, self._base_output)

            def base_output(x_in: torch.Tensor, sparse) -> torch.Tensor:
                with _threads(threads):
                    return self._base_output(x_in, sparse)

            return self._with_adapters(x, layer, low_rank, base_output)

    def _with_adapters(self, x: torch.Tensor, layer: _LayerPlan | None, low_rank, base_output) -> torch.Tensor:
        """layer: what the plan does here (None: nothing); low_rank: the pool's per-row tensors (None: not used)."""
        x_in = x  # what the base weight sees: rotated on rows with OFT adapters
        for rows, rotations in layer.rotations if layer is not None else ():
            rotated = x if rows is None or rows.dtype == torch.bool else x.index_select(0, rows)
            for adapter, rotation in rotations:
                rotated = adapter.rotate(rotated, rotation)
            if rows is None:
                x_in = rotated
            elif rows.dtype == torch.bool:
                x_in = torch.where(rows, rotated, x_in)
            else:
                x_in = x.clone() if x_in is x else x_in
                x_in.index_copy_(0, rows, rotated)

        y = base_output(x_in, layer.sparse if layer is not None else ())
        # computed from the output so far, before any delta is added to it
        rescaled = [(rows, self._rescaled(y, x, rows, steps)) for rows, steps in layer.rescales] if layer else []
        for rows, scale, shift in layer.affine if layer is not None else ():
            own = y if rows is None else y.index_select(0, rows)
            own.mul_(scale)
            if shift is not None:
                own.sub_(shift)
            if rows is not None:
                y.index_copy_(0, rows, own)
        if low_rank is not None:
            self.pool.add_to(y, x, *low_rank)
        for rows, w1, w2_t in layer.kron if layer is not None else ():
            # the rows outside the pass add W1 (0 W2^T) = 0 exactly: their input is selected out, not multiplied by 0
            LoKrLayer.add_per_row(y, x if rows is None else torch.where(rows, x, layer.zero), w1, w2_t)
        for rows, adapter, weight in layer.other if layer is not None else ():
            per_row = isinstance(weight, torch.Tensor)
            if rows is None or rows.dtype == torch.long:
                own_x = x if rows is None else x.index_select(0, rows)
                if adapter.low_rank is not None:  # the scale applied while adding: one operation fewer
                    a, b, scale = adapter.low_rank
                    delta = F.linear(F.linear(own_x, a), b)
                else:
                    delta, scale = adapter.delta(own_x), 1
                if per_row:
                    delta.mul_(weight)
                else:
                    scale = scale * weight
                if rows is None:
                    y.add_(delta, alpha=scale)
                else:
                    y.index_add_(0, rows, delta, alpha=scale)
            else:
                delta = torch.where(rows, adapter.delta(x), layer.zero)  # selected first: inf x 0 never meets
                y += delta.mul_(weight) if per_row or weight != 1 else delta
        for rows, term in rescaled:
            if rows is None:
                y.add_(term)
            else:
                y.index_add_(0, rows, term.to(y.dtype))
        for rows, bias in layer.biases if layer is not None else ():
            if rows is None:
                y.add_(bias)
            else:
                y.index_add_(0, rows, bias.expand(len(rows), *y.shape[1:]))
        return y

    def _rescaled(self, y: torch.Tensor, x: torch.Tensor, rows, steps) -> torch.Tensor:
        """What the rescaling LoRA adapters (DoRA) among steps, the rows' LoRA adapters here in order, add to those
        rows of y (the output before any delta): each rescales u, the output without the base bias so far."""
        own_y, own_x = (y, x) if rows is None else (y.index_select(0, rows), x.index_select(0, rows))
        u = own_y if self.base.bias is None else own_y - self.base.bias
        last = max(i for i, (adapter, _) in enumerate(steps) if adapter.rescales_output)
        total = None
        for i, (adapter, weight) in enumerate(steps[: last + 1]):
            term = None
            if adapter.rescales_output:
                term = u * (adapter.ratio_minus_one * weight)
                total = term if total is None else total + term
            if i < last:  # u for the next one: this adapter's whole effect added
                u = u + adapter.delta(own_x) * weight
                u = u if term is None else u + term
        return total

    def _base_output(self, x_in: torch.Tensor, sparse: list) -> torch.Tensor:
        """F.linear(x', W', b) per row, W' = W plus the row's SHiRA deltas: built densely as peft does on a float
        base; on a quantized one (whose weight is never read), the base layer's own forward plus x' S^T."""
        if quantized(self.base):
            return self._base_output_quantized(x_in, sparse)
        y = None
        for rows, adapters in sparse:
            weight = self.base.weight.clone()
            for adapter, w in adapters:
                adapter.add_to(weight, w)
            if rows is None:
                return F.linear(x_in, weight, self.base.bias)
            y = self.base(x_in) if y is None else y
            y.index_copy_(0, rows, F.linear(x_in.index_select(0, rows), weight, self.base.bias))
        return self.base(x_in) if y is None else y

    def _base_output_quantized(self, x_in: torch.Tensor, sparse: list) -> torch.Tensor:
        y = self.base(x_in)
        for rows, adapters in sparse:
            own = x_in if rows is None else x_in.index_select(0, rows)
            delta = None
            for adapter, w in adapters:
                part = adapter.delta(own)
                delta = (part.mul_(w) if w != 1 else part) if delta is None else delta.add_(part, alpha=w)
            if rows is None:
                y += delta
            else:
                y.index_add_(0, rows, delta)
        return y

    def _layer_plan(self, plan: BatchPlan) -> _LayerPlan:
        layer = self._plans.get(plan.id)
        if layer is None:
            layer = self._plans[plan.id] = self._build_layer_plan(plan)
            while len(self._plans) > self.PLANS_KEPT:
                self._plans.popitem(last=False)
        return layer

    def _build_layer_plan(self, plan: BatchPlan) -> _LayerPlan:
        """The plan's row groups for this layer's adapters (shared with every layer that has the same slots and
        traits: planned once per batch composition for all of them), filled in with this layer's adapters."""
        if self._signature is None:
            spans = self.pool.spans
            self._signature = tuple(sorted((s, _Traits.of(a, s in spans)) for s, a in self.adapters.items()))
        shared = plan.shared(self._signature, self.dtype)
        adapter = self.adapters.__getitem__

        def filled(groups: list) -> list:
            return [(rows, [(adapter(s), w) for s, w in steps]) for rows, steps in groups]

        bias = self.base.bias
        affine = []
        for rows, slot, weight in shared.affine:
            change = adapter(slot).ratio_minus_one * weight  # float32: y * (1 + c) - c * b
            affine.append((rows, 1 + change, None if bias is None else change * bias.float()))
        biases = []
        for rows, steps in shared.biases:
            terms = [adapter(s).bias_delta * w for s, w in steps]
            biases.append((rows, sum(terms[1:], terms[0])))
        kron = []
        if shared.kron:
            stacks = self._kron_stacks()
            for rows, shape, index, weights in shared.kron:
                w1, w2_t = (stack.index_select(0, index) for stack in stacks[shape])
                kron.append((rows, w1 if weights is None else (w1.float() * weights).to(w1.dtype), w2_t))
        return _LayerPlan(
            rotations=[(rows, [_rotation(adapter(s), w) for s, w in steps]) for rows, steps in shared.rotations],
            sparse=filled(shared.sparse),
            other=[(rows, adapter(s), w) for rows, s, w in shared.other],
            zero=plan.cached(("zero", self.dtype), lambda: torch.zeros((), dtype=self.dtype)),
            affine=affine,
            rescales=filled(shared.rescales),
            biases=biases,
            kron=kron,
        )

    def _kron_stacks(self) -> dict[tuple, tuple[torch.Tensor, torch.Tensor]]:
        """Per LoKr factor shapes: (W1 [1 + n, a, c], W2^T [1 + n, d, b]) of this layer's n LoKr adapters of those
        shapes, by slot, after a zero entry (see _SharedPlan.kron); stacked once per attach or detach."""
        if self._kron is None:
            by_shape: dict[tuple, list] = {}
            for slot, traits in self._signature:
                if traits.kron is not None:
                    by_shape.setdefault(traits.kron, []).append(self.adapters[slot])
            self._kron = {}
            for shape, adapters in by_shape.items():
                w1 = [adapters[0].w1.new_zeros(shape[0])] + [a.w1 for a in adapters]
                w2_t = [adapters[0].w2_t.new_zeros(shape[1])] + [a.w2_t for a in adapters]
                self._kron[shape] = (torch.stack(w1), torch.stack(w2_t))
        return self._kron


class _Traits(NamedTuple):
    """What the planning of a layer reads of one adapter on it (none of its tensors)."""

    rotates: bool
    rotates_per_row: bool
    sparse: bool  # adds to the weight (SHiRA)
    lora: bool
    rescales: bool  # DoRA
    bias: bool  # carries a trained bias
    additive: bool  # adds a delta computed from the input
    pooled: bool  # held by the layer's rank pool
    kron: tuple | None  # a LoKr adapter's factor shapes (W1's, W2^T's)

    @classmethod
    def of(cls, adapter: LayerAdapter, pooled: bool) -> _Traits:
        return cls(
            adapter.rotates_input,
            adapter.rotates_per_row,
            adapter.adds_to_weight,
            isinstance(adapter, LoraLayer),
            adapter.rescales_output,
            adapter.bias_delta is not None,
            not adapter.rotates_input and not adapter.adds_to_weight and adapter.adds_delta,
            pooled,
            (tuple(adapter.w1.shape), tuple(adapter.w2_t.shape)) if isinstance(adapter, LoKrLayer) else None,
        )


@dataclass
class _SharedPlan:
    """What every layer with the same adapter slots and traits does for one BatchPlan: _LayerPlan's fields with
    slots in place of adapters, and nothing built from an adapter's tensors (MixedLinear._build_layer_plan fills
    those in per layer)."""

    rotations: list
    sparse: list
    other: list
    affine: list  # (rows, slot, weight)
    rescales: list
    biases: list  # (row indices, (slot, weight))
    # LoKr in a decode pass, one pass per depth (each row's first LoKr adapter on the layer, its second, ...) and
    # factor shapes: (rows mask, shapes, index [rows] into the layer's stacks of those shapes (0: the zero entry,
    # for the rows outside the pass), weights [rows, 1, 1] float32 or None when all are 1)
    kron: list

    @classmethod
    def build(cls, plan: BatchPlan, signature: tuple, dtype: torch.dtype) -> _SharedPlan:
        traits = dict(signature)
        rows = plan.weighted(traits)  # per row: (slot, weight) of its adapters on these layers

        def groups(kind, select) -> list:
            """Rows grouped by the sequence of their adapters of one kind and their weights (order matters), where
            rows at weights other than 1 of an adapter that rotates each row by its own weight share a group (their
            weights a tuple, in row order). A group with weights other than 1 runs on its own rows only."""
            chosen = [tuple((s, w) for s, w in pairs if kind(traits[s])) for pairs in rows]
            keys = [tuple((s, None if w != 1 and traits[s].rotates_per_row else w) for s, w in c) for c in chosen]
            found = []
            for key in dict.fromkeys(k for k in keys if k):
                pattern = tuple(k == key for k in keys)
                members = [c for c, p in zip(chosen, pattern, strict=True) if p]
                steps = [(s, tuple(m[i][1] for m in members) if w is None else w) for i, (s, w) in enumerate(key)]
                found.append(((select if all(w == 1 for _, w in key) else plan.indices)(pattern), steps))
            return found

        def select(pattern: tuple[bool, ...]) -> torch.Tensor | None:
            return plan.indices(pattern) if plan.gather else plan.mask(pattern)

        def other(slot: int) -> tuple:
            """(rows, slot, weight): the weight as one number when all its rows share it, else per row."""
            weights = [dict(pairs).get(slot) for pairs in rows]
            pattern = tuple(w is not None for w in weights)
            if len({w for w in weights if w is not None}) == 1:
                return select(pattern), slot, next(w for w in weights if w is not None)
            if plan.gather:  # one per selected row
                column = plan.column(tuple(w for w in weights if w is not None), dtype)
            else:  # one per row of the batch (the others are not selected)
                column = plan.column(tuple(1.0 if w is None else w for w in weights), dtype)
            return select(pattern), slot, column

        used = list(dict.fromkeys(s for pairs in rows for s, _ in pairs))  # first-use order
        affine, rescales = [], []
        if any(t.rescales for t in traits.values()):
            for r, steps in groups(lambda t: t.lora, plan.indices):
                if not any(traits[s].rescales for s, _ in steps[1:]) and traits[steps[0][0]].rescales:
                    affine.append((r, *steps[0]))
                elif any(traits[s].rescales for s, _ in steps):
                    rescales.append((r, steps))
        return cls(
            rotations=groups(lambda t: t.rotates, plan.indices if plan.gather else plan.mask),
            sparse=groups(lambda t: t.sparse, plan.indices),
            # a decode pass takes the low-rank adapters from the pool, and runs LoKr adapters per row
            other=[
                other(s)
                for s in used
                if traits[s].additive and (plan.gather or not (traits[s].pooled or traits[s].kron))
            ],
            affine=affine,
            rescales=rescales,
            biases=groups(lambda t: t.bias, plan.indices),
            kron=[] if plan.gather else _kron_passes(plan, rows, signature),
        )


def _kron_passes(plan: BatchPlan, rows: list, signature: tuple) -> list:
    """_SharedPlan.kron (rows: BatchPlan.weighted's). A layer's stacks hold its LoKr adapters of some shapes in the
    order of their slots, after the zero entry (MixedLinear._kron_stacks)."""
    traits = dict(signature)
    index = {}
    for slot, t in signature:
        if t.kron is not None:
            index[slot] = 1 + sum(1 for s in index if traits[s].kron == t.kron)
    chosen = [[(s, w) for s, w in pairs if traits[s].kron is not None] for pairs in rows]
    passes = []
    for depth in range(max(map(len, chosen))):
        at = [c[depth] if depth < len(c) else None for c in chosen]
        for shape in dict.fromkeys(traits[p[0]].kron for p in at if p is not None):
            own = [p if p is not None and traits[p[0]].kron == shape else None for p in at]
            positions = tuple(0 if p is None else index[p[0]] for p in own)
            weights = tuple(1.0 if p is None else p[1] for p in own)
            passes.append(
                (
                    plan.mask(tuple(p is not None for p in own)),
                    shape,
                    plan.cached(("positions", positions), lambda p=positions: torch.tensor(p)),
                    None if all(w == 1 for w in weights) else plan.column(weights, torch.float32),
                )
            )
    return passes


def _rotation(adapter: LayerAdapter, weight: float | tuple[float, ...]) -> tuple[LayerAdapter, object]:
    """(adapter, what it rotates by): at one weight, or at each row's own (a tuple)."""
    if isinstance(weight, tuple):
        return adapter, adapter.rotation_per_row(weight)
    return adapter, adapter.rotation(weight)


class MixedParameters(nn.Module):
    """A module whose parameters adapters patch (LoRA's target_parameters, e.g. MoE expert stacks and routers):
    each group of rows with the same adapters runs the module once, with its parameters patched for that group.

    Its inputs and outputs are the batch's tokens, [rows, ...] or flattened [rows * tokens, ...].
    """

    def __init__(self, base: nn.Module, context: MixingContext):
        super().__init__()
        self.base = base
        self.context = context
        self.adapters: dict[int, ParameterLora] = {}
        self._groups: OrderedDict[int, list] = OrderedDict()  # by BatchPlan.id: [(row indices or None, adapters)]

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # what the model reads of the module it called (num_experts, top_k, ...)
            base = self._modules.get("base")
            if base is None:
                raise
            return getattr(base, name)

    def attach(self, slot: int, adapter: ParameterLora, order: tuple = ()) -> None:
        self.adapters[slot] = adapter  # in no plan built so far, as in MixedLinear.attach

    def detach(self, slot: int, keep: bool = True) -> None:
        del self.adapters[slot]
        self._groups.clear()

    def forward(self, *args, **kwargs):
        plan = self.context.plan
        if plan is None:
            return self.base(*args, **kwargs)
        groups = self._groups.get(plan.id)
        if groups is None:
            groups = self._groups[plan.id] = self._build_groups(plan)
            while len(self._groups) > MixedLinear.PLANS_KEPT:
                self._groups.popitem(last=False)
        if len(groups) == 1:
            return self._run(groups[0][1], args, kwargs)
        rows = len(plan.combos)
        parts = [(rows_, self._run(adapters, *_select((args, kwargs), rows_, rows))) for rows_, adapters in groups]
        return _gather(parts, rows)

    def _build_groups(self, plan: BatchPlan) -> list:
        """Rows grouped by their adapters here and those adapters' weights."""
        chosen = plan.weighted(self.adapters)
        return [
            (plan.indices(tuple(c == sequence for c in chosen)), [(self.adapters[s], w) for s, w in sequence])
            for sequence in dict.fromkeys(chosen)
        ]

    def _run(self, adapters: list[tuple[ParameterLora, float]], args, kwargs):
        if not adapters:
            return self.base(*args, **kwargs)
        names = {name for adapter, _ in adapters for name, *_ in adapter.deltas}
        patched = {name: ParameterLora.patched(getattr(self.base, name), name, adapters) for name in names}
        return torch.func.functional_call(self.base, patched, args, kwargs)


def _select(tree, indices: torch.Tensor, rows: int):
    """The tensors of tree (nested tuples and dicts) restricted to the rows at indices."""
    if isinstance(tree, torch.Tensor):
        return tree.unflatten(0, (rows, -1)).index_select(0, indices).flatten(0, 1)
    if isinstance(tree, (tuple, list)):
        return type(tree)(_select(t, indices, rows) for t in tree)
    if isinstance(tree, dict):
        return {k: _select(v, indices, rows) for k, v in tree.items()}
    return tree


def _gather(parts: list, rows: int):
    """One output for the whole batch from each group's output (tensors, or tuples of them)."""
    first = parts[0][1]
    if isinstance(first, tuple):
        return tuple(_gather([(i, out[k]) for i, out in parts], rows) for k in range(len(first)))
    if not isinstance(first, torch.Tensor):
        return first
    per_row = first.shape[0] // len(parts[0][0])
    out = first.new_empty((rows * per_row, *first.shape[1:])).unflatten(0, (rows, per_row))
    for indices, part in parts:
        out.index_copy_(0, indices, part.unflatten(0, (len(indices), per_row)))
    return out.flatten(0, 1)


class BaseLayout:
    """The base model's modules as they were before any adapter was attached.

    `linears` are the layers adapters can target: Linear, and GPT-2-style Conv1D (its weight transposed).
    """

    def __init__(self, model: nn.Module):
        self.model_type = getattr(model.config, "model_type", None)
        self.dtype = model.dtype  # what the layers compute in (a quantized Linear stores its weight otherwise)
        self.modules = dict(model.named_modules())
        self.linears = {name: m for name, m in self.modules.items() if isinstance(m, (nn.Linear, Conv1D))}
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.output_embedding = next((n for n, m in self.modules.items() if m is output), None)
        self.embeddings = {name: m for name, m in self.modules.items() if isinstance(m, nn.Embedding)}
        embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        self.input_embedding = next((n for n, m in self.modules.items() if m is embedding), None)
        self.tied = output is not None and embedding is not None and output.weight is embedding.weight

    def shape(self, module_name: str) -> LayerShape:
        layer = self.linears[module_name]  # a quantized Linear's weight is stored packed: its features say
        if isinstance(layer, nn.Linear):
            in_f, out_f = layer.in_features, layer.out_features
            weight = None if quantized(layer) else layer.weight.detach()
        else:  # Conv1D's weight is [in, out]
            in_f, out_f, weight = layer.nx, layer.nf, layer.weight.detach().T
        return LayerShape(in_f, out_f, weight, None if layer.bias is None else layer.bias.detach())


class MixedModel:
    """The model's layers that serve adapters: each module is wrapped in place the first time an adapter targets it,
    and kept (without adapters a wrapper costs one lookup per pass). Called only on the model's thread."""

    def __init__(self, layout: BaseLayout, context: MixingContext):
        self.layout = layout
        self.context = context
        self._wrappers: dict[str, MixedLinear | MixedParameters] = {}
        self._module_wrappers: dict[str, MixedModule] = {}  # where ModuleAdapters are (modules.py)

    def attach(
        self, slot: int, layers: dict[str, LayerAdapter | ParameterLora], order: tuple = (), undo_keeps: bool = True
    ) -> None:
        """order: what places the adapter among the others in rank pools, the same for the same adapter whatever was
        loaded before (its name and version; after those, the slot). Failing midway (out of memory in a rank pool),
        it detaches what it attached before raising, keeping the layers' weights when undo_keeps (else they are a
        copy the caller drops): no layer keeps part of the adapter."""
        try:
            for module_name, layer in layers.items():
                wrapper = self._module(module_name) if isinstance(layer, ModuleAdapter) else self._wrapper(module_name)
                wrapper.attach(slot, layer, order)
        except BaseException:
            self.detach(slot, layers, undo_keeps)
            raise

    def detach(self, slot: int, module_names, keep: bool = True) -> None:
        """keep: the adapter's layers keep their weights (the rank pools give back their copies), for a later attach;
        else they are dropped."""
        for module_name in module_names:
            for wrappers in (self._wrappers, self._module_wrappers):
                if slot in getattr(wrappers.get(module_name), "adapters", ()):
                    wrappers[module_name].detach(slot, keep)

    def rank_pool_bytes(self) -> tuple[int, int]:
        """(allocated, held by adapters): bytes of every layer's rank pool. The adapter budget counts what adapters
        hold, not the free ranks between (README, "The decode step"). Read from any thread."""
        pools = [w.pool for w in list(self._wrappers.values()) if isinstance(w, MixedLinear)]
        return sum(p.nbytes for p in pools), sum(p.held_nbytes for p in pools)

    def _wrapper(self, module_name: str) -> MixedLinear | MixedParameters:
        if module_name not in self._wrappers:
            module = self.layout.modules[module_name]
            # on its input and output (Linear, Conv1D), or on its parameters
            wrapper = (
                MixedLinear(module, self.context, self.layout.dtype)
                if isinstance(module, (nn.Linear, Conv1D))
                else MixedParameters(module, self.context)
            )
            if module_name in self._module_wrappers:  # inside the module adapters' wrapper
                self._module_wrappers[module_name].inner = wrapper
            else:
                self._place(module_name, wrapper)
            self._wrappers[module_name] = wrapper
        return self._wrappers[module_name]

    def _module(self, module_name: str) -> MixedModule:
        if module_name not in self._module_wrappers:
            base = self.layout.modules[module_name]
            wrapper = MixedModule(base, self._wrappers.get(module_name, base), self.context)
            self._place(module_name, wrapper)
            self._module_wrappers[module_name] = wrapper
        return self._module_wrappers[module_name]

    def _place(self, module_name: str, wrapper: nn.Module) -> None:
        parent_name, _, child = module_name.rpartition(".")
        setattr(self.layout.modules[parent_name], child, wrapper)
