"""What the API routes share: the server's state and the request's tenant, waiting for a request while watching its
client, the headers of a result, and server-sent events."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from fastapi import Request
from fastapi.responses import StreamingResponse

from server.adapters.combination import Combination
from server.adapters.store import TypeNotKnown, without_fetching
from server.api import validation
from server.api.errors import error_body
from server.auth import Tenant
from server.engine.sequence import GenerationRequest, RequestHandle, Sequence
from server.errors import ClientDisconnected, MixserveError
from server.state import ServerState

log = logging.getLogger(__name__)

DISCONNECT_POLL_SECONDS = 0.1
KEEP_ALIVE_SECONDS = 2.0  # a started stream's longest silence: a balancer's inactivity timeout (30 s) never cuts it
MOUNT_THREADS = 4  # per mounted source: how many of its adapters may be fetched at once
_mount_pools: dict[str, ThreadPoolExecutor] = {}
_flights: dict[tuple[object, str], asyncio.Future] = {}  # (the store, a mounted adapter) -> its fetch under way


def state_of(request: Request) -> ServerState:
    return request.app.state.mixserve


def tenant_of(request: Request) -> Tenant:
    """Who the request acts for, as the Authenticate middleware found it from the API key."""
    return request.state.tenant


async def combination(
    state: ServerState, tenant: Tenant, sources: dict[str, list[tuple[str, float]] | None]
) -> Combination:
    """validation.combination on the event loop, where it never fetches: configs are read from local disk (small
    files), and a mounted adapter whose type is known only by fetching it (checked first: names, the tenant, the
    limit) is fetched in a pool of its mount's own, once however many requests wait for it, then parsed again. A
    slow or hung source holds up only the requests that name its adapters, and one slow adapter one thread of its
    mount's pool, never the others' fetches."""
    fetched = set()
    while True:
        try:
            with without_fetching():
                return validation.combination(state, tenant, sources)
        except TypeNotKnown as unknown:
            name = unknown.name
        if name in fetched:  # fetched, yet still unknown: a bug, not a reason to fetch forever
            raise RuntimeError(f"adapter {name!r}: its type is still not known once fetched")
        fetched.add(name)
        await _fetch(state, name)


async def _fetch(state: ServerState, name: str) -> None:
    key = (state.store, name)
    flight = _flights.get(key)
    if flight is None:
        mount = state.store.remote.mount(name).name
        if mount not in _mount_pools:
            _mount_pools[mount] = ThreadPoolExecutor(MOUNT_THREADS, thread_name_prefix=f"mount {mount}")
        flight = asyncio.get_running_loop().run_in_executor(_mount_pools[mount], state.store.peft_type, name)
        _flights[key] = flight
        flight.add_done_callback(lambda _: _flights.pop(key, None))
    await asyncio.wait({flight})  # a request that goes away leaves the fetch to the others
    error = flight.exception()
    if error is not None:  # each request its own exception: one object raised in several would share a traceback
        again = type(error).__new__(type(error), *error.args)
        again.__dict__.update(error.__dict__)
        raise again


async def until_done(handle: RequestHandle, request: Request) -> Sequence:
    """The request's result; if the client disconnects first, its row is freed at the engine's next step."""
    try:
        return await while_connected(handle.result(), request)
    finally:
        handle.cancel()


async def while_connected(awaitable, request: Request):
    """awaitable's result, or ClientDisconnected (and awaitable cancelled) if the client disconnects first."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientDisconnected("the client closed the connection")
    finally:
        task.cancel()


def request_headers(gen: GenerationRequest) -> dict[str, str]:
    """Known before generation: also sent on streamed responses."""
    return {"x-adapters": str(gen.adapters), "x-prompt-tokens": str(len(gen.prompt_ids))}


def result_headers(seq: Sequence) -> dict[str, str]:
    """TGI's timing headers (milliseconds) and token counts, with the canonical combination."""
    queue = (seq.admitted_at or seq.submitted_at) - seq.submitted_at
    inference = (seq.finished_at or seq.submitted_at) - (seq.admitted_at or seq.submitted_at)
    per_token = inference / len(seq.tokens) if seq.tokens else 0.0
    return {
        **request_headers(seq.request),
        "x-queue-time": f"{queue * 1e3:.0f}",
        "x-inference-time": f"{inference * 1e3:.0f}",
        "x-time-per-token": f"{per_token * 1e3:.0f}",
        "x-generated-tokens": str(len(seq.tokens)),
    }


async def _kept_alive(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Each event as a `data:` line, and an SSE comment (which clients ignore) after each KEEP_ALIVE_SECONDS without
    one: a stream paused (preempted, or behind a long prefill) is never idle long enough for a proxy to cut it."""
    pending = None
    try:
        while True:
            pending = pending or asyncio.ensure_future(anext(events, None))
            done, _ = await asyncio.wait({pending}, timeout=KEEP_ALIVE_SECONDS)
            if not done:
                yield ": keep-alive\n\n"
                continue
            event, pending = pending.result(), None
            if event is None:
                return
            yield f"data: {event}\n\n"
    finally:
        if pending is not None:
            pending.cancel()


async def event_stream(
    request: Request, events: AsyncIterator[str], handles, headers: dict[str, str], openai: bool
) -> StreamingResponse:
    """Each of `events` (JSON text) as a server-sent `data:` event, then OpenAI's `[DONE]` if `openai`. The status
    line and headers go out with the first token: until then the request fails as a non-streamed one does (an error
    status, which a load balancer may retry on another replica); after it, an error ends the stream with an event in
    the routes' error shape, and a silence of KEEP_ALIVE_SECONDS gets a comment line. The handles are cancelled when
    the stream ends, which frees their rows if the client went away."""
    events = aiter(events)
    early: list[str] = []  # events before the first token (OpenAI's role chunk, an echo): sent with it
    ended = False
    try:
        while not ended and not any(handle.seq.first_token_at for handle in handles):
            event = await while_connected(anext(events, None), request)
            if event is None:
                ended = True
            else:
                early.append(event)
    except BaseException:
        for handle in handles:
            handle.cancel()
        raise

    async def body() -> AsyncIterator[str]:
        try:
            for event in early:
                yield f"data: {event}\n\n"
            if not ended:
                async for event in _kept_alive(events):
                    yield event
            if openai:
                yield "data: [DONE]\n\n"
        except MixserveError as exc:
            yield f"data: {json.dumps(error_body(openai, exc.status_code, exc.message, exc.error_type))}\n\n"
        except Exception as exc:  # as the routes' handler of unexpected errors does: logged, and a 500 event
            ids = ", ".join(handle.seq.request.request_id for handle in handles)
            log.exception("request %s (%s): its stream failed", ids, headers.get("x-adapters", ""))
            body = error_body(openai, 500, f"internal error: {type(exc).__name__}", "internal")
            yield f"data: {json.dumps(body)}\n\n"
        finally:
            for handle in handles:
                handle.cancel()

    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)
