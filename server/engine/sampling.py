"""Choosing the next token: TGI's parameters on top of transformers' logits processors."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 100
    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def sampling(self) -> bool:
        """As in TGI: any warper turns sampling on."""
        warped = (self.temperature not in (None, 1.0)) or bool(self.top_k) or (self.top_p not in (None, 1.0))
        return self.do_sample or warped


class TokenChooser:
    """Per-sequence state for picking tokens: the processors and, when sampling, a seeded generator."""

    def __init__(self, params: SamplingParams, device: torch.device):
        self.processors = LogitsProcessorList()
        if params.repetition_penalty not in (None, 1.0):
            self.processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
        self.seed: int | None = None
        self.generator: torch.Generator | None = None
        if params.sampling:
            if params.temperature not in (None, 1.0):
                self.processors.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k:
                self.processors.append(TopKLogitsWarper(params.top_k))
            if params.top_p not in (None, 1.0):
                self.processors.append(TopPLogitsWarper(params.top_p))
            self.seed = params.seed if params.seed is not None else random.getrandbits(63)
            self.generator = torch.Generator(device=device).manual_seed(self.seed)

    @property
    def plain_greedy(self) -> bool:
        """Argmax of the raw logits: the engine picks these tokens for a whole batch at once."""
        return self.generator is None and not self.processors

    def choose(self, logits: torch.Tensor, ids: list[int]) -> int:
        """logits: [1, vocab] float32 for the next position; ids: the tokens so far (prompt and generated)."""
        scores = self.processors(torch.tensor([ids], device=logits.device), logits) if self.processors else logits
        if self.generator is None:
            return int(scores.argmax(dim=-1))
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
