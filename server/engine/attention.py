"""The attention masks a model must be given, per its config, for rows that each sit at their own positions.

transformers builds a model's masks from shared cache positions, which cannot express a batch whose rows have
different lengths; the runner builds them itself, and must honour everything the model's own masks would:
causality, sliding windows (one for the whole model, or per layer type as `layer_types` says) and ALiBi (whose
bias the model derives from a 2D padding mask). A model whose layout is not one of these is refused at start.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FULL, SLIDING = "full_attention", "sliding_attention"


class UnsupportedModel(RuntimeError):
    pass


@dataclass(frozen=True)
class MaskLayout:
    # window by layer type, for models that take {layer type: mask}; {None: window} for models that take one mask
    windows: dict[str | None, int | None]
    padding_only: bool = False  # ALiBi models: a 2D [rows, length] mask of the keys each row may see

    @classmethod
    def of(cls, config) -> MaskLayout:
        model_type = config.model_type
        for option in ("attention_chunk_size", "attention_window_size"):
            if getattr(config, option, None):
                raise UnsupportedModel(f"{model_type}: {option} is not supported")
        if "local" in (getattr(config, "attention_layers", None) or ()):  # GPT-Neo
            raise UnsupportedModel(
                f"{model_type}: local attention layers apply their window from a buffer of their own, which assumes"
                " that every row ends at the same position; not supported"
            )
        window = getattr(config, "sliding_window", None) or None
        layer_types = getattr(config, "layer_types", None)
        if model_type == "bloom" or getattr(config, "alibi", False):
            if window or (layer_types and set(layer_types) != {FULL}):
                raise UnsupportedModel(f"{model_type}: ALiBi with sliding windows is not supported")
            return cls({None: None}, padding_only=True)
        if not layer_types:
            return cls({None: window})
        unknown = set(layer_types) - {FULL, SLIDING}
        if unknown:
            raise UnsupportedModel(f"{model_type}: attention layer types {sorted(unknown)} are not supported")
        if SLIDING in layer_types and not window:
            raise UnsupportedModel(f"{model_type}: sliding_attention layers without a sliding_window")
        return cls({kind: window if kind == SLIDING else None for kind in dict.fromkeys(layer_types)})

    def masks(self, query_positions: torch.Tensor, rows: int, length: int, dtype: torch.dtype):
        """The attention_mask argument for queries at query_positions ([rows or 1, queries]) over keys 0..length-1.

        Row r's key k is visible to its query at position q when k <= q (and q - k < window); keys past a row's
        own length are hidden by causality, as every row's last query sits at its last position.
        """
        keys = torch.arange(length, device=query_positions.device)
        if self.padding_only:
            return (keys[None, :] <= query_positions[:, -1:]).expand(rows, length).long()
        queries = query_positions[:, :, None]
        causal = keys <= queries

        def additive(window: int | None) -> torch.Tensor:
            visible = causal if window is None else causal & (keys > queries - window)
            mask = torch.zeros(visible.shape, dtype=dtype, device=keys.device).masked_fill_(
                ~visible, torch.finfo(dtype).min
            )
            return mask[:, None].expand(rows, 1, queries.shape[1], length)

        if len(self.windows) == 1:  # one kind of layer: one mask, which every model takes
            return additive(next(iter(self.windows.values())))
        return {kind: additive(window) for kind, window in self.windows.items()}
