"""Adapter types, one module each, and the canonical composition order of docs/contract.md."""

from .adalora import AdaLoraKind
from .base import Kind, LayerAdapter
from .loha import LoHaKind
from .lokr import LoKrKind
from .lora import LoraKind
from .oft import OFTKind
from .shira import ShiraKind

# Nesting, innermost first: SHiRA must be innermost (it cannot wrap another tuner layer), OFT next so that every
# additive adapter sees the input it was trained on.
KINDS: dict[str, Kind] = {
    kind.peft_type: kind for kind in (ShiraKind(), OFTKind(), LoraKind(), AdaLoraKind(), LoHaKind(), LoKrKind())
}
CANONICAL_ORDER: tuple[str, ...] = tuple(KINDS)

__all__ = ["CANONICAL_ORDER", "KINDS", "Kind", "LayerAdapter"]
