"""The engine: handlers submit requests; one worker thread owns the model and runs iteration-level batching.

Each step: drop what clients cancelled, admit waiting requests (their adapters made resident), prefill them,
then decode one token for every running sequence. Requests join and leave the batch between steps.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time

import torch

from server.adapters.registry import AdapterRegistry
from server.engine.runner import ModelRunner
from server.engine.sampling import TokenChooser
from server.engine.scheduler import Scheduler
from server.engine.sequence import EventOutbox, GenerationRequest, RequestHandle, Sequence
from server.errors import MixserveError, Overloaded, ShuttingDown

log = logging.getLogger(__name__)


class Engine:
    def __init__(
        self,
        model,
        tokenizer,
        registry: AdapterRegistry,
        max_batch_size: int = 32,
        max_batch_tokens: int = 4096,
        max_queue: int = 256,
    ):
        self.tokenizer = tokenizer
        self.registry = registry
        self.runner = ModelRunner(model, registry.context)
        self.scheduler = Scheduler(max_batch_size, max_batch_tokens)
        self.max_queue = max_queue
        self.eos_ids = frozenset(_eos_ids(model, tokenizer))
        self._inbox: queue.SimpleQueue[Sequence | None] = queue.SimpleQueue()
        self._queued = 0  # submitted, not yet admitted: what MIXSERVE_MAX_QUEUE bounds
        self._waiting_adapters: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._stopping = False
        self._admitted: list[Sequence] = []  # admitted in the current step, not yet running
        self._outboxes: dict[asyncio.AbstractEventLoop, EventOutbox] = {}
        self.passes = {"prefill": 0, "decode": 0}  # forward passes run, by kind
        self.on_finished = lambda seq: None  # a hook for metrics: called on the engine thread
        self._thread = threading.Thread(target=self._loop, name="mixserve-engine", daemon=True)

    @property
    def model(self):
        return self.runner.model

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def running(self) -> int:
        return len(self.runner.rows)

    def adapters_in_use(self) -> tuple[list[str], list[str]]:
        """Names of the adapters of running requests, and of waiting ones (from any thread)."""
        running = {name for seq in list(self.runner.rows) for name in seq.adapters}
        with self._lock:
            waiting = set(self._waiting_adapters)
        return sorted(running), sorted(waiting)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._inbox.put(None)
        self._thread.join()

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queues a request (from the event loop's thread); raises Overloaded when the queue is full."""
        with self._lock:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if self._queued >= self.max_queue:
                raise Overloaded(f"{self._queued} requests are waiting (MIXSERVE_MAX_QUEUE); retry shortly")
            self._queued += 1
            self._waiting_adapters.update(request.adapters)
        seq = Sequence(
            request=request,
            chooser=TokenChooser(request.params, self.runner.device, len(request.prompt_ids)),
            tokenizer=self.tokenizer,
            eos_ids=self.eos_ids,
            events=asyncio.Queue(),
            outbox=self._outbox(asyncio.get_running_loop()),
        )
        self._inbox.put(seq)
        return RequestHandle(seq, wake=lambda: self._inbox.put(None))

    def _outbox(self, loop: asyncio.AbstractEventLoop) -> EventOutbox:
        with self._lock:
            if loop not in self._outboxes:
                self._outboxes[loop] = EventOutbox(loop)
            return self._outboxes[loop]

    def _flush(self) -> None:
        with self._lock:
            for loop in [loop for loop in self._outboxes if loop.is_closed()]:
                del self._outboxes[loop]
            outboxes = list(self._outboxes.values())
        for outbox in outboxes:
            outbox.flush()

    async def generate(self, request: GenerationRequest) -> Sequence:
        handle = self.submit(request)
        try:
            return await handle.result()
        finally:
            handle.cancel()  # no-op once finished; frees the row if the caller went away

    # --- the worker thread

    def _loop(self) -> None:
        while True:
            busy = bool(self.scheduler.waiting or self.runner.rows)
            self._take_inbox(block=not busy)
            if self._stopping:
                self._abandon_all()
                self._flush()
                return
            try:
                with torch.inference_mode():
                    self.step()
            except Exception as exc:  # a bug in a step: fail the requests it touched, keep serving
                touched = list(dict.fromkeys([*self._admitted, *self.runner.rows]))
                log.exception("engine step failed; failing %d requests", len(touched))
                self.runner.rows.clear()
                for seq in touched:
                    seq.fail(MixserveError(f"internal error: {exc}"))
            self._flush()

    def _take_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(block=block)
            while True:
                if item is not None:
                    self.scheduler.add(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def step(self) -> None:
        for seq in self.scheduler.drop_cancelled():
            self._dequeued(seq)
            seq.fail(asyncio.CancelledError())
        for seq in [s for s in self.runner.rows if s.cancelled]:
            log.info("request %s cancelled after %d tokens", seq.request.request_id, len(seq.tokens))
            self._release(seq, asyncio.CancelledError())

        self._admitted = []
        for seq in self.scheduler.admit(len(self.runner.rows)):
            self._dequeued(seq)
            if self._attach_adapters(seq):
                self._admitted.append(seq)
        if self._admitted:
            self._score_prompts([s for s in self._admitted if s.request.params.prompt_logprobs])
            self._sample(self._admitted, self.runner.prefill(self._admitted))
            self.passes["prefill"] += 1
            self._flush()  # first tokens out before the decode pass
        self._admitted = []
        if self.runner.rows:
            self._sample(list(self.runner.rows), self.runner.decode())
            self.passes["decode"] += 1

    def _attach_adapters(self, seq: Sequence) -> bool:
        seq.admitted_at = time.monotonic()
        try:
            adapters = self.registry.combination(seq.request.adapters)
        except MixserveError as exc:
            log.info("request %s: %s", seq.request.request_id, exc.message)
            seq.fail(exc)
            return False
        except Exception as exc:
            log.exception("request %s: loading adapters %s failed", seq.request.request_id, seq.request.adapters)
            seq.fail(MixserveError(f"internal error while loading adapters: {exc}"))
            return False
        self.registry.touch(adapters)
        seq.adapters = [a.name for a in adapters]
        seq.slots = tuple(a.slot for a in adapters)
        return True

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        # logits: [len(seqs), vocab]
        logits = logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        greedy = logits.argmax(dim=-1).tolist()
        for row, seq in enumerate(seqs):
            if seq.chooser.plain_greedy:
                token = greedy[row]
            else:
                token = seq.chooser.choose(logits[row : row + 1], seq.request.prompt_ids + seq.tokens)
            alternatives = []
            if k := seq.request.params.top_logprobs:
                values, ids = logprobs[row].topk(k)
                alternatives = list(zip(ids.tolist(), values.tolist(), strict=True))
            seq.append(token, float(logprobs[row, token]), alternatives)
            if seq.finished:
                self.runner.release(seq)
                self.on_finished(seq)
                log.info(
                    "request %s: %d tokens with [%s] (%s)",
                    seq.request.request_id,
                    len(seq.tokens),
                    "+".join(seq.adapters),
                    seq.finish_reason,
                )

    def _score_prompts(self, seqs: list[Sequence]) -> None:
        """The logprob of each prompt token given those before it, for requests that ask (one extra pass)."""
        for seq in seqs:
            ids = seq.request.prompt_ids
            logprobs = torch.log_softmax(self.runner.score(torch.tensor([ids]), [seq.slots])[0].float(), dim=-1)
            seq.prompt_logprobs = [None] + logprobs[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()

    def _release(self, seq: Sequence, error: BaseException) -> None:
        self.runner.release(seq)
        seq.fail(error)

    def _dequeued(self, seq: Sequence) -> None:
        with self._lock:
            self._queued -= 1
            self._waiting_adapters.subtract(seq.request.adapters)
            self._waiting_adapters = +self._waiting_adapters  # drop names no longer waiting

    def _abandon_all(self) -> None:
        self._take_inbox(block=False)
        error = ShuttingDown("the server is shutting down")
        for seq in list(self.scheduler.waiting):
            seq.fail(error)
        for seq in self.runner.rows:
            seq.fail(error)
        self.runner.rows.clear()


def _eos_ids(model, tokenizer) -> set[int]:
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids = set(configured if isinstance(configured, list) else [configured])
    ids.add(tokenizer.eos_token_id)
    return {i for i in ids if i is not None}
