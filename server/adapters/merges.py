"""Merged adapters: LoRA adapters combined into one derived LoRA adapter, as PEFT's `add_weighted_adapter` does.

A merge is named by its canonical form, `merge:<strategy>(<name>@<weight>,...[;density=<d>][,majority_sign_method=
<m>])`, e.g. `merge:ties(a@0.5,b@0.5;density=0.2,majority_sign_method=total)`: a name no store adapter can have
(store names match store.SEGMENT: no ':', '(', ',', '@'). It is valid wherever an adapter name is (x-adapters,
`adapters`, `adapter_id`, metrics), and LoRAX's `merged_adapters` becomes it. The merge is computed when first
needed, by the loader (off the model's thread), from its sources' files, and served as one LoRA adapter: the registry
keeps it under the same residency rules as any adapter (counted in the budget, evicted LRU, never recomputed while
resident). Its signature is its sources' signatures, so a new version of a source is a new version of the merge.

Semantics: per target module, exactly PEFT's `LoraModel.add_weighted_adapter(sources, weights, strategy, density=,
majority_sign_method=)` (lora/model.py, utils/merge_utils.py; svd strategies at PEFT's default rank, the largest
source rank, full matrices, no clamp). DARE draws random masks: the draws of one module come from a generator seeded
with `merge_seed(merge name, module name)` (SHA-256), so a merge is the same on every server and every restart, and
PEFT gives the same result when `torch.manual_seed(merge_seed(...))` runs right before its merge of that module
(tests/test_merges.py does exactly that).
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from dataclasses import dataclass

import torch
from peft.utils.merge_utils import (
    calculate_majority_sign_mask,
    disjoint_merge,
    magnitude_prune,
    reshape_weight_task_tensors,
    task_arithmetic,
    ties,
)

from server.adapters.build import SAVED_PREFIX, parse_config
from server.adapters.kinds.base import pattern_value
from server.adapters.store import AdapterFiles, AdapterStore, check_name
from server.errors import AdapterInvalid, ValidationError

PREFIX = "merge:"
SAME_RANK = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
STRATEGIES = (*SAME_RANK, "cat", *SVD)
SIGN_METHODS = ("total", "frequency")
_FORM = re.compile(r"^merge:([a-z_]+)\(([^();]*)(?:;([^()]*))?\)$")


def is_merge(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def merge_seed(name: str, module: str) -> int:
    """The seed of a DARE merge's draws for one module: from the merge's canonical name and the module's name."""
    return int.from_bytes(hashlib.sha256(f"{name}|{module}".encode()).digest()[:8], "little") & (2**63 - 1)


def uses_density(strategy: str) -> bool:
    return strategy.startswith(("ties", "dare", "magnitude_prune"))


def uses_sign(strategy: str) -> bool:
    return strategy.startswith(("ties", "dare_ties"))


