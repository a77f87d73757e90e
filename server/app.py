"""The FastAPI application: lifespan owns the server state; routes stay thin."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException

from server import __version__
from server.api import native, openai
from server.api.metrics import Metrics
from server.api.schemas import ErrorResponse
from server.auth import EVERYTHING, OPEN_PATHS, Keyring, Unauthorized
from server.config import Settings
from server.errors import MixserveError, ShuttingDown
from server.state import ServerState

log = logging.getLogger(__name__)
REQUEST_ID = re.compile(r"^[\w.:-]{1,128}$")
UNCOUNTED = OPEN_PATHS | {"/metrics"}  # probes and scrapes: not in flight for the drain, answered while draining
DESCRIPTION = """Serves any combination of PEFT adapters (LoRA, LoHa, LoKr, AdaLoRA, OFT, SHiRA) per request on one
resident base model, with the output PEFT's PeftMixedModel gives for that set. TGI/LoRAX-compatible routes at the
root, OpenAI-compatible ones under /v1."""


@dataclass
class Traffic:
    """Requests in flight (streams until their last byte) and whether the server is draining."""

    in_flight: int = 0
    draining: bool = False


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = await asyncio.to_thread(ServerState.start, settings)
        app.state.mixserve = state
        app.state.metrics = Metrics(state)
        try:
            yield
        finally:
            await asyncio.to_thread(state.stop)

    app = FastAPI(title="mixserve", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.traffic = Traffic()
    app.state.replica = settings.replica
    app.include_router(native.router)
    app.include_router(openai.router)

    @app.get(
        "/metrics",
        response_class=Response,
        summary="Prometheus metrics",
        responses={200: {"content": {"text/plain": {}}}, 401: {"model": ErrorResponse}, 403: {"model": ErrorResponse}},
    )
    async def metrics(request: Request) -> Response:
        """With API keys configured, a key without namespaces: the metrics name every tenant's adapters."""
        request.state.tenant.check_unscoped("/metrics")
        return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get(
        "/ready",
        summary="200 when ready for traffic: model loaded, preloads done, not draining",
        responses={503: {"model": ErrorResponse}},
    )
    async def ready(request: Request) -> dict:
        if request.app.state.traffic.draining:
            raise ShuttingDown("draining: finishing in-flight requests before exiting")
        return {"status": "ready"}

    _install_error_handlers(app)
    # outermost last: request id first, then the key (an unknown client's body is never read), then the body's size
    app.add_middleware(LimitBody, limit=settings.max_body_bytes)
    app.add_middleware(Authenticate, keyring=Keyring.from_settings(settings.api_keys, settings.api_keys_file))
    app.add_middleware(RequestContext)
    return app


async def drain(app: FastAPI, seconds: float) -> None:
    """Stops taking requests (503 with Retry-After) and waits, up to `seconds`, for those in flight to finish."""
    traffic = app.state.traffic
    traffic.draining = True
    log.info("draining: %d requests in flight, waiting up to %.0f s", traffic.in_flight, seconds)
    deadline = time.monotonic() + seconds
    while traffic.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if traffic.in_flight:
        log.warning("drain time over with %d requests in flight; stopping them", traffic.in_flight)


class RequestContext:
    """Gives every request an id (the client's x-request-id, or a new one), echoes it with the replica and the total
    time, counts the request by route and status, and while draining turns new requests away (503)."""

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

        async def send_with_headers(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers["x-request-id"] = request_id
                headers["x-replica"] = app_state.replica
                headers["x-total-time"] = f"{(time.perf_counter() - started) * 1e3:.0f}"
            await send(message)

        if counted and app_state.traffic.draining:
            message = "draining: this replica is shutting down; retry"
            response = _error_response(scope["path"], 503, message, "unavailable", ShuttingDown.headers)
            return await response(scope, receive, send_with_headers)
        if counted:
            app_state.traffic.in_flight += 1
        try:
            await self.app(scope, receive, send_with_headers)
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
                response = _error_response(scope["path"], exc.status_code, exc.message, exc.error_type, exc.headers)
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
            return await _error_response(scope["path"], 413, message, "payload_too_large")(scope, receive, send)
        await self.app(scope, receive, send)


def _error_response(path: str, status: int, message: str, error_type: str, headers: dict | None = None):
    if path.startswith("/v1/"):
        body = {"error": {"message": message, "type": error_type, "param": None, "code": status}}
    else:
        body = {"error": message, "error_type": error_type}
    return JSONResponse(status_code=status, content=body, headers=headers)


def _error(request: Request, status: int, message: str, error_type: str, headers: dict | None = None) -> JSONResponse:
    return _error_response(request.url.path, status, message, error_type, headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(MixserveError)
    async def mixserve_error(request: Request, exc: MixserveError) -> JSONResponse:
        log.log(
            exc.log_level,
            "request %s: %s %s -> %d: %s",
            getattr(request.state, "request_id", "-"),
            request.method,
            request.url.path,
            exc.status_code,
            exc.message,
        )
        return _error(request, exc.status_code, exc.message, exc.error_type, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for e in exc.errors():
            if e["type"] == "json_invalid":
                problems.append(f"malformed JSON body: {e['ctx'].get('error', e['msg'])}")
                continue
            where = ".".join(str(p) for p in e["loc"] if p != "body")
            message = e["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: {message}" if where else message)
        return _error(request, 422, "; ".join(problems), "validation")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(request, exc.status_code, str(exc.detail), "http")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception(
            "request %s: %s %s failed", getattr(request.state, "request_id", "-"), request.method, request.url.path
        )
        return _error(request, 500, f"internal error: {type(exc).__name__}", "internal")
