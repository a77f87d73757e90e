"""Who runs next: waiting requests join the running batch first come, first served, within the batch limits."""

from __future__ import annotations

from collections import deque

from server.engine.sequence import Sequence


class Scheduler:
    def __init__(self, max_batch_size: int, max_batch_tokens: int):
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.waiting: deque[Sequence] = deque()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def admit(self, running: int) -> list[Sequence]:
        """The oldest waiting requests that fit beside `running` sequences: the batch size, and a prefill of at most
        max_batch_tokens (padded) tokens. The oldest is always admitted when there is room, whatever its length,
        so no request waits behind later ones."""
        admitted: list[Sequence] = []
        longest = 0
        while self.waiting and running + len(admitted) < self.max_batch_size:
            length = max(longest, len(self.waiting[0].request.prompt_ids))
            if admitted and length * (len(admitted) + 1) > self.max_batch_tokens:
                break
            admitted.append(self.waiting.popleft())
            longest = length
        return admitted

    def drop_cancelled(self) -> list[Sequence]:
        cancelled = [s for s in self.waiting if s.cancelled]
        if cancelled:
            self.waiting = deque(s for s in self.waiting if not s.cancelled)
        return cancelled
