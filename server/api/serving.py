"""What the API routes share: waiting for a request while watching its client, and the headers of a result."""

from __future__ import annotations

import asyncio

from fastapi import Request

from server.engine.sequence import GenerationRequest, RequestHandle, Sequence
from server.errors import ClientDisconnected

DISCONNECT_POLL_SECONDS = 0.1


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


def request_headers(gen: GenerationRequest) -> dict[str, str]:
    """Known before generation: also sent on streamed responses."""
    return {"x-adapters": "+".join(gen.adapters), "x-prompt-tokens": str(len(gen.prompt_ids))}


def result_headers(seq: Sequence) -> dict[str, str]:
    """TGI's timing headers (milliseconds) and token counts, with the canonical combination."""
    queue = (seq.admitted_at or seq.submitted_at) - seq.submitted_at
    inference = (seq.finished_at or seq.submitted_at) - (seq.admitted_at or seq.submitted_at)
    per_token = inference / len(seq.tokens) if seq.tokens else 0.0
    return {
        **request_headers(seq.request),
        "x-queue-time": f"{queue * 1e3:.0f}",
        "x-inference-time": f"{inference * 1e3:.0f}",
        "x-time-per-token": f"{per_token * 1e3:.0f}",
        "x-generated-tokens": str(len(seq.tokens)),
    }
