"""Remote adapter sources, mounted into the store's name space by configuration (MIXSERVE_ADAPTER_SOURCES).

    acme/=s3://bucket/tenants/acme/,shared/=hf://org,shared/pirate=hf://org/pirate@v1.2

A mount maps a name prefix (`acme/`) or one name (`shared/pirate`) to a location of a source. A name under a
prefix, `acme/support-bot`, is the adapter at key `support-bot` of that location; clients only ever give names, so
they can never make the server fetch from a bucket or URL that is not mounted.

A source is a class behind the small interface below, found by its URL scheme in the entry point group
`mixserve.adapter_sources` (as vLLM finds its LoRA resolvers). The built-in `s3` and `hf` sources are registered
there by this package's pyproject.toml; a plugin adds its own the same way:

    [project.entry-points."mixserve.adapter_sources"]
    gs = "my_package.gcs:GcsSource"
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import ClassVar

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # what a source fetches for an adapter

ENTRY_POINT_GROUP = "mixserve.adapter_sources"
_MOUNT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}(/[A-Za-z0-9][A-Za-z0-9._-]{0,127}){0,3}/?$")


class SourceError(Exception):
    """A fetch or version check that failed. `reason` is one of REASONS; the message a source gives is for the
    log and may name internal locations: clients only ever see the reason."""

    REASONS = (
        "unreachable",
        "access_denied",
        "timeout",
        "incomplete",
        "corrupt",
        "changed",
        "not_cached",
        "not_found",
        "error",
    )

    def __init__(self, reason: str, detail: str = ""):
        if reason not in self.REASONS:
            raise ValueError(f"unknown source error reason {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class SourceOptions:
    """What the operator configured for every source: seconds a network call may take, the S3 endpoint."""

    timeout: float = 30.0
    s3_endpoint_url: str | None = None


class AdapterSource(ABC):
    """Where adapters are fetched from. One instance per mount, called from loader threads (thread-safe).

    Semantics:
        version(key)              -> a string that changes whenever the adapter's files change (ETags, a commit)
        fetch(key, version, into) -> the adapter's files (adapter_config.json and adapter_model.safetensors) written
                                     into the empty folder `into`, exactly as of `version`, their integrity checked;
                                     never partially (the caller renames `into` into place only when it returns)
    Both raise SourceError (reason "not_found" for an adapter the source does not hold).
    """

    scheme: ClassVar[str]  # the URL scheme it is mounted with: s3, hf
    kind: ClassVar[str]  # what LoRAX's parameters.adapter_source calls it: s3, hub

    def __init__(self, location: str, options: SourceOptions):
        """location: the mount's URL without the scheme, e.g. 'bucket/tenants/acme/' or 'org@v1.2'. Raises
        ValueError when it is malformed (the server does not start)."""
        self.location = location
        self.options = options

    @abstractmethod
    def version(self, key: str) -> str: ...

    @abstractmethod
    def fetch(self, key: str, version: str, into: Path) -> None: ...


def source_classes() -> dict[str, type[AdapterSource]]:
    """The installed sources, by scheme."""
    classes = {}
    for point in entry_points(group=ENTRY_POINT_GROUP):
        cls = point.load()
        if not (isinstance(cls, type) and issubclass(cls, AdapterSource)):
            raise ValueError(  # noqa: TRY004 - a settings error: pydantic reports ValueError, not TypeError
                f"entry point {point.name!r} of {ENTRY_POINT_GROUP} is not an AdapterSource"
            )
        classes[point.name] = cls
    return classes


@dataclass(frozen=True)
class Mount:
    """A prefix (ends with '/') or one adapter name, served from `source`."""

    name: str
    source: AdapterSource

    @property
    def is_prefix(self) -> bool:
        return self.name.endswith("/")

    def key(self, name: str) -> str | None:
        """The key of name at the source, or None when the mount does not cover name ('' for a one-name mount)."""
        if self.is_prefix:
            return name[len(self.name) :] if name.startswith(self.name) and len(name) > len(self.name) else None
        return "" if name == self.name else None


def parse_mounts(text: str, options: SourceOptions) -> list[Mount]:
    """'prefix/=scheme://location,name=scheme://location' -> mounts, most specific first. Raises ValueError naming
    every problem (unknown scheme, bad name, a mount given twice)."""
    items = [item.strip() for item in text.replace("\n", ",").split(",") if item.strip()]
    if not items:
        return []
    classes, mounts, problems = source_classes(), [], []
    for item in items:
        name, eq, url = (part.strip() for part in item.partition("="))
        scheme, sep, location = url.partition("://")
        if not eq or not sep or not location:
            problems.append(f"{item!r}: expected 'prefix/=scheme://location'")
        elif not _MOUNT_NAME.fullmatch(name):
            problems.append(f"{name!r}: a mount is an adapter name or a prefix ending with '/'")
        elif scheme not in classes:
            problems.append(f"{item!r}: no source for {scheme}:// (installed: {', '.join(sorted(classes)) or 'none'})")
        elif any(m.name == name for m in mounts):
            problems.append(f"{name!r} is mounted twice")
        else:
            try:
                mounts.append(Mount(name, classes[scheme](location, options)))
            except ValueError as exc:
                problems.append(f"{item!r}: {exc}")
    if problems:
        raise ValueError("MIXSERVE_ADAPTER_SOURCES: " + "; ".join(problems))
    return sorted(mounts, key=lambda m: len(m.name), reverse=True)
