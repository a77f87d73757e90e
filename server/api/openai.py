"""OpenAI-compatible routes: /v1/models, /v1/completions and /v1/chat/completions, streamed or not.

`model` is the base model's id or a combination ('a', 'a+b', 'a@0.5+b'), which may name the base first
('<base>:a+b'); the base's ids are MIXSERVE_SERVED_MODEL_NAME, the model folder's name and MIXSERVE_MODEL as given
(Settings.base_model_ids). The body field `adapters` (names or {"name", "weight"} objects) may carry the combination
instead.
Chat prompts use the tokenizer's chat template; without one, the plain default

    <role>: <content>\\n   (one line per message)
    assistant:

OpenAI semantics where they differ from TGI's: a stop sequence is not part of the returned text, temperature
defaults to 1 (sampling) and 0 means greedy, max_tokens defaults to 16 for completions.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator

import jinja2
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.adapters.combination import Combination
from server.api import tools, validation
from server.api.errors import OPENAI_ERRORS
from server.api.openai_schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Delta,
    FunctionCall,
    FunctionCallDelta,
    Model,
    ModelList,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    Usage,
)
from server.api.schemas import adapter_pairs
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
from server.engine.constraints import Grammar, GrammarSpec
from server.engine.output import pieces, shown, without_stop
from server.engine.sampling import SamplingParams
from server.engine.sequence import GenerationRequest, Sequence, TokenEvent
from server.errors import ValidationError
from server.model import encode_prompt
from server.state import ServerState

STREAM = {200: {"content": {"text/event-stream": {}}, "description": "with stream=true: server-sent events"}}
FINISH = {"eos_token": "stop", "stop_sequence": "stop", "length": "length"}
router = APIRouter(prefix="/v1", responses=OPENAI_ERRORS, tags=["OpenAI"])


@router.get("/models", response_model=ModelList, summary="The base model and every adapter in the store")
async def models(request: Request) -> ModelList:
    state = state_of(request)
    ids, created = state.settings.base_model_ids, int(state.started_at)
    names = tenant_of(request).visible(await asyncio.to_thread(state.store.names))
    return ModelList(
        data=[Model(id=i, created=created, root=ids[0], parent=None, max_model_len=state.max_total_tokens) for i in ids]
        + [Model(id=name, created=created, root=name, parent=ids[0]) for name in names]
    )


@router.post("/completions", response_model=Completion, responses=STREAM, summary="Text completion")
async def completions(body: CompletionRequest, request: Request):
    state = state_of(request)
    adapters = await _adapters(state, request, body)
    prompts = _prompts(state, body.prompt)
    sampling = _sampling(body, body.max_tokens, body.logprobs or 0, bool(body.echo and body.logprobs is not None))
    grammar = await compile_grammar(state, body.grammar_spec())
    gens = [_request(state, ids, adapters, sampling, request, i, grammar) for i, ids in enumerate(prompts)]
    handles = []
    try:  # one answer for all the prompts: when one is refused or fails, the others stop too
        for gen in gens:
            handles.append(state.engine.submit(gen))
        reply = _Completions(body, state.tokenizer, f"cmpl-{uuid.uuid4().hex}")
        if body.stream:
            return await event_stream(request, reply.stream(handles), handles, request_headers(gens[0]), openai=True)
        seqs = await asyncio.gather(*(until_done(h, request) for h in handles))
    except BaseException:
        for handle in handles:
            handle.cancel()
        raise
    return JSONResponse(reply.complete(seqs).model_dump(), headers=result_headers(seqs[0]))


@router.post("/chat/completions", response_model=ChatCompletion, responses=STREAM, summary="Chat completion")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state = state_of(request)
    adapters = await _adapters(state, request, body)
    ids = _chat_prompt(state.tokenizer, body)
    alternatives = (body.top_logprobs or 0) if body.logprobs else 0
    sampling = _sampling(body, body.max_completion_tokens or body.max_tokens, alternatives, False)
    fmt = tools.call_format(state.tokenizer)
    grammar = await compile_grammar(state, _chat_grammar(body, fmt, state.tokenizer))
    gen = _request(state, ids, adapters, sampling, request, 0, grammar)
    handle = state.engine.submit(gen)
    reply = _Chat(body, state.tokenizer, f"chatcmpl-{uuid.uuid4().hex}", fmt)
    if body.stream:
        return await event_stream(request, reply.stream(handle), [handle], request_headers(gen), openai=True)
    seq = await until_done(handle, request)
    return JSONResponse(reply.complete(seq).model_dump(), headers=result_headers(seq))


async def _adapters(state: ServerState, request: Request, body) -> Combination:
    sources = {"model": _named(state.settings.base_model_ids, body.model), "adapters": adapter_pairs(body.adapters)}
    return await combination(state, tenant_of(request), sources)


def _named(base_ids: list[str], model: str) -> list[tuple[str, float]] | None:
    """The adapters `model` names: none for a base id (which wins over an adapter of the same name), those after
    '<base>:', else the whole of it."""
    for base in sorted(base_ids, key=len, reverse=True):
        if model == base:
            return []
        if model.startswith(f"{base}:"):
            if not model[len(base) + 1 :]:
                raise ValidationError(f"model: {model!r} names no adapter after the base; the base alone is {base!r}")
            return validation.split_adapter_id(model[len(base) + 1 :])
    return validation.split_adapter_id(model)


def _prompts(state: ServerState, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        return [encode_prompt(state.tokenizer, prompt)]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if not prompt:
        raise ValidationError("prompt: empty")
    return [encode_prompt(state.tokenizer, p) if isinstance(p, str) else list(p) for p in prompt]


def _chat_prompt(tokenizer, body: ChatCompletionRequest) -> list[int]:
    """The conversation through the tokenizer's chat template (which gets the tools, unless tool_choice is
    none), or the plain default."""
    offered = body.tools if body.tool_mode != "none" else None
    if not getattr(tokenizer, "chat_template", None):
        return encode_prompt(tokenizer, tools.plain_prompt(body.messages, offered))
    try:
        text = tokenizer.apply_chat_template(
            tools.template_messages(body.messages),
            tools=[t.model_dump(exclude_none=True) for t in offered] if offered else None,
            tokenize=False,
            add_generation_prompt=True,
        )
    except jinja2.TemplateError as exc:
        raise ValidationError(f"messages: the model's chat template refused them: {exc}") from exc
    return tokenizer.encode(text, add_special_tokens=False)


def _chat_grammar(body: ChatCompletionRequest, fmt: str, tokenizer) -> GrammarSpec | None:
    """A required or named tool call's grammar, or the request's own constraint."""
    marker = tools.calls_marker(tokenizer) if fmt == tools.MISTRAL else ""
    if body.tool_mode == "required":
        names = [t.function.name for t in body.tools]
        return tools.required_grammar(body.tools, names, body.parallel_calls, fmt, marker)
    if body.tool_mode == "named":
        return tools.required_grammar(body.tools, [body.tool_choice.function.name], False, fmt, marker)
    return body.grammar_spec()


def _sampling(body, max_tokens: int | None, alternatives: int, prompt_logprobs: bool) -> SamplingParams:
    temperature = 1.0 if body.temperature is None else body.temperature
    return SamplingParams(
        max_new_tokens=max_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_k=body.top_k if temperature > 0 else None,
        top_p=body.top_p if temperature > 0 else None,
        repetition_penalty=body.repetition_penalty,
        frequency_penalty=body.frequency_penalty or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        logit_bias={int(k): v for k, v in (body.logit_bias or {}).items()},
        seed=body.seed,
        stop=tuple(body.stop_list),
        top_logprobs=alternatives,
        prompt_logprobs=prompt_logprobs,
        processed_logprobs=body.logprobs_mode == "processed_logprobs",
    )


def _request(
    state, ids, adapters, sampling, request: Request, index: int, grammar: Grammar | None
) -> GenerationRequest:
    request_id = request.state.request_id if index == 0 else f"{request.state.request_id}-{index}"
    return validation.generation_request(state, ids, adapters, sampling, request_id, grammar, tenant_of(request))


def _usage(seqs: list[Sequence]) -> Usage:
    prompt = sum(len(s.request.prompt_ids) for s in seqs)
    completion = sum(len(s.tokens) for s in seqs)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class _Text:
    """The text a client has been sent, as deltas: never any of a stop sequence, not even the start of one."""

    def __init__(self, seq: Sequence):
        self.seq = seq
        self.text = ""  # the tokens' texts so far
        self.sent = 0

    def delta(self, event: TokenEvent) -> str:
        """The text that event's token adds (events come one per token, in order)."""
        self.text += event.text
        stop = self.seq.stop_sequence if event.final else None
        text = shown(self.text, () if event.final else self.seq.request.params.stop, stop)
        delta = text[self.sent :]
        self.sent = len(text)
        return delta


