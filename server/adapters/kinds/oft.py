"""OFT: rotates the layer's input by a block-diagonal orthogonal matrix (Cayley transform of skew blocks)."""

from __future__ import annotations

from collections import OrderedDict

import torch
from peft import OFTConfig
from peft.tuners.oft.layer import OFTLayer, OFTRotationModule

from .base import Kind, LayerAdapter, expect_params, expect_shape


class OFTLayerAdapter(LayerAdapter):
    """Semantics at weight w: the rotation of the scaled generator, R(w) = Cayley(w Q), Q the skew-symmetric blocks
    PEFT builds from oft_R (after COFT's projection) and Cayley PEFT's own (exact, or its Neumann series as the
    adapter was trained): R(1) is PEFT's rotation, R(0) the identity, R(-w) = R(w)^T (the inverse of R(w), exactly
    so for the exact transform; as far as the series is orthogonal for Neumann).

    With the Neumann series, R(w) = I + sum_k c_k w^k Q^k is a polynomial in w: rows at different weights rotate in
    one batched product with Q's powers (`rotation_per_row`) instead of one product per weight."""

    rotates_input = True
    WEIGHTS_KEPT = 16  # rotations at weights other than 1 kept per layer, LRU (plans in use hold theirs regardless)

    def __init__(self, blocks: torch.Tensor, generator: torch.Tensor, cayley: tuple[int, int, bool, int]):
        self.blocks = blocks  # [n_blocks, block_size, block_size]: R(1)
        # [n_blocks or 1 (shared), block_size * (block_size - 1) / 2]: Q's upper triangle, in float32 as PEFT keeps
        # it (autocast_adapter_dtype): R(w) is computed from it and cast to the serving dtype once
        self.generator = generator
        self.cayley = cayley  # (block_size, in_features, use_cayley_neumann, num_cayley_neumann_terms)
        self.rotates_per_row = bool(_neumann_coefficients(*cayley[2:]))
        self._weighted: OrderedDict[float | str, torch.Tensor] = OrderedDict()

    def rotation(self, weight: float) -> torch.Tensor:
        if weight == 1:
            return self.blocks
        blocks = self._weighted.pop(weight, None)
        if blocks is None:
            blocks = _cayley(self.generator * weight, *self.cayley).to(self.blocks.dtype)
        self._weighted[weight] = blocks
        while len(self._weighted) > self.WEIGHTS_KEPT:
            self._weighted.popitem(last=False)
        return blocks

    def rotation_per_row(self, weights: tuple[float, ...]) -> PerRowRotation:
        """R(w) for rows each at its own weight (Neumann series only): [Q; Q^2; ...; Q^m] built once per layer."""
        powers = self._weighted.pop("powers", None)
        if powers is None:
            size, in_features, _, terms = self.cayley
            q = _cayley(self.generator, size, in_features, False, 0, skew=True)  # [n, s, s]
            stack = [q]
            for _ in range(len(_neumann_coefficients(True, terms)) - 1):
                stack.append(torch.bmm(stack[-1], q))
            powers = torch.cat(stack, dim=1).to(self.blocks.dtype)  # [n, m*s, s]
        self._weighted["powers"] = powers  # most recent: evicted last
        coefficients = _neumann_coefficients(True, self.cayley[3])
        per_row = torch.tensor([[c * w**k for k, c in enumerate(coefficients, 1)] for w in weights])
        return PerRowRotation(powers, per_row.to(powers)[:, None, None, :, None])

    def rotate(self, x: torch.Tensor, rotation: torch.Tensor | PerRowRotation | None = None) -> torch.Tensor:
        if isinstance(rotation, PerRowRotation):
            return rotation(x)
        # x: [..., in] viewed as [N, n_blocks, block_size]; peft's einsum "...rk,rkc->...rc" as one bmm
        blocks = self.blocks if rotation is None else rotation
        n, size, _ = blocks.shape
        xs = x.reshape(-1, n, size).transpose(0, 1)  # [n_blocks, N, block_size]
        return torch.bmm(xs, blocks).transpose(0, 1).reshape(x.shape)

    def map_tensors(self, fn) -> OFTLayerAdapter:
        copy = super().map_tensors(fn)
        copy._weighted = OrderedDict()  # rotations stay with the copy they were built for
        return copy


