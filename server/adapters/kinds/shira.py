"""SHiRA: a sparse high-rank delta S added to the base weight: y = F.linear(x', W + S, b)."""

from __future__ import annotations

import torch

from .base import Kind, LayerAdapter, expect_params, expect_shape


class ShiraLayer(LayerAdapter):
    adds_to_weight = True

    def __init__(self, indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]):
        self.indices = indices  # [2, nnz]: (out, in) positions
        self.values = values  # [nnz], scaling (1.0 at inference) included
        self.shape = shape

    def add_to(self, weight: torch.Tensor, scale: float = 1.0) -> None:
        # the same dense += sparse (values * scaling) as peft's shira.Linear, so that the sums round alike
        values = self.values if scale == 1 else self.values * scale
        weight += torch.sparse_coo_tensor(self.indices, values, self.shape)


class ShiraKind(Kind):
    peft_type = "SHIRA"
    param_names = ("shira_weight", "shira_indices")

    def build(self, config, module_name, shape, tensors, dtype):
        out_f, in_f = shape.out_features, shape.in_features
        count = config.r * (in_f + out_f)
        if count > in_f * out_f:
            raise ValueError(f"r={config.r} asks for {count} entries; the {out_f}x{in_f} weight has {in_f * out_f}")
        expect_params(tensors, {"shira_weight", "shira_indices"})
        values = expect_shape(tensors, "shira_weight", (count,))
        indices = expect_shape(tensors, "shira_indices", (2, count)).long()  # peft saves float32 on Windows
        rows, cols = indices
        if count and (rows.min() < 0 or rows.max() >= out_f or cols.min() < 0 or cols.max() >= in_f):
            raise ValueError(f"shira_indices point outside the {out_f}x{in_f} weight")
        if torch.unique(rows * in_f + cols).numel() != count:
            raise ValueError("shira_indices name a weight entry more than once")
        return ShiraLayer(indices, values.to(dtype), (out_f, in_f))
