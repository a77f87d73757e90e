"""AdaLoRA: delta(x) = x (A*E)^T B^T * scaling / (ranknum + 1e-5), SVD-shaped LoRA with pruned ranks."""

from __future__ import annotations

import torch

from .base import Kind, LayerAdapter, expect_params, expect_shape


class AdaLoraLayer(LayerAdapter):
    def __init__(self, ae: torch.Tensor, b: torch.Tensor, scale: float):
        self.low_rank = (ae, b, scale)  # ae [r, in]: lora_A * lora_E, fixed at inference; b [out, r]


class AdaLoraKind(Kind):
    peft_type = "ADALORA"
    on_conv1d = True
    param_names = ("lora_A", "lora_B", "lora_E")

    def rank(self, config) -> int | None:
        return config.init_r

    def module_ranks(self, config) -> dict[str, int]:
        """Ranks kept by AdaLoRA's pruning, from rank_pattern (`<module>.lora_E` -> keep mask)."""
        ranks = {}
        for key, mask in (config.rank_pattern or {}).items():
            module = key.removesuffix(".lora_E")
            if module == key:
                raise ValueError(f"rank_pattern key {key!r} does not name a lora_E tensor")
            if not isinstance(mask, list):
                raise ValueError(f"rank_pattern[{key!r}] is not a list of booleans")
            ranks[module] = int(sum(bool(m) for m in mask))
        return ranks

    def build(self, config, module_name, shape, tensors, dtype):
        r = self.module_ranks(config).get(module_name, config.init_r)
        expect_params(tensors, set(self.param_names))
        a = expect_shape(tensors, "lora_A", (r, shape.in_features))
        e = expect_shape(tensors, "lora_E", (r, 1))
        b = expect_shape(tensors, "lora_B", (shape.out_features, r))
        if r == 0:
            return None
        # peft resizes pruned modules but keeps ranknum at init_r; its scaling falls back to the rank without alpha
        scaling = config.lora_alpha if config.lora_alpha > 0 else float(r)
        ranknum = torch.tensor(float(config.init_r), dtype=torch.float32) + 1e-5  # rounded as peft's parameter
        return AdaLoraLayer((a * e).to(dtype), b.to(dtype), scaling / float(ranknum))
