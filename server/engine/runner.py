"""Runs the model: one forward pass with each row's adapters applied."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from server.adapters.mixing import MixingContext, RowGroup


class ModelRunner:
    def __init__(self, model: PreTrainedModel, context: MixingContext):
        self.model = model
        self.context = context
        self.device = model.device

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, groups: Sequence[RowGroup], cache=None, last_only: bool = True
    ) -> torch.Tensor:
        """input_ids: [B, T] -> logits [B, vocab] for the last position (or [B, T, vocab])."""
        with self.context.use(groups):
            out = self.model(
                input_ids=input_ids,
                cache=cache,
                use_cache=cache is not None,
                logits_to_keep=1 if last_only else 0,
            )
        return out.logits[:, -1] if last_only else out.logits
