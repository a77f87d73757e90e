"""One request's state from submission to its last token, and the events it sends back to its client."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from server.adapters.combination import Combination
from server.engine.constraints import Constraint, Grammar
from server.engine.output import GeneratedText
from server.engine.sampling import SamplingParams, TokenChooser


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    adapters: Combination
    params: SamplingParams
    timeout: float | None = None  # seconds from submission, queue included
    grammar: Grammar | None = None  # what the output is constrained to, compiled
    tenant: str = ""  # auth.Tenant.identity: cached prefixes are never shared across tenants


@dataclass(frozen=True)
class TokenEvent:
    index: int  # 0 for the first generated token
    token: int
    logprob: float
    final: bool  # the sequence finished with this token
    text: str = ""  # what the token adds to the answer (held text comes with a later token)


@dataclass(frozen=True)
class _Done:
    error: BaseException | None = None


@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    chooser: TokenChooser
    tokenizer: object
    eos_ids: frozenset[int]
    events: asyncio.Queue  # read by the client's event loop
    outbox: EventOutbox  # written by the engine
    slots: tuple[int, ...] = ()  # the loaded adapters' slots in canonical order, once admitted
    weights: tuple[float, ...] = ()  # their weights, slot for slot
    loaded: list = field(default_factory=list)  # the LoadedAdapters it holds while running
    cache_scope: bytes | None = None  # once admitted: what its cached prefix blocks are shared within (None: not)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    alternatives: list[list[tuple[int, float]]] = field(default_factory=list)  # top logprobs per token, if asked
    prompt_logprobs: list[float | None] | None = None  # if asked; None for the first prompt token
    prompt_alternatives: list[list[tuple[int, float]]] | None = None  # with prompt_logprobs: the top ones, per token
    finish_reason: str | None = None  # length | eos_token | stop_sequence
    stop_sequence: str | None = None  # the one that ended the text
    texts: list[str] = field(default_factory=list)  # what each token added to the answer: they add up to `text`
    text: str = ""  # set when finished (as TGI returns it: ending with the stop sequence that ended it)
    cancelled: bool = False  # set by the client's side, read by the engine at the next step
    submitted_at: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    constraint: Constraint | None = field(init=False)  # where the output is in its grammar, if constrained

    def __post_init__(self) -> None:
        self.constraint = self.request.grammar.constraint() if self.request.grammar else None
        # a constrained answer is the text its grammar checked: no clean-up of spaces (" ." -> ".") after it
        clean_up = False if self.constraint is not None else None
        self._output = GeneratedText(self.tokenizer, self.request.params.stop, clean_up)

    def expired(self, now: float) -> bool:
        return self.request.timeout is not None and now - self.submitted_at > self.request.timeout

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_ids) + len(self.tokens)

    def append(self, token: int, logprob: float, alternatives: list[tuple[int, float]] | None = None) -> None:
        if not self.tokens:
            self.first_token_at = time.monotonic()
        self.tokens.append(token)
        self.logprobs.append(logprob)
        self.alternatives.append(alternatives or [])
        params = self.request.params
        if self.constraint is not None:
            self.constraint.advance(token)  # raises for a token the grammar forbids: this row fails
        text = self._output.add(token)
        if token in self.eos_ids and not params.ignore_eos:
            self.finish_reason = "eos_token"
        elif self._output.stop_sequence is not None:
            self.finish_reason, self.stop_sequence = "stop_sequence", self._output.stop_sequence
        elif self.constraint is not None and self.constraint.finished:
            self.finish_reason = "eos_token"  # the grammar is complete: nothing but the end may follow
        elif len(self.tokens) >= params.max_new_tokens:
            self.finish_reason = "length"
        if self.finished:
            text += self._output.finish()
            self.text = self._output.text
        self.texts.append(text)
        self._send(TokenEvent(len(self.tokens) - 1, token, logprob, self.finished, text))
        if self.finished:
            self.finished_at = time.monotonic()
            self._send(_Done())

    def end_unextended(self) -> None:
        """A request for no new tokens (a prompt to score) ends once its prompt is scored."""
        self.finish_reason = "length"
        self.finished_at = time.monotonic()
        self._send(_Done())

    def fail(self, error: BaseException) -> None:
        self.finished_at = time.monotonic()
        self._send(_Done(error))

    def _send(self, event) -> None:
        self.outbox.put(self.events, event)


class EventOutbox:
    """Events for clients, collected during an engine step and handed to their event loop in one call: one
    wake-up per step rather than one per token."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._pending: list[tuple[asyncio.Queue, object]] = []
        self._lock = threading.Lock()

    def put(self, queue: asyncio.Queue, event) -> None:
        with self._lock:
            self._pending.append((queue, event))

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        if pending and not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(_deliver, pending)
            except RuntimeError:  # the loop closed meanwhile: nobody is listening
                pass


def _deliver(pending: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, event in pending:
        queue.put_nowait(event)


class RequestHandle:
    """The client's side of a submitted request: its token stream, its result, and cancellation."""

    def __init__(self, seq: Sequence, wake):
        self.seq = seq
        self._wake = wake

    async def stream(self) -> AsyncIterator[TokenEvent]:
        """Tokens as they are generated; raises the request's error if it fails."""
        while True:
            event = await self.seq.events.get()
            if isinstance(event, TokenEvent):
                yield event
            elif event.error is not None:
                raise event.error
            else:
                return

    async def result(self) -> Sequence:
        async for _ in self.stream():
            pass
        return self.seq

    def cancel(self) -> None:
        if not self.seq.finished_at:
            self.seq.cancelled = True
            self._wake()
