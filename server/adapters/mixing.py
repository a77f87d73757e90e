"""Per-row adapter combinations on the model's Linear layers, and the wrapping of those layers in place.

For each forward pass the model runner publishes a `BatchPlan` (which adapters each batch row uses) in the
`MixingContext`. Every wrapped layer computes the base output once for the whole batch and applies each row's own
adapters, grouped by adapter rather than by row: all low-rank deltas (LoRA, AdaLoRA, factorised LoHa) of the batch
in two matmuls with a per-row scale mask, the others on the rows that use them. Nothing walks the module tree per
pass, and no adapter is "active" outside the pass that asked for it.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from server.adapters.kinds import LayerAdapter
from server.adapters.kinds.base import LayerShape
from server.adapters.kinds.lora import ParameterLora

_plan_ids = itertools.count()

# On CPU, adapter operations are small (a rank-sized matmul, a mask, a block rotation): on several threads each one
# costs more in waking and joining the other threads than in arithmetic, so they run on one thread, in decode and
# prefill, and so does the base layer's matmul when it is smaller than this many multiply-adds (tokens x in x out).
# Measured with bench/mixed_decode.py (README, "CPU threads").
SERIAL_BASE_MACS = 8_000_000


@contextmanager
def _threads(n: int) -> Iterator[int]:
    """torch's CPU operations on n threads inside; yields the count outside. Called on the model's thread only:
    torch.set_num_threads also sets the count that a thread starting torch work meanwhile keeps."""
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

    def column(self, values: tuple[float, ...], dtype: torch.dtype) -> torch.Tensor:
        """[len(values), 1, 1]: one number per row."""
        return self.cached(("column", values, dtype), lambda: torch.tensor(values, dtype=dtype)[:, None, None])

    def cached(self, key, build):
        if key not in self._cache:
            self._cache[key] = build().to(self.device)
        return self._cache[key]


class MixingContext:
    """The plan of the forward pass in progress; set only by the thread that runs the model."""

    def __init__(self) -> None:
        self.plan: BatchPlan | None = None

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
    all low-rank adapters share two matmuls. In a prefill pass
    (BatchPlan.gather) arithmetic dominates: each adapter runs on its own rows only. SHiRA, whose dense weight costs
    as much as the base layer, always runs on its rows only.
    """

    rotations: list[tuple[torch.Tensor | None, list[tuple[LayerAdapter, object]]]]  # (rows, (adapter, rotation))
    sparse: list[tuple[torch.Tensor | None, list[tuple[LayerAdapter, float]]]]  # (row indices, (adapter, weight))
    # A_cat [R, in], B_cat [out, R], scales [B, 1, R] (weights included), and where they apply (bool [B, 1, R])
    low_rank: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None
    # (rows, adapter, weight): one number for all its rows, or one per row of the selection ([n, 1, 1])
    other: list[tuple[torch.Tensor | None, LayerAdapter, float | torch.Tensor]]
    serial_adapters: bool  # the adapters' operations on one thread (on CPU)
    zero: torch.Tensor  # what torch.where puts outside the rows (a Python 0 would build a tensor per call)

    @property
    def empty(self) -> bool:
        return not (self.rotations or self.sparse or self.low_rank or self.other)


