"""The model's passes as the engine runs them, with fault isolation.

When a batched pass fails, the requests in it are run alone to find those whose own pass fails: only those are
failed (through `fail`, which takes them out of the batch), and the others go on. A request's fault never fails
another request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from server.engine.fatal import raise_if_device_fatal
from server.engine.runner import ModelRunner
from server.engine.sequence import Sequence

log = logging.getLogger(__name__)
# What a scoring pass may hold in logits and logprobs (float32: rows x longest prompt x vocabulary, twice): prompts are
# scored in groups under it (the scheduler bounds a batch's tokens, not its rows times its longest prompt).
SCORE_BYTES = 1 << 30


class IsolatedPasses:
    def __init__(
        self,
        runner: ModelRunner,
        fail: Callable[[Sequence, Exception], None],
        end: Callable[[Sequence], None],
        choosable: int | None = None,
    ):
        """fail(seq, error): seq failed alone; end(seq): seq, asking for no new tokens, is done; choosable: the ids
        the top alternatives are chosen among (below it; all by default), as for generated tokens."""
        self.runner = runner
        self.fail = fail
        self.end = end
        self.choosable = choosable

    def prefill(self, seqs: list[Sequence]) -> tuple[list[Sequence], torch.Tensor | None]:
        """Scores the prompts of those that ask (once: not again when a preempted one is recomputed), then takes
        the others into the batch. The scoring pass's last logits are those of the first new token: a sequence that
        asks for one token takes it from them, one that asks for none ends, and neither takes cache blocks. Returns
        the sequences whose next token is to be chosen, with their logits."""
        scored, last = self._score_prompts(
            [s for s in seqs if s.request.params.prompt_logprobs and s.prompt_logprobs is None]
        )
        for seq in seqs:
            if seq.request.params.max_new_tokens == 0 and seq.finished_at is None:
                self.end(seq)
        one = [row for row, s in enumerate(scored) if s.finished_at is None and s.request.params.max_new_tokens == 1]
        taken = {scored[row] for row in one}
        prefilled, logits = self._prefill([s for s in seqs if s.finished_at is None and s not in taken])
        if not one:
            return prefilled, logits
        rows = last[one]
        return [scored[row] for row in one] + prefilled, rows if logits is None else torch.cat([rows, logits])

    def decode(self) -> tuple[list[Sequence], torch.Tensor | None]:
        """A decode pass of the running rows. When it fails, each row's tokens are run alone (without the cache) to
        find the rows that fail by themselves; those are failed and the rest decoded again. If that fails too, the
        error propagates: the step's handler fails the batch."""
        try:
            return list(self.runner.rows), self.runner.decode()
        except Exception as exc:
            raise_if_device_fatal(exc)
            log.warning("decode of %d rows failed (%s); checking each row alone", len(self.runner.rows), exc)
        for seq in list(self.runner.rows):
            try:
                self.runner.score(torch.tensor([seq.request.prompt_ids + seq.tokens]), [seq.slots], [seq.weights])
            except Exception as exc:
                self.fail(seq, exc)
        return list(self.runner.rows), self.runner.decode() if self.runner.rows else None

    def _prefill(self, seqs: list[Sequence]) -> tuple[list[Sequence], torch.Tensor | None]:
        if not seqs:
            return [], None
        try:
            return seqs, self.runner.prefill(seqs)
        except Exception as exc:
            raise_if_device_fatal(exc)
            if len(seqs) == 1:
                self.fail(seqs[0], exc)
                return [], None
            log.warning("prefill of %d requests failed (%s); prefilling each alone", len(seqs), exc)
        return _joined([self._prefill([seq]) for seq in seqs])

    def _score_prompts(self, seqs: list[Sequence]) -> tuple[list[Sequence], torch.Tensor | None]:
        """The logprob of each prompt token given those before it, and the top ones where asked, in a pass of their
        own (right-padded: the causal mask keeps padding out of every row's tokens). When it fails, each is scored
        alone to find and fail those whose own pass fails. Returns those scored, with their logits after the prompt's
        last token [len, vocab]."""
        if not seqs:
            return [], None
        groups = _under_score_bytes(seqs, self.runner.model.config.vocab_size)
        if len(groups) > 1:
            return _joined([self._score_prompts(group) for group in groups])
        try:
            return seqs, self._score(seqs)
        except Exception as exc:
            raise_if_device_fatal(exc)  # not these prompts' fault: the step's handler stops the engine
            if len(seqs) == 1:
                self.fail(seqs[0], exc)
                return [], None
            log.warning("scoring %d prompts failed (%s); scoring each alone", len(seqs), exc)
        return _joined([self._score_prompts([seq]) for seq in seqs])

    def _score(self, seqs: list[Sequence]) -> torch.Tensor:
        prompts = [seq.request.prompt_ids for seq in seqs]
        lengths = [len(prompt) for prompt in prompts]
        ids = torch.full((len(seqs), max(lengths)), self.runner.pad_id, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = torch.tensor(prompt)
        logits = self.runner.score(ids, [s.slots for s in seqs], [s.weights for s in seqs])  # [B, T, vocab]
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # position t: the token at t + 1
        actual = logprobs.gather(2, ids[:, 1:, None].to(logprobs.device))[..., 0].tolist()
        k = max(seq.request.params.top_logprobs for seq in seqs)
        if k:  # one top-k over every row and position
            values, top = logprobs[..., : self.choosable].topk(k)
            values, top = values.tolist(), top.tolist()
        for row, (seq, n) in enumerate(zip(seqs, lengths, strict=True)):
            seq.prompt_logprobs = [None, *actual[row][: n - 1]]
            if own := seq.request.params.top_logprobs:
                pairs = zip(top[row][: n - 1], values[row][: n - 1], strict=True)
                seq.prompt_alternatives = [[], *(list(zip(t[:own], v[:own], strict=True)) for t, v in pairs)]
        return logits[torch.arange(len(seqs)), torch.tensor(lengths) - 1]


def _joined(outcomes: list[tuple[list[Sequence], torch.Tensor | None]]) -> tuple[list[Sequence], torch.Tensor | None]:
    """The passes' (sequences kept, their logits) as one, in order."""
    logits = [rows for _, rows in outcomes if rows is not None]
    return [seq for kept, _ in outcomes for seq in kept], torch.cat(logits) if logits else None


def _under_score_bytes(seqs: list[Sequence], vocab: int) -> list[list[Sequence]]:
    """seqs in order, in groups whose padded logits stay under SCORE_BYTES (a prompt alone may be over it)."""
    groups: list[list[Sequence]] = []
    longest = 0
    for seq in seqs:
        longest_with = max(longest, len(seq.request.prompt_ids))
        if groups and (len(groups[-1]) + 1) * longest_with * vocab * 8 <= SCORE_BYTES:
            groups[-1].append(seq)
            longest = longest_with
        else:
            groups.append([seq])
            longest = len(seq.request.prompt_ids)
    return groups
