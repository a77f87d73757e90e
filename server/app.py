"""The FastAPI application: lifespan owns the server state; routes stay thin."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server import __version__
from server.api import native, openai, playground, tokenizer
from server.api.errors import install_error_handlers
from server.api.middleware import Authenticate, LimitBody, RequestContext, Traffic
from server.api.schemas import ErrorResponse
from server.api.serving import tenant_of
from server.auth import Keyring
from server.config import Settings
from server.errors import Draining, NotReady
from server.metrics import Metrics
from server.state import ServerState

DESCRIPTION = """Serves any combination of PEFT adapters (LoRA, LoHa, LoKr, AdaLoRA, OFT, SHiRA) per request on one
resident base model, with the output PEFT's PeftMixedModel gives for that set. TGI/LoRAX-compatible routes at the
root, OpenAI-compatible ones under /v1."""


def create_app(settings: Settings, started: tuple[ServerState, Metrics] | None = None) -> FastAPI:
    """started: a state already started with its metrics (`python -m server` starts it before serving, so that a
    start error prints as its message alone); else the lifespan starts one."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if started is not None:
            state, metrics = started
        else:
            metrics = Metrics()
            state = await asyncio.to_thread(ServerState.start, settings, metrics)
        metrics.watch(state)
        app.state.mixserve = state
        app.state.metrics = metrics
        try:
            yield
        finally:
            await asyncio.to_thread(state.stop)

    app = FastAPI(title="mixserve", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.traffic = Traffic()
    app.state.replica = settings.replica
    app.include_router(native.router)
    app.include_router(openai.router)
    app.include_router(tokenizer.router)
    app.include_router(playground.router)

    @app.get(
        "/metrics",
        response_class=Response,
        summary="Prometheus metrics",
        responses={200: {"content": {"text/plain": {}}}, 401: {"model": ErrorResponse}, 403: {"model": ErrorResponse}},
    )
    async def metrics(request: Request) -> Response:
        """With API keys configured, a key without namespaces: the metrics name every tenant's adapters."""
        tenant_of(request).check_unscoped("/metrics")
        return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get(
        "/health",
        summary="200 while the process serves (answered by its event loop, never waiting on the engine)",
        responses={503: {"model": ErrorResponse}},
    )
    async def health(request: Request) -> dict:
        if request.app.state.mixserve.is_broken():
            raise NotReady(request.app.state.mixserve.broken)
        return {"status": "ok"}

    @app.get(
        "/ready",
        summary="200 when ready for traffic: model loaded, preloads done, not draining, the engine not stuck",
        responses={404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
    )
    async def ready(request: Request) -> dict:
        """404 while draining: HAProxy's `http-check disable-on-404` then sends no new requests and leaves the
        started ones alone (a 503 marks the replica DOWN and its streams are cut); Kubernetes: any 4xx fails."""
        if request.app.state.traffic.draining:
            raise Draining("draining: finishing in-flight requests before exiting")
        problem = request.app.state.mixserve.unready()
        if problem:
            raise NotReady(problem)
        return {"status": "ready"}

    install_error_handlers(app)
    # outermost last: request id first, then the key (an unknown client's body is never read), then the body's size
    app.add_middleware(LimitBody, limit=settings.max_body_bytes)
    app.add_middleware(Authenticate, keyring=Keyring.from_settings(settings.api_keys, settings.api_keys_file))
    app.add_middleware(playground.Pages)  # the page holds no data: served without a key
    app.add_middleware(RequestContext)
    return app
