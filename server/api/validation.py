"""Checks at the edge, before anything is queued: each problem named, nothing half-accepted."""

from __future__ import annotations

import dataclasses

from server.adapters.combination import Combination, parse_spec
from server.api.schemas import MAX_STOP_CHARS
from server.auth import EVERYTHING, Tenant
from server.engine.constraints import Grammar
from server.engine.sampling import DEFAULT_MAX_NEW_TOKENS, SamplingParams
from server.engine.sequence import GenerationRequest
from server.errors import ValidationError
from server.state import ServerState


def combination(state: ServerState, tenant: Tenant, sources: dict[str, list[tuple[str, float]] | None]) -> Combination:
    """The request's combination, from whichever request fields carry it (see Combination.parse)."""
    settings = state.settings
    limit = settings.max_adapters_per_request
    setting = "MIXSERVE_MAX_ADAPTERS_PER_REQUEST"
    if limit == settings.max_loaded_adapters:
        setting = "MIXSERVE_MAX_LOADED_ADAPTERS, adapters resident at once"
    return Combination.parse(sources, tenant, state.registry.peft_type, (limit, setting))


def split_adapter_id(adapter_id: str | None) -> list[tuple[str, float]] | None:
    """'a+b@0.5' (the canonical form) -> (name, weight) pairs."""
    return parse_spec(adapter_id) if adapter_id else None


def generation_request(
    state: ServerState,
    prompt_ids: list[int],
    adapters: Combination,
    sampling: SamplingParams,
    request_id: str,
    grammar: Grammar | None = None,
    tenant: Tenant = EVERYTHING,
) -> GenerationRequest:
    """sampling.max_new_tokens None asks for the default, or what the context leaves when that is less. grammar:
    the output's constraint, compiled (see api/structured.py); tenant: whom the request acts for."""
    settings, problems = state.settings, []
    room = (state.max_total_tokens or 10**9) - len(prompt_ids)
    max_new = (
        sampling.max_new_tokens
        if sampling.max_new_tokens is not None
        else max(1, min(DEFAULT_MAX_NEW_TOKENS, settings.max_new_tokens, room))
    )
    if not prompt_ids:
        problems.append("the input encodes to no tokens")
    if len(prompt_ids) > settings.max_input_tokens:
        problems.append(f"inputs are {len(prompt_ids)} tokens; at most {settings.max_input_tokens}")
    if max_new > settings.max_new_tokens:
        problems.append(f"max_new_tokens is {max_new}; at most {settings.max_new_tokens}")
    if max_new > room:
        problems.append(
            f"inputs ({len(prompt_ids)} tokens) + max_new_tokens ({max_new}) exceed the model's context of"
            f" {state.max_total_tokens} tokens"
        )
    if any(len(stop) > MAX_STOP_CHARS for stop in sampling.stop):
        problems.append(f"a stop sequence is longer than {MAX_STOP_CHARS} characters")
    vocab = min(state.vocab_size, state.engine.tokenizer_ids)  # ids past the tokenizer have no text
    if any(not 0 <= token < vocab for token in prompt_ids):
        problems.append(f"the prompt holds token ids outside the vocabulary (0..{vocab - 1})")
    if any(not 0 <= token < vocab for token in sampling.logit_bias):
        problems.append(f"logit_bias names token ids outside the vocabulary (0..{vocab - 1})")
    if grammar is not None and sampling.stop:
        problems.append("stop sequences cannot be combined with an output constraint: the grammar decides the end")
    if grammar is not None and sampling.ignore_eos:
        problems.append("ignore_eos_token cannot be combined with an output constraint: the grammar decides the end")
    if problems:
        raise ValidationError("; ".join(problems))
    sampling = dataclasses.replace(sampling, max_new_tokens=max_new)
    return GenerationRequest(
        request_id,
        prompt_ids,
        adapters,
        sampling,
        timeout=settings.request_timeout,
        grammar=grammar,
        tenant=tenant.identity,
    )
