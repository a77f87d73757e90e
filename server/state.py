"""Everything the routes need, built once at start-up."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from server.adapters.merges import MergingStore
from server.adapters.registry import AdapterRegistry
from server.adapters.store import AdapterStore
from server.config import Settings
from server.engine.constraints import Grammars
from server.engine.engine import Engine, Inbox
from server.engine.fatal import exit_soon
from server.errors import MixserveError
from server.metrics import Metrics
from server.model import load_model, load_tokenizer
from server.quantization import quantization_of

log = logging.getLogger(__name__)

WEDGED_STALLS = 3  # a step stuck this many times MIXSERVE_STALL_SECONDS: broken (the liveness probe restarts it)


@dataclass
class ServerState:
    settings: Settings
    store: AdapterStore
    registry: AdapterRegistry
    engine: Engine
    grammars: Grammars  # output constraints, compiled for this tokenizer
    tokenizer: object
    max_total_tokens: int | None  # the model's context length, where its config says
    vocab_size: int
    device: str
    dtype: str
    quantization: str  # the base's (server/quantization.py)
    started_at: float
    broken: str | None = None  # why the replica can serve nothing more (set where that is found): /health fails

    def unready(self) -> str | None:
        """Why /ready fails beyond a drain (None: it does not): broken, or an engine stuck in a step."""
        if self.is_broken():
            return self.broken
        stalled = self.engine.stalled_for(time.monotonic())
        if stalled > self.settings.stall_seconds:
            return f"the engine has not finished a step for {stalled:.0f} s with requests (MIXSERVE_STALL_SECONDS)"
        return None

    def is_broken(self) -> bool:
        """Whether /health fails: set `broken` once the engine is wedged (a step stuck for 3 x MIXSERVE_STALL_SECONDS
        with requests: a restart is the way out) or its thread has died."""
        if not self.broken:
            stalled = self.engine.stalled_for(time.monotonic())
            if stalled > WEDGED_STALLS * self.settings.stall_seconds:
                self.broken = f"the engine is wedged: no step finished for {stalled:.0f} s with requests"
            elif not self.engine.alive:
                self.broken = "the engine's thread has died"
        return self.broken is not None

    @classmethod
    def start(cls, settings: Settings, metrics: Metrics | None = None) -> ServerState:
        for note in settings.notes:
            log.warning("settings: %s", note)
        device, dtype = settings.torch_device, settings.torch_dtype
        model = load_model(settings.model_path, device, dtype, settings.quantization)
        tokenizer = load_tokenizer(settings.model_path)
        metrics = metrics or Metrics()
        store = MergingStore.from_settings(settings, on_fetch=metrics.observe_fetch)  # the store, and merges
        inbox = Inbox()  # the engine's: finished loads wake it
        registry = AdapterRegistry(
            model,
            store,
            device,
            dtype,
            max_loaded=settings.max_loaded_adapters,
            max_rank=settings.max_lora_rank,
            memory=settings.adapter_memory,
            host_cache=settings.host_cache,
            retry_seconds=settings.load_retry_seconds,
            wake=inbox.wake,
            on_load=metrics.observe_load,
            on_evict=metrics.observe_evict,
        )
        try:
            engine = Engine(
                model,
                tokenizer,
                registry,
                inbox,
                max_batch_size=settings.max_batch_size,
                max_batch_tokens=settings.max_batch_tokens,
                max_queue=settings.max_queue,
                kv_cache_memory=settings.kv_cache_memory,
                max_sequence_tokens=settings.max_input_tokens + settings.max_new_tokens,
                prefix_cache=settings.prefix_cache,
                paged_attention=settings.paged_attention,
                on_finished=metrics.observe_finished,
            )
        except BaseException:  # e.g. a KV cache budget too small: the registry's threads stop too
            registry.close()
            raise
        engine.start()
        for name in settings.preload_names:  # before the server answers /health
            try:
                registry.ensure(name).result()
            except MixserveError as exc:
                engine.stop()
                raise RuntimeError(f"MIXSERVE_PRELOAD: {exc.message}") from exc
        state = cls(
            settings=settings,
            store=store,
            registry=registry,
            engine=engine,
            grammars=Grammars(tokenizer, model.config.vocab_size, engine.eos_ids),
            tokenizer=tokenizer,
            max_total_tokens=getattr(model.config, "max_position_embeddings", None),
            vocab_size=model.config.vocab_size,
            device=device.type,
            dtype=str(dtype).removeprefix("torch."),
            quantization=quantization_of(model),
            started_at=time.time(),
        )
        engine.on_fatal = state.device_failed
        return state

    def device_failed(self, reason: str) -> None:
        """The engine's device failed (server/engine/fatal.py): /health and /ready fail, and the process exits."""
        self.broken = f"the device failed: {reason}"
        exit_soon()

    def stop(self) -> None:
        self.engine.stop()
        self.store.close()
