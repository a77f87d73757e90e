"""Per-row adapter combinations on the model's Linear layers.

The model runner says, for each forward pass, which rows of the batch use which adapters (a `MixingContext`);
every wrapped layer computes the base output once and applies each row's own adapters. Nothing walks the module
tree per pass, and no adapter is ever "active" outside the pass that asked for it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from server.adapters.kinds import LayerAdapter


@dataclass(frozen=True)
class RowGroup:
    slots: tuple[int, ...]  # loaded adapters, in canonical order
    rows: torch.Tensor | None = None  # batch rows (dim 0) that use them; None: every row


class MixingContext:
    """The row groups of the forward pass in progress; set only by the thread that runs the model."""

    def __init__(self) -> None:
        self.groups: tuple[RowGroup, ...] = ()

    @contextmanager
    def use(self, groups: Sequence[RowGroup]) -> Iterator[None]:
        self.groups = tuple(g for g in groups if g.slots)
        try:
            yield
        finally:
            self.groups = ()


class MixedLinear(nn.Module):
    """A Linear layer of the base model plus the loaded adapters that target it (referenced, never copied).

    Semantics: see LayerAdapter; rows whose adapters do not touch this layer get the base output.
    """

    def __init__(self, base: nn.Linear, context: MixingContext):
        super().__init__()
        self.base = base
        self.context = context
        self.adapters: dict[int, LayerAdapter] = {}

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [batch, ..., in]
        plans = []
        for group in self.context.groups:
            present = [self.adapters[s] for s in group.slots if s in self.adapters]
            if present:
                plans.append((group.rows, present))
        if not plans:
            return self.base(x)

        x_in = x  # the input the base weight sees: rotated for rows with OFT adapters
        for rows, present in plans:
            rotations = [a for a in present if a.rotates_input]
            if not rotations:
                continue
            rotated = x if rows is None else x.index_select(0, rows)
            for adapter in rotations:
                rotated = adapter.rotate(rotated)
            if rows is None:
                x_in = rotated
            else:
                x_in = x.clone() if x_in is x else x_in
                x_in.index_copy_(0, rows, rotated)

        y = self._base_output(x_in, plans)
        for rows, present in plans:
            for adapter in present:
                if adapter.rotates_input or adapter.adds_to_weight:
                    continue
                if rows is None:
                    y += adapter.delta(x)
                else:
                    y.index_add_(0, rows, adapter.delta(x.index_select(0, rows)))
        return y

    def _base_output(self, x_in: torch.Tensor, plans: list) -> torch.Tensor:
        """F.linear(x', W', b) per row: W' = W for most rows, W plus the row's SHiRA deltas for the others."""
        y = None
        for rows, present in plans:
            sparse = [a for a in present if a.adds_to_weight]
            if not sparse:
                continue
            weight = self.base.weight.clone()
            for adapter in sparse:
                adapter.add_to(weight)
            if rows is None:
                return F.linear(x_in, weight, self.base.bias)
            y = self.base(x_in) if y is None else y
            y.index_copy_(0, rows, F.linear(x_in.index_select(0, rows), weight, self.base.bias))
        return self.base(x_in) if y is None else y
