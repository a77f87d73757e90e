"""Keys and values of the running sequences, one slot (batch row) each, grown on demand.

Row i of a forward pass is slot `first + i`; a sequence's token at position p sits at index p of its slot. The
model's attention calls `update`, which writes this pass's keys and values and returns the slots' caches up to
`length` positions; the runner's mask hides what lies beyond each sequence's own length, where a slot holds its
prompt's padding or zeros (freed slots are zeroed).

Each layer's tensors take the shape of the first keys written to them, so that the cache holds what the model's
attention really stores (one shared head for multi-query Falcon, other head sizes per layer).
"""

from __future__ import annotations

import torch


class SlotCache:
    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self._rows = 0  # slots the current pass needs
        self._first = 0
        self._positions: torch.Tensor | None = None  # [rows] write position of each row; None: prefill from 0
        self._length = 0
        self._query_length = 0

    def begin(self, first: int, rows: int, positions: torch.Tensor | None, length: int, query_length: int) -> None:
        """The next forward pass: its rows are slots first..first+rows-1, writing at `positions` ([rows], one token
        each) or, when None, prompts of query_length tokens from position 0; attention spans `length` positions.
        Each layer grows (by doubling, keeping what is stored) when the pass writes it."""
        self._first, self._positions, self._length, self._query_length = first, positions, length, query_length
        self._rows = first + rows

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        # key, value: [rows, kv_heads, tokens, head_dim]
        rows = key.shape[0]
        slots = slice(self._first, self._first + rows)
        keys, values = self._layer(self.keys, layer_idx, key), self._layer(self.values, layer_idx, value)
        if self._positions is None:
            keys[slots, :, : key.shape[2]] = key
            values[slots, :, : key.shape[2]] = value
        else:
            index = torch.arange(self._first, self._first + rows, device=key.device)
            keys[index, :, self._positions] = key[:, :, 0]
            values[index, :, self._positions] = value[:, :, 0]
        return keys[slots, :, : self._length], values[slots, :, : self._length]

    def move(self, source: int, target: int, length: int) -> None:
        """Copies slot source into slot target (the first `length` positions; zeros after them)."""
        for cache in (self.keys, self.values):
            for layer in cache.values():
                layer[target, :, :length] = layer[source, :, :length]
                layer[target, :, length:] = 0

    def clear(self, slot: int) -> None:
        """Zeros a freed slot. Masks hide keys past a row's length by adding -inf, which cannot hide a NaN or inf
        left there by an earlier occupant whose adapter overflowed: the next occupant must find zeros."""
        for cache in (self.keys, self.values):
            for layer in cache.values():
                layer[slot] = 0

    # What transformers asks of a cache while it builds masks and positions for models that build their own
    # (ALiBi models get a 2D padding mask): every row's keys span 0..length-1, the queries end at length-1.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._length - self._query_length

    def get_mask_sizes(self, query_length, layer_idx: int = 0) -> tuple[int, int]:
        return self._length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length(layer_idx)

    @property
    def is_compileable(self) -> bool:
        return False

    def _layer(self, cache: dict[int, torch.Tensor], layer_idx: int, like: torch.Tensor) -> torch.Tensor:
        """The layer's tensor, grown to hold this pass."""
        old = cache.get(layer_idx)
        have_rows, have_length = (0, 0) if old is None else (old.shape[0], old.shape[2])
        if self._rows <= have_rows and self._length <= have_length:
            return old
        rows, length = _grown(self._rows, have_rows), _grown(self._length, have_length)
        new = like.new_zeros(rows, like.shape[1], length, like.shape[3])
        if old is not None:
            new[: old.shape[0], :, : old.shape[2]] = old
        cache[layer_idx] = new
        return new


def _grown(need: int, have: int) -> int:
    return have if need <= have else max(need, 2 * have)
