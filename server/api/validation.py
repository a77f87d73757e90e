"""Checks at the edge, before anything is queued: each problem named, nothing half-accepted."""

from __future__ import annotations

import uuid

from server.adapters.store import AdapterStore, check_name
from server.engine.model import encode_prompt
from server.engine.sampling import SamplingParams
from server.engine.sequence import GenerationRequest
from server.errors import ValidationError

DEFAULT_MAX_NEW_TOKENS = 100


def combination(sources: dict[str, list[str] | None], store: AdapterStore, limit: int) -> list[str]:
    """One adapter list from whichever request fields carry it; each name valid, listed once, in the store."""
    given = {field: names for field, names in sources.items() if names}
    if len({tuple(names) for names in given.values()}) > 1:
        raise ValidationError(f"the adapters are given differently in {' and '.join(given)}; give them once")
    names = next(iter(given.values()), [])
    for name in names:
        check_name(name)
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValidationError(f"adapters listed more than once: {', '.join(duplicates)}")
    if len(names) > limit:
        raise ValidationError(f"{len(names)} adapters requested; at most {limit} per request")
    for name in names:
        store.path(name)  # 404 for names not in the store
    return list(names)


def split_adapter_id(adapter_id: str | None) -> list[str] | None:
    return adapter_id.split("+") if adapter_id else None


def generation_request(
    *,
    inputs: str,
    adapters: list[str],
    params,
    tokenizer,
    max_input_tokens: int,
    max_new_tokens_limit: int,
    max_total_tokens: int | None,
    request_id: str | None = None,
) -> GenerationRequest:
    prompt_ids = encode_prompt(tokenizer, inputs)
    max_new = params.max_new_tokens or min(DEFAULT_MAX_NEW_TOKENS, max_new_tokens_limit)
    problems = []
    if not prompt_ids:
        problems.append("inputs encode to no tokens")
    if len(prompt_ids) > max_input_tokens:
        problems.append(f"inputs are {len(prompt_ids)} tokens; at most {max_input_tokens}")
    if max_new > max_new_tokens_limit:
        problems.append(f"max_new_tokens is {max_new}; at most {max_new_tokens_limit}")
    if max_total_tokens is not None and len(prompt_ids) + max_new > max_total_tokens:
        problems.append(
            f"inputs ({len(prompt_ids)} tokens) + max_new_tokens ({max_new}) exceed the model's context of"
            f" {max_total_tokens} tokens"
        )
    if problems:
        raise ValidationError("; ".join(problems))
    sampling = SamplingParams(
        max_new_tokens=max_new,
        do_sample=params.do_sample,
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        repetition_penalty=params.repetition_penalty,
        seed=params.seed,
        stop=tuple(params.stop),
    )
    return GenerationRequest(
        request_id=request_id or uuid.uuid4().hex, prompt_ids=prompt_ids, adapters=adapters, params=sampling
    )
