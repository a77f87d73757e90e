"""Batched sampling equals choosing each row alone with transformers' logits processors and torch.multinomial, for
every parameter and mixes of them in one batch, over several steps (the seeded generators advance alike)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from server.engine.sampling import SamplingParams, TokenChooser, sample

VOCAB, PROMPT = 300, [5, 17, 17, 40, 99]
PARAMS = [
    SamplingParams(),
    SamplingParams(top_logprobs=3),
    SamplingParams(do_sample=True, seed=1),
    SamplingParams(temperature=0.7, seed=2),
    SamplingParams(top_k=5, seed=3, top_logprobs=2),
    SamplingParams(top_p=0.9, seed=4),
    SamplingParams(temperature=1.3, top_k=40, top_p=0.8, seed=5),
    SamplingParams(repetition_penalty=1.5),
    SamplingParams(repetition_penalty=0.8, do_sample=True, seed=6),
    SamplingParams(frequency_penalty=0.5, presence_penalty=0.25),
    SamplingParams(presence_penalty=9.0, do_sample=True, seed=10),
    SamplingParams(frequency_penalty=-1.0, temperature=0.5, seed=7),
    SamplingParams(logit_bias={3: 100.0, 7: -100.0, 42: 2.5}),
    SamplingParams(logit_bias={11: 5.0}, top_k=2, seed=8),
    SamplingParams(top_p=0.01, seed=9),  # the most likely token kept
    SamplingParams(temperature=1e-6),  # greedy
    SamplingParams(repetition_penalty=1e30),  # overflows: the finite order kept
    SamplingParams(repetition_penalty=1e-30, top_k=3, seed=11),  # to +inf: the largest finite value
]


class _Reference:
    """The pre-batching chooser: transformers' processors on one row, then torch.multinomial."""

    def __init__(self, params: SamplingParams):
        self.processors = LogitsProcessorList()
        if params.logit_bias:
            ids, values = torch.tensor(list(params.logit_bias)), torch.tensor(list(params.logit_bias.values()))
            self.processors.append(lambda _, s: s.index_put((torch.zeros_like(ids), ids), values, accumulate=True))
        if params.repetition_penalty not in (None, 1.0):
            self.processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
        if params.frequency_penalty or params.presence_penalty:
            f, p = params.frequency_penalty, params.presence_penalty

            def penalty(ids, s):
                generated = ids[:, len(PROMPT) :]
                counts = torch.zeros_like(s).scatter_add_(1, generated, torch.ones_like(generated, dtype=s.dtype))
                return s - f * counts - p * (counts > 0).to(s.dtype)

            self.processors.append(penalty)
        self.generator = None
        if params.sampling:
            if params.temperature not in (None, 1.0):
                self.processors.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k:
                self.processors.append(TopKLogitsWarper(params.top_k))
            if params.top_p not in (None, 1.0):
                self.processors.append(TopPLogitsWarper(params.top_p))
            self.generator = torch.Generator().manual_seed(params.seed)

    def choose(self, logits: torch.Tensor, ids: list[int]) -> int:
        if self.processors:
            scores = self.processors(torch.tensor([ids]), logits)
            scores = torch.nan_to_num(scores, nan=-torch.inf, posinf=torch.finfo(scores.dtype).max)
            logits = scores if torch.isfinite(scores).any() else logits
        if self.generator is None:
            return int(logits.argmax(dim=-1))
        probs = torch.softmax(logits, dim=-1)
        if not torch.isfinite(probs).all():
            return int(logits.argmax(dim=-1))
        return int(torch.multinomial(probs, 1, generator=self.generator))


def _row(params: SamplingParams):
    request = SimpleNamespace(prompt_ids=list(PROMPT), params=params)
    return SimpleNamespace(request=request, chooser=TokenChooser(params, len(PROMPT)), tokens=[], constraint=None)


def test_batched_sampling_equals_each_row_alone_with_transformers_processors():
    torch.manual_seed(0)
    rows = [_row(p) for p in PARAMS]
    references = [_Reference(p) for p in PARAMS]
    for step in range(6):
        logits = torch.randn(len(rows), VOCAB + 20) * 4  # a model vocabulary larger than the tokenizer's
        logits[:, PROMPT] += 8  # the tokens seen so far lead: penalties change the choice
        for i, row in enumerate(rows):
            logits[i, row.tokens] += 8
        choices = sample(rows, logits, VOCAB)
        logprobs = torch.log_softmax(logits, dim=-1)
        for row, reference, choice, own, own_logprobs in zip(rows, references, choices, logits, logprobs, strict=True):
            expected = reference.choose(own[None, :VOCAB].clone(), row.request.prompt_ids + row.tokens)
            assert choice.token == expected, (step, row.request.params)
            assert choice.logprob == float(own_logprobs[expected])
            if k := row.request.params.top_logprobs:
                values, ids = own_logprobs[:VOCAB].topk(k)
                assert choice.alternatives == list(zip(ids.tolist(), values.tolist()))
            row.tokens.append(choice.token)


def test_sampling_syncs_once_per_step():
    """One read of device values per step, whatever the parameters (the profiler's count of scalar reads and
    data-dependent shapes, and .tolist() calls)."""
    from torch.overrides import TorchFunctionMode
    from torch.profiler import ProfilerActivity, profile

    class ToList(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.Tensor.tolist:
                ToList.calls += 1
            return func(*args, **(kwargs or {}))

    greedy = [_row(SamplingParams()) for _ in range(4)]
    mixed = [_row(p) for p in PARAMS]
    for rows in (greedy, mixed):
        ToList.calls = 0
        logits = torch.randn(len(rows), VOCAB)
        with profile(activities=[ProfilerActivity.CPU]) as prof, ToList():
            sample(rows, logits)
        reads = [e.name for e in prof.events() if e.name in ("aten::_local_scalar_dense", "aten::nonzero")]
        assert reads == [] and ToList.calls == 1, (reads, ToList.calls)


def test_a_row_whose_choice_fails_fails_alone():
    """A processor raising for one row (here a logit bias past the vocabulary, which the API refuses before) gives
    that row the exception; the others, processed in the same batch, get the tokens they get without it."""
    torch.manual_seed(0)
    good = [
        SamplingParams(top_k=5, seed=3),
        SamplingParams(repetition_penalty=1.5),
        SamplingParams(temperature=0.7, seed=2),
    ]
    logits = torch.randn(len(good) + 1, VOCAB) * 4
    alone = sample([_row(p) for p in good], logits[: len(good)].clone())
    choices = sample([_row(p) for p in good] + [_row(SamplingParams(logit_bias={VOCAB + 5: 1.0}))], logits)
    assert isinstance(choices[-1], Exception)
    assert [c.token for c in choices[:-1]] == [c.token for c in alone]
