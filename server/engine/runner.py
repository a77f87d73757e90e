"""Runs the model over a batch whose rows each carry their own adapter combination.

The running sequences occupy cache slots 0..n-1 in `rows` order. A prefill pass takes new sequences (right-padded
prompts) into the next slots; a decode pass feeds every running sequence its last token.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from transformers import PreTrainedModel

from server.adapters.mixing import BatchPlan, MixingContext
from server.engine.kv_cache import SlotCache
from server.engine.sequence import Sequence


class ModelRunner:
    def __init__(self, model: PreTrainedModel, context: MixingContext):
        config = model.config
        if "sliding_attention" in (getattr(config, "layer_types", None) or []):
            raise RuntimeError(f"{config.model_type}: sliding-window attention layers are not supported yet")
        self.model = model
        self.context = context
        self.device = model.device
        self.dtype = model.dtype
        heads = config.num_attention_heads
        self.cache = SlotCache(
            num_layers=config.num_hidden_layers,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            dtype=self.dtype,
            device=self.device,
        )
        self.pad_id = config.pad_token_id if config.pad_token_id is not None else 0
        self.rows: list[Sequence] = []
        self._plans: OrderedDict[tuple, BatchPlan] = OrderedDict()

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        """Takes seqs into the batch; returns the logits after each prompt, [len(seqs), vocab]."""
        first, lengths = len(self.rows), [len(s.request.prompt_ids) for s in seqs]
        width = max(lengths)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, : lengths[row]] = torch.tensor(seq.request.prompt_ids)
        positions = torch.arange(width, device=self.device).expand(len(seqs), width)
        # causal is enough: a real token never sees the padding after it; padded rows' outputs are discarded
        causal = torch.ones(width, width, dtype=torch.bool, device=self.device).tril()
        last = torch.tensor(lengths, device=self.device) - 1
        keep, row_of = torch.unique(last, return_inverse=True)
        self.cache.reserve(first + len(seqs), width)
        self.cache.begin(first, None, width)
        mask = self._additive(causal).expand(len(seqs), 1, width, width)
        logits = self._forward(seqs, ids, mask, positions, keep, gather=True)
        self.rows.extend(seqs)
        return logits[torch.arange(len(seqs), device=self.device), row_of]

    @torch.inference_mode()
    def decode(self) -> torch.Tensor:
        """One token for every running sequence; logits [len(rows), vocab] in rows order."""
        positions = torch.tensor([s.num_tokens - 1 for s in self.rows], device=self.device)
        length = int(positions.max()) + 1
        ids = torch.tensor([[s.tokens[-1]] for s in self.rows])
        visible = torch.arange(length, device=self.device)[None, :] <= positions[:, None]  # [rows, length]
        self.cache.reserve(len(self.rows), length)
        self.cache.begin(0, positions, length)
        return self._forward(self.rows, ids, self._additive(visible)[:, None, None, :], positions[:, None], 1)[:, -1]

    def release(self, seq: Sequence) -> None:
        """Frees seq's slot; the last row moves into it so that the rows stay contiguous."""
        row, last = self.rows.index(seq), len(self.rows) - 1
        if row != last:
            moved = self.rows[last]
            self.cache.move(last, row, moved.num_tokens)
            self.rows[row] = moved
        self.rows.pop()

    @torch.inference_mode()
    def score(self, input_ids: torch.Tensor, combos: list[tuple[int, ...]]) -> torch.Tensor:
        """Logits of every position, [B, T, vocab], without touching the running batch's cache."""
        with self.context.use(self._plan(tuple(combos), gather=True)):
            return self.model(input_ids=input_ids.to(self.device), use_cache=False).logits

    def _forward(self, seqs, ids, mask, positions, keep, gather: bool = False) -> torch.Tensor:
        with self.context.use(self._plan(tuple(s.slots for s in seqs), gather)):
            out = self.model(
                input_ids=ids.to(self.device),
                attention_mask=mask,
                position_ids=positions,
                cache=self.cache,
                use_cache=True,
                logits_to_keep=keep,
            )
        return out.logits

    def _additive(self, visible: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros((), dtype=self.dtype, device=self.device)
        return torch.where(visible, zero, torch.finfo(self.dtype).min)

    def _plan(self, combos: tuple[tuple[int, ...], ...], gather: bool = False) -> BatchPlan:
        """The same plan object while the batch keeps its composition, so that layers reuse their preparation."""
        key = (combos, gather)
        plan = self._plans.pop(key, None) or BatchPlan(combos, self.device, gather)
        self._plans[key] = plan
        while len(self._plans) > 8:
            self._plans.popitem(last=False)
        return plan
