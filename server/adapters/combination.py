"""A request's combination of adapters, parsed once at the edge from whichever request fields carry it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from server.adapters.kinds import CANONICAL_ORDER
from server.adapters.store import check_name
from server.auth import Tenant
from server.errors import ValidationError


@dataclass(frozen=True)
class Combination:
    """Adapter names, each listed once. Parsed from a request, they are valid, the tenant's, and in canonical
    composition order (docs/contract.md); `str()` is then the canonical form clients see (`x-adapters`,
    `details.adapters`) and the logs show. The engine orders any combination by the types it loads."""

    names: tuple[str, ...] = ()

    def __str__(self) -> str:
        return "+".join(self.names)

    @classmethod
    def parse(
        cls,
        sources: dict[str, list[str] | None],
        tenant: Tenant,
        peft_type: Callable[[str], str],
        limit: tuple[int, str],
    ) -> Combination:
        """sources: request field -> the names it gives (None or empty: not given); all that give names must agree.
        peft_type(name): the adapter's type (raises for an adapter that is missing or cannot be mixed).
        limit: (most adapters per request, the setting that says so)."""
        given = {source: names for source, names in sources.items() if names}
        if len({tuple(names) for names in given.values()}) > 1:
            raise ValidationError(f"the adapters are given differently in {' and '.join(given)}; give them once")
        names = next(iter(given.values()), [])
        for name in names:
            check_name(name)
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValidationError(f"adapters listed more than once: {', '.join(duplicates)}")
        most, setting = limit
        if len(names) > most:
            raise ValidationError(f"{len(names)} adapters requested; at most {most} per request ({setting})")
        tenant.check(names)
        types = {name: peft_type(name) for name in names}
        return cls(tuple(sorted(names, key=lambda n: CANONICAL_ORDER.index(types[n]))))
