"""The native routes: TGI/LoRAX-compatible /, /generate, /generate_stream, /info, /tokenize; /adapters."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from server import __version__
from server.adapters.store import AdapterStore, check_name
from server.api import validation
from server.api.errors import NATIVE_ERRORS
from server.api.schemas import (
    Details,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    Info,
    InputToken,
    StreamDetails,
    StreamResponse,
    Token,
    TokenizedToken,
    TokenizeRequest,
    adapter_pairs,
)
from server.api.serving import (
    combination,
    event_stream,
    request_headers,
    result_headers,
    state_of,
    tenant_of,
    until_done,
)
from server.api.structured import compile_grammar
from server.api.tokenizer import PromptTokenizeRequest, PromptTokenizeResponse, tokenize_prompt
from server.auth import Tenant
from server.engine.output import pieces
from server.engine.sampling import SamplingParams
from server.engine.sequence import GenerationRequest, RequestHandle, Sequence
from server.errors import AdapterNotFound, MixserveError
from server.model import encode_prompt
from server.state import ServerState

STREAM = {200: {"content": {"text/event-stream": {}}, "description": "server-sent events, one per token"}}
router = APIRouter(responses=NATIVE_ERRORS)


@router.post("/generate", response_model=GenerateResponse, summary="Generate text with a combination of adapters")
async def generate(body: GenerateRequest, request: Request) -> JSONResponse:
    state = state_of(request)
    seq = await until_done(state.engine.submit(await _generation_request(body, request)), request)
    response = _response(body, seq, state.tokenizer)
    return JSONResponse(response.model_dump(exclude_none=False), headers=result_headers(seq))


@router.post("/generate_stream", response_class=StreamingResponse, responses=STREAM, summary="Generate, streamed")
async def generate_stream(body: GenerateRequest, request: Request) -> StreamingResponse:
    """Server-sent events in TGI's format: one `data:` event per token, the last with the text and details."""
    state = state_of(request)
    gen = await _generation_request(body, request)
    handle = state.engine.submit(gen)
    events = _events(handle, body, state.tokenizer)
    return await event_stream(request, events, [handle], request_headers(gen), openai=False)


@router.post("/", responses={200: {"model": list[GenerateResponse], **STREAM[200]}}, summary="TGI's root route")
async def compat_generate(body: GenerateRequest, request: Request):
    """As /generate_stream when `stream` is true; else as /generate, the response in a list (as TGI, for the
    Inference API's clients)."""
    if body.stream:
        return await generate_stream(body, request)
    response = await generate(body, request)
    response.body = b"[" + response.body + b"]"
    response.headers["content-length"] = str(len(response.body))
    return response


@router.get("/info", response_model=Info, summary="The model, the device and the limits")
async def info(request: Request) -> Info:
    state = state_of(request)
    settings = state.settings
    return Info(
        model_id=settings.model_id,
        model_dtype=state.dtype,
        model_quantization=state.quantization,
        model_device_type=state.device,
        max_concurrent_requests=settings.max_batch_size + settings.max_queue,
        max_input_tokens=settings.max_input_tokens,
        max_total_tokens=state.max_total_tokens,
        max_new_tokens=settings.max_new_tokens,
        max_batch_size=settings.max_batch_size,
        max_adapters_per_request=settings.max_adapters_per_request,
        adapters_loaded=len(tenant_of(request).visible(a.name for a in state.registry.loaded())),
        adapters_available=len(tenant_of(request).visible(await asyncio.to_thread(state.store.names))),
        version=__version__,
    )


@router.post("/tokenize", response_model=list[TokenizedToken] | PromptTokenizeResponse, summary="The tokens of a text")
async def tokenize(
    body: TokenizeRequest | PromptTokenizeRequest, request: Request
) -> list[TokenizedToken] | PromptTokenizeResponse:
    """TGI's `{"inputs"}` gets TGI's answer, vLLM's `{"prompt"}` vLLM's (api/tokenizer.py)."""
    if isinstance(body, PromptTokenizeRequest):
        return tokenize_prompt(body, request)
    tokenizer = state_of(request).tokenizer
    ids = (
        encode_prompt(tokenizer, body.inputs)
        if body.add_special_tokens
        else tokenizer.encode(body.inputs, add_special_tokens=False)
    )
    tokens, offset = [], 0
    special = set(tokenizer.all_special_ids)
    for token in ids:
        text = tokenizer.decode([token])
        at = -1 if token in special else body.inputs.find(text, offset) if text else -1
        if at >= 0:
            offset = at + len(text)
        tokens.append(
            TokenizedToken(id=token, text=text, start=at if at >= 0 else None, stop=offset if at >= 0 else None)
        )
    return tokens


@router.get("/adapters", summary="Adapters: loaded, loading, in host memory, failed (all=true: the whole store)")
async def adapters(
    request: Request, all: bool = Query(False, description="also list the store's adapters never loaded")
) -> dict:
    return {"adapters": await asyncio.to_thread(_listing, state_of(request), tenant_of(request), all)}


@router.post("/adapters/{name:path}/load", summary="Make an adapter resident (200 once it is)")
async def load_adapter(name: str, request: Request) -> dict:
    state = state_of(request)
    check_name(name)
    tenant_of(request).check([name])
    await asyncio.to_thread(state.store.path, name)  # 404 before any work (a mounted adapter: fetched)
    await asyncio.wrap_future(state.registry.ensure(name))
    return state.registry.describe(name)