class _Completions:
    def __init__(self, body: CompletionRequest, tokenizer, reply_id: str):
        self.body, self.tokenizer, self.id, self.created = body, tokenizer, reply_id, int(time.time())

    def _echo(self, seq: Sequence) -> str:
        return self.tokenizer.decode(seq.request.prompt_ids, skip_special_tokens=True) if self.body.echo else ""

    def complete(self, seqs: list[Sequence]) -> Completion:
        choices = []
        for index, seq in enumerate(seqs):
            echo, text = self._echo(seq), without_stop(seq.text, seq.stop_sequence)
            choices.append(
                CompletionChoice(
                    index=index,
                    text=echo + text,
                    logprobs=self._logprobs(seq, len(echo), text),
                    finish_reason=FINISH[seq.finish_reason],
                )
            )
        return Completion(id=self.id, created=self.created, model=self.body.model, choices=choices, usage=_usage(seqs))

    def _logprobs(self, seq: Sequence, echo_length: int, text: str) -> CompletionLogprobs | None:
        if self.body.logprobs is None:
            return None
        decode = self.tokenizer.decode
        lps, tokens = list(seq.logprobs), list(seq.texts)
        alts = [_top(decode, *row) for row in zip(seq.alternatives, tokens, lps, strict=True)]
        if self.body.echo:
            prompt, prompt_texts = seq.request.prompt_ids, pieces(self.tokenizer, seq.request.prompt_ids)
            tops = [None] * len(prompt)  # none at the first token: nothing comes before it
            if seq.prompt_alternatives:
                scored = zip(seq.prompt_alternatives[1:], prompt_texts[1:], seq.prompt_logprobs[1:], strict=True)
                tops[1:] = [_top(decode, *row) for row in scored]
            lps = list(seq.prompt_logprobs or [None] * len(prompt)) + lps
            alts, tokens = tops + alts, prompt_texts + tokens
        offsets, at = [], 0 if self.body.echo else echo_length
        for token in tokens:
            offsets.append(at)
            at += len(token)
        return CompletionLogprobs(
            tokens=tokens, token_logprobs=lps, top_logprobs=alts if self.body.logprobs else None, text_offset=offsets
        )

    async def stream(self, handles) -> AsyncIterator[str]:
        seqs = [h.seq for h in handles]
        texts = [_Text(seq) for seq in seqs]
        for index, seq in enumerate(seqs):
            if self.body.echo:
                yield self._chunk(CompletionChoice(index=index, text=self._echo(seq)))
        async for index, event in _merge(handles):
            seq = seqs[index]
            delta = texts[index].delta(event)
            logprobs = None
            if self.body.logprobs is not None:
                alts = _top(self.tokenizer.decode, seq.alternatives[event.index], event.text, event.logprob)
                logprobs = CompletionLogprobs(
                    tokens=[event.text],
                    token_logprobs=[event.logprob],
                    top_logprobs=[alts] if self.body.logprobs else None,
                    text_offset=[texts[index].sent - len(delta)],
                )
            finish = FINISH[seq.finish_reason] if event.final else None
            if delta or finish or logprobs:
                yield self._chunk(CompletionChoice(index=index, text=delta, logprobs=logprobs, finish_reason=finish))
        for index, seq in enumerate(seqs):
            if not seq.tokens:  # max_tokens 0: the prompt scored, nothing generated
                yield self._chunk(CompletionChoice(index=index, text="", finish_reason=FINISH[seq.finish_reason]))
        usage = _usage(seqs)
        yield self._chunk(None, usage)

    def _chunk(self, choice: CompletionChoice | None, usage: Usage | None = None) -> str:
        chunk = Completion(
            id=self.id, created=self.created, model=self.body.model, choices=[choice] if choice else [], usage=usage
        )
        return chunk.model_dump_json()


