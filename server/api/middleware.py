"""The ASGI middleware every request passes, outermost first: RequestContext (its id, timing, metrics, the count of
requests in flight), Authenticate (the API key, before any body is read), LimitBody (the body's size); and `drain`,
which turns new requests away and waits for those in flight before a shutdown."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI
from starlette.datastructures import MutableHeaders

from server.api.errors import error_response
from server.auth import EVERYTHING, OPEN_PATHS, Keyring, Unauthorized
from server.errors import ShuttingDown

log = logging.getLogger(__name__)
REQUEST_ID = re.compile(r"^[\w.:-]{1,128}$")
ABANDON_SECONDS = 5  # after the drain: for the requests stopped then to send their errors
UNCOUNTED = OPEN_PATHS | {"/metrics"}  # probes and scrapes: not in flight for the drain, answered while draining


@dataclass
class Traffic:
    """Requests in flight (streams until their last byte) and whether the server is draining."""

    in_flight: int = 0
    draining: bool = False


async def drain(app: FastAPI, seconds: float) -> None:
    """Stops taking requests (503 with Retry-After) and waits, up to `seconds`, for those in flight to finish."""
    traffic = app.state.traffic
    traffic.draining = True
    log.info("draining: %d requests in flight, waiting up to %.0f s", traffic.in_flight, seconds)
    deadline = time.monotonic() + seconds
    while traffic.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if traffic.in_flight:  # they fail with ShuttingDown: a stream ends with an error event, not cut
        log.warning("drain time over with %d requests in flight; stopping them", traffic.in_flight)
        app.state.mixserve.engine.abandon()
        deadline = time.monotonic() + ABANDON_SECONDS
        while traffic.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)


class RequestContext:
    """Gives every request an id (the client's x-request-id, or a new one), echoes it with the replica and the total
    time, counts the request by route and status, and while draining turns new requests away (503). Answers an
    unexpected error with a 500 itself: Starlette's handler of last resort re-raises, and uvicorn then closes the
    keep-alive connection."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started, status = time.perf_counter(), 500
        app_state = scope["app"].state
        counted = scope["path"] not in UNCOUNTED

        started_response = False

        async def send_with_headers(message):
            nonlocal status, started_response
            if message["type"] == "http.response.start":
                status, started_response = message["status"], True
                headers = MutableHeaders(scope=message)
                headers["x-request-id"] = request_id
                headers["x-replica"] = app_state.replica
                headers["x-total-time"] = f"{(time.perf_counter() - started) * 1e3:.0f}"
            await send(message)

        if counted and app_state.traffic.draining:
            message = "draining: this replica is shutting down; retry"
            response = error_response(scope["path"], 503, message, "unavailable", ShuttingDown.headers)
            return await response(scope, receive, send_with_headers)
        if counted:
            app_state.traffic.in_flight += 1
        try:
            await self.app(scope, receive, send_with_headers)
        except Exception as exc:  # unexpected: a 500 in the routes' shape, the connection kept for the next request
            if started_response:  # a body cut short: only closing the connection tells the client
                raise
            log.exception("request %s: %s %s failed", request_id, scope["method"], scope["path"])
            response = error_response(scope["path"], 500, f"internal error: {type(exc).__name__}", "internal")
            await response(scope, receive, send_with_headers)
        finally:
            if counted:
                app_state.traffic.in_flight -= 1
            metrics = getattr(scope["app"].state, "metrics", None)
            route = scope.get("route")
            if metrics is not None:
                path = route.path if route is not None else "unmatched"
                metrics.requests.labels(path, str(status)).inc()
                metrics.request_seconds.labels(path).observe(time.perf_counter() - started)


class Authenticate:
    """With API keys configured, every route but OPEN_PATHS needs a valid key (401 otherwise); the request's tenant
    (server.auth.Tenant) is put in request.state.tenant for the routes to scope adapters by."""

    def __init__(self, app, keyring: Keyring | None):
        self.app = app
        self.keyring = keyring

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        tenant = EVERYTHING
        if self.keyring is not None and scope["path"] not in OPEN_PATHS:
            try:
                tenant = self.keyring.tenant(dict(scope["headers"]).get(b"authorization", b"").decode("latin-1"))
            except Unauthorized as exc:
                log.info(
                    "request %s: %s %s -> 401: %s",
                    scope["state"]["request_id"],
                    scope["method"],
                    scope["path"],
                    exc.message,
                )
                response = error_response(scope["path"], exc.status_code, exc.message, exc.error_type, exc.headers)
                return await response(scope, receive, send)
        scope["state"]["tenant"] = tenant
        await self.app(scope, receive, send)


class LimitBody:
    """Refuses request bodies over `limit` bytes with 413, by Content-Length or as they stream in."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        too_large = declared is not None and declared.isdigit() and int(declared) > self.limit
        if not too_large and declared is None and scope["method"] in ("POST", "PUT", "PATCH"):
            chunks, size, more = [], 0, True
            while more and size <= self.limit:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                more = message.get("more_body", False)
            too_large = size > self.limit
            replay = iter([{"type": "http.request", "body": b"".join(chunks), "more_body": False}])
            original = receive

            async def receive():
                return next(replay, None) or await original()

        if too_large:
            message = f"request body over {self.limit} bytes (MIXSERVE_MAX_BODY_BYTES)"
            return await error_response(scope["path"], 413, message, "payload_too_large")(scope, receive, send)
        await self.app(scope, receive, send)
