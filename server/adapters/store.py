"""Where adapters come from: a local directory with one folder per adapter, and remote sources mounted under names.

An adapter's name is its folder's path in the store: `support-bot`, or `acme/support-bot` for a folder of a
namespace folder (tenants' adapters live under their namespace). Each part of a name matches SEGMENT.

A name under a mount of MIXSERVE_ADAPTER_SOURCES (`acme/` -> `s3://bucket/tenants/acme/`) resolves to a folder of
the disk tier instead, fetched on demand (server/adapters/sources/): past that, it is read, checked and served as a
local adapter is. Its signature is the version last seen at the source rather than the files' stat.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors

from server.adapters.sources import SourceOptions, parse_mounts
from server.adapters.sources.disk import DiskTier
from server.adapters.sources.remote import RemoteAdapters
from server.errors import AdapterInvalid, AdapterLoadFailed, AdapterNotFound, ValidationError

SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
MAX_DEPTH = 4
NAME_PATTERN = re.compile(rf"^{SEGMENT}(/{SEGMENT}){{0,{MAX_DEPTH - 1}}}$")
CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"


@dataclass(frozen=True)
class AdapterFiles:
    """One adapter as read from the store, not yet checked against the base model."""

    name: str
    config: dict
    tensors: dict[str, torch.Tensor]
    version: str  # sha256 of the files' bytes, shortened
    signature: tuple  # the files' stat when read: a change on disk changes it


class TypeNotKnown(Exception):
    """Raised by peft_type, under without_fetching, for a mounted adapter whose type is known only by fetching it."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


_fetching = contextvars.ContextVar("mixserve_store_fetching", default=True)


@contextmanager
def without_fetching() -> Iterator[None]:
    """Meanwhile (in this context: the event loop's call), peft_type raises TypeNotKnown where it would fetch."""
    token = _fetching.set(False)
    try:
        yield
    finally:
        _fetching.reset(token)


def check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ValidationError(
            f"invalid adapter name {name!r}: up to {MAX_DEPTH} parts joined by '/', each matching {SEGMENT}"
            " (no absolute paths, no '..')"
        )


