"""OFT: rotates the layer's input by a block-diagonal orthogonal matrix (Cayley transform of skew blocks)."""

from __future__ import annotations

from collections import OrderedDict

import torch
from peft.tuners.oft.layer import OFTLayer, OFTRotationModule

from .base import Kind, LayerAdapter, expect_params, expect_shape


class OFTLayerAdapter(LayerAdapter):
    """Semantics at weight w: the rotation of the scaled generator, R(w) = Cayley(w Q), Q the skew-symmetric blocks
    PEFT builds from oft_R (after COFT's projection) and Cayley PEFT's own (exact, or its Neumann series as the
    adapter was trained): R(1) is PEFT's rotation, R(0) the identity, R(-w) the inverse of R(w) (exactly so for
    the exact transform; up to the series' truncation for Neumann)."""

    rotates_input = True
    WEIGHTS_KEPT = 16  # rotations at weights other than 1 kept per layer, LRU (plans in use hold theirs regardless)

    def __init__(self, blocks: torch.Tensor, generator: torch.Tensor, cayley: tuple[int, int, bool, int]):
        self.blocks = blocks  # [n_blocks, block_size, block_size]: R(1)
        self.generator = generator  # [n_blocks or 1 (shared), block_size * (block_size - 1) / 2]: Q's upper triangle
        self.cayley = cayley  # (block_size, in_features, use_cayley_neumann, num_cayley_neumann_terms)
        self._weighted: OrderedDict[float, torch.Tensor] = OrderedDict()

    def rotation(self, weight: float) -> torch.Tensor:
        if weight == 1:
            return self.blocks
        blocks = self._weighted.pop(weight, None)
        if blocks is None:
            generator = self.generator.float() * weight
            blocks = _cayley(generator, *self.cayley).to(self.blocks.dtype)
        self._weighted[weight] = blocks
        while len(self._weighted) > self.WEIGHTS_KEPT:
            self._weighted.popitem(last=False)
        return blocks

    def rotate(self, x: torch.Tensor, rotation: torch.Tensor | None = None) -> torch.Tensor:
        # x: [..., in] viewed as [N, n_blocks, block_size]; peft's einsum "...rk,rkc->...rc" as one bmm
        blocks = self.blocks if rotation is None else rotation
        n, size, _ = blocks.shape
        xs = x.reshape(-1, n, size).transpose(0, 1)  # [n_blocks, N, block_size]
        return torch.bmm(xs, blocks).transpose(0, 1).reshape(x.shape)

    def to(self, device: torch.device, pin: bool = False) -> OFTLayerAdapter:
        copy = super().to(device, pin)
        copy._weighted = OrderedDict()  # rotations stay with the copy they were built for
        return copy


def _cayley(generator: torch.Tensor, size: int, in_features: int, neumann: bool, terms: int) -> torch.Tensor:
    """PEFT's blocks from a generator [n or 1, size * (size - 1) / 2] (float32): [in_features / size, size, size]."""
    rotation = OFTRotationModule(
        generator.shape[0],
        generator.shape[1],
        size,
        in_features,
        use_cayley_neumann=neumann,
        num_cayley_neumann_terms=terms,
    ).to(generator.device)
    blocks = rotation._cayley_batch(generator, size, neumann, terms)
    return blocks if blocks.shape[0] == in_features // size else blocks.repeat(in_features // size, 1, 1)


class OFTKind(Kind):
    peft_type = "OFT"
    param_names = ("oft_R.weight",)

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
            raise ValueError("exactly one of r and oft_block_size must be non-zero")
        expect_params(tensors, {"oft_R.weight"})
        n_elements = size * (size - 1) // 2
        weight = expect_shape(tensors, "oft_R.weight", (1 if config.block_share else r, n_elements))
        if config.coft:  # the generator is the projected one
            projector = OFTRotationModule(
                weight.shape[0], n_elements, size, in_f, coft=True, eps=config.eps, block_share=config.block_share
            ).to(weight.device)
            weight = projector._project_batch(weight, eps=config.eps)
        cayley = (size, in_f, config.use_cayley_neumann, config.num_cayley_neumann_terms)
        return OFTLayerAdapter(_cayley(weight, *cayley).to(dtype), weight.to(dtype), cayley)
