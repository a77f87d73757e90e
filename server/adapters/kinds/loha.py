"""LoHa: delta(x) = x ((W1a W1b) * (W2a W2b))^T * scaling, the Hadamard product of two low-rank matrices."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Kind, LayerAdapter, expect_params, expect_shape, pattern_value


class LoHaFactorised(LayerAdapter):
    """(W1a W1b) * (W2a W2b) = U V with U[o, (p,q)] = W1a[o,p] W2a[o,q] and V[(p,q), i] = W1b[p,i] W2b[q,i]:
    a rank r1*r2 product, cheaper than the dense matrix while r1*r2*(in+out) < in*out; pooled only when r1*r2 is
    within MIXSERVE_MAX_LORA_RANK (else the dense matrix, on the rows that use it)."""

    def __init__(self, u: torch.Tensor, v: torch.Tensor, scaling: float):
        self.low_rank = (v, u, scaling)  # v [r1*r2, in], u [out, r1*r2]


class LoHaDense(LayerAdapter):
    def __init__(self, weight: torch.Tensor):
        self.weight = weight  # [out, in], scaling included, computed as peft does

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class LoHaKind(Kind):
    peft_type = "LOHA"
    param_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

    def build(self, config, module_name, shape, tensors, dtype):
        r = pattern_value(config.rank_pattern, module_name, config.r)
        alpha = pattern_value(config.alpha_pattern, module_name, config.alpha)
        expect_params(tensors, {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"})
        out_f, in_f = shape.out_features, shape.in_features
        w1a = expect_shape(tensors, "hada_w1_a", (out_f, r))
        w1b = expect_shape(tensors, "hada_w1_b", (r, in_f))
        w2a = expect_shape(tensors, "hada_w2_a", (out_f, r))
        w2b = expect_shape(tensors, "hada_w2_b", (r, in_f))
        scaling = alpha / r
        within_pool = shape.max_pooled_ranks is None or r * r <= shape.max_pooled_ranks
        if within_pool and r * r * (in_f + out_f) < in_f * out_f:
            u = (w1a[:, :, None] * w2a[:, None, :]).reshape(out_f, r * r)
            v = (w1b[:, None, :] * w2b[None, :, :]).reshape(r * r, in_f)
            return LoHaFactorised(u.to(dtype), v.to(dtype), scaling)
        weight = ((w1a @ w1b) * (w2a @ w2b)) * torch.tensor(scaling)
        return LoHaDense(weight.to(dtype))