class MixedLinear(nn.Module):
    """A Linear layer of the base model plus the loaded adapters that target it (referenced, never copied).

    Semantics: see LayerAdapter; rows whose adapters do not touch this layer get the base output.
    """

    PLANS_KEPT = 4  # a prefill plan and a decode plan alternate; keep a few

    def __init__(self, base: nn.Linear, context: MixingContext):
        super().__init__()
        self.base = base
        self.context = context
        self.adapters: dict[int, LayerAdapter] = {}
        self._plans: OrderedDict[int, _LayerPlan] = OrderedDict()  # by BatchPlan.id
        self._stacks: OrderedDict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

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

    def attach(self, slot: int, adapter: LayerAdapter) -> None:
        # A new slot is in no plan built so far: the running batch keeps its plans (no stall at the next step).
        self.adapters[slot] = adapter

    def detach(self, slot: int) -> None:
        del self.adapters[slot]
        self._plans.clear()
        self._stacks.clear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.context.plan
        if plan is None:
            return self.base(x)
        layer = self._layer_plan(plan)
        if layer.empty:
            return self.base(x)
        if x.dim() == 3:  # [rows, tokens, in]
            return self._mixed(x, layer)
        # Layers that see the batch flattened, [rows * tokens, in] (shared experts, OPT's MLP): row by row again
        rows = len(plan.combos)
        if x.dim() != 2 or x.shape[0] % rows:
            raise RuntimeError(f"an adapter layer got input {tuple(x.shape)}, which is not {rows} rows of tokens")
        return self._mixed(x.view(rows, -1, x.shape[-1]), layer).flatten(0, 1)

    def _mixed(self, x: torch.Tensor, layer: _LayerPlan) -> torch.Tensor:
        if not layer.serial_adapters:
            return self._with_adapters(x, layer, self._base_output)
        with _threads(1) as threads:
            if x.shape[0] * x.shape[1] * self.in_features * self.out_features < SERIAL_BASE_MACS:
                return self._with_adapters(x, layer, self._base_output)

            def base_output(x_in: torch.Tensor, sparse: list) -> torch.Tensor:
                with _threads(threads):
                    return self._base_output(x_in, sparse)

            return self._with_adapters(x, layer, base_output)

    def _with_adapters(self, x: torch.Tensor, layer: _LayerPlan, base_output) -> torch.Tensor:
        x_in = x  # what the base weight sees: rotated on rows with OFT adapters
        for rows, rotations in layer.rotations:
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

        y = base_output(x_in, layer.sparse)
        if layer.low_rank is not None:
            a_cat, b_cat, scales, own = layer.low_rank
            own_ranks = torch.where(own, F.linear(x, a_cat), layer.zero).mul_(scales)
            y.view(-1, y.shape[-1]).addmm_(own_ranks.view(-1, own_ranks.shape[-1]), b_cat.T)
        for rows, adapter, weight in layer.other:
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
        return y

    def _base_output(self, x_in: torch.Tensor, sparse: list) -> torch.Tensor:
        """F.linear(x', W', b) per row, W' = W plus the row's SHiRA deltas: built densely as peft does."""
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

    def _layer_plan(self, plan: BatchPlan) -> _LayerPlan:
        layer = self._plans.get(plan.id)
        if layer is None:
            layer = self._plans[plan.id] = self._build_layer_plan(plan)
            while len(self._plans) > self.PLANS_KEPT:
                self._plans.popitem(last=False)
        return layer

    def _build_layer_plan(self, plan: BatchPlan) -> _LayerPlan:
        rows = plan.weighted(self.adapters)  # per row: (slot, weight) of its adapters on this layer
        dtype = self.base.weight.dtype

        def groups(kind, select, prepare) -> list:
            """Rows grouped by the sequence of their adapters of one kind and their weights (order matters), where
            rows at weights other than 1 of an adapter that rotates each row by its own weight share a group (None
            stands for their weights). A group with weights other than 1 runs on its own rows only."""
            chosen = [tuple((s, w) for s, w in pairs if kind(self.adapters[s])) for pairs in rows]
            keys = [
                tuple((s, None if w != 1 and self.adapters[s].rotates_per_row else w) for s, w in c) for c in chosen
            ]
            found = []
            for key in dict.fromkeys(k for k in keys if k):
                pattern = tuple(k == key for k in keys)
                members = [c for c, p in zip(chosen, pattern, strict=True) if p]
                steps = [
                    prepare(self.adapters[s], tuple(m[i][1] for m in members) if w is None else w)
                    for i, (s, w) in enumerate(key)
                ]
                found.append(((select if all(w == 1 for _, w in key) else plan.indices)(pattern), steps))
            return found

        used = list(dict.fromkeys(s for pairs in rows for s, _ in pairs))  # first-use order
        additive = [s for s in used if not (a := self.adapters[s]).rotates_input and not a.adds_to_weight]
        # sorted: one stack for a set of adapters, whatever the order of the rows that use them
        fused = () if plan.gather else tuple(sorted(s for s in additive if self.adapters[s].low_rank is not None))

        def select(pattern: tuple[bool, ...]) -> torch.Tensor | None:
            return plan.indices(pattern) if plan.gather else plan.mask(pattern)

        def other(slot: int) -> tuple:
            """(rows, adapter, weight): the weight as one number when all its rows share it, else per row."""
            weights = [dict(pairs).get(slot) for pairs in rows]
            pattern = tuple(w is not None for w in weights)
            if len({w for w in weights if w is not None}) == 1:
                return select(pattern), self.adapters[slot], next(w for w in weights if w is not None)
            if plan.gather:  # one per selected row
                column = plan.column(tuple(w for w in weights if w is not None), dtype)
            else:  # one per row of the batch (the others are not selected)
                column = plan.column(tuple(1.0 if w is None else w for w in weights), dtype)
            return select(pattern), self.adapters[slot], column

        return _LayerPlan(
            rotations=groups(lambda a: a.rotates_input, plan.indices if plan.gather else plan.mask, _rotation),
            sparse=groups(lambda a: a.adds_to_weight, plan.indices, lambda a, w: (a, w)),
            low_rank=self._low_rank(plan, rows, fused) if fused else None,
            other=[other(s) for s in additive if s not in fused],
            serial_adapters=plan.device.type == "cpu",
            zero=plan.cached(("zero", dtype), lambda: torch.zeros((), dtype=dtype)),
        )

    def _low_rank(self, plan: BatchPlan, rows: list[tuple[tuple[int, float], ...]], slots: tuple[int, ...]):
        """Every low-rank adapter of the batch side by side, A_cat [R, in] and B_cat [out, R], a mask [rows, 1, R]
        holding each row's scale times its weight on the ranks of its own adapters, and where that is (True on its
        own ranks)."""
        if slots not in self._stacks:
            parts = [self.adapters[s].low_rank for s in slots]
            self._stacks[slots] = (torch.cat([a for a, _, _ in parts]), torch.cat([b for _, b, _ in parts], dim=1))
            while len(self._stacks) > self.PLANS_KEPT:
                self._stacks.popitem(last=False)
        a_cat, b_cat = self._stacks[slots]
        spans = tuple((s, self.adapters[s].low_rank[0].shape[0], self.adapters[s].low_rank[2]) for s in slots)

        def build(dtype: torch.dtype, fill) -> torch.Tensor:
            """[rows, 1, R]: fill(scale, weight) on the ranks of each row's own adapters, zero elsewhere."""
            mask = torch.zeros(len(rows), 1, a_cat.shape[0], dtype=dtype)
            start = 0
            for slot, width, scale in spans:
                for row, pairs in enumerate(rows):
                    weight = dict(pairs).get(slot)
                    if weight is not None:
                        mask[row, 0, start : start + width] = fill(scale, weight)
                start += width
            return mask

        where = (spans, tuple(tuple(s for s, _ in pairs) for pairs in rows))
        scales = plan.cached(("low_rank", where, tuple(rows)), lambda: build(a_cat.dtype, lambda c, w: c * w))
        own = plan.cached(("low_rank_own", where), lambda: build(torch.bool, lambda c, w: True))
        return a_cat, b_cat, scales, own


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

    def attach(self, slot: int, adapter: ParameterLora) -> None:
        self.adapters[slot] = adapter  # in no plan built so far, as in MixedLinear.attach

    def detach(self, slot: int) -> None:
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
        self.modules = dict(model.named_modules())
        self.linears = {name: m for name, m in self.modules.items() if isinstance(m, (nn.Linear, Conv1D))}
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.output_embedding = next((n for n, m in self.modules.items() if m is output), None)

    def shape(self, module_name: str) -> LayerShape:
        weight = self.linears[module_name].weight  # Linear: [out, in]; Conv1D: [in, out]
        out_f, in_f = weight.shape if isinstance(self.linears[module_name], nn.Linear) else weight.shape[::-1]
        return LayerShape(in_f, out_f)