class PerRowRotation:
    """x R(w_row) = x + sum_k (c_k w_row^k x) Q^k for rows [rows, tokens, in]: one batched product for every weight."""

    def __init__(self, powers: torch.Tensor, coefficients: torch.Tensor):
        self.powers = powers  # [n_blocks, m * s, s]: Q, Q^2, ..., Q^m stacked
        self.coefficients = coefficients  # [rows, 1, 1, m, 1]: c_k w^k

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, ms, s = self.powers.shape
        rows, tokens = x.shape[0], x.shape[1]
        scaled = x.reshape(rows, tokens, n, 1, s) * self.coefficients  # [rows, tokens, n, m, s]
        scaled = scaled.reshape(rows * tokens, n, ms).transpose(0, 1)  # [n, N, m*s]
        xs = x.reshape(rows * tokens, n, s).transpose(0, 1)  # [n, N, s]
        return torch.baddbmm(xs, scaled, self.powers).transpose(0, 1).reshape(x.shape)


def _neumann_coefficients(neumann: bool, terms: int) -> tuple[float, ...]:
    """PEFT's Neumann series (OFTRotationModule._cayley_batch) as R = I + sum_k c_k Q^k: (c_1, ..., c_m); empty for
    the exact transform, or a series that is the identity."""
    if not neumann or terms <= 1:
        return ()
    if terms == 2:
        return (2.0,)
    return (2.0,) * (max(terms - 1, 3) - 1) + (1.0,)


def _cayley(
    generator: torch.Tensor, size: int, in_features: int, neumann: bool, terms: int, skew: bool = False
) -> torch.Tensor:
    """PEFT's blocks from a generator [n or 1, size * (size - 1) / 2] (float32): [in_features / size, size, size];
    skew: the skew-symmetric Q itself, not its rotation."""
    rotation = OFTRotationModule(
        generator.shape[0],
        generator.shape[1],
        size,
        in_features,
        use_cayley_neumann=neumann,
        num_cayley_neumann_terms=terms,
    ).to(generator.device)
    if skew:
        blocks = rotation._pytorch_skew_symmetric(generator, size)
    else:
        blocks = rotation._cayley_batch(generator, size, neumann, terms)
    return blocks if blocks.shape[0] == in_features // size else blocks.repeat(in_features // size, 1, 1)


class OFTKind(Kind):
    peft_type = "OFT"
    param_names = ("oft_R.weight",)

    def raw_problems(self, raw: dict) -> list[str]:
        """PEFT's own refusals of adapters saved by an older OFT (OFTConfig.check_kwargs, which
        PeftConfig.from_peft_type skips: the config would then fail with a message that blames the settings)."""
        try:
            OFTConfig.check_kwargs(**raw)
        except ValueError as exc:
            return [f"{exc} (mixserve serves today's OFT only: retrain the adapter with PEFT 0.14 or later)"]
        return []

    def rank(self, config) -> int | None:
        return config.r or None

    def build(self, config, module_name, shape, tensors, dtype):
        in_f = shape.in_features
        # peft's OFTLayer.update_layer: exactly one of r and oft_block_size is given, the other follows
        if config.r == 0 and config.oft_block_size != 0:
            size = config.oft_block_size
            if in_f % size != 0 or size > in_f:
                size = OFTLayer.adjust_oft_parameters(None, in_f, size)
            r = in_f // size
        elif config.r != 0 and config.oft_block_size == 0:
            r = config.r
            if in_f % r != 0 or r > in_f:
                r = OFTLayer.adjust_oft_parameters(None, in_f, r)
            size = in_f // r
        else:
            raise ValueError(
                f"r={config.r} and oft_block_size={config.oft_block_size}: exactly one must be non-zero (PEFT refuses"
                " both, and neither); re-save the adapter's config with the one it was trained with"
            )
        expect_params(tensors, {"oft_R.weight"})
        n_elements = size * (size - 1) // 2
        weight = expect_shape(tensors, "oft_R.weight", (1 if config.block_share else r, n_elements))
        if config.coft:  # the generator is the projected one
            projector = OFTRotationModule(
                weight.shape[0], n_elements, size, in_f, coft=True, eps=config.eps, block_share=config.block_share
            ).to(weight.device)
            weight = projector._project_batch(weight, eps=config.eps)
        cayley = (size, in_f, config.use_cayley_neumann, config.num_cayley_neumann_terms)
        weight = weight.float()
        return OFTLayerAdapter(_cayley(weight, *cayley).to(dtype), weight, cayley)
