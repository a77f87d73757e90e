"""A request's combination of adapters, parsed once at the edge from whichever request fields carry it."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from server.adapters.kinds import CANONICAL_ORDER
from server.adapters.merges import Merge, is_merge, weight_text
from server.adapters.store import check_name
from server.auth import Tenant
from server.errors import ValidationError

MAX_WEIGHT = 10.0  # |weight| at most this (README, "Weighted mixes")


@dataclass(frozen=True)
class Combination:
    """Adapter names, each listed once, each with a weight (1: in full). Parsed from a request, they are valid, the
    tenant's, in canonical composition order (docs/contract.md), and no weight is 0 (weight 0 is the adapter left
    out); `str()` is then the canonical form clients see (`x-adapters`, `details.adapters`) and the logs show,
    e.g. `pirate@0.5+digits`. The engine orders any combination by the types it loads."""

    names: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()  # one per name; empty: all 1

    def __post_init__(self) -> None:
        if not self.weights:
            object.__setattr__(self, "weights", (1.0,) * len(self.names))
        if len(self.weights) != len(self.names):
            raise ValueError("a combination needs one weight per adapter")

    def __str__(self) -> str:
        return "+".join(self.parts)

    @property
    def parts(self) -> list[str]:
        """Each adapter as the canonical form writes it: `name`, or `name@weight` when the weight is not 1."""
        return [
            name if w == 1 else f"{name}@{weight_text(w)}" for name, w in zip(self.names, self.weights, strict=True)
        ]

    def weight(self, name: str) -> float:
        return self.weights[self.names.index(name)]

    @classmethod
    def parse(
        cls,
        sources: dict[str, list[tuple[str, float]] | None],
        tenant: Tenant,
        peft_type: Callable[[str], str],
        limit: tuple[int, str],
    ) -> Combination:
        """sources: request field -> the (name, weight) pairs it gives (None or empty: not given); all that give
        adapters must agree. peft_type(name): the adapter's type (raises for an adapter that is missing or cannot be
        mixed). limit: (most adapters per request, the setting that says so)."""
        given = {source: list(pairs) for source, pairs in sources.items() if pairs}
        if len({tuple(pairs) for pairs in given.values()}) > 1:
            raise ValidationError(f"the adapters are given differently in {' and '.join(given)}; give them once")
        pairs = next(iter(given.values()), [])
        names = [name for name, _ in pairs]
        for name in names:
            Merge.parse(name) if is_merge(name) else check_name(name)
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValidationError(f"adapters listed more than once: {', '.join(duplicates)}")
        bad = [f"{name}: {weight!r}" for name, weight in pairs if not valid_weight(weight)]
        if bad:
            raise ValidationError(
                f"adapter weights must be finite numbers from -{MAX_WEIGHT:g} to {MAX_WEIGHT:g}: {', '.join(bad)}"
            )
        most, setting = limit
        sources = [s for n in names for s in (Merge.parse(n).names if is_merge(n) else [n])]
        if len(sources) > most:  # a merge counts as the adapters it merges
            raise ValidationError(f"{len(sources)} adapters requested; at most {most} per request ({setting})")
        tenant.check(sources)
        types = {name: peft_type(name) for name in names}
        kept = sorted(((n, float(w)) for n, w in pairs if w != 0), key=lambda p: CANONICAL_ORDER.index(types[p[0]]))
        return cls(tuple(n for n, _ in kept), tuple(w for _, w in kept))


def parse_spec(spec: str) -> list[tuple[str, float]]:
    """The combination as the canonical form writes it, `a+b@0.5` (TGI's adapter_id, OpenAI's model), a merge
    written `merge:ties(a@0.5,b@0.5;density=0.2,majority_sign_method=total)` (server/adapters/merges.py): (name,
    weight) pairs. A weight that is not a number is refused; the names are checked by Combination.parse."""
    pairs = []
    for part in spec.split("+"):
        head, close, tail = part.rpartition(")") if is_merge(part) else ("", "", part)
        name, at, weight = tail.partition("@")
        name = head + close + name  # a merge's own weights are inside its parentheses
        try:
            pairs.append((name, float(weight) if at else 1.0))
        except ValueError:
            raise ValidationError(f"{part!r}: the weight after '@' is not a number") from None
    return pairs


def valid_weight(weight) -> bool:
    return isinstance(weight, (int, float)) and math.isfinite(weight) and abs(weight) <= MAX_WEIGHT
