"""The engine: handlers submit requests; one worker thread owns the model and runs iteration-level batching.

Each step: drop what clients cancelled, admit waiting requests (their adapters made resident), prefill them,
then decode one token for every running sequence. Requests join and leave the batch between steps.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
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
from server.errors import MixserveError, Overloaded, RequestTimeout, ShuttingDown

log = logging.getLogger(__name__)
IDLE_POLL_SECONDS = 0.05  # with nothing running: how often waiting requests look at loads again


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
        registry.wake = lambda: self._inbox.put(None)
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

    def waiting_adapters(self) -> set[str]:
        with self._lock:
            return set(self._waiting_adapters)

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
        self.registry.close()

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
        stalled = False  # the last step found nothing it could run
        while True:
            self._take_inbox(block=not self.runner.rows and (stalled or not self.scheduler.waiting))
            if self._stopping:
                self._abandon_all()
                self._flush()
                return
            try:
                with torch.inference_mode():
                    stalled = not self.step()
            except Exception:  # a bug in a step: fail the requests it touched, keep serving
                touched = list(dict.fromkeys([*self._admitted, *self.runner.rows]))
                log.exception("engine step failed; failing %d requests", len(touched))
                self.runner.rows.clear()
                for seq in touched:  # the details are in the log: the error may be about any of them
                    self._retire(seq, MixserveError("internal error; the request was not completed"))
                self._admitted = []
            self._flush()

    def _take_inbox(self, block: bool) -> None:
        """New requests and calls; blocks (briefly, if requests wait on loads) when there is nothing to run."""
        try:
            item = self._inbox.get(timeout=IDLE_POLL_SECONDS) if block else self._inbox.get_nowait()
            while True:
                if isinstance(item, Sequence):
                    self.scheduler.add(item)
                elif item is not None:
                    self._run_call(*item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _run_call(self, fn, future: concurrent.futures.Future) -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:  # handed to the caller
            future.set_exception(exc)

    def step(self) -> bool:
        """One iteration; False when it had nothing to run."""
        self.registry.poll()
        now = time.monotonic()
        for seq in self.scheduler.drop_abandoned(now):
            self._dequeued(seq)
            seq.fail(_abandoned(seq))
        for seq in [s for s in self.runner.rows if s.cancelled or s.expired(now)]:
            log.info("request %s abandoned after %d tokens", seq.request.request_id, len(seq.tokens))
            self._retire(seq, _abandoned(seq))

        self._admitted, failed = self.scheduler.admit(len(self.runner.rows), self._ready)
        for seq, error in failed:
            self._dequeued(seq)
            self._refuse(seq, error)
        for seq in self._admitted:
            self._dequeued(seq)
        if self._admitted:
            self._score_prompts([s for s in self._admitted if s.request.params.prompt_logprobs])
            self._admitted = [s for s in self._admitted if s.finished_at is None]  # scoring may fail some
        if self._admitted:
            prefilled, logits = self._prefill(self._admitted)
            if prefilled:
                self._sample(prefilled, logits)
            self.passes["prefill"] += 1
            self._flush()  # first tokens out before the decode pass
        admitted, self._admitted = bool(self._admitted), []
        if not self.runner.rows:
            return admitted
        logits = self._decode()
        if logits is not None:
            self._sample(list(self.runner.rows), logits)
        self.passes["decode"] += 1
        return True

    def _prefill(self, seqs: list[Sequence]) -> tuple[list[Sequence], torch.Tensor | None]:
        """Prefills seqs; when the pass fails, each alone, so that only requests whose own pass fails are failed.
        Returns those prefilled, with their logits."""
        try:
            return seqs, self.runner.prefill(seqs)
        except Exception as exc:
            if len(seqs) == 1:
                self._fail_row(seqs[0], exc)
                return [], None
            log.warning("prefill of %d requests failed (%s); prefilling each alone", len(seqs), exc)
        outcomes = [self._prefill([seq]) for seq in seqs]
        logits = [rows for _, rows in outcomes if rows is not None]
        return [seq for kept, _ in outcomes for seq in kept], torch.cat(logits) if logits else None

    def _decode(self) -> torch.Tensor | None:
        """A decode pass. When it fails, each row's tokens are run alone (without the cache) to find the rows
        that fail by themselves; those are failed and the rest decoded again. If that fails too, the step's
        error handler fails the batch."""
        try:
            return self.runner.decode()
        except Exception as exc:
            log.warning("decode of %d rows failed (%s); checking each row alone", len(self.runner.rows), exc)
        for seq in list(self.runner.rows):
            try:
                self.runner.score(torch.tensor([seq.request.prompt_ids + seq.tokens]), [seq.slots])
            except Exception as exc:
                self._fail_row(seq, exc)
        return self.runner.decode() if self.runner.rows else None

    def _refuse(self, seq: Sequence, error: Exception) -> None:
        """A request whose adapters could not be made ready: the adapters' own error, or for an unexpected one a
        generic message (its text may hold server paths), the details logged with the request's id."""
        if isinstance(error, MixserveError):
            log.info("request %s: %s", seq.request.request_id, error.message)
            seq.fail(error)
            return
        log.error(
            "request %s with [%s]: preparing its adapters failed: %s: %s",
            seq.request.request_id,
            "+".join(seq.request.adapters),
            type(error).__name__,
            error,
            exc_info=error,
        )
        seq.fail(MixserveError(f"internal error preparing this request's adapters: {type(error).__name__}"))

    def _fail_row(self, seq: Sequence, exc: Exception) -> None:
        log.error(
            "request %s with [%s]: failed at token %d: %s: %s",
            seq.request.request_id,
            "+".join(seq.adapters),
            len(seq.tokens),
            type(exc).__name__,
            exc,
            exc_info=exc,
        )
        self._retire(seq, MixserveError(f"internal error computing this request: {type(exc).__name__}"))

    def _ready(self, seq: Sequence, protected: set[str]) -> bool:
        """Makes seq's adapters resident and takes them; False while one is loading."""
        adapters = self.registry.resolve(seq.request.adapters, protected)
        if adapters is None:
            return False
        self.registry.acquire(adapters)
        seq.loaded = adapters
        seq.adapters = [a.name for a in adapters]
        seq.slots = tuple(a.slot for a in adapters)
        seq.admitted_at = time.monotonic()
        return True

    def call(self, fn) -> concurrent.futures.Future:
        """Runs fn on the engine's thread at the next step boundary (for what touches the model)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put((fn, future))
        return future

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        # logits: [len(seqs), vocab]
        logits = logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        greedy = logits.argmax(dim=-1).tolist()
        for row, seq in enumerate(seqs):
            try:
                if seq.chooser.plain_greedy:
                    token = greedy[row]
                else:
                    token = seq.chooser.choose(logits[row : row + 1], seq.request.prompt_ids + seq.tokens)
                alternatives = []
                if k := seq.request.params.top_logprobs:
                    values, ids = logprobs[row].topk(k)
                    alternatives = list(zip(ids.tolist(), values.tolist(), strict=True))
                seq.append(token, float(logprobs[row, token]), alternatives)
            except Exception as exc:  # this row's sampling or decoding: fail it, not the batch
                self._fail_row(seq, exc)
                continue
            if seq.finished:
                self._retire(seq)
                self.on_finished(seq)
                log.info(
                    "request %s: %d tokens with [%s] (%s)",
                    seq.request.request_id,
                    len(seq.tokens),
                    "+".join(seq.adapters),
                    seq.finish_reason,
                )

    def _score_prompts(self, seqs: list[Sequence]) -> None:
        """The logprob of each prompt token given those before it, for requests that ask (one extra pass each).
        A request whose pass fails is failed alone."""
        for seq in seqs:
            ids = seq.request.prompt_ids
            try:
                scores = self.runner.score(torch.tensor([ids]), [seq.slots])[0]
                logprobs = torch.log_softmax(scores.float(), dim=-1)
                seq.prompt_logprobs = [None] + logprobs[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
            except Exception as exc:
                self._fail_row(seq, exc)

    def _retire(self, seq: Sequence, error: BaseException | None = None) -> None:
        """seq leaves the batch: its row and its adapters are freed."""
        if seq in self.runner.rows:
            self.runner.release(seq)
        self.registry.release(seq.loaded)
        seq.loaded = []
        if error is not None:
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
        for seq in list(self.runner.rows):
            self._retire(seq, error)


def _abandoned(seq: Sequence) -> BaseException:
    if seq.cancelled:
        return asyncio.CancelledError()
    return RequestTimeout(f"the request took over {seq.request.timeout:g} s (MIXSERVE_REQUEST_TIMEOUT); cancelled")


def _eos_ids(model, tokenizer) -> set[int]:
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids = set(configured if isinstance(configured, list) else [configured])
    ids.add(tokenizer.eos_token_id)
    return {i for i in ids if i is not None}