@router.delete(
    "/adapters/{name:path}", responses={409: {"model": ErrorResponse}}, summary="Unload an adapter (409 while in use)"
)
async def unload_adapter(name: str, request: Request) -> dict:
    """Frees the adapter from the model and the host tier. Refused with 409 while running or waiting requests use
    it (retry when they finish); a later request loads it again."""
    state = state_of(request)
    check_name(name)
    tenant_of(request).check([name], not_found="adapter {name!r} is not loaded")
    engine = state.engine
    removed = await asyncio.wrap_future(engine.call(lambda: state.registry.unload(name, engine.waiting_adapters())))
    if not removed:
        raise AdapterNotFound(f"adapter {name!r} is not loaded")
    return {"name": name, "unloaded": True}


async def _generation_request(body: GenerateRequest, request: Request) -> GenerationRequest:
    state = state_of(request)
    params = body.parameters
    adapters = await combination(
        state,
        tenant_of(request),
        {
            "adapters": adapter_pairs(body.adapters),
            "parameters.adapters": adapter_pairs(params.adapters),
            "parameters.adapter_id": validation.split_adapter_id(params.adapter_id),
            "parameters.merged_adapters": params.merged_adapters.pairs() if params.merged_adapters else None,
        },
    )
    state.store.check_source(adapters.names, params.adapter_source)
    sampling = SamplingParams(
        max_new_tokens=params.max_new_tokens,
        do_sample=bool(params.do_sample),
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        repetition_penalty=params.repetition_penalty,
        frequency_penalty=params.frequency_penalty or 0.0,
        seed=params.seed,
        stop=tuple(params.stop or ()),
        ignore_eos=bool(params.ignore_eos_token),
        top_logprobs=params.alternatives,
        prompt_logprobs=bool(params.decoder_input_details and params.details),
    )
    prompt = encode_prompt(state.tokenizer, body.inputs)
    grammar = await compile_grammar(state, params.grammar_spec())
    return validation.generation_request(
        state, prompt, adapters, sampling, request.state.request_id, grammar, tenant_of(request)
    )


def _text(body: GenerateRequest, seq: Sequence) -> str:
    return body.inputs + seq.text if body.parameters.return_full_text else seq.text


def _token(tokenizer, token: int, logprob: float, text: str | None = None) -> Token:
    """text: what the token added to the answer (None for an alternative: decoded alone). As in TGI, a special
    token shows its own text, flagged `special`; the texts of the others add up to the answer."""
    special = token in tokenizer.all_special_ids
    if special or text is None:
        text = tokenizer.decode([token])
    return Token(id=token, text=text, logprob=logprob, special=special)


def _prompt_texts(tokenizer, seq: Sequence) -> list[str]:
    """What each prompt token adds to the prompt's text, when its logprobs were asked."""
    return pieces(tokenizer, seq.request.prompt_ids) if seq.prompt_logprobs else []


def _response(body: GenerateRequest, seq: Sequence, tokenizer) -> GenerateResponse:
    if not body.parameters.details:
        return GenerateResponse(generated_text=_text(body, seq))
    prompt = seq.request.prompt_ids
    details = Details(
        finish_reason=seq.finish_reason,
        generated_tokens=len(seq.tokens),
        prompt_tokens=len(prompt),
        seed=seq.chooser.seed,
        prefill=[
            InputToken(id=t, text=text, logprob=lp)
            for t, text, lp in zip(prompt, _prompt_texts(tokenizer, seq), seq.prompt_logprobs or [], strict=False)
        ],
        tokens=[_token(tokenizer, *token) for token in zip(seq.tokens, seq.logprobs, seq.texts, strict=True)],
        top_tokens=[[_token(tokenizer, t, lp) for t, lp in alts] for alts in seq.alternatives]
        if seq.request.params.top_logprobs
        else None,
        adapters=seq.request.adapters.parts,
    )
    return GenerateResponse(generated_text=_text(body, seq), details=details)


async def _events(handle: RequestHandle, body: GenerateRequest, tokenizer) -> AsyncIterator[str]:
    seq = handle.seq
    async for event in handle.stream():
        text, details = None, None
        if event.final:
            text = _text(body, seq)
            if body.parameters.details:
                details = StreamDetails(
                    finish_reason=seq.finish_reason,
                    generated_tokens=len(seq.tokens),
                    input_length=len(seq.request.prompt_ids),
                    prompt_tokens=len(seq.request.prompt_ids),
                    seed=seq.chooser.seed,
                )
        top = seq.alternatives[event.index] if seq.request.params.top_logprobs else None
        chunk = StreamResponse(
            index=event.index,
            token=_token(tokenizer, event.token, event.logprob, event.text),
            top_tokens=[_token(tokenizer, t, lp) for t, lp in top] if top is not None else None,
            generated_text=text,
            details=details,
        )
        yield chunk.model_dump_json()


def _listing(state: ServerState, tenant: Tenant, everything: bool) -> list[dict]:
    """The adapters a tenant sees; reads the store (configs cached by their stat), so run off the event loop."""
    names = set(state.registry.known()) | (set(state.store.names()) if everything else set())
    listed = [state.registry.describe(name) for name in sorted(tenant.visible(names))]
    for entry in listed:
        if entry["state"] == "available":
            _add_type(state.store, entry)
        entry["tier"] = {"loaded": "device", "host": "host"}.get(entry["state"]) or state.store.tier(entry["name"])
    return [e for e in listed if everything or e["state"] != "available"]


def _add_type(store: AdapterStore, entry: dict) -> None:
    entry["type"] = None
    try:
        entry["type"] = store.peft_type(entry["name"])
    except MixserveError as exc:
        entry["error"] = exc.message