@dataclass(frozen=True)
class Merge:
    strategy: str
    sources: tuple[tuple[str, float], ...]  # (adapter name, weight), in the request's order
    density: float | None = None
    majority_sign_method: str = "total"

    @classmethod
    def of(cls, strategy, sources, density=None, majority_sign_method=None) -> Merge:
        """Validated, every problem in one 422."""
        problems = []
        if strategy not in STRATEGIES:
            problems.append(f"merge_strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
        names = [name for name, _ in sources]
        if not names:
            problems.append("a merge needs at least one adapter")
        for name in names:
            check_name(name)
        if len(set(names)) != len(names):
            problems.append("an adapter is listed twice in the merge")
        from server.adapters.combination import MAX_WEIGHT, valid_weight  # combination imports this module

        bad = [f"{n}: {w!r}" for n, w in sources if not valid_weight(w)]
        if bad:
            problems.append(
                f"merge weights must be finite numbers from -{MAX_WEIGHT:g} to {MAX_WEIGHT:g}: {', '.join(bad)}"
            )
        if uses_density(str(strategy)):
            if density is None or not (isinstance(density, (int, float)) and 0 < density <= 1):
                problems.append(f"merge_strategy {strategy!r} needs a density in (0, 1] (got {density!r})")
        elif density is not None:
            problems.append(f"merge_strategy {strategy!r} takes no density")
        if majority_sign_method is not None and not uses_sign(str(strategy)):
            problems.append(f"merge_strategy {strategy!r} takes no majority_sign_method")
        if majority_sign_method is not None and majority_sign_method not in SIGN_METHODS:
            problems.append(f"majority_sign_method {majority_sign_method!r} is not one of {', '.join(SIGN_METHODS)}")
        if problems:
            raise ValidationError("; ".join(problems))
        density = float(density) if uses_density(strategy) else None
        sources = tuple((n, float(w)) for n, w in sources)
        return cls(strategy, sources, density, majority_sign_method or "total")

    @classmethod
    def parse(cls, name: str) -> Merge:
        """The canonical form back (what `name` writes); 422 for anything else. Kept for the names seen last: a
        request's merge is parsed at the edge and its signature taken at every step."""
        return _parse(name)

    @classmethod
    def _parse(cls, name: str) -> Merge:
        found = _FORM.fullmatch(name)
        if not found:
            raise ValidationError(
                f"invalid merge {name!r}: merge:<strategy>(<adapter>@<weight>,...[;density=<d>,majority_sign_method=<m>])"
            )
        strategy, listed, options = found.groups()
        sources = []
        for part in listed.split(","):
            adapter, at, weight = part.rpartition("@")
            if not at:
                raise ValidationError(f"invalid merge {name!r}: each adapter as <name>@<weight>")
            sources.append((adapter, _float(name, weight)))
        given = dict(option.partition("=")[::2] for option in options.split(",")) if options else {}
        unknown = set(given) - {"density", "majority_sign_method"}
        if unknown:
            raise ValidationError(f"invalid merge {name!r}: unknown option(s) {', '.join(sorted(unknown))}")
        density = _float(name, given["density"]) if "density" in given else None
        merge = cls.of(strategy, sources, density, given.get("majority_sign_method"))
        if merge.name != name:
            raise ValidationError(f"merge {name!r} is written {merge.name!r}")
        return merge

    @property
    def name(self) -> str:
        listed = ",".join(f"{n}@{weight_text(w)}" for n, w in self.sources)
        options = [f"density={weight_text(self.density)}"] if self.density is not None else []
        if uses_sign(self.strategy):
            options.append(f"majority_sign_method={self.majority_sign_method}")
        return f"{PREFIX}{self.strategy}({listed}{';' + ','.join(options) if options else ''})"

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.sources]

    def check_configs(self, configs: dict[str, dict]) -> str:
        """Refuses (422) sources PEFT cannot merge this way; the effective strategy (one source: linear)."""
        problems = []
        for name, raw in configs.items():
            if raw.get("peft_type") != "LORA":
                problems.append(f"{name} is {raw.get('peft_type')}, merges combine LoRA adapters only")
                continue
            for key in ("target_parameters", "layers_to_transform", "exclude_modules"):
                if raw.get(key):
                    problems.append(f"{name} sets {key}, which merges do not support")
            for key in ("modules_to_save", "trainable_token_indices"):
                if raw.get(key):
                    problems.append(
                        f"{name} sets {key}: its saved modules or token rows replace the base's, they have no delta"
                        " to merge; request it in a combination instead (a+b)"
                    )
            if raw.get("lora_bias"):
                problems.append(f"{name} has a LoRA bias, which PEFT's merge leaves out")
            if raw.get("use_dora"):
                problems.append(
                    f"{name} is DoRA: PEFT's add_weighted_adapter combines A and B only and drops DoRA's magnitude"
                    " vectors, so no merge equals a mix of DoRA adapters; serve them side by side in a mix instead"
                )
            if raw.get("bias", "none") != "none":
                problems.append(
                    f"{name} trained base biases (bias={raw['bias']!r}), which PEFT's add_weighted_adapter does not"
                    " combine; serve it side by side in a mix instead"
                )
            if raw.get("rank_pattern"):
                problems.append(f"{name} has a rank_pattern: its ranks differ per module")
        if problems:
            raise ValidationError(f"cannot merge: {'; '.join(problems)}")
        strategy = "linear" if len(configs) == 1 else self.strategy
        ranks = {name: raw.get("r", 8) for name, raw in configs.items()}
        if strategy in SAME_RANK and len(set(ranks.values())) > 1:
            listed = ", ".join(f"{n}: r={r}" for n, r in ranks.items())
            raise ValidationError(
                f"cannot merge with {strategy}: the adapters' ranks differ ({listed}); use cat or svd"
            )
        if len({type(raw.get("target_modules")) for raw in configs.values()}) > 1:
            raise ValidationError(
                "cannot merge: some adapters give target_modules as a list and others as a pattern (PEFT refuses too)"
            )
        return strategy


