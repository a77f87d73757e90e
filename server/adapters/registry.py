"""What is resident: adapters attached to the model (each version under its own slot), a host-memory tier of
recently evicted ones, the running requests' references to them, and the budget that decides what is evicted.

Loads happen in the AdapterLoader, off the model's thread. Everything that touches the model — attaching, evicting,
unloading — happens on the engine's thread at a step boundary (`resolve`, `poll`, `unload`); listings and `ensure`
may come from any thread.

Lifecycle of a name: its files' stat signature is taken on every request. A signature that no resident version
has starts one load; requests wait for it while everything else keeps running. While a load of that version failed
recently, requests get the old version if there is one (a corrupt or half-written update leaves the old one
serving), else the error. A new version replaces the old one for new requests; requests already running keep the
old one, which is freed when the last of them finishes.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from torch import nn

from server.adapters.build import BuiltAdapter, check_mixable
from server.adapters.host import release_cached
from server.adapters.kinds import CANONICAL_ORDER
from server.adapters.loader import CPU, AdapterLoader, FinishedLoad
from server.adapters.mixing import BaseLayout, MixedModel, MixingContext
from server.adapters.store import AdapterStore
from server.errors import AdapterBusy, AdapterOutOfMemory, MixserveError, ShuttingDown, ValidationError

log = logging.getLogger(__name__)
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
class _Entry:
    current: LoadedAdapter | None = None  # the newest good version
    retired: list[LoadedAdapter] = field(default_factory=list)  # older versions still running


class AdapterRegistry:
    def __init__(
        self,
        model: nn.Module,
        store: AdapterStore,
        device: torch.device,
        dtype: torch.dtype,
        *,
        max_loaded: int | None = None,
        max_rank: int | None = None,
        memory: int | None = None,
        host_cache: int = 0,
        retry_seconds: float = 1.0,
        loader_threads: int = 2,
        wake: Callable[[], None] = lambda: None,
        on_load: Callable[[float | None, str], None] = lambda seconds, outcome: None,
        on_evict: Callable[[str], None] = lambda name: None,
    ):
        """wake: called from any thread when the engine's thread has work here (a load finished, a load asked for);
        on_load and on_evict: for metrics."""
        self.store = store
        self.device = device
        self.max_loaded = max_loaded
        self.memory = memory
        self.host_cache = host_cache
        self.context = MixingContext()
        layout = BaseLayout(model)
        self.model = MixedModel(layout, self.context)
        self.loader = AdapterLoader(
            store,
            layout,
            dtype,
            max_rank=max_rank,
            retry_seconds=retry_seconds,
            threads=loader_threads,
            wake=wake,
            on_load=on_load,
        )
        self._wake = wake
        self._on_evict = on_evict
        self._entries: dict[str, _Entry] = {}
        self._host: OrderedDict[str, LoadedAdapter] = OrderedDict()  # evicted, kept in host memory; LRU first
        self._slots = itertools.count()
        self._waiters: dict[str, list[Future]] = {}  # `ensure`'s callers, by name
        self._lock = threading.Lock()  # guards _entries, _host and _waiters for other threads
        self._capacity: tuple[float, int] | None = None  # (when counted, adapters in the store)

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
        """At shutdown, after the engine's thread stopped: `ensure`'s callers get ShuttingDown."""
        self.loader.close()
        with self._lock:
            waiters, self._waiters = self._waiters, {}
        for pending in waiters.values():
            _settle(pending, ShuttingDown("the server is shutting down"))

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

    def peft_type(self, name: str) -> str:
        """The adapter's type: the loaded version's, else its config's (cached by the file's stat). Raises for an
        adapter that is not in the store or whose type cannot be mixed."""
        current = self.get(name)
        peft_type = current.peft_type if current else self.store.peft_type(name)
        check_mixable(name, peft_type)
        return peft_type

    def describe(self, name: str) -> dict:
        """State (available | loading | loaded | host | error), version, bytes, times, error text."""
        with self._lock:
            entry = self._entries.get(name) or _Entry()
            current = entry.current
        error = self.loader.last_error(name)
        state = "available"
        if current is not None:
            state = "loaded" if current.resident else "host"
        elif error is not None:
            state = "error"
        if self.loader.is_loading(name):
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
        if error is not None:
            info["error"] = error.message
        return info

    # --- the engine's thread

    def resolve(
        self, names: list[str], protected: set[str], check: Callable[[list[LoadedAdapter]], None] = lambda _: None
    ) -> list[LoadedAdapter] | None:
        """The resident adapters for a request, in canonical order; None while one is loading (loads start here).
        Raises NoRoom while memory is short, or the error of a failed load that left nothing to serve.
        protected: names that making room must not evict (adapters of older waiting requests); check: refuses a
        combination by raising, before anything is made resident (a refused request evicts nothing)."""
        versions = [self._version(name) for name in names]
        if None in versions:
            return None
        self._check_fits(versions)
        check(versions)
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
        """Takes finished loads in; resolves `ensure`'s futures."""
        for load in self.loader.finished():
            if not isinstance(load.outcome, MixserveError):
                self._take(load)
        with self._lock:
            names = list(self._waiters)
        for name in names:
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
            with self._lock:
                waiters = self._waiters.pop(name)
            _settle(waiters, adapter)

    def ensure(self, name: str) -> Future:
        """From any thread: a future of the adapter once resident (the API's load, preloads)."""
        future: Future = Future()
        with self._lock:
            self._waiters.setdefault(name, []).append(future)
        self._wake()
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
        current = self._entry(name).current
        if current is not None and current.built.signature == signature:
            return current
        error = self.loader.recent_failure(name, signature)
        if error is None:
            self.loader.start(name, signature)
            return None
        if current is None:
            raise error
        return current  # the new version is broken: the old one serves

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

    def _take(self, load: FinishedLoad) -> None:
        """A new version becomes current (in no slot yet); the old one is dropped, or retired while it runs."""
        entry = self._entry(load.name)
        built: BuiltAdapter = load.outcome
        current = entry.current
        if current is not None and current.built.version == built.version:
            current.built.signature = built.signature  # touched, not changed
            return
        adapter = LoadedAdapter(built=built, slot=next(self._slots), load_ms=load.seconds * 1e3)
        with self._lock:
            entry.current = adapter
        log.info("adapter %s: version %s read and checked in %.1f ms", load.name, built.version, load.seconds * 1e3)
        if current is not None:
            with self._lock:
                self._host.pop(load.name, None)
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
        size = adapter.nbytes  # counted (and cached) from its own tensors, before the pools take them
        adapter.built = self._attach(adapter, protected)
        with self._lock:
            adapter.resident = True
            self._host.pop(adapter.name, None)
        log.info(
            "adapter %s: attached (%d bytes) in %.1f ms",
            adapter.name,
            size,
            (time.perf_counter() - started) * 1e3,
        )
        return adapter

    def _attach(self, adapter: LoadedAdapter, protected: set[str]) -> BuiltAdapter:
        """The adapter's weights on the device, attached to the model. Out of memory (the copy, or a rank pool
        growing), every idle adapter is evicted and both are tried once more; out of memory again fails the requests
        that need it (503), leaving the adapter in host memory and in no layer."""
        try:
            return self._attached_copy(adapter)
        except torch.OutOfMemoryError:
            idle = [a for a in self.loaded() if a.refs == 0 and a.name not in protected and a is not adapter]
            log.warning("adapter %s: out of device memory; evicting %d idle adapters", adapter.name, len(idle))
            for victim in idle:
                self._evict(victim)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        try:
            return self._attached_copy(adapter)
        except torch.OutOfMemoryError as exc:
            raise AdapterOutOfMemory(
                f"adapter {adapter.name!r}: out of device memory ({adapter.nbytes} bytes), even after evicting the"
                " idle adapters; retry later"
            ) from exc

    def _attached_copy(self, adapter: LoadedAdapter) -> BuiltAdapter:
        built = adapter.built.to(self.device)
        # on the CPU the copy is the adapter itself: a failed attach gives its layers their weights back
        self.model.attach(adapter.slot, built.layers, (adapter.name, built.version), undo_keeps=built is adapter.built)
        return built

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
        pin = self.device.type == "cuda"
        kept = adapter.built.host_nbytes(pin) <= self.host_cache
        if kept and self.device != CPU:  # copied off the device from the rank pools, before they free its ranks
            adapter.built = adapter.built.to_host(pin)
        self._detach(adapter, keep=kept and self.device == CPU)
        self._on_evict(adapter.name)
        if not kept:
            with self._lock:
                entry = self._entries[adapter.name]
                if entry.current is adapter:
                    entry.current = None
            log.info("adapter %s: evicted", adapter.name)
            return
        dropped = 0
        with self._lock:
            self._host[adapter.name] = adapter
            while sum(a.built.host_nbytes(pin) for a in self._host.values()) > self.host_cache:
                _, oldest = self._host.popitem(last=False)
                entry = self._entries[oldest.name]
                if entry.current is oldest:
                    entry.current = None
                dropped += 1
        if dropped and pin:
            release_cached()
        log.info("adapter %s: evicted to host memory", adapter.name)

    def _touch_host(self, adapter: LoadedAdapter) -> None:
        with self._lock:
            if adapter.name in self._host:
                self._host.move_to_end(adapter.name)

    def _drop(self, adapter: LoadedAdapter | None) -> None:
        if adapter is not None and adapter.resident:
            self._detach(adapter, keep=False)

    def _detach(self, adapter: LoadedAdapter, keep: bool) -> None:
        """keep: its weights stay with it (the host tier on the CPU); else they go with the device's copy."""
        self.model.detach(adapter.slot, adapter.built.layers, keep)
        with self._lock:
            adapter.resident = False


def _settle(waiters: list[Future], outcome: LoadedAdapter | MixserveError) -> None:
    """Resolves each waiter that its caller has not cancelled (a cancelled one must not fail the others)."""
    for waiter in waiters:
        if not waiter.set_running_or_notify_cancel():
            continue
        if isinstance(outcome, MixserveError):
            waiter.set_exception(outcome)
        else:
            waiter.set_result(outcome)
