"""The engine: handlers submit requests; one worker thread owns the model and runs iteration-level batching.

Each step: schedule (drop what clients cancelled, admit waiting requests whose adapters are resident and whose
prompts fit in the KV cache), run (prefill the admitted, each after the blocks of its prefix that an earlier request
of the same tenant, adapters, versions and weights left cached; then decode one token for every running sequence,
preempting the youngest while the cache lacks a block for that), postprocess (sample, append, retire the finished).
Requests join and leave the batch between steps; a preempted one waits first in line and, readmitted, recomputes
its prompt and tokens: its stream goes on where it was.
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

from server.adapters.modules import check_combination
from server.adapters.registry import AdapterRegistry
from server.engine.fatal import device_fatal, exit_soon, raise_if_device_fatal
from server.engine.passes import IsolatedPasses
from server.engine.runner import DEFAULT_SEQUENCE_TOKENS, ModelRunner
from server.engine.sampling import TokenChooser, sample
from server.engine.scheduler import Scheduler
from server.engine.sequence import EventOutbox, GenerationRequest, RequestHandle, Sequence
from server.errors import MixserveError, Overloaded, RequestTimeout, ShuttingDown
from server.model import tokenizer_ids

log = logging.getLogger(__name__)
IDLE_POLL_SECONDS = 0.05  # with nothing running: how often waiting requests look at loads again


class Inbox:
    """What reaches the engine's thread from others: new requests, calls to run there, and wake-ups (None)."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()

    def put(self, item) -> None:
        self._queue.put(item)

    def wake(self) -> None:
        self._queue.put(None)

    def get(self, timeout: float = 0):
        """The next item; raises queue.Empty after timeout seconds (at once by default)."""
        return self._queue.get(timeout=timeout)