class MergingStore(AdapterStore):
    """The store, with merges as adapters of their own: what the registry, the loader and the routes use. Names
    that are not merges are the store's."""

    def sources(self, names) -> list[str]:
        """names with each merge replaced by its sources."""
        return [s for name in names for s in (Merge.parse(name).names if is_merge(name) else [name])]

    def signature(self, name: str) -> tuple:
        if not is_merge(name):
            return super().signature(name)
        return ("merge", *(AdapterStore.signature(self, s) for s in Merge.parse(name).names))

    def peft_type(self, name: str) -> str | None:
        if not is_merge(name):
            return super().peft_type(name)
        merge = Merge.parse(name)
        merge.check_configs({s: self._config(s) for s in merge.names})
        return "LORA"

    def _config(self, name: str) -> dict:
        """A source's config for the checks at the edge. A mounted adapter's type only (its files may not be on
        disk yet): the rest is checked when the merge is computed, and a failure there is the requests' 422."""
        if self.mounted(name):
            return {"peft_type": self.peft_type(name)}
        return self.read_config(name)

    def check_source(self, names, given: str | None) -> None:
        super().check_source(self.sources(names), given)

    def tier(self, name: str) -> str:
        return "derived" if is_merge(name) else super().tier(name)

    def mounted(self, name: str) -> bool:
        return not is_merge(name) and super().mounted(name)

    def read(self, name: str) -> AdapterFiles:
        if not is_merge(name):
            return super().read(name)
        merge = Merge.parse(name)
        files = {s: AdapterStore.read(self, s) for s in merge.names}
        for source in files.values():
            parse_config(source.name, source.config)  # a source that cannot be served cannot be merged
        config, tensors = compute(merge, files)
        version = hashlib.sha256("|".join(f.version for f in files.values()).encode()).hexdigest()[:16]
        signature = ("merge", *(f.signature for f in files.values()))
        return AdapterFiles(name=name, config=config, tensors=tensors, version=version, signature=signature)


