"""API keys and the tenants they stand for.

MIXSERVE_API_KEYS (and/or the lines of MIXSERVE_API_KEYS_FILE) lists keys, comma- or newline-separated:

    admin-key                   every adapter
    acme-key:acme/              only adapters whose names start with acme/
    both-key:acme/|globex/      either namespace

A key bound to prefixes can neither use nor list adapters outside them; such an adapter answers 404, as an unknown
one does, so that names do not leak across tenants. Keys are kept as SHA-256 digests and a presented key is compared
with every one of them (hmac.compare_digest, no early exit): the time taken does not depend on which key, or which
prefix of a key, matched.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from pathlib import Path

from server.errors import AdapterNotFound, MixserveError

OPEN_PATHS = frozenset({"/health", "/ready"})  # the probes: no key, even with keys configured


class Unauthorized(MixserveError):
    status_code = 401
    error_type = "unauthorized"
    headers = {"WWW-Authenticate": "Bearer"}


class Forbidden(MixserveError):
    status_code = 403
    error_type = "forbidden"


@dataclass(frozen=True)
class Tenant:
    """Who a request acts for: the adapter name prefixes it may use, or None for all; identity: its key's SHA-256
    (hex; "" on an open server), which keeps what one key's requests cached from serving another's."""

    prefixes: tuple[str, ...] | None = None
    identity: str = field(default="", repr=False)

    def allows(self, name: str) -> bool:
        return self.prefixes is None or name.startswith(self.prefixes)

    def visible(self, names) -> list[str]:
        return [name for name in names if self.allows(name)]

    def check_unscoped(self, what: str) -> None:
        """For what spans every tenant (metrics name their adapters): a key without namespaces only."""
        if self.prefixes is not None:
            raise Forbidden(f"{what} needs an API key without namespaces")

    def check(self, names: list[str], not_found: str = "adapter {name!r} not found in the store") -> None:
        """Raises AdapterNotFound, worded as for an adapter that does not exist, for a name outside the tenant."""
        for name in names:
            if not self.allows(name):
                raise AdapterNotFound(not_found.format(name=name))


EVERYTHING = Tenant()


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class Keyring:
    def __init__(self, entries: list[tuple[str, Tenant]]):
        self._entries = [(_digest(key), tenant) for key, tenant in entries]

    @classmethod
    def parse(cls, text: str) -> Keyring:
        entries = []
        for item in text.replace(",", "\n").splitlines():
            item = item.strip()
            if not item or item.startswith("#"):
                continue
            key, _, scope = item.partition(":")
            key = key.strip()
            if len(key) < 8:
                raise ValueError("API keys must be at least 8 characters")
            prefixes = tuple(_prefix(p) for p in scope.split("|") if p.strip()) if scope.strip() else None
            entries.append((key, Tenant(prefixes, _digest(key).hex())))
        return cls(entries)

    @classmethod
    def from_settings(cls, keys: str, keys_file: Path | None) -> Keyring | None:
        """None when no key is configured: the server is open."""
        text = keys + "\n" + (keys_file.read_text() if keys_file else "")
        ring = cls.parse(text)
        return ring if ring._entries else None

    def tenant(self, authorization: str | None) -> Tenant:
        """The tenant of an `Authorization: Bearer <key>` header; raises Unauthorized."""
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        presented = _digest(key.strip())
        found = None
        for digest, tenant in self._entries:
            if hmac.compare_digest(digest, presented):
                found = tenant
        if found is None:
            raise Unauthorized("invalid API key")
        return found


def _prefix(text: str) -> str:
    """A namespace: 'acme' and 'acme/' both mean the adapters under acme/."""
    text = text.strip().strip("/")
    if not text:
        raise ValueError("an empty adapter prefix; leave the key unscoped to allow every adapter")
    return text + "/"
