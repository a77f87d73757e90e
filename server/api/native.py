"""The native routes: /generate and /generate_stream (TGI/LoRAX-compatible), /adapters, /health."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from server.adapters.store import AdapterStore
from server.api import validation
from server.api.schemas import (
    Details,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    StreamDetails,
    StreamResponse,
    Token,
)
from server.engine.sequence import GenerationRequest, RequestHandle, Sequence
from server.errors import ClientDisconnected, MixserveError, ValidationError
from server.state import ServerState

ERRORS = {status: {"model": ErrorResponse} for status in (404, 422, 429, 500, 503)}
DISCONNECT_POLL_SECONDS = 0.1
router = APIRouter()


def _state(request: Request) -> ServerState:
    return request.app.state.mixserve


@router.post("/generate", response_model=GenerateResponse, responses=ERRORS)
async def generate(body: GenerateRequest, request: Request) -> GenerateResponse:
    if body.stream:
        raise ValidationError("stream=true is served at /generate_stream")
    state = _state(request)
    seq = await until_done(state.engine.submit(_generation_request(body, request)), request)
    params = body.parameters
    text = body.inputs + seq.text if params.return_full_text else seq.text
    return GenerateResponse(generated_text=text, details=_details(seq, state.tokenizer) if params.details else None)


@router.post("/generate_stream", responses=ERRORS, response_class=StreamingResponse)
async def generate_stream(body: GenerateRequest, request: Request) -> StreamingResponse:
    """Server-sent events in TGI's format: one `data:` event per token, the last with the text and details."""
    state = _state(request)
    handle = state.engine.submit(_generation_request(body, request))
    return StreamingResponse(_events(handle, body, state.tokenizer), media_type="text/event-stream")


async def _events(handle: RequestHandle, body: GenerateRequest, tokenizer) -> AsyncIterator[str]:
    params, special = body.parameters, set(tokenizer.all_special_ids)
    try:
        async for event in handle.stream():
            seq = handle.seq
            token = Token(
                id=event.token,
                text=tokenizer.decode([event.token]),
                logprob=event.logprob,
                special=event.token in special,
            )
            text, details = None, None
            if event.final:
                text = body.inputs + seq.text if params.return_full_text else seq.text
                if params.details:
                    details = StreamDetails(
                        finish_reason=seq.finish_reason, generated_tokens=len(seq.tokens), seed=seq.chooser.seed
                    )
            chunk = StreamResponse(index=event.index, token=token, generated_text=text, details=details)
            yield f"data: {chunk.model_dump_json()}\n\n"
    except MixserveError as exc:
        yield f"data: {json.dumps({'error': exc.message, 'error_type': exc.error_type})}\n\n"
    finally:
        handle.cancel()  # frees the row if the client went away


def _generation_request(body: GenerateRequest, request: Request) -> GenerationRequest:
    state = _state(request)
    params = body.parameters
    adapters = validation.combination(
        {
            "adapters": body.adapters,
            "parameters.adapters": params.adapters,
            "parameters.adapter_id": validation.split_adapter_id(params.adapter_id),
        },
        state.store,
        state.settings.max_adapters_per_request,
    )
    return validation.generation_request(
        inputs=body.inputs,
        adapters=adapters,
        params=params,
        tokenizer=state.tokenizer,
        max_input_tokens=state.settings.max_input_tokens,
        max_new_tokens_limit=state.settings.max_new_tokens,
        max_total_tokens=state.max_total_tokens,
        request_id=request.headers.get("x-request-id"),
    )


@router.get("/adapters", responses=ERRORS)
async def adapters(
    request: Request, all: bool = Query(False, description="also list the store's adapters that are not loaded")
) -> dict:
    state = _state(request)
    listed = [a.describe() for a in state.registry.loaded()]
    if all:
        loaded = {a["name"] for a in listed}
        listed += [_describe_unloaded(state.store, n) for n in state.store.names() if n not in loaded]
        listed.sort(key=lambda a: a["name"])
    return {"adapters": listed}


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


async def until_done(handle: RequestHandle, request: Request) -> Sequence:
    """The request's result; if the client disconnects first, its row is freed at the engine's next step."""
    result = asyncio.ensure_future(handle.result())
    try:
        while True:
            done, _ = await asyncio.wait({result}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                return result.result()
            if await request.is_disconnected():
                raise ClientDisconnected("the client closed the connection")
    finally:
        handle.cancel()
        result.cancel()


def _details(seq: Sequence, tokenizer) -> Details:
    special = set(tokenizer.all_special_ids)
    return Details(
        finish_reason=seq.finish_reason,
        generated_tokens=len(seq.tokens),
        seed=seq.chooser.seed,
        tokens=[
            Token(id=t, text=tokenizer.decode([t]), logprob=lp, special=t in special)
            for t, lp in zip(seq.tokens, seq.logprobs, strict=True)
        ],
        adapters=seq.adapters,
    )


def _describe_unloaded(store: AdapterStore, name: str) -> dict:
    entry = {"name": name, "loaded": False, "type": None}
    try:
        entry["type"] = store.read_config(name).get("peft_type")
    except MixserveError as exc:
        entry["error"] = exc.message
    return entry
