"""What is loaded: adapters attached to the resident model, each under an integer slot."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from server.adapters.build import BaseLayout, BuiltAdapter, build_adapter, check_mixable
from server.adapters.kinds import CANONICAL_ORDER
from server.adapters.mixing import MixedLinear, MixingContext
from server.adapters.store import AdapterStore

log = logging.getLogger(__name__)


@dataclass
class LoadedAdapter:
    built: BuiltAdapter
    slot: int
    loaded_at: float = field(default_factory=time.time)
    last_used: float | None = None

    @property
    def name(self) -> str:
        return self.built.name

    @property
    def peft_type(self) -> str:
        return self.built.kind.peft_type

    def describe(self) -> dict:
        return {
            "name": self.name,
            "loaded": True,
            "type": self.peft_type,
            "rank": self.built.kind.rank(self.built.config),
            "target_modules": sorted(self.built.layers),
            "bytes": self.built.nbytes,
            "version": self.built.version,
            "loaded_at": self.loaded_at,
            "last_used": self.last_used,
        }


class AdapterRegistry:
    """Loads adapters into the model and turns combinations into row groups.

    `load`, `unload` and forward passes run on one thread (the engine's); listings may come from any thread.
    """

    def __init__(self, model: nn.Module, store: AdapterStore, device: torch.device, dtype: torch.dtype):
        self.store = store
        self.device = device
        self.dtype = dtype
        self.context = MixingContext()
        self._layout = BaseLayout(model)
        self._wrappers: dict[str, MixedLinear] = {}
        self._loaded: dict[str, LoadedAdapter] = {}
        self._slots = itertools.count()
        self._lock = threading.Lock()  # guards _loaded for readers on other threads
        self.on_load = lambda seconds, outcome: None  # a hook for metrics

    @property
    def capacity(self) -> int:
        """How many adapters can be resident at once: every adapter in the store, for now."""
        return len(self.store.names())

    def get(self, name: str) -> LoadedAdapter | None:
        with self._lock:
            return self._loaded.get(name)

    def loaded(self) -> list[LoadedAdapter]:
        with self._lock:
            return sorted(self._loaded.values(), key=lambda a: a.name)

    def load(self, name: str) -> LoadedAdapter:
        """Read, check and attach; an adapter that fails anywhere leaves the model untouched."""
        if (adapter := self.get(name)) is not None:
            return adapter
        started = time.perf_counter()
        try:
            built = build_adapter(self.store.read(name), self._layout, self.device, self.dtype)
        except Exception:
            self.on_load(None, "error")
            raise
        adapter = LoadedAdapter(built=built, slot=next(self._slots))
        for module_name, layer in built.layers.items():
            self._wrapper(module_name).attach(adapter.slot, layer)
        with self._lock:
            self._loaded[name] = adapter
        self.on_load(time.perf_counter() - started, "success")
        log.info(
            "loaded adapter %s (%s, %d layers, %d bytes) in %.1f ms",
            name,
            adapter.peft_type,
            len(built.layers),
            built.nbytes,
            (time.perf_counter() - started) * 1e3,
        )
        return adapter

    def unload(self, name: str) -> None:
        with self._lock:
            adapter = self._loaded.pop(name)
        for module_name in adapter.built.layers:
            wrapper = self._wrappers[module_name]
            wrapper.detach(adapter.slot)
            if not wrapper.adapters:
                self._replace(module_name, wrapper.base)
                del self._wrappers[module_name]
        log.info("unloaded adapter %s", name)

    def canonical(self, names: list[str]) -> list[str]:
        """names in canonical composition order, by their types (read from the store when not loaded)."""
        types = {}
        for name in names:
            loaded = self.get(name)
            types[name] = loaded.peft_type if loaded else self.store.read_config(name).get("peft_type")
            check_mixable(name, types[name])
        return sorted(names, key=lambda n: CANONICAL_ORDER.index(types[n]))

    def combination(self, names: list[str]) -> list[LoadedAdapter]:
        """Loads what is missing; returns the adapters in canonical order (type nesting, then request order)."""
        adapters = [self.load(name) for name in names]
        return sorted(adapters, key=lambda a: CANONICAL_ORDER.index(a.peft_type))

    def touch(self, adapters: list[LoadedAdapter]) -> None:
        now = time.time()
        for adapter in adapters:
            adapter.last_used = now

    def _wrapper(self, module_name: str) -> MixedLinear:
        if module_name not in self._wrappers:
            wrapper = MixedLinear(self._layout.linears[module_name], self.context)
            self._replace(module_name, wrapper)
            self._wrappers[module_name] = wrapper
        return self._wrappers[module_name]

    def _replace(self, module_name: str, module: nn.Module) -> None:
        parent_name, _, child = module_name.rpartition(".")
        setattr(self._layout.modules[parent_name], child, module)
