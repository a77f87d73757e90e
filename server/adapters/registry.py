"""What is loaded: adapters resident in the model (each version under its own slot), a host-memory tier of
recently evicted ones, and the loads in flight.

Reading, checking and building an adapter happens in a loader pool, off the model's thread. Everything that
touches the model — attaching, evicting, unloading — happens on the engine's thread at a step boundary
(`resolve`, `poll`, `ensure`, `unload`); listings may come from any thread.

Lifecycle of a name: its files' stat signature is taken on every request. A signature that no resident version
has starts one load (single-flight); requests wait for it while everything else keeps running. A load that fails
is remembered for `retry_seconds`: in that window requests get the old version if there is one (a corrupt or
half-written update leaves the old one serving), else the error; after it, the next request retries. A new
version replaces the old one for new requests; requests already running keep the old one, which is freed when
the last of them finishes.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import nn

from server.adapters.build import BaseLayout, BuiltAdapter, build_adapter, check_mixable
from server.adapters.kinds import CANONICAL_ORDER
from server.adapters.mixing import MixedLinear, MixedParameters, MixingContext, mixed_layer
from server.adapters.store import AdapterStore
from server.errors import AdapterBusy, AdapterLoadFailed, AdapterOutOfMemory, MixserveError, ValidationError

log = logging.getLogger(__name__)
CPU = torch.device("cpu")
CAPACITY_SECONDS = 10.0  # without MIXSERVE_MAX_LOADED_ADAPTERS, capacity counts the store at most this often


class NoRoom(Exception):
    """Not enough adapter memory until running requests finish."""


@dataclass(eq=False)
class LoadedAdapter:
    """One version of an adapter, resident (attached to the model) or in the host tier."""

    built: BuiltAdapter
    slot: int
    load_ms: float
    resident: bool = False
    refs: int = 0  # running requests using this version
    loaded_at: float = field(default_factory=time.time)
    last_used: float | None = None

    @property
    def name(self) -> str:
        return self.built.name

    @property
    def peft_type(self) -> str:
        return self.built.kind.peft_type

    @property
    def nbytes(self) -> int:
        return self.built.nbytes


@dataclass
class _Failure:
    signature: tuple
    at: float
    error: MixserveError


@dataclass
class _Entry:
    current: LoadedAdapter | None = None  # the newest good version
    retired: list[LoadedAdapter] = field(default_factory=list)  # older versions still running
    loading: tuple | None = None  # signature of the load in flight
    failure: _Failure | None = None


class AdapterRegistry:
    def __init__(
        self,
        model: nn.Module,
        store: AdapterStore,
        device: torch.device,
        dtype: torch.dtype,
        *,
        max_loaded: int | None = None,
        memory: int | None = None,
        host_cache: int = 0,
        retry_seconds: float = 1.0,
        loader_threads: int = 2,
    ):
        self.store = store
        self.device = device
        self.dtype = dtype
        self.max_loaded = max_loaded
        self.memory = memory
        self.host_cache = host_cache
        self.retry_seconds = retry_seconds
        self.context = MixingContext()
        self._layout = BaseLayout(model)
        self._wrappers: dict[str, MixedLinear | MixedParameters] = {}
        self._entries: dict[str, _Entry] = {}
        self._host: OrderedDict[str, LoadedAdapter] = OrderedDict()  # evicted, kept in host memory; LRU first
        self._slots = itertools.count()
        self._pool = ThreadPoolExecutor(loader_threads, thread_name_prefix="mixserve-loader")
        self._finished: queue.SimpleQueue = queue.SimpleQueue()
        self._waiters: dict[str, list[Future]] = {}
        self._lock = threading.Lock()  # guards _entries and _host for readers on other threads
        self._capacity: tuple[float, int] | None = None  # (when counted, adapters in the store)
        self.on_load = lambda seconds, outcome: None  # hooks, for metrics
        self.on_evict = lambda name: None
        self.wake = lambda: None  # called from a loader thread when a load finished

    @property
    def capacity(self) -> int:
        """How many adapters can be resident at once (vLLM's max_lora): without a limit, the store's size, counted
        at most every CAPACITY_SECONDS (scrapes must not walk a large store each time)."""
        if self.max_loaded:
            return self.max_loaded
        now = time.monotonic()
        if self._capacity is None or now - self._capacity[0] > CAPACITY_SECONDS:
            self._capacity = (now, len(self.store.names()))
        return self._capacity[1]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- any thread

    def loaded(self) -> list[LoadedAdapter]:
        """Resident versions, retired ones included."""
        with self._lock:
            return [a for e in self._entries.values() for a in (e.current, *e.retired) if a and a.resident]

    def known(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def get(self, name: str) -> LoadedAdapter | None:
        with self._lock:
            entry = self._entries.get(name)
            return entry.current if entry else None

    def canonical(self, names: list[str]) -> list[str]:
        """names in canonical composition order, by their types (read from the store when not loaded)."""
        types = {}
        for name in names:
            current = self.get(name)
            types[name] = current.peft_type if current else self.store.peft_type(name)
            check_mixable(name, types[name])
        return sorted(names, key=lambda n: CANONICAL_ORDER.index(types[n]))

    def describe(self, name: str) -> dict:
        """State (available | loading | loaded | host | error), version, bytes, times, error text."""
        with self._lock:
            entry = self._entries.get(name) or _Entry()
            current = entry.current
        state = "available"
        if current is not None:
            state = "loaded" if current.resident else "host"
        elif entry.failure is not None:
            state = "error"
        if entry.loading is not None:
            state = "loading"
        info = {"name": name, "state": state, "loaded": current is not None and current.resident}
        if current is not None:
            built = current.built
            info.update(
                type=current.peft_type,
                rank=built.kind.rank(built.config),
                target_modules=sorted(built.layers),
                bytes=current.nbytes,
                version=built.version,
                loaded_at=current.loaded_at,
                last_used=current.last_used,
                last_load_ms=round(current.load_ms, 1),
                running_requests=current.refs,
            )
        if entry.failure is not None:
            info["error"] = entry.failure.error.message
        return info

    # --- the engine's thread

    def resolve(self, names: list[str], protected: set[str]) -> list[LoadedAdapter] | None:
        """The resident adapters for a request, in canonical order; None while one is loading (loads start here).
        Raises NoRoom while memory is short, or the error of a failed load that left nothing to serve.
        protected: names that making room must not evict (adapters of older waiting requests)."""
        versions = [self._version(name) for name in names]
        if None in versions:
            return None
        self._check_fits(versions)
        adapters = [self._resident(adapter, protected | set(names)) for adapter in versions]
        return sorted(adapters, key=lambda a: CANONICAL_ORDER.index(a.peft_type))

    def load_blocking(self, names: list[str], timeout: float = 120.0) -> list[LoadedAdapter]:
        """resolve, waiting for the loads: for a caller that owns the model's thread and has nothing else to run
        (tools, tests)."""
        deadline = time.monotonic() + timeout
        while (adapters := self.resolve(names, set())) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"loading {names} took over {timeout} s")
            time.sleep(0.001)
            self.poll()
        return adapters

    def acquire(self, adapters: list[LoadedAdapter]) -> None:
        now = time.time()
        for adapter in adapters:
            adapter.refs += 1
            adapter.last_used = now
            self._touch_host(adapter)

    def release(self, adapters: list[LoadedAdapter]) -> None:
        for adapter in adapters:
            adapter.refs -= 1
            entry = self._entries.get(adapter.name)
            if adapter.refs == 0 and entry is not None and adapter in entry.retired:
                with self._lock:
                    entry.retired.remove(adapter)
                self._drop(adapter)

    def poll(self) -> None:
        """Takes finished loads in; resolves API waiters (`ensure`)."""
        while True:
            try:
                name, signature, outcome, seconds = self._finished.get_nowait()
            except queue.Empty:
                break
            self._finish_load(name, signature, outcome, seconds)
        for name in list(self._waiters):
            try:
                adapter = self.resolve([name], set())
                adapter = adapter and adapter[0]
            except NoRoom:
                adapter = AdapterBusy(
                    f"no room for adapter {name!r}: the resident adapters are in use (MIXSERVE_MAX_LOADED_ADAPTERS /"
                    " MIXSERVE_ADAPTER_MEMORY); retry when requests finish"
                )
            except MixserveError as exc:
                adapter = exc
            except Exception:  # a bug or an I/O error: this load's callers get it, not the engine's step
                log.exception("loading adapter %s for the API failed", name)
                adapter = MixserveError(f"internal error loading adapter {name!r}")
            if adapter is None:
                continue
            for waiter in self._waiters.pop(name):
                if isinstance(adapter, MixserveError):
                    waiter.set_exception(adapter)
                else:
                    waiter.set_result(adapter)

    def ensure(self, name: str) -> Future:
        """Resident soon: the future resolves to the adapter (the API's load, preloads)."""
        future: Future = Future()
        self._waiters.setdefault(name, []).append(future)
        self.poll()
        return future

    def unload(self, name: str, needed: set[str]) -> bool:
        """Frees every version of name (device and host); refused while running or waiting requests use it."""
        entry = self._entries.get(name)
        if entry is None or (entry.current is None and not entry.retired):
            return False
        running = sum(a.refs for a in (entry.current, *entry.retired) if a)
        if running or name in needed:
            raise AdapterBusy(
                f"adapter {name!r} is in use by {running} running and {'some' if name in needed else 'no'} waiting"
                " requests; retry when they finish"
            )
        with self._lock:
            current, entry.current = entry.current, None
            self._host.pop(name, None)
        self._drop(current)
        log.info("unloaded adapter %s", name)
        return True

    # --- internals (engine thread)

    def _entry(self, name: str) -> _Entry:
        with self._lock:  # listings iterate _entries on other threads
            return self._entries.setdefault(name, _Entry())

    def _version(self, name: str) -> LoadedAdapter | None:
        """The version of name to serve, resident or not; None while it is loading (the load starts here)."""
        signature = self.store.signature(name)
        entry = self._entry(name)
        current = entry.current
        if current is None or current.built.signature != signature:
            failure = entry.failure
            if failure is not None and failure.signature == signature:
                if time.monotonic() - failure.at < self.retry_seconds:
                    if current is None:
                        raise failure.error
                    return current  # the new version is broken: the old one serves
            self._start_load(name, signature, entry)
            return None
        return current

    def _check_fits(self, adapters: list[LoadedAdapter]) -> None:
        """Refuses a combination that could never be resident at once, whatever finishes or is evicted."""
        if self.max_loaded is not None and len(adapters) > self.max_loaded:
            raise ValidationError(
                f"{len(adapters)} adapters requested; MIXSERVE_MAX_LOADED_ADAPTERS allows {self.max_loaded} at once"
            )
        total = sum(a.nbytes for a in adapters)
        if self.memory is not None and total > self.memory:
            which = f"adapter {adapters[0].name!r} needs" if len(adapters) == 1 else "these adapters need together"
            raise ValidationError(f"{which} {total} bytes; MIXSERVE_ADAPTER_MEMORY is {self.memory} bytes")

    def _start_load(self, name: str, signature: tuple, entry: _Entry) -> None:
        if entry.loading == signature:
            return
        with self._lock:
            entry.loading = signature

        def load() -> None:
            started = time.perf_counter()
            try:
                outcome = build_adapter(self.store.read(name), self._layout, CPU, self.dtype)
            except MixserveError as exc:
                outcome = exc
            except Exception as exc:  # a bug or an I/O error: fail this load, not the server
                log.exception("loading adapter %s failed", name)
                outcome = AdapterLoadFailed(f"adapter {name!r}: could not be loaded ({type(exc).__name__})")
            self._finished.put((name, signature, outcome, time.perf_counter() - started))
            self.wake()

        self._pool.submit(load)

    def _finish_load(self, name: str, signature: tuple, outcome, seconds: float) -> None:
        entry = self._entry(name)
        with self._lock:
            if entry.loading == signature:
                entry.loading = None
        if isinstance(outcome, MixserveError):
            error = outcome  # 422 for an adapter that cannot be served as it is, 424 for a load that failed
            with self._lock:
                entry.failure = _Failure(signature, time.monotonic(), error)
            self.on_load(None, "error")
            log.warning("adapter %s: load failed: %s", name, outcome.message)
            return
        self.on_load(seconds, "success")
        current = entry.current
        if current is not None and current.built.version == outcome.version:
            current.built.signature = outcome.signature  # touched, not changed
            return
        adapter = LoadedAdapter(built=outcome, slot=next(self._slots), load_ms=seconds * 1e3)
        with self._lock:
            entry.current, entry.failure = adapter, None
        log.info("adapter %s: version %s read and checked in %.1f ms", name, outcome.version, seconds * 1e3)
        if current is not None:
            with self._lock:
                self._host.pop(name, None)
            if current.refs:
                with self._lock:
                    entry.retired.append(current)
            else:
                self._drop(current)

    def _resident(self, adapter: LoadedAdapter, protected: set[str]) -> LoadedAdapter:
        if adapter.resident:
            return adapter
        self._make_room(adapter, protected)
        started = time.perf_counter()
        adapter.built = self._to_device(adapter, protected)
        for module_name, layer in adapter.built.layers.items():
            self._wrapper(module_name).attach(adapter.slot, layer)
        with self._lock:
            adapter.resident = True
            self._host.pop(adapter.name, None)
        log.info(
            "adapter %s: attached (%d bytes) in %.1f ms",
            adapter.name,
            adapter.nbytes,
            (time.perf_counter() - started) * 1e3,
        )
        return adapter

    def _to_device(self, adapter: LoadedAdapter, protected: set[str]) -> BuiltAdapter:
        """The adapter's weights on the device. Out of memory, every idle adapter is evicted and the copy tried once
        more; out of memory again fails the requests that need it (503), leaving the adapter in host memory."""
        try:
            return adapter.built.to(self.device)
        except torch.OutOfMemoryError:
            idle = [a for a in self.loaded() if a.refs == 0 and a.name not in protected and a is not adapter]
            log.warning("adapter %s: out of device memory; evicting %d idle adapters", adapter.name, len(idle))
            for victim in idle:
                self._evict(victim)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        try:
            return adapter.built.to(self.device)
        except torch.OutOfMemoryError as exc:
            raise AdapterOutOfMemory(
                f"adapter {adapter.name!r}: out of device memory ({adapter.nbytes} bytes), even after evicting the"
                " idle adapters; retry later"
            ) from exc

    def _make_room(self, adapter: LoadedAdapter, protected: set[str]) -> None:
        while self._over_budget(adapter.nbytes):
            victims = [a for a in self.loaded() if a.refs == 0 and a.name not in protected and a is not adapter]
            if not victims:
                raise NoRoom(adapter.name)
            self._evict(min(victims, key=lambda a: a.last_used or a.loaded_at))

    def _over_budget(self, extra: int) -> bool:
        resident = self.loaded()
        too_many = self.max_loaded is not None and len(resident) + 1 > self.max_loaded
        too_big = self.memory is not None and sum(a.nbytes for a in resident) + extra > self.memory
        return too_many or too_big

    def _evict(self, adapter: LoadedAdapter) -> None:
        self._detach(adapter)
        self.on_evict(adapter.name)
        if adapter.nbytes > self.host_cache:
            with self._lock:
                entry = self._entries[adapter.name]
                if entry.current is adapter:
                    entry.current = None
            log.info("adapter %s: evicted", adapter.name)
            return
        if self.device != CPU:
            adapter.built = adapter.built.to(CPU, pin=self.device.type == "cuda")
        with self._lock:
            self._host[adapter.name] = adapter
            while sum(a.nbytes for a in self._host.values()) > self.host_cache:
                _, dropped = self._host.popitem(last=False)
                entry = self._entries[dropped.name]
                if entry.current is dropped:
                    entry.current = None
        log.info("adapter %s: evicted to host memory", adapter.name)

    def _touch_host(self, adapter: LoadedAdapter) -> None:
        with self._lock:
            if adapter.name in self._host:
                self._host.move_to_end(adapter.name)

    def _drop(self, adapter: LoadedAdapter | None) -> None:
        if adapter is not None and adapter.resident:
            self._detach(adapter)

    def _detach(self, adapter: LoadedAdapter) -> None:
        for module_name in adapter.built.layers:
            self._wrappers[module_name].detach(adapter.slot)
        with self._lock:
            adapter.resident = False

    def _wrapper(self, module_name: str) -> MixedLinear | MixedParameters:
        """Wrapped on first use and kept: without adapters a wrapper costs one lookup per pass."""
        if module_name not in self._wrappers:
            wrapper = mixed_layer(self._layout.modules[module_name], self.context)
            parent_name, _, child = module_name.rpartition(".")
            setattr(self._layout.modules[parent_name], child, wrapper)
            self._wrappers[module_name] = wrapper
        return self._wrappers[module_name]
