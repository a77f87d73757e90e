"""Reading, checking and building adapters in a pool of threads, off the model's thread.

One load per adapter name at a time for the version (its files' stat signature) last asked for. A finished load goes
back through a queue that the residency manager drains on the model's thread (`finished`); the loader never touches
what is resident. A load that failed is remembered for `retry_seconds`: in that window asking again for that version
gives its error (`recent_failure`); after it, the next request retries.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from server.adapters.build import BuiltAdapter, build_adapter
from server.adapters.mixing import BaseLayout
from server.adapters.store import AdapterStore
from server.errors import AdapterLoadFailed, MixserveError

log = logging.getLogger(__name__)
CPU = torch.device("cpu")
# Loader threads' niceness: about a tenth of a core's share beside the model's threads when both want one
LOADER_NICENESS = 10


def _start_loader_thread(torch_threads: int) -> None:
    """A loader thread uses torch's thread count as the server started with it, set here: a thread takes the count
    last set in the process when it first runs a torch operation, and the model's thread sets it to one inside
    adapted layers (mixing._threads), so a loader starting then would keep one thread for good.

    It also takes what the model's threads leave idle: a lower scheduling priority (Linux: per thread; elsewhere a
    thread id is not a process id, and it would lower the whole server). Best effort."""
    torch.set_num_threads(torch_threads)  # this thread's count (and new threads'): the model's thread keeps its own
    if sys.platform != "linux":
        return
    try:
        niceness = os.getpriority(os.PRIO_PROCESS, 0) + LOADER_NICENESS
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except OSError as exc:
        log.info("loader threads keep the server's priority: %s", exc)


@dataclass(frozen=True)
class FinishedLoad:
    name: str
    signature: tuple
    outcome: BuiltAdapter | MixserveError  # 422 for an adapter that cannot be served as it is, 424 for a failed load
    seconds: float


@dataclass(frozen=True)
class _Failure:
    signature: tuple
    at: float
    error: MixserveError


class AdapterLoader:
    def __init__(
        self,
        store: AdapterStore,
        layout: BaseLayout,
        dtype: torch.dtype,
        *,
        max_rank: int | None = None,
        retry_seconds: float = 1.0,
        threads: int = 2,
        wake: Callable[[], None] = lambda: None,
        on_load: Callable[[float | None, str], None] = lambda seconds, outcome: None,
    ):
        """wake: called from a loader thread when a load finished; on_load(seconds or None, "success" | "error")."""
        self.store = store
        self.layout = layout
        self.dtype = dtype
        self.max_rank = max_rank
        self.retry_seconds = retry_seconds
        self._wake = wake
        self._on_load = on_load
        self._pool = ThreadPoolExecutor(
            threads,
            thread_name_prefix="mixserve-loader",
            initializer=_start_loader_thread,
            initargs=(torch.get_num_threads(),),
        )
        self._finished: queue.SimpleQueue[FinishedLoad] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards the two dicts for readers on other threads
        self._loading: dict[str, tuple] = {}  # name -> signature of the load in flight
        self._failures: dict[str, _Failure] = {}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def start(self, name: str, signature: tuple) -> None:
        """Starts loading this version of name, unless it is loading already."""
        with self._lock:
            if self._loading.get(name) == signature:
                return
            self._loading[name] = signature
        try:
            self._pool.submit(self._load, name, signature)
        except BaseException:  # shut down: nothing will finish this load
            with self._lock:
                del self._loading[name]
            raise

    def recent_failure(self, name: str, signature: tuple) -> MixserveError | None:
        """The error of this version's last load, if it failed less than retry_seconds ago."""
        with self._lock:
            failure = self._failures.get(name)
        if failure is None or failure.signature != signature or time.monotonic() - failure.at >= self.retry_seconds:
            return None
        return failure.error

    def is_loading(self, name: str) -> bool:
        with self._lock:
            return name in self._loading

    def last_error(self, name: str) -> MixserveError | None:
        """The error of name's last load, when it failed (whatever the version)."""
        with self._lock:
            failure = self._failures.get(name)
        return failure.error if failure else None

    def finished(self) -> list[FinishedLoad]:
        """The loads finished since the last call, their failures remembered."""
        done = []
        while True:
            try:
                load = self._finished.get_nowait()
            except queue.Empty:
                return done
            with self._lock:
                if self._loading.get(load.name) == load.signature:
                    del self._loading[load.name]
                if isinstance(load.outcome, MixserveError):
                    self._failures[load.name] = _Failure(load.signature, time.monotonic(), load.outcome)
                else:
                    self._failures.pop(load.name, None)
            if isinstance(load.outcome, MixserveError):
                self._on_load(None, "error")
                log.warning("adapter %s: load failed: %s", load.name, load.outcome.message)
            else:
                self._on_load(load.seconds, "success")
            done.append(load)

    def _load(self, name: str, signature: tuple) -> None:
        started = time.perf_counter()
        try:
            outcome = build_adapter(self.store.read(name), self.layout, CPU, self.dtype, self.max_rank)
        except MixserveError as exc:
            outcome = exc
        except Exception as exc:  # a bug or an I/O error: fail this load, not the server
            log.exception("loading adapter %s failed", name)
            outcome = AdapterLoadFailed(f"adapter {name!r}: could not be loaded ({type(exc).__name__})")
        self._finished.put(FinishedLoad(name, signature, outcome, time.perf_counter() - started))
        self._wake()
