"""The engine: HTTP handlers enqueue requests; one worker thread owns the model and generates."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from server.adapters.registry import AdapterRegistry
from server.engine.runner import ModelRunner
from server.engine.sampling import TokenChooser
from server.engine.sequence import GenerationRequest, Sequence
from server.errors import MixserveError

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """The client went away; its work stops."""


@dataclass
class _Job:
    request: GenerationRequest
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


class Engine:
    def __init__(self, model, tokenizer, registry: AdapterRegistry):
        self.model = model
        self.tokenizer = tokenizer
        self.registry = registry
        self.runner = ModelRunner(model, registry.context)
        self.eos_ids = frozenset(_eos_ids(model, tokenizer))
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="mixserve-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()

    async def generate(self, request: GenerationRequest) -> Sequence:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put(_Job(request, future, loop))
        return await future

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            if job.future.cancelled():
                continue
            started = time.perf_counter()
            try:
                outcome = self._run(job)
            except Cancelled:
                log.info("request %s cancelled by the client", job.request.request_id)
                continue
            except MixserveError as exc:
                outcome = exc
            except Exception as exc:
                log.exception("request %s failed (adapters %s)", job.request.request_id, job.request.adapters)
                outcome = MixserveError(f"internal error in request {job.request.request_id}: {exc}")
            job.loop.call_soon_threadsafe(_settle, job.future, outcome)
            if isinstance(outcome, Sequence):
                log.info(
                    "request %s: %d tokens with [%s] in %.0f ms (%s)",
                    job.request.request_id,
                    len(outcome.tokens),
                    "+".join(outcome.adapters),
                    (time.perf_counter() - started) * 1e3,
                    outcome.finish_reason,
                )

    def _run(self, job: _Job) -> Sequence:
        request = job.request
        adapters = self.registry.combination(request.adapters)
        group = self.registry.row_group(adapters)
        device = self.runner.device
        seq = Sequence(
            request=request,
            chooser=TokenChooser(request.params, device),
            tokenizer=self.tokenizer,
            eos_ids=self.eos_ids,
            adapters=[a.name for a in adapters],
        )
        prompt_len = len(request.prompt_ids)
        ids = torch.empty((1, prompt_len + request.params.max_new_tokens), dtype=torch.long, device=device)
        ids[0, :prompt_len] = torch.tensor(request.prompt_ids, device=device)
        cache = DynamicCache(config=self.model.config)
        logits = self.runner.forward(ids[:, :prompt_len], [group], cache)
        while True:
            length = prompt_len + len(seq.tokens)
            token, logprob = seq.chooser(ids[:, :length], logits)
            seq.append(token, logprob)
            if seq.finished:
                return seq
            if job.future.cancelled():
                raise Cancelled
            ids[0, length] = token
            logits = self.runner.forward(ids[:, length : length + 1], [group], cache)


def _settle(future: asyncio.Future, outcome) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _eos_ids(model, tokenizer) -> set[int]:
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids = set(configured if isinstance(configured, list) else [configured])
    ids.add(tokenizer.eos_token_id)
    return {i for i in ids if i is not None}
