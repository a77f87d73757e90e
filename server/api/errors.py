"""Error responses, built in this one place: TGI's `{"error", "error_type"}` body on the native routes, OpenAI's
`{"error": {"message", "type", "param", "code"}}` under /v1/. Also the handlers that turn exceptions into them and
the error tables the routers document in the OpenAPI schema. Unexpected errors are answered by
middleware.RequestContext."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from server.api.openai_schemas import OpenAIErrorResponse
from server.api.schemas import ErrorResponse
from server.errors import MixserveError

log = logging.getLogger(__name__)
STATUSES = (401, 404, 408, 413, 422, 424, 429, 499, 500, 503)
NATIVE_ERRORS = {status: {"model": ErrorResponse} for status in STATUSES}
OPENAI_ERRORS = {status: {"model": OpenAIErrorResponse} for status in STATUSES}


def error_body(openai: bool, status: int, message: str, error_type: str) -> dict:
    """OpenAI's shape or TGI's; a stream's last event when it fails, and the body of every error response."""
    if openai:
        return {"error": {"message": message, "type": error_type, "param": None, "code": status}}
    return {"error": message, "error_type": error_type}


def error_response(path: str, status: int, message: str, error_type: str, headers: dict | None = None) -> JSONResponse:
    """In the shape of the routes under `path`: middleware answers before any route is matched."""
    body = error_body(path.startswith("/v1/"), status, message, error_type)
    return JSONResponse(status_code=status, content=body, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
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
        return error_response(request.url.path, exc.status_code, exc.message, exc.error_type, exc.headers)

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
        return error_response(request.url.path, 422, "; ".join(problems), "validation")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(request.url.path, exc.status_code, str(exc.detail), "http")
