"""The interface every adapter type implements: its weights on one Linear layer, and how to build them."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftConfig
from peft.utils.other import get_pattern_key

# Options that put adapter weights outside what this server serves: what each does, and what to do instead.
_UNSUPPORTED_OPTIONS = {
    "layer_replication": (
        "it repeats base layers, which would change the model for every request; serve a model saved with the layers"
        " replicated, and the adapter trained on it"
    ),
}


@dataclasses.dataclass(frozen=True)
class LayerShape:
    in_features: int
    out_features: int
    # the base layer's weight [out, in] (None when stored quantized) and bias [out] (views), for adapters whose
    # weights depend on them (DoRA's norm, trained biases)
    weight: torch.Tensor | None = dataclasses.field(default=None, compare=False, repr=False)
    bias: torch.Tensor | None = dataclasses.field(default=None, compare=False, repr=False)
    # the most ranks one adapter may take in the layer's rank pool (MIXSERVE_MAX_LORA_RANK; None: no limit)
    max_pooled_ranks: int | None = dataclasses.field(default=None, compare=False)


class LayerAdapter:
    """One adapter's weights on one Linear layer of the base model.

    Semantics, for the rows x of that layer's input, with the adapters in canonical nesting order (docs/contract.md):
        x' = rotate_k(... rotate_1(x))                         # OFT: rotates_input
        W' = W + S_1 + ... + S_m                               # SHiRA: adds_to_weight
        y  = F.linear(x', W', b) + sum(delta(x) for LoRA, AdaLoRA, LoHa, LoKr) + sum(bias_delta)
    W' is built densely on a float base; on a quantized one (server/quantization.py) the base layer's own forward
    is computed, whatever its weight's storage, plus each SHiRA's sparse x' S^T.
    A LoRA adapter that `rescales_output` (DoRA) also adds `ratio_minus_one * u` ([out], float32), where u is the
    output without the base bias up to it (the base, and the LoRA adapters before it in the request, as nested in
    PEFT's LoRA wrapper).

    Additive adapters whose delta is B(A(x)) * scale set `low_rank = (A, B, scale)`: the mixed layer computes all
    of those in a batch with two matmuls. The others implement `delta`.

    Weights (README, "Weighted mixes"): an additive adapter at weight w adds w * delta(x) (w * S for SHiRA), the
    mixed layer multiplying; a rotating one applies `rotation(w)`, which it defines.
    """

    rotates_input = False
    rotates_per_row = False  # a rotating adapter that takes one weight per row in one operation (rotation_per_row)
    adds_to_weight = False
    # A [r, in], B [out, r], scale; a PoolSpan while a rank pool holds them
    low_rank: tuple[torch.Tensor, torch.Tensor, float] | PoolSpan | None = None
    bias_delta: torch.Tensor | None = None  # [out]: a trained bias minus the base layer's, added to the output
    adds_delta = True  # False for an adapter that only carries a bias_delta
    rescales_output = False

    def rotation(self, weight: float) -> object:
        """What `rotate` applies at that weight, built once (layer plans hold it while they run)."""
        raise NotImplementedError

    def rotation_per_row(self, weights: tuple[float, ...]) -> object:
        """What `rotate` applies to rows each at its own weight (rows in the order of weights)."""
        raise NotImplementedError

    def rotate(self, x: torch.Tensor, rotation: object) -> torch.Tensor:
        raise NotImplementedError

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        a, b, scale = self.low_rank
        return F.linear(F.linear(x, a), b) * scale

    def to(self, device: torch.device) -> LayerAdapter:
        """A copy with every tensor on device."""
        return self.map_tensors(lambda t: t.to(device, non_blocking=True))

    def map_tensors(self, fn) -> LayerAdapter:
        """A copy with fn(t) in place of every tensor t; a tensor held twice (low_rank's are) stays one tensor."""
        done: dict[int, torch.Tensor] = {}

        def mapped(value):
            if isinstance(value, torch.Tensor):
                if id(value) not in done:
                    done[id(value)] = fn(value)
                return done[id(value)]
            if isinstance(value, (tuple, PoolSpan)):  # a PoolSpan's copy holds its own tensors
                return tuple(mapped(v) for v in value)
            return value

        copy = object.__new__(type(self))
        copy.__dict__.update({key: mapped(value) for key, value in vars(self).items()})
        return copy

    def tensors(self) -> list[torch.Tensor]:
        """Each tensor once (low_rank holds the same tensors as the attributes)."""

        def flat(value) -> list[torch.Tensor]:
            if isinstance(value, torch.Tensor):
                return [value]
            return [t for v in value for t in flat(v)] if isinstance(value, (tuple, PoolSpan)) else []

        return list({id(t): t for t in flat(tuple(vars(self).values()))}.values())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


class PoolSpan:
    """An adapter's low_rank while a rank pool (server/adapters/mixing.py) holds the only device copy of A and B:
    (A, B, scale) as views of the pool's span, looked up at each use (a repack moves the span). The same view
    objects come back until the pool changes, so that a copy keyed by tensor (BuiltAdapter.to_host) finds them."""

    def __init__(self, pool, slot: int):
        self.pool = pool
        self.slot = slot

    def __iter__(self):
        return iter(self.pool.factors(self.slot))


class Kind:
    """One adapter type (a PEFT tuner that PEFT can mix)."""

    peft_type: str
    # Suffixes of the state-dict keys that hold this type's weights, after the module path.
    param_names: tuple[str, ...]
    # Whether PEFT can build this type on GPT-2-style Conv1D layers (the same math as on Linear layers).
    on_conv1d = False
    # Whether its config's `bias` ('all', or '<type>_only': the base layers' biases trained too) is served.
    serves_trained_biases = False

    def raw_problems(self, raw: dict) -> list[str]:
        """What in the saved config the server cannot serve, found before PEFT parses it; empty if nothing."""
        return []

    def problems(self, config: PeftConfig) -> list[str]:
        """What in this config the server cannot serve exactly; empty if nothing."""
        found = []
        for option, why in _UNSUPPORTED_OPTIONS.items():
            if getattr(config, option, None):
                found.append(f"{option} is not supported: {why}")
        bias = getattr(config, "bias", "none")
        if bias != "none" and not self.serves_trained_biases:
            found.append(
                f"bias={bias!r} trains the base model's biases, which are served for LoRA adapters only (a"
                f" {self.peft_type} adapter's are not); retrain with bias='none'"
            )
        return found

    def build(
        self, config: PeftConfig, module_name: str, shape: LayerShape, tensors: dict[str, torch.Tensor], dtype
    ) -> LayerAdapter | None:
        """This adapter on one layer of the given shape; None where its weights have no effect (rank 0).

        `tensors` hold this module's weights in float32 on the model's device, keyed by param name.
        Raises ValueError with the reason when they do not fit the layer.
        """
        raise NotImplementedError

    def rank(self, config: PeftConfig) -> int | None:
        return getattr(config, "r", None)


def pattern_value(pattern: dict | None, module_name: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup."""
    if not pattern:
        return default
    return pattern.get(get_pattern_key(pattern.keys(), module_name), default)


def expect_params(tensors: dict[str, torch.Tensor], required: set[str], optional: set[str] = frozenset()) -> None:
    missing = required - tensors.keys()
    unexpected = tensors.keys() - required - optional
    if missing:
        raise ValueError(f"missing tensors {sorted(missing)}")
    if unexpected:
        raise ValueError(f"unexpected tensors {sorted(unexpected)}")


def expect_shape(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, ...]) -> torch.Tensor:
    tensor = tensors[name]
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(
            f"{name} has shape {tuple(tensor.shape)}, the base layer needs {tuple(shape)}: the adapter was trained on"
            " another base model (or its config's r or patterns do not match its weights)"
        )
    return tensor


def config_fields(config: PeftConfig) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(config)}
