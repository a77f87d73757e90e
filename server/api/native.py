"""The native routes: /generate (TGI/LoRAX-compatible), /adapters, /health."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request

from server.adapters.store import AdapterStore
from server.api import validation
from server.api.schemas import Details, ErrorResponse, GenerateRequest, GenerateResponse, Token
from server.engine.sequence import Sequence
from server.errors import MixserveError
from server.state import ServerState

ERRORS = {status: {"model": ErrorResponse} for status in (404, 422, 500)}
router = APIRouter()


def _state(request: Request) -> ServerState:
    return request.app.state.mixserve


@router.post("/generate", response_model=GenerateResponse, response_model_exclude_none=False, responses=ERRORS)
async def generate(body: GenerateRequest, request: Request) -> GenerateResponse:
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
    gen = validation.generation_request(
        inputs=body.inputs,
        adapters=adapters,
        params=params,
        tokenizer=state.tokenizer,
        max_input_tokens=state.settings.max_input_tokens,
        max_new_tokens_limit=state.settings.max_new_tokens,
        max_total_tokens=state.max_total_tokens,
        request_id=request.headers.get("x-request-id"),
    )
    seq = await state.engine.generate(gen)
    text = body.inputs + seq.text if params.return_full_text else seq.text
    return GenerateResponse(generated_text=text, details=_details(seq, state.tokenizer) if params.details else None)


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