class Engine:
    def __init__(
        self,
        model,
        tokenizer,
        registry: AdapterRegistry,
        inbox: Inbox,
        *,
        max_batch_size: int = 32,
        max_batch_tokens: int = 4096,
        max_queue: int = 256,
        kv_cache_memory: int | float | None = None,
        max_sequence_tokens: int | None = None,
        prefix_cache: bool = True,
        paged_attention: bool = False,
        on_finished=lambda seq: None,
        on_fatal=lambda reason: exit_soon(),
    ):
        """inbox: the one the registry wakes (`AdapterRegistry(wake=inbox.wake)`); kv_cache_memory: the KV cache's
        budget (bytes, or a fraction of free GPU memory); max_sequence_tokens: the longest a request may be, which
        the cache must hold; prefix_cache: whether a request reuses the cached blocks of an earlier one's prefix (same
        tenant, adapters, versions and weights); paged_attention: whether long decode passes read the cache in place
        (server/engine/paged_attention.py); on_finished(seq): for metrics, called on the engine's thread;
        on_fatal(reason): once, after a device error that no request caused (server/engine/fatal.py)."""
        self.tokenizer = tokenizer
        self.registry = registry
        default_tokens = max_batch_size * (max_sequence_tokens or DEFAULT_SEQUENCE_TOKENS)
        self.runner = ModelRunner(
            model,
            registry.context,
            kv_cache_memory,
            default_tokens,
            prefix_cache,
            paged_rows=max_batch_size if paged_attention else None,
        )
        capacity = self.runner.cache.capacity_tokens
        if max_sequence_tokens is not None and capacity < max_sequence_tokens:
            raise RuntimeError(
                f"MIXSERVE_KV_CACHE_MEMORY holds {capacity} tokens, less than one request may need"
                f" ({max_sequence_tokens}: MIXSERVE_MAX_INPUT_TOKENS + MIXSERVE_MAX_NEW_TOKENS)"
            )
        self.scheduler = Scheduler(max_batch_size, max_batch_tokens)
        self.max_queue = max_queue
        self.eos_ids = frozenset(_eos_ids(model, tokenizer))
        self.tokenizer_ids = tokenizer_ids(tokenizer, self.eos_ids)
        self.passes = IsolatedPasses(self.runner, self._fail_row, self._end_unextended, self.tokenizer_ids)
        self.on_finished = on_finished
        self.on_fatal = on_fatal
        self.broken: str | None = None  # the device error that stopped the engine
        self._inbox = inbox
        self._queued = 0  # submitted, not yet admitted: what MIXSERVE_MAX_QUEUE bounds
        self._waiting_adapters: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._stopping = False
        self._admitted: list[Sequence] = []  # admitted in the current step, not yet running
        self._preempted: set[Sequence] = set()  # waiting again, holding their adapters
        self.preemptions = 0
        self.progress_at = time.monotonic()  # each turn of the loop: a step that never ends leaves it behind
        self._outboxes: dict[asyncio.AbstractEventLoop, EventOutbox] = {}
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

    @property
    def alive(self) -> bool:
        """Whether the loop's thread runs (or has not been started, or was stopped): False once it died of an error."""
        return self._thread.is_alive() or self._stopping or self._thread.ident is None

    def stalled_for(self, now: float) -> float:
        """Seconds since the loop last turned while it has requests (0 without): a stuck step (from any thread)."""
        return now - self.progress_at if self.running or self._queued else 0.0

    def abandon(self) -> None:
        """Every request waiting or running fails with ShuttingDown, at the next step boundary (a drain's end)."""
        self.call(self._abandon_all)

    def waiting_adapters(self) -> set[str]:
        with self._lock:
            return set(self._waiting_adapters)

    def adapters_in_use(self) -> tuple[list[str], list[str]]:
        """Names of the adapters of running requests, and of waiting ones (from any thread)."""
        running = {name for seq in list(self.runner.rows) for name in seq.request.adapters.names}
        with self._lock:
            waiting = set(self._waiting_adapters)
        return sorted(running), sorted(waiting)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._inbox.wake()
        self._thread.join()
        self.registry.close()

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queues a request (from the event loop's thread); raises Overloaded when the queue is full."""
        with self._lock:
            if self._stopping or self.broken:
                raise ShuttingDown("the server is shutting down" if self._stopping else self._broken_message())
            if self._queued >= self.max_queue:
                raise Overloaded(f"{self._queued} requests are waiting (MIXSERVE_MAX_QUEUE); retry shortly")
            self._queued += 1
            self._waiting_adapters.update(request.adapters.names)
        seq = Sequence(
            request=request,
            chooser=TokenChooser(request.params, len(request.prompt_ids)),
            tokenizer=self.tokenizer,
            eos_ids=self.eos_ids,
            events=asyncio.Queue(),
            outbox=self._outbox(asyncio.get_running_loop()),
        )
        with self._lock:  # a device error meanwhile: its handler drains the inbox after marking the engine broken
            taken = not self.broken
            if taken:
                self._inbox.put(seq)
        if not taken:
            raise ShuttingDown(self._broken_message())
        return RequestHandle(seq, wake=self._inbox.wake)

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
            self.progress_at = time.monotonic()
            self._take_inbox(block=not self.runner.rows and (stalled or not self.scheduler.waiting))
            if self._stopping:
                self._abandon_all()
                self._flush()
                return
            try:
                with torch.inference_mode():
                    stalled = not self.step()
            except Exception as exc:  # a bug in a step: fail the requests it touched, keep serving
                if device_fatal(exc):
                    self._stop_on_device_error(exc)
                    return
                touched = list(dict.fromkeys([*self._admitted, *self.runner.rows]))
                log.exception("engine step failed; failing %d requests", len(touched))
                for seq in touched:  # the details are in the log: the error may be about any of them
                    self._retire(seq, MixserveError("internal error; the request was not completed"))
                self._admitted = []
            self._flush()

    def _take_inbox(self, block: bool) -> None:
        """New requests and calls; blocks (briefly, if requests wait on loads) when there is nothing to run."""
        try:
            item = self._inbox.get(IDLE_POLL_SECONDS if block else 0)
            while True:
                if isinstance(item, Sequence):
                    self.scheduler.add(item)
                elif item is not None:
                    self._run_call(*item)
                item = self._inbox.get()
        except queue.Empty:
            pass

    def _run_call(self, fn, future: concurrent.futures.Future) -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:  # handed to the caller
            future.set_exception(exc)

    def step(self) -> bool:
        """One iteration: schedule, run, postprocess. False when it had nothing to run."""
        self.registry.poll()
        self._leave(*self.scheduler.abandoned(self.runner.rows, time.monotonic()))
        self._admitted, refused = self.scheduler.admit(len(self.runner.rows), self._ready, self.runner.cache.pool)
        self._join(self._admitted, refused)
        admitted = bool(self._admitted)
        if admitted:
            self._postprocess(*self.passes.prefill(self._admitted))
            self._flush()  # first tokens out before the decode pass
        self._admitted = []
        self._make_room()
        decoding = bool(self.runner.rows)
        if decoding:
            self._postprocess(*self.passes.decode())
        return admitted or decoding

    def _make_room(self) -> None:
        """The youngest running sequences are preempted while the cache lacks the blocks the decode needs: their
        blocks freed, they wait first in line, holding their adapters, to be recomputed when readmitted."""
        pool = self.runner.cache.pool
        while self.runner.blocks_to_decode() > pool.free:
            seq = self.runner.rows[-1]  # rows are in admission order
            self.runner.release(seq)
            self._preempted.add(seq)
            self.scheduler.waiting.appendleft(seq)
            with self._lock:
                self._queued += 1
                self._waiting_adapters.update(seq.request.adapters.names)
            self.preemptions += 1
            log.info(
                "request %s preempted after %d tokens: the KV cache has %d free blocks of %d",
                seq.request.request_id,
                len(seq.tokens),
                pool.free,
                pool.total,
            )

    def _leave(self, dropped: list[Sequence], abandoned: list[Sequence]) -> None:
        """Requests cancelled or past their deadline leave the queue or the batch."""
        for seq in dropped:
            self._dequeued(seq)
            if seq in self._preempted:
                self._preempted.discard(seq)
                self._retire(seq, _abandoned(seq))
            else:
                seq.fail(_abandoned(seq))
        for seq in abandoned:
            log.info("request %s abandoned after %d tokens", seq.request.request_id, len(seq.tokens))
            self._retire(seq, _abandoned(seq))

    def _join(self, admitted: list[Sequence], refused: list[tuple[Sequence, Exception]]) -> None:
        """Requests leave the queue: the refused failed, the admitted about to run."""
        for seq, error in refused:
            self._dequeued(seq)
            self._preempted.discard(seq)  # a preempted one gives back the adapters it held
            self.registry.release(seq.loaded)
            seq.loaded = []
            self._refuse(seq, error)
        for seq in admitted:
            self._dequeued(seq)

    def _postprocess(self, seqs: list[Sequence], logits: torch.Tensor | None) -> None:
        """Each row's next token appended (its events sent); finished rows retired."""
        if logits is None:
            return
        for seq, choice in zip(seqs, sample(seqs, logits, self.tokenizer_ids), strict=True):
            if isinstance(choice, Exception):
                self._fail_row(seq, choice)
                continue
            try:
                seq.append(choice.token, choice.logprob, choice.alternatives)
            except Exception as exc:  # this row's decoding: fail it, not the batch
                self._fail_row(seq, exc)
                continue
            if seq.finished:
                self._finished(seq)

    def _end_unextended(self, seq: Sequence) -> None:
        seq.end_unextended()
        self._finished(seq)

    def _finished(self, seq: Sequence) -> None:
        self._retire(seq)
        self.on_finished(seq)
        log.info(
            "request %s: %d tokens with [%s] (%s)",
            seq.request.request_id,
            len(seq.tokens),
            seq.request.adapters,
            seq.finish_reason,
        )

    def _refuse(self, seq: Sequence, error: Exception) -> None:
        """A request whose adapters could not be made ready: the adapters' own error, or for an unexpected one a
        generic message (its text may hold server paths), the details logged with the request's id."""
        raise_if_device_fatal(error)  # not this request's fault: the step's handler stops the engine
        if isinstance(error, MixserveError):
            log.info("request %s: %s", seq.request.request_id, error.message)
            seq.fail(error)
            return
        log.error(
            "request %s with [%s]: preparing its adapters failed: %s: %s",
            seq.request.request_id,
            seq.request.adapters,
            type(error).__name__,
            error,
            exc_info=error,
        )
        seq.fail(MixserveError(f"internal error preparing this request's adapters: {type(error).__name__}"))

    def _fail_row(self, seq: Sequence, exc: Exception) -> None:
        raise_if_device_fatal(exc)  # not this row's fault: the step's handler stops the engine
        if isinstance(exc, MixserveError) and exc.status_code < 500:  # the request's own (a grammar it cannot meet)
            log.info("request %s: failed at token %d: %s", seq.request.request_id, len(seq.tokens), exc.message)
            self._retire(seq, exc)
            return
        log.error(
            "request %s with [%s]: failed at token %d: %s: %s",
            seq.request.request_id,
            seq.request.adapters,
            len(seq.tokens),
            type(exc).__name__,
            exc,
            exc_info=exc,
        )
        self._retire(seq, MixserveError(f"internal error computing this request: {type(exc).__name__}"))

    def _ready(self, seq: Sequence, protected: set[str]) -> bool:
        """Makes seq's adapters resident and takes them; False while one is loading. A preempted sequence holds its
        own since it first ran (the same versions: a reload meanwhile does not change its stream)."""
        if seq in self._preempted:
            self._preempted.discard(seq)
            return True
        weights = seq.request.adapters.weight
        adapters = self.registry.resolve(
            seq.request.adapters.names,
            protected,
            lambda found: check_combination(found, [weights(a.name) for a in found]),
        )
        if adapters is None:
            return False
        self.registry.acquire(adapters)
        seq.loaded = adapters
        seq.slots = tuple(a.slot for a in adapters)
        seq.weights = tuple(seq.request.adapters.weight(a.name) for a in adapters)
        versions = [(a.name, a.built.version, w) for a, w in zip(adapters, seq.weights, strict=True)]
        seq.cache_scope = repr((seq.request.tenant, versions)).encode()  # what the keys and values depend on
        seq.admitted_at = time.monotonic()
        return True

    def call(self, fn) -> concurrent.futures.Future:
        """Runs fn on the engine's thread at the next step boundary (for what touches the model)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put((fn, future))
        return future

    def _retire(self, seq: Sequence, error: BaseException | None = None) -> None:
        """seq leaves the batch: its row, its cache blocks and its adapters are freed."""
        self.runner.release(seq)
        self.registry.release(seq.loaded)
        seq.loaded = []
        if error is not None:
            seq.fail(error)

    def _dequeued(self, seq: Sequence) -> None:
        with self._lock:
            self._queued -= 1
            self._waiting_adapters.subtract(seq.request.adapters.names)
            self._waiting_adapters = +self._waiting_adapters  # drop names no longer waiting

    def _stop_on_device_error(self, exc: Exception) -> None:
        """The engine stops for good: every request it holds, queued or not yet taken, fails with 503, and
        on_fatal is told. Nothing here touches the device (its context is unusable)."""
        text = str(exc).strip()
        reason = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
        log.critical("device error, no request's fault; failing every request, then exiting: %s", reason, exc_info=exc)
        with self._lock:
            self.broken = reason
        self.on_fatal(reason)  # first: health checks fail before clients hear
        error = ShuttingDown(self._broken_message())
        held = [*self.scheduler.waiting, *self._admitted, *self.runner.rows]
        try:
            while True:
                item = self._inbox.get()
                if isinstance(item, Sequence):
                    held.append(item)
                elif item is not None:
                    item[1].set_exception(error)
        except queue.Empty:
            pass
        for seq in dict.fromkeys(held):
            seq.fail(error)
        self._flush()

    def _broken_message(self) -> str:
        return f"this replica's device failed ({self.broken}); it is being replaced: retry"

    def _abandon_all(self) -> None:
        self._take_inbox(block=False)
        error = ShuttingDown("the server is shutting down")
        while self.scheduler.waiting:
            seq = self.scheduler.waiting.popleft()
            self._dequeued(seq)
            self._preempted.discard(seq)
            self._retire(seq, error)
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
