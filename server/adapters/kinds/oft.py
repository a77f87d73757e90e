"""OFT: rotates the layer's input by a block-diagonal orthogonal matrix (Cayley transform of skew blocks)."""

from __future__ import annotations

import torch
from peft.tuners.oft.layer import OFTLayer, OFTRotationModule

from .base import Kind, LayerAdapter, expect_params, expect_shape


class OFTLayerAdapter(LayerAdapter):
    rotates_input = True

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks  # [n_blocks, block_size, block_size]

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] viewed as [N, n_blocks, block_size]; peft's einsum "...rk,rkc->...rc" as one bmm
        n, size, _ = self.blocks.shape
        xs = x.reshape(-1, n, size).transpose(0, 1)  # [n_blocks, N, block_size]
        return torch.bmm(xs, self.blocks).transpose(0, 1).reshape(x.shape)


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
        rotation = OFTRotationModule(
            1 if config.block_share else r,
            n_elements,
            size,
            in_f,
            coft=config.coft,
            eps=config.eps,
            block_share=config.block_share,
            use_cayley_neumann=config.use_cayley_neumann,
            num_cayley_neumann_terms=config.num_cayley_neumann_terms,
        ).to(weight.device)
        if config.coft:
            weight = rotation._project_batch(weight, eps=config.eps)
        blocks = rotation._cayley_batch(weight, size, config.use_cayley_neumann, config.num_cayley_neumann_terms)
        if config.block_share:
            blocks = blocks.repeat(in_f // size, 1, 1)
        return OFTLayerAdapter(blocks.to(dtype))
