"""Where adapters come from: a local directory with one folder per adapter.

An adapter's name is its folder's path in the store: `support-bot`, or `acme/support-bot` for a folder of a
namespace folder (tenants' adapters live under their namespace). Each part of a name matches SEGMENT.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors

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


def check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ValidationError(
            f"invalid adapter name {name!r}: up to {MAX_DEPTH} parts joined by '/', each matching {SEGMENT}"
            " (no absolute paths, no '..')"
        )


class AdapterStore:
    def __init__(self, root: Path, allow_pickle: bool = False):
        self.root = root.resolve()
        self.allow_pickle = allow_pickle
        self._types: dict[str, tuple[tuple, str | None]] = {}  # name -> (its config's stat, its peft_type)
        self._types_lock = threading.Lock()

    def names(self) -> list[str]:
        """Every adapter: a folder with an adapter_config.json, at the top or inside namespace folders."""
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
        """The adapter's folder. Refuses bad names, unknown names and folders that resolve outside the store."""
        check_name(name)
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
        signature = _stat(name, self._file(name, CONFIG_FILE))
        with self._types_lock:
            cached = self._types.get(name)
        if cached is not None and cached[0] == signature:
            return cached[1]
        peft_type = self.read_config(name).get("peft_type")
        with self._types_lock:
            self._types[name] = (signature, peft_type)
        return peft_type

    def signature(self, name: str) -> tuple:
        """Cheap to take on every request: (file, mtime, size, inode) of the adapter's files."""
        paths = [self._file(name, CONFIG_FILE), self._weights_file(name)]
        return tuple((p.name, *_stat(name, p)) for p in paths)

    def read(self, name: str) -> AdapterFiles:
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
