"""Keys and values of the running sequences, one slot (batch row) each, grown on demand.

Row i of a forward pass is slot `first + i`; a sequence's token at position p sits at index p of its slot. The
model's attention calls `update`, which writes this pass's keys and values and returns the slots' caches up to
`length` positions; the runner's 4D mask hides what lies beyond each sequence's own length.
"""

from __future__ import annotations

import torch


class SlotCache:
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.shape = (kv_heads, head_dim)
        self.dtype = dtype
        self.device = device
        self.keys = [self._empty(0, 0) for _ in range(num_layers)]
        self.values = [self._empty(0, 0) for _ in range(num_layers)]
        self._first = 0
        self._positions: torch.Tensor | None = None  # [rows] write position of each row; None: prefill from 0
        self._length = 0

    @property
    def capacity(self) -> tuple[int, int]:
        return self.keys[0].shape[0], self.keys[0].shape[2]

    def reserve(self, rows: int, length: int) -> None:
        """Room for `rows` slots of `length` positions; grows by doubling, keeping what is stored."""
        have_rows, have_length = self.capacity
        if rows <= have_rows and length <= have_length:
            return
        rows, length = _grown(rows, have_rows), _grown(length, have_length)
        for cache in (self.keys, self.values):
            for i, old in enumerate(cache):
                new = self._empty(rows, length)
                new[: old.shape[0], :, : old.shape[2]] = old
                cache[i] = new

    def begin(self, first: int, positions: torch.Tensor | None, length: int) -> None:
        """The next forward pass: its rows are slots first.., writing at `positions` ([rows], one token each) or,
        when None, prompts from position 0; attention spans `length` positions."""
        self._first, self._positions, self._length = first, positions, length

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, **kwargs):
        # key, value: [rows, kv_heads, tokens, head_dim]
        rows = key.shape[0]
        slots = slice(self._first, self._first + rows)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self._positions is None:
            keys[slots, :, : key.shape[2]] = key
            values[slots, :, : key.shape[2]] = value
        else:
            index = torch.arange(self._first, self._first + rows, device=key.device)
            keys[index, :, self._positions] = key[:, :, 0]
            values[index, :, self._positions] = value[:, :, 0]
        return keys[slots, :, : self._length], values[slots, :, : self._length]

    def move(self, source: int, target: int, length: int) -> None:
        """Copies slot source into slot target (the first `length` positions)."""
        for cache in (self.keys, self.values):
            for layer in cache:
                layer[target, :, :length] = layer[source, :, :length]

    def _empty(self, rows: int, length: int) -> torch.Tensor:
        return torch.zeros(rows, self.shape[0], length, self.shape[1], dtype=self.dtype, device=self.device)


def _grown(need: int, have: int) -> int:
    return have if need <= have else max(need, 2 * have)