class _Chat:
    def __init__(self, body: ChatCompletionRequest, tokenizer, reply_id: str, call_format: str):
        self.body, self.tokenizer, self.id, self.created = body, tokenizer, reply_id, int(time.time())
        self.call_format = call_format

    def _reader(self) -> tools.CallReader | tools.ConstrainedCallReader | None:
        """What reads tool calls out of the text, when the request offers tools (tool_choice not none): for a
        required or named call, whose grammar fixes how it is written, piece by piece as it is written."""
        if self.body.tool_mode in ("required", "named"):
            return tools.ConstrainedCallReader(self.call_format)
        if self.body.tool_mode == "none":
            return None
        names = [t.function.name for t in self.body.tools]
        schemas = {t.function.name: t.function.parameters or {"type": "object"} for t in self.body.tools}
        return tools.CallReader(self.call_format, names, self.body.parallel_calls, schemas)

    def _token(self, token: int, logprob: float, text: str | None = None) -> TopLogprob:
        """text: what the token added to the answer (None for an alternative: decoded alone)."""
        text = self.tokenizer.decode([token]) if text is None else text
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

    def _logprobs(self, seq: Sequence, indices) -> ChatLogprobs | None:
        if not self.body.logprobs:
            return None
        return ChatLogprobs(
            content=[
                TokenLogprob(
                    **self._token(seq.tokens[i], seq.logprobs[i], seq.texts[i]).model_dump(),
                    top_logprobs=[self._token(t, lp) for t, lp in seq.alternatives[i]],
                )
                for i in indices
            ]
        )

    def complete(self, seq: Sequence) -> ChatCompletion:
        text, calls = without_stop(seq.text, seq.stop_sequence), []
        reader = self._reader()
        if reader is not None:
            text, calls = tools.assemble(reader.feed(text) + reader.finish())
        choice = ChatChoice(
            index=0,
            message=AssistantMessage(
                content=text or (None if calls else ""),
                tool_calls=[
                    ToolCall(id=c["id"], function=FunctionCall(name=c["name"], arguments=c["arguments"])) for c in calls
                ]
                or None,
            ),
            logprobs=self._logprobs(seq, range(len(seq.tokens))),
            finish_reason=_finish(seq, bool(calls)),
        )
        return ChatCompletion(
            id=self.id, created=self.created, model=self.body.model, choices=[choice], usage=_usage([seq])
        )

    async def stream(self, handle) -> AsyncIterator[str]:
        seq, text, reader, calls = handle.seq, _Text(handle.seq), self._reader(), 0
        yield self._chunk(ChatChunkChoice(index=0, delta=Delta(role="assistant", content="")))
        async for _, event in _merge([handle]):
            delta = text.delta(event)
            pieces = [delta] if reader is None and delta else []
            if reader is not None:
                pieces = reader.feed(delta) + (reader.finish() if event.final else [])
            deltas = [_delta(piece) for piece in pieces]
            calls += sum(isinstance(piece, tools.CallStart) for piece in pieces)
            finish = _finish(seq, calls > 0) if event.final else None
            logprobs = self._logprobs(seq, [event.index])
            if not deltas and (finish or logprobs):
                deltas = [Delta()]
            for i, piece in enumerate(deltas):
                last = i == len(deltas) - 1
                yield self._chunk(
                    ChatChunkChoice(
                        index=0,
                        delta=piece,
                        logprobs=logprobs if last else None,
                        finish_reason=finish if last else None,
                    ),
                    _usage([seq]) if finish and last else None,
                )
        if self.body.stream_options and self.body.stream_options.include_usage:
            yield self._chunk(None, _usage([seq]))

    def _chunk(self, choice: ChatChunkChoice | None, usage: Usage | None = None) -> str:
        chunk = ChatCompletionChunk(
            id=self.id, created=self.created, model=self.body.model, choices=[choice] if choice else [], usage=usage
        )
        return chunk.model_dump_json()