class MixedModel:
    """The model's layers that serve adapters: each module is wrapped in place the first time an adapter targets it,
    and kept (without adapters a wrapper costs one lookup per pass). Called only on the model's thread."""

    def __init__(self, layout: BaseLayout, context: MixingContext):
        self.layout = layout
        self.context = context
        self._wrappers: dict[str, MixedLinear | MixedParameters] = {}

    def attach(self, slot: int, layers: dict[str, LayerAdapter | ParameterLora]) -> None:
        for module_name, layer in layers.items():
            self._wrapper(module_name).attach(slot, layer)

    def detach(self, slot: int, module_names) -> None:
        for module_name in module_names:
            self._wrappers[module_name].detach(slot)

    def _wrapper(self, module_name: str) -> MixedLinear | MixedParameters:
        if module_name not in self._wrappers:
            module = self.layout.modules[module_name]
            # on its input and output (Linear, Conv1D), or on its parameters
            wrapper = (
                MixedLinear(module, self.context)
                if isinstance(module, (nn.Linear, Conv1D))
                else MixedParameters(module, self.context)
            )
            parent_name, _, child = module_name.rpartition(".")
            setattr(self.layout.modules[parent_name], child, wrapper)
            self._wrappers[module_name] = wrapper
        return self._wrappers[module_name]
