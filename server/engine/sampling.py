"""Choosing the next token: TGI's and OpenAI's parameters on top of transformers' logits processors."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from server.engine.constraints import mask_constrained

GREEDY_TEMPERATURE = 1e-5
DEFAULT_MAX_NEW_TOKENS = 100  # TGI's default; the API fits it to the context room left (api/validation.py)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int | None = DEFAULT_MAX_NEW_TOKENS  # None: the default, fitted to the context (the API's)
    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float = 0.0  # OpenAI: minus penalty times the count of each generated token
    presence_penalty: float = 0.0  # OpenAI: minus penalty once per token generated at all
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    top_logprobs: int = 0  # alternatives reported per generated token
    prompt_logprobs: bool = False  # logprob of each prompt token (TGI's decoder_input_details)
    processed_logprobs: bool = False  # a constrained row's logprobs after its grammar's mask (vLLM's processed)

    @property
    def sampling(self) -> bool:
        """As in TGI: any warper turns sampling on; as in vLLM, a temperature under 1e-5 means greedy."""
        if self.temperature is not None and self.temperature < GREEDY_TEMPERATURE:
            return False
        warped = (self.temperature not in (None, 1.0)) or bool(self.top_k) or (self.top_p not in (None, 1.0))
        return self.do_sample or warped


class TokenChooser:
    """Per-sequence state for picking tokens: the processors and, when sampling, a seeded generator."""

    def __init__(self, params: SamplingParams, device: torch.device, prompt_length: int = 0):
        self.processors = LogitsProcessorList()
        if params.logit_bias:
            self.processors.append(_LogitBias(params.logit_bias))
        if params.repetition_penalty not in (None, 1.0):
            self.processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
        if params.frequency_penalty or params.presence_penalty:
            penalty = _FrequencyPresencePenalty(params.frequency_penalty, params.presence_penalty, prompt_length)
            self.processors.append(penalty)
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
        if self.processors:
            scores = self.processors(torch.tensor([ids], device=logits.device), logits)
            # extreme penalties can overflow; keep the order of what is finite, fall back to the raw logits
            scores = torch.nan_to_num(scores, nan=-torch.inf, posinf=torch.finfo(scores.dtype).max)
            logits = scores if torch.isfinite(scores).any() else logits
        if self.generator is None:
            return int(logits.argmax(dim=-1))
        probs = torch.softmax(logits, dim=-1)
        if not torch.isfinite(probs).all():  # a +max score beside others: all mass on the largest
            return int(logits.argmax(dim=-1))
        return int(torch.multinomial(probs, 1, generator=self.generator))


@dataclass(frozen=True)
class Choice:
    token: int
    logprob: float
    alternatives: list[tuple[int, float]]  # the top logprobs, if the request asked


def sample(rows: list, logits: torch.Tensor, choosable: int | None = None) -> list[Choice | Exception]:
    """The next token of each row (a Sequence: its chooser, parameters and tokens so far) from its logits,
    [len(rows), vocab], among the ids below `choosable` (all by default); a row whose choice fails gets the exception
    instead, the others are unaffected. Logprobs are the model's own (over the ids below `choosable`), or for a
    constrained row that asks for processed logprobs, those after its grammar's mask."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # also for constrained rows
    logits = logits[:, :choosable].float()
    greedy = logits.argmax(dim=-1).tolist()
    masked = mask_constrained(rows, logits)  # constrained rows only
    choices: list[Choice | Exception] = []
    for row, seq in enumerate(rows):
        try:
            row_logits = masked.get(row)
            if isinstance(row_logits, Exception):
                raise row_logits
            if row_logits is None and seq.chooser.plain_greedy:
                token = greedy[row]
            else:
                row_logits = logits[row : row + 1] if row_logits is None else row_logits
                token = seq.chooser.choose(row_logits, seq.request.prompt_ids + seq.tokens)
            row_logprobs = logprobs[row, :choosable]
            if row in masked and seq.request.params.processed_logprobs:  # over what the grammar allows
                row_logprobs = torch.log_softmax(masked[row][0], dim=-1)
            alternatives = []
            if k := seq.request.params.top_logprobs:
                values, ids = row_logprobs.topk(min(k, row_logprobs.shape[-1]))
                alternatives = [(i, v) for i, v in zip(ids.tolist(), values.tolist(), strict=True) if v > -math.inf]
            choices.append(Choice(token, float(row_logprobs[token]), alternatives))
        except Exception as exc:  # noqa: BLE001 - handed to the caller, which fails this row alone
            choices.append(exc)
    return choices


class _LogitBias(LogitsProcessor):
    def __init__(self, bias: dict[int, float]):
        self.ids = torch.tensor(list(bias), dtype=torch.long)
        self.values = torch.tensor(list(bias.values()), dtype=torch.float32)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        scores[:, self.ids.to(scores.device)] += self.values.to(scores.device)
        return scores


class _FrequencyPresencePenalty(LogitsProcessor):
    """OpenAI's penalties, over the generated tokens only (not the prompt)."""

    def __init__(self, frequency: float, presence: float, prompt_length: int):
        self.frequency, self.presence, self.prompt_length = frequency, presence, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids[:, self.prompt_length :]
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)
