"""LoRA (and rsLoRA): delta(x) = B(A(x)) * scaling."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import Kind, LayerAdapter, config_fields, expect_params, expect_shape, pattern_value


class LoraLayer(LayerAdapter):
    def __init__(self, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, scaling: float):
        self.a = a  # [r, in]
        self.b = b  # [out, r]
        self.bias = bias  # [out] or None
        self.scaling = scaling
        if bias is None:
            self.low_rank = (a, b, scaling)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out]; the same operations as peft's lora.Linear
        return F.linear(F.linear(x, self.a), self.b, self.bias) * self.scaling


class LoraKind(Kind):
    peft_type = "LORA"
    param_names = ("lora_A.weight", "lora_B.weight", "lora_B.bias")

    def problems(self, config) -> list[str]:
        found = super().problems(config)
        fields = config_fields(config)
        variants = [name for name, f in fields.items() if f.metadata.get("is_lora_variant") and getattr(config, name)]
        init = config.init_lora_weights
        if isinstance(init, str) and init in fields["init_lora_weights"].metadata.get("lora_variants", ()):
            variants.append(f"init_lora_weights={init!r}")
        if variants:
            found.append(f"LoRA variants are not supported: {', '.join(variants)}")
        return found

    def build(self, config, module_name, linear, tensors, dtype):
        r = pattern_value(config.rank_pattern, module_name, config.r)
        alpha = pattern_value(config.alpha_pattern, module_name, config.lora_alpha)
        bias_name = {"lora_B.bias"} if config.lora_bias else set()
        expect_params(tensors, {"lora_A.weight", "lora_B.weight"} | bias_name)
        a = expect_shape(tensors, "lora_A.weight", (r, linear.in_features))
        b = expect_shape(tensors, "lora_B.weight", (linear.out_features, r))
        bias = expect_shape(tensors, "lora_B.bias", (linear.out_features,)) if bias_name else None
        scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        return LoraLayer(a.to(dtype), b.to(dtype), None if bias is None else bias.to(dtype), scaling)