def _top(decode, alternatives: list[tuple[int, float]], text: str, logprob: float) -> dict[str, float]:
    """A position's top logprobs by text, with the token there under its text in `tokens` (what it adds to the
    answer) when it is not among them, as OpenAI's completions did. Where texts coincide the largest logprob stays:
    lm_eval reads a continuation as greedy when each token's logprob is the maximum here, which then still means
    that no other token was likelier."""
    top: dict[str, float] = {}
    for key, lp in [*((decode([t]), lp) for t, lp in alternatives), (text, logprob)]:
        top[key] = max(lp, top.get(key, -math.inf))
    return top


def _finish(seq: Sequence, called: bool) -> str:
    """tool_calls when the answer holds calls and was not cut short."""
    return "tool_calls" if called and seq.finish_reason != "length" else FINISH[seq.finish_reason]


def _delta(piece: tools.Piece) -> Delta:
    """Content, or a part of a call as OpenAI streams calls: its id and name first, then its arguments."""
    if isinstance(piece, tools.CallStart):
        function = FunctionCallDelta(name=piece.name, arguments="")
        return Delta(tool_calls=[ToolCallDelta(index=piece.index, id=piece.id, type="function", function=function)])
    if isinstance(piece, tools.CallArguments):
        return Delta(tool_calls=[ToolCallDelta(index=piece.index, function=FunctionCallDelta(arguments=piece.text))])
    return Delta(content=piece)


async def _merge(handles) -> AsyncIterator[tuple[int, object]]:
    """(index of the handle, event) from several token streams as they come."""
    if len(handles) == 1:
        async for event in handles[0].stream():
            yield 0, event
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index, handle):
        try:
            async for event in handle.stream():
                await queue.put((index, event, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put((index, None, exc))
        finally:
            await queue.put((index, None, None))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        open_streams = len(handles)
        while open_streams:
            index, event, error = await queue.get()
            if error is not None:
                raise error
            if event is None:
                open_streams -= 1
            else:
                yield index, event
    finally:
        for task in tasks:
            task.cancel()
