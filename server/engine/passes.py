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


class IsolatedPasses:
    def __init__(self, runner: ModelRunner, fail: Callable[[Sequence, Exception], None]):
        self.runner = runner
        self.fail = fail

    def prefill(self, seqs: list[Sequence]) -> tuple[list[Sequence], torch.Tensor | None]:
        """Scores the prompts of those that ask (once: not again when a preempted one is recomputed), then takes
        seqs into the batch. Returns those prefilled, with their logits."""
        self._score_prompts([s for s in seqs if s.request.params.prompt_logprobs and s.prompt_logprobs is None])
        return self._prefill([s for s in seqs if s.finished_at is None])

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
        outcomes = [self._prefill([seq]) for seq in seqs]
        logits = [rows for _, rows in outcomes if rows is not None]
        return [seq for kept, _ in outcomes for seq in kept], torch.cat(logits) if logits else None

    def _score_prompts(self, seqs: list[Sequence]) -> None:
        """The logprob of each prompt token given those before it (one extra pass each)."""
        for seq in seqs:
            ids = seq.request.prompt_ids
            try:
                scores = self.runner.score(torch.tensor([ids]), [seq.slots], [seq.weights])[0]
                logprobs = torch.log_softmax(scores.float(), dim=-1)
                seq.prompt_logprobs = [None] + logprobs[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
            except Exception as exc:
                self.fail(seq, exc)