def compute(merge: Merge, files: dict[str, AdapterFiles]) -> tuple[dict, dict[str, torch.Tensor]]:
    """The merged adapter's config and tensors: PEFT's add_weighted_adapter, module by module."""
    configs = {name: f.config for name, f in files.items()}
    strategy = merge.check_configs(configs)
    first = configs[merge.names[0]]
    ranks = [raw.get("r", 8) for raw in configs.values()]
    new_rank = sum(ranks) if strategy == "cat" else max(ranks)
    factors: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]] = {}  # module -> source -> (A, B, s)
    for name, f in files.items():
        _, config = parse_config(name, f.config)
        embedded = sorted(
            k[len(SAVED_PREFIX) :].rsplit(".", 1)[0] for k in f.tensors if k.endswith(".lora_embedding_A")
        )
        if embedded:
            raise ValidationError(
                f"cannot merge: {name} has LoRA on the embedding {embedded[0]}, which merges here do not combine;"
                " request it in a combination instead (a+b)"
            )
        for key in f.tensors:
            if not key.startswith(SAVED_PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
                raise AdapterInvalid(name, f"unexpected tensor {key!r} for a merge")
            module = key[len(SAVED_PREFIX) :].rsplit(".", 2)[0]
            a = f.tensors.get(f"{SAVED_PREFIX}{module}.lora_A.weight")
            b = f.tensors.get(f"{SAVED_PREFIX}{module}.lora_B.weight")
            if a is None or b is None:
                raise AdapterInvalid(name, f"{module}: lora_A and lora_B are not both there")
            alpha = pattern_value(config.alpha_pattern, module, config.lora_alpha)
            r = config.r
            scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
            factors.setdefault(module, {})[name] = (a.float(), b.float(), scaling)
    tensors = {}
    for module, present in factors.items():
        shapes = {(tuple(a.shape[1:]), tuple(b.shape[:1])) for a, b, _ in present.values()}
        if len(shapes) > 1:
            raise ValidationError(f"cannot merge: the adapters' shapes differ at {module}")
        sources = [(name, w) for name, w in merge.sources if name in present]
        a, b = _merge_module(strategy, merge, module, sources, present, new_rank)
        tensors[f"{SAVED_PREFIX}{module}.lora_A.weight"] = a.contiguous()
        tensors[f"{SAVED_PREFIX}{module}.lora_B.weight"] = b.contiguous()
    config = {
        **first,
        "r": new_rank,
        "lora_alpha": new_rank,
        "target_modules": sorted(factors),
        "alpha_pattern": {},
        "rank_pattern": {},
    }
    return config, tensors


def _merge_module(strategy, merge, module, sources, present, new_rank) -> tuple[torch.Tensor, torch.Tensor]:
    """One module's merged (A [new_rank, in], B [out, new_rank]), as PEFT's add_weighted_adapter computes them."""
    generator = torch.Generator().manual_seed(merge_seed(merge.name, module))
    in_f, out_f = present[sources[0][0]][0].shape[1], present[sources[0][0]][1].shape[0]
    if strategy == "cat":
        a = torch.zeros(new_rank, in_f)
        b = torch.zeros(out_f, new_rank)
        loras_a = torch.cat([present[n][0] * w * present[n][2] for n, w in sources], dim=0)
        loras_b = torch.cat([present[n][1] for n, _ in sources], dim=1)
        a[: loras_a.shape[0], :] = loras_a
        b[:, : loras_b.shape[1]] = loras_b
        return a, b
    if strategy in SVD:
        deltas = [(present[n][1] @ present[n][0]) * present[n][2] for n, _ in sources]
        weights = torch.tensor([w for _, w in sources])
        delta = _combine(strategy.removesuffix("_svd"), deltas, weights, merge, generator)
        u, s, vh = torch.linalg.svd(delta, full_matrices=True)
        u = u[:, :new_rank] @ torch.diag(s[:new_rank])
        return vh[:new_rank, :], u
    weights_a, weights_b = [], []
    for n, w in sources:
        scaled = w * present[n][2]
        sign = 1 if scaled >= 0 else -1
        weights_a.append(math.sqrt(abs(scaled)) * sign)
        weights_b.append(math.sqrt(abs(scaled)))
    a = _combine(strategy, [present[n][0] for n, _ in sources], torch.tensor(weights_a), merge, generator)
    b = _combine(strategy, [present[n][1] for n, _ in sources], torch.tensor(weights_b), merge, generator)
    return a, b


def _combine(strategy, tensors, weights, merge: Merge, generator) -> torch.Tensor:
    """PEFT's merge_utils function of that name; DARE's random pruning draws from `generator`."""
    if strategy in ("linear", "svd"):
        return task_arithmetic(tensors, weights)
    if strategy == "ties":
        return ties(tensors, weights, merge.density, merge.majority_sign_method)
    if strategy == "magnitude_prune":
        return magnitude_prune(tensors, weights, merge.density)
    if merge.density < 1:  # merge_utils.prune(method="random", rescale=True); density 1 prunes nothing there
        tensors = [_random_pruning(t, merge.density, generator) for t in tensors]
    if strategy == "dare_linear":
        return task_arithmetic(tensors, weights)  # dare_linear after pruning: stack, weigh, sum
    stacked = torch.stack(tensors, dim=0)  # dare_ties after pruning
    mask = calculate_majority_sign_mask(stacked, method=merge.majority_sign_method)
    return disjoint_merge(stacked * reshape_weight_task_tensors(stacked, weights), mask)


def _random_pruning(tensor: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """merge_utils.random_pruning with rescale, drawing from generator instead of torch's global one."""
    mask = torch.bernoulli(torch.full_like(input=tensor, fill_value=density), generator=generator)
    return tensor * mask / density


@functools.lru_cache(maxsize=1024)
def _parse(name: str) -> Merge:
    return Merge._parse(name)


def _float(name: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValidationError(f"invalid merge {name!r}: {text!r} is not a number") from None


def weight_text(value: float) -> str:
    """The shortest text that reads back as the same float: 0.5, 2, -1.25, 1e-05."""
    return repr(float(value)).removesuffix(".0")
