"""The disk tier: fetched adapters in a local folder, within a byte budget, least recently used evicted first.

Each version of an adapter is one folder, `<root>/<name>/@<digest of the version>/`, written under `.partial/` and
renamed into place once complete, with a manifest (`.mixserve.json`: name, version, bytes, each file's SHA-256)
written last: a folder without one is never used. Folders found at start are reused (their manifest's time is their
last use). A folder being read is pinned, from the moment it is found or put (under the lock that eviction takes)
until its reader unpins it: eviction passes over it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)
MANIFEST = ".mixserve.json"
PARTIAL = ".partial"


class DiskTier:
    def __init__(self, root: Path, budget: int):
        self.root = root.resolve()
        self.budget = budget
        self._lock = threading.Lock()
        self._entries: OrderedDict[Path, dict] = OrderedDict()  # folder -> manifest; least recently used first
        self._pins: Counter[Path] = Counter()
        shutil.rmtree(self.root / PARTIAL, ignore_errors=True)  # a crash mid-fetch leaves these
        (self.root / PARTIAL).mkdir(parents=True, exist_ok=True)
        self._scan()

    def folder(self, name: str, version: str) -> Path:
        return self.root / name / ("@" + hashlib.sha256(version.encode()).hexdigest()[:16])

    def get(self, name: str, version: str, use: bool = True, pin: bool = False) -> Path | None:
        """The folder of this version, marked as just used (unless use is false), pinned when pin (then unpin it);
        None when it is not on disk."""
        folder = self.folder(name, version)
        with self._lock:
            if folder not in self._entries:
                return None
            if use:
                self._entries.move_to_end(folder)
            if pin:
                self._pins[folder] += 1
        if use:
            _touch(folder / MANIFEST)
        return folder

    def latest(self, name: str, pin: bool = False) -> tuple[Path, str] | None:
        """The most recently used version of name on disk: (folder, version), pinned when pin."""
        with self._lock:
            found = [(f, m["version"]) for f, m in self._entries.items() if m["name"] == name]
            if found and pin:
                self._pins[found[-1][0]] += 1
        return found[-1] if found else None

    def put(self, name: str, version: str, fill: Callable[[Path], None]) -> Path:
        """fill(folder) writes the files into an empty folder; they are hashed, and the folder renamed into place,
        pinned (unpin it once read), and the budget enforced."""
        partial = self.root / PARTIAL / uuid.uuid4().hex
        partial.mkdir()
        try:
            fill(partial)
            files = {p.name: sha256_of(p) for p in sorted(partial.iterdir())}
            manifest = {"name": name, "version": version, "bytes": _size(partial), "files": files}
            (partial / MANIFEST).write_text(json.dumps(manifest))
            folder = self.folder(name, version)
            folder.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(partial, folder)
            except OSError:  # already there (another process fetched it): keep that one
                if not (folder / MANIFEST).is_file():
                    raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        with self._lock:
            self._entries[folder] = manifest
            self._pins[folder] += 1
        self._evict()
        return folder

    def unpin(self, folder: Path) -> None:
        with self._lock:
            self._pins[folder] -= 1
            if not self._pins[folder]:
                del self._pins[folder]

    def drop(self, folder: Path) -> None:
        """Forgets folder and deletes it (its files were found damaged)."""
        with self._lock:
            manifest = self._entries.pop(folder, None)
        if manifest is not None:
            shutil.rmtree(folder, ignore_errors=True)
            log.warning("disk tier: dropped %s version %s: damaged", manifest["name"], manifest["version"])

    def manifest(self, folder: Path) -> dict | None:
        with self._lock:
            return self._entries.get(folder)

    def names(self) -> set[str]:
        with self._lock:
            return {m["name"] for m in self._entries.values()}

    def usage(self) -> tuple[int, int]:
        """(folders, bytes) on disk."""
        with self._lock:
            return len(self._entries), sum(m["bytes"] for m in self._entries.values())

    def _evict(self) -> None:
        while True:
            with self._lock:
                total = sum(m["bytes"] for m in self._entries.values())
                victims = [f for f in self._entries if not self._pins[f]]
                if total <= self.budget or not victims:
                    return
                victim = victims[0]
                manifest = self._entries.pop(victim)
            shutil.rmtree(victim, ignore_errors=True)
            log.info(
                "disk tier: evicted %s version %s (%d bytes)", manifest["name"], manifest["version"], manifest["bytes"]
            )

    def _scan(self) -> None:
        found = []
        for path in self.root.rglob(MANIFEST):
            folder = path.parent
            try:
                manifest = json.loads(path.read_text())
                if folder == self.folder(manifest["name"], manifest["version"]):
                    found.append((path.stat().st_mtime, folder, manifest))
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("disk tier: ignoring an unreadable manifest in %s", folder.relative_to(self.root))
        for _, folder, manifest in sorted(found, key=lambda f: f[0]):
            self._entries[folder] = manifest
        if found:
            count, size = self.usage()
            log.info("disk tier: reusing %d adapter versions (%d bytes)", count, size)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def _touch(path: Path) -> None:
    try:
        now = time.time()
        os.utime(path, (now, now))
    except OSError:
        pass
