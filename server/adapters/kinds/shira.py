"""SHiRA: a sparse high-rank delta S added to the base weight: y = F.linear(x', W + S, b). On a float base the
mixed layer builds W + S densely, as peft does (so the sums round alike); on a quantized base, whose weight it never
reads, it adds x' S^T to the base layer's output (server/adapters/mixing.py, MixedLinear._base_output)."""

from __future__ import annotations

import torch

from .base import Kind, LayerAdapter, expect_params, expect_shape


class ShiraLayer(LayerAdapter):
    adds_to_weight = True

    def __init__(self, indices: torch.Tensor, crow: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]):
        # S [out, in]: entries (indices[0], indices[1]) in row-major order; crow: where each row's start (CSR)
        self.indices, self.crow = indices, crow
        self.values = values  # [nnz] in the serving dtype, scaling (1.0 at inference) included
        self.shape = shape

    def add_to(self, weight: torch.Tensor, scale: float = 1.0) -> None:
        # the same dense += sparse (values * scaling) as peft's shira.Linear, so that the sums round alike
        values = self.values if scale == 1 else self.values * scale
        weight += torch.sparse_coo_tensor(self.indices, values, self.shape)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        # x [..., in] -> x S^T [..., out]: each token's output from its own input only. In float32: torch's sparse
        # products on CPU take no bfloat16 or float16.
        s = torch.sparse_csr_tensor(self.crow, self.indices[1], self.values.float(), self.shape, check_invariants=False)
        flat = x.reshape(-1, x.shape[-1]).T.float()
        return torch.sparse.mm(s, flat).T.to(x.dtype).reshape(*x.shape[:-1], self.shape[0])


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
        flat = rows * in_f + cols
        if torch.unique(flat).numel() != count:
            raise ValueError("shira_indices name a weight entry more than once")
        order = torch.argsort(flat)
        crow = torch.zeros(out_f + 1, dtype=torch.long, device=rows.device)
        crow[1:] = torch.bincount(rows, minlength=out_f).cumsum(0)
        return ShiraLayer(indices[:, order].contiguous(), crow, values[order].to(dtype), (out_f, in_f))
