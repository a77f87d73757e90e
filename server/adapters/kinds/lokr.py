"""LoKr: delta(x) = x kron(W1, W2)^T * scaling, computed without building the Kronecker product."""

from __future__ import annotations

import torch
from peft.tuners.lokr.layer import factorization

from .base import Kind, LayerAdapter, expect_params, expect_shape, pattern_value


class LoKrLayer(LayerAdapter):
    """In a decode pass the mixed layer applies the LoKr adapters of every row at once (`add_per_row`), each row
    with its own factors (its weight folded into W1), selected once per batch composition from the layer's stacks of
    its LoKr adapters' factors."""

    def __init__(self, w1: torch.Tensor, w2: torch.Tensor):
        self.w1 = w1  # [a, c], times the scaling
        self.w2_t = w2.T.contiguous()  # W2^T [d, b]; out = a*b, in = c*d

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        # kron(W1, W2)[i*b+j, k*d+l] = W1[i,k] W2[j,l], so with X = x viewed as [..., c, d]: y = W1 X W2^T
        (a, c), (d, b) = self.w1.shape, self.w2_t.shape
        n = x.numel() // (c * d)
        xw = torch.mm(x.reshape(n * c, d), self.w2_t).view(n, c, b)  # X W2^T
        return torch.bmm(self.w1.expand(n, a, c), xw).view(*x.shape[:-1], a * b)  # [N, a, b]: W1 X W2^T

    @staticmethod
    def add_per_row(y: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2_t: torch.Tensor) -> None:
        """Semantics: y[r] += W1_r X_r W2_r^T for each row r, X_r = x[r] viewed as [tokens, c, d]; y [rows, tokens,
        a*b], x [rows, tokens, c*d], w1 [rows, a, c] (scale and weight included), w2_t [rows, d, b]: two batched
        products over the rows, the second adding into y."""
        rows, tokens = x.shape[0], x.shape[1]
        (a, c), (d, b) = w1.shape[1:], w2_t.shape[1:]
        if tokens != 1:  # one product per token
            w1, w2_t = w1.repeat_interleave(tokens, 0), w2_t.repeat_interleave(tokens, 0)
        xw = torch.bmm(x.reshape(rows * tokens, c, d), w2_t)  # X W2^T: [N, c, b]
        y.view(rows * tokens, a, b).baddbmm_(w1, xw)


class LoKrKind(Kind):
    peft_type = "LOKR"
    param_names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

    def build(self, config, module_name, shape, tensors, dtype):
        r = pattern_value(config.rank_pattern, module_name, config.r)
        alpha = pattern_value(config.alpha_pattern, module_name, config.alpha)
        # the shapes peft's lokr.Linear gives this layer
        out_l, out_k = factorization(shape.out_features, config.decompose_factor)
        in_m, in_n = factorization(shape.in_features, config.decompose_factor)
        full_w1 = not (config.decompose_both and r < max(out_l, in_m) / 2)
        full_w2 = not (r < max(out_k, in_n) / 2)
        expect_params(
            tensors,
            ({"lokr_w1"} if full_w1 else {"lokr_w1_a", "lokr_w1_b"})
            | ({"lokr_w2"} if full_w2 else {"lokr_w2_a", "lokr_w2_b"}),
        )
        if full_w1:
            w1 = expect_shape(tensors, "lokr_w1", (out_l, in_m))
        else:
            w1 = expect_shape(tensors, "lokr_w1_a", (out_l, r)) @ expect_shape(tensors, "lokr_w1_b", (r, in_m))
        if full_w2:
            w2 = expect_shape(tensors, "lokr_w2", (out_k, in_n))
        else:
            w2 = expect_shape(tensors, "lokr_w2_a", (out_k, r)) @ expect_shape(tensors, "lokr_w2_b", (r, in_n))
        return LoKrLayer((w1 * (alpha / r)).to(dtype), w2.to(dtype))
