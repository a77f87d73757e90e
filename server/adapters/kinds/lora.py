"""LoRA (and rsLoRA, DoRA, trained biases): delta(x) = B(A(x)) * scaling."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import Kind, LayerAdapter, config_fields, expect_params, expect_shape, pattern_value

# LoRA variants (LoraConfig fields marked is_lora_variant) that are served.
_SERVED_VARIANTS = ("use_dora",)

# PEFT re-runs these initialisations on load, and each subtracts its initial adapter from the base layer's weight.
_INITS_THAT_REWRITE_THE_BASE = ("olora", "pissa", "corda", "loftq", "lora_ga")


class LoraLayer(LayerAdapter):
    def __init__(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        bias: torch.Tensor | None,
        scaling: float,
        bias_delta: torch.Tensor | None = None,
    ):
        # a [r, in], b [out, r], bias [out] (lora_B's): held once, in low_rank when a rank pool can take them (no
        # bias); bias_delta [out]: the trained base bias minus the served one (config.bias 'lora_only' or 'all')
        if bias is None:
            self.low_rank = (a, b, scaling)
        else:
            self.with_bias = (a, b, bias, scaling)
        if bias_delta is not None:
            self.bias_delta = bias_delta

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out]; the same operations as peft's lora.Linear
        if self.low_rank is not None:
            return super().delta(x)
        a, b, bias, scaling = self.with_bias
        return F.linear(F.linear(x, a), b, bias) * scaling


class DoraLayer(LoraLayer):
    """DoRA (use_dora), as peft's DoraLinearLayer in eval: with r the output of the layer so far (the base, inner
    adapters, and the LoRA adapters before this one) and b the base layer's bias,
        r' = r + (g - 1) * (r - b) + g * B(A(x)) * scaling,    g = magnitude / ||W + scaling * B A||  (per output)
    with the norm detached (a constant here) and lora_dropout the identity. g is computed once, at build.

    Weight w (docs/contract.md): r' = r + w * ((g - 1) * (r - b) + g * B(A(x)) * scaling). The low-rank part is
    a LoRA with B scaled by g (it rides the rank pool); the mixed layer adds the rest, ratio_minus_one = g - 1."""

    rescales_output = True

    def __init__(self, a, b, scaling: float, ratio: torch.Tensor, bias_delta: torch.Tensor | None, dtype):
        # ratio: g [out], float32
        super().__init__(a.to(dtype), (ratio[:, None] * b).to(dtype), None, scaling, bias_delta)
        self.ratio_minus_one = ratio - 1  # [out], float32 (as PEFT's: its magnitude stays float32)


class TrainedBias(LayerAdapter):
    """A trained bias of a layer the adapter does not target (config.bias='all'): only bias_delta."""

    adds_delta = False

    def __init__(self, bias_delta: torch.Tensor):
        self.bias_delta = bias_delta


class ParameterLora(LayerAdapter):
    """LoRA on parameters of a module that is not a Linear layer (PEFT's `target_parameters`, e.g. the 3D expert
    stacks of MoE models): the module runs with W + delta(W) for each targeted parameter W."""

    def __init__(self, deltas: tuple[tuple[str, torch.Tensor, torch.Tensor, float], ...]):
        # (parameter name, lhs, rhs, scaling): delta = lhs @ rhs * scaling, batched over experts for 3D parameters
        self.deltas = deltas

    @staticmethod
    def patched(weight: torch.Tensor, name: str, adapters: list[tuple[ParameterLora, float]]) -> torch.Tensor:
        """weight with the (adapter, weight)s' deltas, each times its weight (its scaling multiplied, as peft's
        set_scale does), computed as peft's ParamWrapper does: one adapter on an expert stack folds in with one
        baddbmm; otherwise the deltas are summed, then added."""
        found = [(n, lhs, rhs, scaling * w) for a, w in adapters for n, lhs, rhs, scaling in a.deltas if n == name]
        if not found:
            return weight
        if len(found) == 1 and weight.dim() == 3:
            _, lhs, rhs, scaling = found[0]
            return torch.baddbmm(weight, lhs, rhs, alpha=scaling)
        return weight + sum((lhs @ rhs) * scaling for _, lhs, rhs, scaling in found)


class LoraKind(Kind):
    peft_type = "LORA"
    on_conv1d = True
    serves_trained_biases = True
    # the trained bias of a targeted layer is saved as base_layer.bias, of another layer as bias (config.bias)
    param_names = ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_magnitude_vector", "base_layer.bias", "bias")

    def problems(self, config) -> list[str]:
        found = super().problems(config)
        fields = config_fields(config)
        variants = [
            name
            for name, f in fields.items()
            if f.metadata.get("is_lora_variant") and getattr(config, name) and name not in _SERVED_VARIANTS
        ]
        init = config.init_lora_weights
        if isinstance(init, str) and init in fields["init_lora_weights"].metadata.get("lora_variants", ()):
            variants.append(f"init_lora_weights={init!r}")
        if variants:
            found.append(
                f"{', '.join(variants)}: a LoRA variant whose forward pass is not LoRA's, which mixserve does not"
                f" implement (it serves LoRA, rsLoRA and DoRA); retrain without it, or merge it into the base model"
                " with PEFT (merge_and_unload) and serve that"
            )
        return found

    def raw_problems(self, raw: dict) -> list[str]:
        init = raw.get("init_lora_weights")
        if isinstance(init, str) and init.lower().startswith(_INITS_THAT_REWRITE_THE_BASE):
            return [
                f"init_lora_weights={init!r} changes the base model's weights when PEFT loads it; convert the adapter"
                " to a plain LoRA with PEFT (save_pretrained(..., path_initial_model_for_weight_conversion=...))"
            ]
        return []

    def build(self, config, module_name, shape, tensors, dtype):
        if "bias" in tensors:  # a layer that is not targeted, whose bias was trained (bias='all')
            expect_params(tensors, {"bias"})
            return TrainedBias(_bias_delta(tensors, "bias", shape, dtype))
        r = pattern_value(config.rank_pattern, module_name, config.r)
        alpha = pattern_value(config.alpha_pattern, module_name, config.lora_alpha)
        bias_name = {"lora_B.bias"} if config.lora_bias else set()
        dora = {"lora_magnitude_vector"} if config.use_dora else set()
        expect_params(tensors, {"lora_A.weight", "lora_B.weight"} | bias_name | dora, {"base_layer.bias"})
        a = expect_shape(tensors, "lora_A.weight", (r, shape.in_features))
        b = expect_shape(tensors, "lora_B.weight", (shape.out_features, r))
        bias = expect_shape(tensors, "lora_B.bias", (shape.out_features,)) if bias_name else None
        scaling = _scaling(config, r, alpha)
        bias_delta = _bias_delta(tensors, "base_layer.bias", shape, dtype) if "base_layer.bias" in tensors else None
        if dora:
            if shape.weight is None or not shape.weight.is_floating_point():
                raise ValueError(
                    "DoRA's weight norm needs the base layer's weight in floating point, and this base layer is"
                    " quantized; serve the base unquantized (MIXSERVE_QUANTIZATION=none)"
                )
            magnitude = expect_shape(tensors, "lora_magnitude_vector", (shape.out_features,))
            ratio = magnitude / _weight_norm(shape.weight, a, b, scaling)
            if not torch.isfinite(ratio).all():
                raise ValueError(
                    "DoRA's weight norm is 0 for some output (W + scaling * B A has a zero row), so its magnitude"
                    " ratio is undefined; the adapter is broken (PEFT's output there is not finite either)"
                )
            return DoraLayer(a, b, scaling, ratio, bias_delta, dtype)
        return LoraLayer(a.to(dtype), b.to(dtype), None if bias is None else bias.to(dtype), scaling, bias_delta)

    def build_parameters(self, config, module_name, params, tensors, dtype) -> ParameterLora:
        """LoRA on `params` ({name: (shape, transposed)}, in the order peft nests its wrappers: the first innermost)
        of one module; `tensors` are keyed `lora_A.weight` for the outermost, `base_layer.lora_A.weight` inside it."""
        if config.lora_bias or config.use_dora:
            raise ValueError(
                "target_parameters works without lora_bias and use_dora (in peft too); retrain without them"
            )
        deltas, depth, expected = [], len(params), set()
        for name, (shape, transposed) in params.items():
            depth -= 1
            prefix = "base_layer." * depth
            expected |= {prefix + "lora_A.weight", prefix + "lora_B.weight"}
            key = f"{module_name}.{name}"
            r = pattern_value(config.rank_pattern, key, config.r)
            alpha = pattern_value(config.alpha_pattern, key, config.lora_alpha)
            experts, out_f, in_f = (1, *shape) if len(shape) == 2 else shape
            if len(shape) == 3 and transposed:
                in_f, out_f = out_f, in_f
            a = expect_shape(tensors, prefix + "lora_A.weight", (r * experts, in_f)).to(dtype)
            b = expect_shape(tensors, prefix + "lora_B.weight", (out_f, r * experts)).to(dtype)
            if len(shape) == 2:
                lhs, rhs = b, a
            else:
                a = a.reshape(experts, r, in_f)  # the same reshapes as peft's ParamWrapper.get_delta_factors
                b = b.reshape(out_f, r, experts).permute(2, 0, 1)
                lhs, rhs = (a.transpose(-2, -1), b.transpose(-2, -1)) if transposed else (b, a)
            deltas.append((name, lhs.contiguous(), rhs.contiguous(), _scaling(config, r, alpha)))
        expect_params(tensors, expected)
        return ParameterLora(tuple(deltas))


def _weight_norm(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """peft's DoraLinearLayer.get_weight_norm, the norm of each output's row of W + scaling * B A, where the adapter
    is built (on the host: the base weight may be on the device), a block of rows at a time: a large layer's (an
    lm_head's) whole weight is never copied."""
    norm = torch.empty(weight.shape[0], dtype=torch.float32, device=a.device)
    step = max(1, (1 << 24) // weight.shape[1])  # rows per block: 64 MiB in float32
    for start in range(0, weight.shape[0], step):
        rows = weight[start : start + step].to(a.device, torch.float32)
        norm[start : start + step] = torch.linalg.norm(rows + scaling * (b[start : start + step] @ a), dim=1)
    return norm


def _bias_delta(tensors: dict[str, torch.Tensor], name: str, shape, dtype) -> torch.Tensor:
    """The trained bias minus the base layer's: what a row that uses the adapter adds to the layer's output."""
    if shape.bias is None:
        raise ValueError(
            f"the file trains a bias ({name}) for a layer that has none in the base model, which PEFT never writes:"
            " the adapter was trained on another base model, or the file was edited; re-save it with PEFT"
        )
    trained = expect_shape(tensors, name, (shape.out_features,))
    return (trained - shape.bias.to(trained.device, torch.float32)).to(dtype)


def _scaling(config, r: int, alpha: float) -> float:
    return alpha / math.sqrt(r) if config.use_rslora else alpha / r
