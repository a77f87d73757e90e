"""The FastAPI application: lifespan owns the server state; routes stay thin."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from server import __version__
from server.api import native
from server.config import Settings
from server.errors import MixserveError
from server.state import ServerState

log = logging.getLogger(__name__)


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.mixserve = await asyncio.to_thread(ServerState.start, settings)
        try:
            yield
        finally:
            await asyncio.to_thread(app.state.mixserve.stop)

    app = FastAPI(title="mixserve", version=__version__, lifespan=lifespan)
    app.include_router(native.router)
    _install_error_handlers(app)
    return app


def _error(status: int, message: str, error_type: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message, "error_type": error_type}, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(MixserveError)
    async def mixserve_error(request: Request, exc: MixserveError) -> JSONResponse:
        log.log(
            logging.ERROR if exc.status_code >= 500 else logging.INFO,
            "%s %s -> %d: %s",
            request.method,
            request.url.path,
            exc.status_code,
            exc.message,
        )
        return _error(exc.status_code, exc.message, exc.error_type, exc.headers)

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
        return _error(422, "; ".join(problems), "validation")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), "http")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}", "internal")
