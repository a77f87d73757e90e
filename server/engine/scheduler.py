"""Who runs next: waiting requests join the running batch first come, first served, within the batch limits."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from server.adapters.registry import NoRoom
from server.engine.kv_cache import BLOCK_SIZE, BlockPool
from server.engine.sequence import Sequence
from server.errors import CacheTooSmall


class Scheduler:
    def __init__(self, max_batch_size: int, max_batch_tokens: int):
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.waiting: deque[Sequence] = deque()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def abandoned(self, running: list[Sequence], now: float) -> tuple[list[Sequence], list[Sequence]]:
        """The requests cancelled by their clients or past their deadline: waiting ones (removed from the queue),
        and running ones (to be retired before others are admitted)."""
        dropped = [s for s in self.waiting if s.cancelled or s.expired(now)]
        if dropped:
            self.waiting = deque(s for s in self.waiting if s not in dropped)
        return dropped, [s for s in running if s.cancelled or s.expired(now)]

    def admit(
        self, running: int, ready: Callable[[Sequence, set[str]], bool], pool: BlockPool
    ) -> tuple[list[Sequence], list[tuple[Sequence, Exception]]]:
        """The oldest waiting requests whose adapters are ready, that fit beside `running` sequences: the batch
        size, a prefill of at most max_batch_tokens (padded) tokens, and the KV cache's free blocks (keeping one
        per running or admitted row for its next decode; a prompt counted as if none of its blocks were cached, which
        bounds what it takes whatever the runner finds cached); and those that failed, with the error (any exception:
        it stays with the request that raised it). A request the whole cache cannot hold fails (CacheTooSmall).

        ready(seq, protected) makes seq's adapters resident and takes them (True), starts their loads (False), or
        raises: NoRoom when memory is short, the load's error when it failed. A request whose adapters are loading
        does not hold up the others; one short of memory does (it is the oldest that fits nothing: later requests
        would keep taking the memory it waits for). protected: adapters that older waiting requests need."""
        admitted: list[Sequence] = []
        failed: list[tuple[Sequence, Exception]] = []
        protected: set[str] = set()
        longest, free = 0, pool.free - running  # a block for each running row's next decode
        for seq in list(self.waiting):
            if running + len(admitted) >= self.max_batch_size:
                break
            length = max(longest, seq.num_tokens)
            if admitted and length * (len(admitted) + 1) > self.max_batch_tokens:
                break
            blocks = pool.missing(seq, seq.num_tokens)
            if blocks > pool.total:
                self.waiting.remove(seq)
                failed.append((seq, CacheTooSmall(seq.num_tokens, pool.total * BLOCK_SIZE)))
                continue
            if blocks > free - len(admitted):
                break
            try:
                if not ready(seq, protected):
                    protected.update(seq.request.adapters.names)
                    continue
            except NoRoom:
                break
            except Exception as exc:
                self.waiting.remove(seq)
                failed.append((seq, exc))
                continue
            self.waiting.remove(seq)
            admitted.append(seq)
            longest, free = length, free - blocks
        return admitted, failed
