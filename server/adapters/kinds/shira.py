"""SHiRA: a sparse high-rank delta S added to the base weight: y = F.linear(x', W + S, b), computed as
base(x') + x' S^T, so that the base layer's weight is never read (it may be stored quantized)."""

from __future__ import annotations

import torch

from .base import Kind, LayerAdapter, expect_params, expect_shape


class ShiraLayer(LayerAdapter):
    adds_to_weight = True

    def __init__(self, crow: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]):
        # S [out, in] in CSR form: row r's entries at crow[r]:crow[r+1] of cols and values (float32, scaling 1.0
        # at inference included): torch's sparse products on CPU take no bfloat16 or float16
        self.crow, self.cols, self.values = crow, cols, values
        self.shape = shape

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        # x [..., in] -> x S^T [..., out]: each token's output from its own input only
        s = torch.sparse_csr_tensor(self.crow, self.cols, self.values, self.shape, check_invariants=False)
        flat = x.reshape(-1, x.shape[-1]).T.to(self.values.dtype)
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
        return ShiraLayer(crow, cols[order].contiguous(), values[order].float().contiguous(), (out_f, in_f))