class AdapterStore:
    def __init__(self, root: Path, allow_pickle: bool = False, remote: RemoteAdapters | None = None):
        """remote: the mounted sources and their disk tier (None: the local folder only)."""
        self.root = root.resolve()
        self.allow_pickle = allow_pickle
        self.remote = remote
        # name -> (its config's stat, or for a mounted adapter the folder read, its peft_type)
        self._types: dict[str, tuple[tuple | Path, str | None]] = {}
        self._types_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings, on_fetch=lambda seconds, size, outcome: None) -> AdapterStore:
        """The store the settings describe; on_fetch(seconds or None, bytes, outcome): remote fetches, for metrics."""
        options = SourceOptions(timeout=settings.fetch_timeout, s3_endpoint_url=settings.s3_endpoint_url or None)
        mounts = parse_mounts(settings.adapter_sources, options)
        remote = None
        if mounts:
            remote = RemoteAdapters(
                mounts,
                DiskTier(settings.disk_cache_dir, settings.disk_cache),
                check_seconds=settings.remote_check_seconds,
                retry_seconds=settings.load_retry_seconds,
                on_fetch=on_fetch,
            )
        return cls(settings.adapters_dir, allow_pickle=settings.allow_pickle, remote=remote)

    def close(self) -> None:
        if self.remote is not None:
            self.remote.close()

    def mounted(self, name: str) -> bool:
        """Whether name is served by a remote source (a mount shadows local folders of the same names)."""
        return self.remote is not None and self.remote.mount(name) is not None

    def source_kind(self, name: str) -> str:
        """What LoRAX's parameters.adapter_source calls where name comes from: local, s3, hub (or a plugin's)."""
        return self.remote.mount(name).source.kind if self.mounted(name) else "local"

    def check_source(self, names, given: str | None) -> None:
        """LoRAX's parameters.adapter_source: when given, it must be where each name comes from (a name's source
        is the configuration's, never the client's: this only refuses a mismatch, with 422)."""
        if given is None:
            return
        known = {"local"} | ({m.source.kind for m in self.remote.mounts} if self.remote else set())
        if given not in known:
            raise ValidationError(f"adapter_source {given!r}: this server serves adapters from {sorted(known)}")
        wrong = [name for name in names if self.source_kind(name) != given]
        if wrong:
            raise ValidationError(
                f"adapter_source {given!r} does not match where {', '.join(map(repr, wrong))} come(s) from"
                f" ({', '.join(sorted({self.source_kind(n) for n in wrong}))}); leave it out or give that"
            )

    def tier(self, name: str) -> str:
        """Where name's files are when not in memory: 'disk' (the store, or the disk tier), or 'remote'."""
        return self.remote.tier(name) if self.mounted(name) else "disk"

    def disk_usage(self) -> tuple[int, int]:
        """(adapter versions, bytes) in the disk tier."""
        return self.remote.disk.usage() if self.remote is not None else (0, 0)

    def names(self) -> list[str]:
        """Every adapter: a folder with an adapter_config.json, at the top or inside namespace folders; and the
        mounted adapters this replica knows of (a bucket is not listed)."""
        if self.remote is None:
            return self._local_names()
        local = [name for name in self._local_names() if not self.mounted(name)]
        return sorted(set(local) | self.remote.names())

    def _local_names(self) -> list[str]:
        found = []

        def walk(folder: Path, prefix: str, depth: int) -> None:
            for entry in sorted(folder.iterdir()):
                name = prefix + entry.name
                if not (NAME_PATTERN.fullmatch(name) and entry.is_dir()):
                    continue
                if (entry / CONFIG_FILE).exists():
                    found.append(name)
                elif depth < MAX_DEPTH and entry.resolve().is_relative_to(self.root):
                    walk(entry, name + "/", depth + 1)

        walk(self.root, "", 1)
        return found

    def path(self, name: str) -> Path:
        """The adapter's folder. Refuses bad names, unknown names and folders that resolve outside the store. A
        mounted adapter's folder is in the disk tier: this may fetch it (call it off the event loop)."""
        check_name(name)
        if self.mounted(name):
            return self.remote.materialize(name)[0]
        candidate = self.root / name
        if not candidate.is_dir():
            raise AdapterNotFound(f"adapter {name!r} not found in the store")
        if not candidate.resolve().is_relative_to(self.root):
            raise AdapterInvalid(name, "its folder resolves outside the adapter store")
        return candidate

    def read_config(self, name: str) -> dict:
        return _read_config(name, self._file(name, CONFIG_FILE))

    def peft_type(self, name: str) -> str | None:
        """The config's peft_type, read again only when the config file changes (listings ask for every adapter)."""
        if self.mounted(name):
            return self._mounted_type(name)
        signature = _stat(name, self._file(name, CONFIG_FILE))
        with self._types_lock:
            cached = self._types.get(name)
        if cached is not None and cached[0] == signature:
            return cached[1]
        peft_type = self.read_config(name).get("peft_type")
        with self._types_lock:
            self._types[name] = (signature, peft_type)
        return peft_type

    def _mounted_type(self, name: str) -> str | None:
        """The type of a version on disk, else of the version fetched; once known, remembered and never fetched again
        (a type rarely changes; the loaded version's is the registry's), read again when another version is on disk."""
        with self._types_lock:
            known = self._types.get(name)
        folder = self.remote.folder_on_disk(name, pin=True)
        if folder is None:
            if known is not None:
                return known[1]
            if not _fetching.get():
                raise TypeNotKnown(name)
            with self.remote.materialized(name) as (folder, _):
                return self._read_type(name, folder)
        try:
            return known[1] if known is not None and known[0] == folder else self._read_type(name, folder)
        finally:
            self.remote.disk.unpin(folder)

    def _read_type(self, name: str, folder: Path) -> str | None:
        peft_type = _read_config(name, folder / CONFIG_FILE).get("peft_type")
        with self._types_lock:
            self._types[name] = (folder, peft_type)
        return peft_type

    def signature(self, name: str) -> tuple:
        """Cheap to take on every request: (file, mtime, size, inode) of the adapter's files; for a mounted adapter
        ('remote', mount, the version last seen at its source), with no network call."""
        if self.mounted(name):
            check_name(name)
            return self.remote.signature(name)
        paths = [self._file(name, CONFIG_FILE), self._weights_file(name)]
        return tuple((p.name, *_stat(name, p)) for p in paths)

    def read(self, name: str) -> AdapterFiles:
        if self.mounted(name):
            return self._read_mounted(name)
        before = self.signature(name)
        config_path = self._file(name, CONFIG_FILE)
        config_bytes = _read_bytes(name, config_path)
        config = _read_config(name, config_path, config_bytes)
        weights_path = self._weights_file(name)
        weights_bytes = _read_bytes(name, weights_path)
        try:
            if weights_path.name == SAFETENSORS_FILE:
                tensors = load_safetensors(weights_bytes)
            else:
                tensors = torch.load(weights_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            reason = str(exc).replace(str(weights_path), weights_path.name).replace(str(self.root), "<store>")
            raise AdapterLoadFailed(f"adapter {name!r}: cannot read {weights_path.name}: {reason}") from exc
        if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise AdapterLoadFailed(f"adapter {name!r}: {weights_path.name} is not a mapping of names to tensors")
        if self.signature(name) != before:
            raise AdapterLoadFailed(f"adapter {name!r}: its files changed while being read (being written?); retried")
        version = hashlib.sha256(config_bytes + weights_bytes).hexdigest()[:16]
        return AdapterFiles(name=name, config=config, tensors=tensors, version=version, signature=before)

    def _read_mounted(self, name: str) -> AdapterFiles:
        """The current version from the disk tier (fetched first if need be), its bytes checked against the
        manifest written when it was fetched: a folder damaged on disk is dropped and fetched again next time."""
        check_name(name)
        with self.remote.materialized(name) as (folder, at_source):
            manifest = self.remote.disk.manifest(folder) or {}
            data = {}
            for filename in (CONFIG_FILE, SAFETENSORS_FILE):
                data[filename] = _read_bytes(name, folder / filename)
                if hashlib.sha256(data[filename]).hexdigest() != manifest.get("files", {}).get(filename):
                    self.remote.disk.drop(folder)
                    raise AdapterLoadFailed(f"adapter {name!r}: its copy on local disk is damaged; fetched again")
        config = _read_config(name, folder / CONFIG_FILE, data[CONFIG_FILE])
        try:
            tensors = load_safetensors(data[SAFETENSORS_FILE])
        except Exception as exc:
            raise AdapterLoadFailed(f"adapter {name!r}: cannot read {SAFETENSORS_FILE}: {exc}") from exc
        version = hashlib.sha256(data[CONFIG_FILE] + data[SAFETENSORS_FILE]).hexdigest()[:16]
        signature = ("remote", self.remote.mount(name).name, at_source)  # as signature() answers once it is seen
        return AdapterFiles(name=name, config=config, tensors=tensors, version=version, signature=signature)

    def _file(self, name: str, filename: str) -> Path:
        path = self.path(name) / filename
        if not path.is_file():
            raise AdapterInvalid(name, f"{filename} is missing")
        if not path.resolve().is_relative_to(self.root):
            raise AdapterInvalid(name, f"{filename} resolves outside the adapter store")
        return path

    def _weights_file(self, name: str) -> Path:
        folder = self.path(name)
        if (folder / SAFETENSORS_FILE).is_file():
            return self._file(name, SAFETENSORS_FILE)
        if (folder / PICKLE_FILE).is_file():
            if not self.allow_pickle:
                raise AdapterInvalid(
                    name, f"only {PICKLE_FILE} (pickle) is present; set MIXSERVE_ALLOW_PICKLE=1 to load it"
                )
            return self._file(name, PICKLE_FILE)
        raise AdapterInvalid(name, f"{SAFETENSORS_FILE} is missing")


def _stat(name: str, path: Path) -> tuple:
    try:
        stat = path.stat()
    except OSError as exc:  # replaced or removed meanwhile
        raise AdapterInvalid(name, f"cannot read {path.name}: {exc.strerror}") from exc
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


def _read_bytes(name: str, path: Path) -> bytes:
    """The file's bytes; an error names the file, never its path on the server."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise AdapterInvalid(name, f"cannot read {path.name}: {exc.strerror}") from exc


def _read_config(name: str, path: Path, data: bytes | None = None) -> dict:
    try:
        config = json.loads(_read_bytes(name, path) if data is None else data)
    except ValueError as exc:
        raise AdapterInvalid(name, f"cannot read {CONFIG_FILE}: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterInvalid(name, f"{CONFIG_FILE} is not a JSON object")
    return config
