"""Mounted adapters: a name under a mount resolves to a folder of the disk tier, fetched on demand.

Called by the store. `signature` is taken on the engine's thread for every request and never touches the network:
it answers the version last seen at the source, and when that is older than `check_seconds` it asks a background
thread to look again (so a changed remote object is picked up like a changed local file). `materialize` may fetch
(loader threads, or the API's worker threads): the source's current version, then the disk tier's folder for it,
fetched once however many callers want it at the same time.

A failure is remembered per name with backoff (retry_seconds, doubled on each further failure up to
MAX_BACKOFF_SECONDS); meanwhile asking again answers the same error (a new exception each time: one object raised in
several threads would share its traceback) without a network call. A source that finds the version it was asked
for gone (S3's 412 on If-Match) has its version looked at again at once, and the fetch retried once. Clients see the reason
only: never a credential, a bucket or a URL (those go to the log at most, as the exception's type).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from server.adapters.sources import Mount, SourceError
from server.adapters.sources.disk import DiskTier
from server.errors import AdapterLoadFailed, AdapterNotFound, MixserveError

log = logging.getLogger(__name__)
MAX_BACKOFF_SECONDS = 60.0
REASONS = {
    "unreachable": "its source is unreachable",
    "access_denied": "access to it was denied",
    "timeout": "its source did not answer in time",
    "incomplete": "the download was incomplete",
    "corrupt": "the downloaded files failed their integrity check",
    "changed": "it changed while being downloaded",
    "not_cached": "it is not in the local Hub cache and HF_HUB_OFFLINE is set",
    "error": "its source answered with an error",
}


@dataclass
class _Seen:
    version: str | None  # None: missing at the source
    at: float


@dataclass
class _Failure:
    error: type[MixserveError]
    message: str
    at: float
    count: int

    def until(self, retry_seconds: float) -> float:
        return self.at + min(retry_seconds * 2 ** (self.count - 1), MAX_BACKOFF_SECONDS)


class RemoteAdapters:
    def __init__(
        self,
        mounts: list[Mount],
        disk: DiskTier,
        *,
        check_seconds: float = 30.0,
        retry_seconds: float = 1.0,
        on_fetch: Callable[[float | None, int, str], None] = lambda seconds, size, outcome: None,
    ):
        """on_fetch(seconds or None, bytes, "success" | a SourceError reason): for metrics (a failed version check
        counts as a failed fetch)."""
        self.mounts = mounts
        self.disk = disk
        self.check_seconds = check_seconds
        self.retry_seconds = retry_seconds
        self._on_fetch = on_fetch
        self._lock = threading.Lock()
        self._seen: dict[str, _Seen] = {}
        self._failures: dict[str, _Failure] = {}
        self._flights: dict[Path, Future] = {}  # one fetch per adapter version
        self._checking: set[str] = set()
        self._checker = ThreadPoolExecutor(2, thread_name_prefix="mixserve-remote-check")

    def mount(self, name: str) -> Mount | None:
        return next((m for m in self.mounts if m.key(name) is not None), None)

    def close(self) -> None:
        self._checker.shutdown(wait=False, cancel_futures=True)

    # --- any thread, no network

    def signature(self, name: str) -> tuple:
        """(mount, version last seen) — None before the first look. Raises AdapterNotFound for an adapter last seen
        missing at the source (looked at again every check_seconds)."""
        mount = self.mount(name)
        with self._lock:
            seen = self._seen.get(name)
        if seen is not None and time.monotonic() - seen.at >= self.check_seconds:
            self._check_later(name)
        if seen is not None and seen.version is None:
            raise AdapterNotFound(f"adapter {name!r} not found at its source")
        return ("remote", mount.name, seen.version if seen else None)

    def tier(self, name: str) -> str:
        """'disk' when a version is on disk, else 'remote'."""
        return "disk" if self.folder_on_disk(name, use=False) is not None else "remote"

    def folder_on_disk(self, name: str, use: bool = True, pin: bool = False) -> Path | None:
        """The disk tier's folder of the version last seen, else of the latest version on disk, or None; pinned when
        pin (then unpin it)."""
        with self._lock:
            seen = self._seen.get(name)
        folder = self.disk.get(name, seen.version, use, pin) if seen is not None and seen.version else None
        latest = self.disk.latest(name, pin) if folder is None else None
        return latest[0] if latest else folder

    def names(self) -> set[str]:
        """The mounted adapters on disk (a bucket or an organisation is not listed): listing them never fetches."""
        return {name for name in self.disk.names() if self.mount(name) is not None}

    # --- may fetch: loader threads, API worker threads

    @contextmanager
    def materialized(self, name: str) -> Iterator[tuple[Path, str]]:
        """materialize's answer, pinned in the disk tier meanwhile (a fetch of another adapter cannot evict it while
        it is read)."""
        folder, version = self._materialize(name)
        try:
            yield folder, version
        finally:
            self.disk.unpin(folder)

    def materialize(self, name: str) -> tuple[Path, str]:
        """(folder in the disk tier, version) of name's current version, not pinned (it may be evicted by the time
        it is read: read it in `materialized`); raises AdapterNotFound (404) or AdapterLoadFailed (424)."""
        with self.materialized(name) as found:
            return found

    def _materialize(self, name: str) -> tuple[Path, str]:
        with self._lock:
            failure = self._failures.get(name)
        if failure is not None and time.monotonic() < failure.until(self.retry_seconds):
            raise failure.error(failure.message)
        mount = self.mount(name)
        try:
            version, folder = self._current(name, mount)
        except SourceError as exc:
            away = exc.reason in ("unreachable", "timeout", "not_cached")
            stale = self.disk.latest(name, pin=True) if away else None
            if stale is not None:  # the source is away: serve what is on disk, look again after check_seconds
                log.warning("adapter %s: source %s; serving the version on disk", name, exc.reason)
                with self._lock:
                    self._seen[name] = _Seen(stale[1], time.monotonic())
                return stale
            raise self._failed(name, exc, failure) from None
        with self._lock:
            self._failures.pop(name, None)
        return folder, version

    def _current(self, name: str, mount: Mount) -> tuple[str, Path]:
        """The current version and its folder, pinned. A version gone at the source by the time it is fetched (S3's
        412) is looked at again at once rather than after check_seconds."""
        version = self._version(name, mount)
        try:
            return version, self._pinned(name, mount, version)
        except SourceError as exc:
            if exc.reason != "changed":
                raise
        log.info("adapter %s: changed at its source since its version was looked at; looking again", name)
        with self._lock:
            self._seen.pop(name, None)
        version = self._version(name, mount)
        return version, self._pinned(name, mount, version)

    def _version(self, name: str, mount: Mount) -> str:
        """The version last seen while it is fresh, else the source's (and it is remembered)."""
        with self._lock:
            seen = self._seen.get(name)
        if seen is not None and seen.version is not None and time.monotonic() - seen.at < self.check_seconds:
            return seen.version
        try:
            version = mount.source.version(mount.key(name))
        except SourceError as exc:
            if exc.reason == "not_found":
                with self._lock:
                    self._seen[name] = _Seen(None, time.monotonic())
            raise
        with self._lock:
            self._seen[name] = _Seen(version, time.monotonic())
        return version

    def _pinned(self, name: str, mount: Mount, version: str) -> Path:
        """The version's folder, pinned: on disk already, else fetched (a caller that waited for another's fetch
        pins it if it is still there, else fetches it again)."""
        while True:
            folder = self.disk.get(name, version, pin=True) or self._fetch_once(name, mount, version)
            if folder is not None:
                return folder

    def _fetch_once(self, name: str, mount: Mount, version: str) -> Path | None:
        """The version fetched and pinned; None when another caller fetched it meanwhile (it is on disk, unpinned)."""
        folder = self.disk.folder(name, version)
        with self._lock:
            flight = self._flights.get(folder)
            leader = flight is None
            if leader:
                flight = self._flights[folder] = Future()
        if not leader:
            error = flight.exception()
            if isinstance(error, SourceError):
                raise SourceError(error.reason, error.detail)
            if error is not None:
                raise SourceError("error", f"the fetch by another request failed: {type(error).__name__}")
            return None
        try:
            result = self._fetch(name, mount, version)
        except BaseException as exc:
            flight.set_exception(exc)
            raise
        else:
            flight.set_result(result)
            return result
        finally:
            with self._lock:
                del self._flights[folder]

    def _fetch(self, name: str, mount: Mount, version: str) -> Path:
        started = time.perf_counter()
        try:
            folder = self.disk.put(name, version, lambda into: mount.source.fetch(mount.key(name), version, into))
        except OSError as exc:  # the disk tier's own folder: full, unwritable
            log.error("adapter %s: writing to the disk tier failed: %s", name, exc.strerror)
            raise SourceError("error", "the disk tier could not be written") from exc
        seconds = time.perf_counter() - started
        size = self.disk.manifest(folder)["bytes"]
        self._on_fetch(seconds, size, "success")
        log.info("adapter %s: fetched version %s (%d bytes) in %.1f ms", name, version, size, seconds * 1e3)
        return folder

    def _failed(self, name: str, exc: SourceError, previous: _Failure | None) -> MixserveError:
        if exc.reason == "not_found":
            error: MixserveError = AdapterNotFound(f"adapter {name!r} not found at its source")
        else:
            error = AdapterLoadFailed(f"adapter {name!r}: fetching it failed: {REASONS[exc.reason]}; retried later")
        self._on_fetch(None, 0, exc.reason)
        failure = _Failure(type(error), error.message, time.monotonic(), (previous.count + 1) if previous else 1)
        with self._lock:
            self._failures[name] = failure
        # the source's own message may name the bucket or the endpoint: the log gets the reason and the type only
        log.warning(
            "adapter %s: fetch failed: %s (%s); retried after %.1f s",
            name,
            exc.reason,
            type(exc.__cause__).__name__ if exc.__cause__ else "SourceError",
            failure.until(self.retry_seconds) - failure.at,
        )
        return error

    def _check_later(self, name: str) -> None:
        with self._lock:
            if name in self._checking:
                return
            self._checking.add(name)
        try:
            self._checker.submit(self._check, name)
        except RuntimeError:  # shut down
            with self._lock:
                self._checking.discard(name)

    def _check(self, name: str) -> None:
        """In the background: the source's current version, remembered (a failure keeps the last one)."""
        mount = self.mount(name)
        try:
            version = mount.source.version(mount.key(name))
        except SourceError as exc:
            with self._lock:
                seen = self._seen.get(name)
                if exc.reason == "not_found":
                    self._seen[name] = _Seen(None, time.monotonic())
                elif seen is not None:
                    seen.at = time.monotonic()  # look again after check_seconds, keep serving what we have
            if exc.reason != "not_found":
                log.warning("adapter %s: version check failed: %s", name, exc.reason)
        else:
            with self._lock:
                seen = self._seen.get(name)
                if seen is not None and seen.version not in (None, version):
                    log.info("adapter %s: a new version at the source: %s", name, version)
                self._seen[name] = _Seen(version, time.monotonic())
        finally:
            with self._lock:
                self._checking.discard(name)
