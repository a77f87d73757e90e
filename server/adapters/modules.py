"""Adapters on whole modules rather than on a Linear layer's input and output: LoRA on an input embedding, a module's
saved copy (PEFT's `modules_to_save`) and replaced token rows (PEFT's `trainable_token_indices`).

Semantics, per row of the batch, on one module M (an embedding, `lm_head`, a norm) with base output y = M(x):
    EmbeddingLora  y + w * scaling * (A^T[ids] @ B^T)          # additive, like LoRA on a Linear layer
    ModuleCopy     M'(x), M' the adapter's copy of M            # replaces M for that row; weight 1 only
    TokenRows      y with the rows (embedding) or the logits (tied lm_head) of the adapter's token ids replaced
Rows are selected, never multiplied by zero: each group of rows with the same adapters here runs on its own rows,
and rows with none of them get the module's own output (for a copied lm_head: one matmul per distinct head).
A row may not combine an adapter that replaces M with another adapter on M (`check_combination`).
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict

import torch
import torch.nn.functional as F
from peft import PeftConfig
from peft.utils.constants import EMBEDDING_LAYER_NAMES
from torch import nn

from server.adapters.kinds.base import LayerAdapter, expect_params, expect_shape, pattern_value
from server.errors import AdapterInvalid, ValidationError

SAVED_PREFIX = "base_model.model."
EMBEDDING_LORA_PARAMS = ("lora_embedding_A", "lora_embedding_B")
TOKEN_DELTA = "token_adapter.trainable_tokens_delta"


class ModuleAdapter(LayerAdapter):
    replaces = False  # the row's output of the module is the adapter's, not the base's plus something

    def output(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor | None, weight: float) -> torch.Tensor:
        """This adapter's output for rows x of module (the base module), y: what the module gives them so far
        (None for an adapter that replaces the module)."""
        raise NotImplementedError


class EmbeddingLora(ModuleAdapter):
    """LoRA on an nn.Embedding, as peft's lora.Embedding computes it."""

    def __init__(self, a_t: torch.Tensor, b_t: torch.Tensor, scaling: float, embed_scale: torch.Tensor | None):
        self.a_t, self.b_t, self.scaling, self.embed_scale = a_t, b_t, scaling, embed_scale  # [vocab, r], [r, dim]

    def output(self, module, x, y, weight):
        # x: [rows, tokens] ids -> [rows, tokens, dim]
        delta = (F.embedding(x, self.a_t) @ self.b_t) * (self.scaling * weight)
        if self.embed_scale is not None:
            delta = delta * self.embed_scale.to(delta.dtype)
        return y + delta


class TokenRows(ModuleAdapter):
    """Token ids whose rows of an embedding (or of a tied lm_head's weight) the adapter replaces."""

    replaces = True

    def __init__(self, indices: torch.Tensor, rows: torch.Tensor, lookup: torch.Tensor, is_head: bool):
        # indices [k], rows [k, dim], lookup [vocab]: the position of each id among indices, -1 for the others
        self.indices, self.rows, self.lookup, self.is_head = indices, rows, lookup, is_head

    def output(self, module, x, y, weight):
        if self.is_head:  # x: [rows, tokens, hidden]: the logits of the replaced ids from the replaced rows
            bias = module.bias.index_select(0, self.indices) if module.bias is not None else None
            return y.index_copy(-1, self.indices, F.linear(x, self.rows, bias))
        at = self.lookup[x]  # x: [rows, tokens] ids
        rows = F.embedding(at.clamp(min=0), self.rows)
        embed_scale = getattr(module, "embed_scale", None)  # Gemma's: peft scales the replaced rows too
        if embed_scale is not None:
            rows = rows * embed_scale.to(rows.dtype)
        return torch.where((at >= 0)[..., None], rows, y)


class ModuleCopy(ModuleAdapter):
    """The adapter's own copy of a module's parameters (peft's ModulesToSaveWrapper)."""

    replaces = True

    def __init__(self, params: tuple[tuple[str, torch.Tensor], ...]):
        self.params = params  # (name, tensor) pairs: map_tensors and tensors() see into tuples

    def output(self, module, x, y, weight):
        return torch.func.functional_call(module, dict(self.params), (x,))


class MixedModule(nn.Module):
    """A module of the base model (or the MixedLinear around it) plus the loaded ModuleAdapters on it."""

    def __init__(self, base: nn.Module, inner: nn.Module, context):
        super().__init__()
        self.base = base  # the base model's module: what copies and token rows run with
        self.inner = inner  # what rows without a replacement run: base, or the MixedLinear wrapping it
        self.context = context
        self.adapters: dict[int, ModuleAdapter] = {}
        self._groups: OrderedDict[int, list] = OrderedDict()  # by BatchPlan.id: [(row indices or None, adapters)]

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # what the model reads of the module (weight, num_embeddings, ...)
            return getattr(self._modules["base"], name)

    def attach(self, slot: int, adapter: ModuleAdapter, order: tuple = ()) -> None:
        self.adapters[slot] = adapter

    def detach(self, slot: int, keep: bool = True) -> None:
        del self.adapters[slot]
        self._groups.clear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.context.plan
        groups = self._plan_groups(plan) if plan is not None else [(None, [])]
        if len(groups) == 1 and groups[0][0] is None:
            return self._run(x, groups[0][1], lambda: self.inner(x))
        if x.shape[0] != len(plan.combos):
            raise RuntimeError(f"a module adapter got input {tuple(x.shape)}, not {len(plan.combos)} rows")
        full: list[torch.Tensor] = []  # the inner module's output for every row, computed once if some group needs it

        def inner(rows: torch.Tensor):
            if self.inner is not self.base:  # a MixedLinear plans for the whole batch: it runs on every row
                if not full:
                    full.append(self.inner(x))
                return full[0].index_select(0, rows)
            return self.inner(x.index_select(0, rows))

        parts = [(rows, self._run(x.index_select(0, rows), ads, lambda r=rows: inner(r))) for rows, ads in groups]
        first = parts[0][1]
        out = first.new_empty((x.shape[0], *first.shape[1:]))
        for rows, part in parts:
            out.index_copy_(0, rows, part)
        return out

    def _run(self, x: torch.Tensor, adapters: list[tuple[ModuleAdapter, float]], inner) -> torch.Tensor:
        copy = next((a for a, _ in adapters if isinstance(a, ModuleCopy)), None)
        y = copy.output(self.base, x, None, 1.0) if copy is not None else inner()
        for adapter, weight in adapters:
            if adapter is not copy:
                y = adapter.output(self.base, x, y, weight)
        return y

    def _plan_groups(self, plan) -> list:
        """Rows grouped by their adapters here and those adapters' weights; one group of every row: indices None."""
        groups = self._groups.get(plan.id)
        if groups is None:
            chosen = plan.weighted(self.adapters)
            groups = [
                (plan.indices(tuple(c == key for c in chosen)), [(self.adapters[s], w) for s, w in key])
                for key in dict.fromkeys(chosen)
            ]
            self._groups[plan.id] = groups
            while len(self._groups) > 4:
                self._groups.popitem(last=False)
        return groups


# --- building, from an adapter's files


def module_adapters(
    name: str, config: PeftConfig, layout, tensors: dict[str, torch.Tensor], device, dtype
) -> tuple[dict[str, ModuleAdapter], dict[str, torch.Tensor]]:
    """The adapter's saved module copies, token rows and checked base-layer copies, taken out of tensors:
    ({module: adapter}, the tensors left for the adapter's layers)."""
    rest = dict(tensors)
    found: dict[str, ModuleAdapter] = {}
    if peft_ties(config, layout) == "saved" or (
        getattr(config, "trainable_token_indices", None)
        and layout.tied
        and getattr(config, "ensure_weight_tying", False)
    ):
        raise AdapterInvalid(name, _ENSURE_TYING)
    saved = _matches(config.modules_to_save or (), layout)
    for module in sorted({*layout.embeddings, layout.output_embedding} - {None}):
        # the base embeddings PEFT saves beside an adapter that targets them, or with save_embedding_layers=True
        for key in (f"{SAVED_PREFIX}{module}.base_layer.weight", f"{SAVED_PREFIX}{module}.weight"):
            if key in rest and not (key.endswith(f"{module}.weight") and module in saved):
                _check_base_copy(name, module, rest.pop(key), layout.modules[module].weight.detach())
    for module in saved:
        own = layout.modules[module]
        if list(own.children()):
            raise AdapterInvalid(
                name,
                f"modules_to_save: {module} is a block of layers ({type(own).__name__}); mixserve serves saved copies"
                " of single layers (lm_head, embed_tokens, norms): save those instead",
            )
        params = {}
        for param, base in own.named_parameters(recurse=False):
            key = f"{SAVED_PREFIX}{module}.{param}"
            if key not in rest:
                raise AdapterInvalid(name, f"modules_to_save: no saved copy of {module}.{param} in the weights file")
            params[param] = _fit(name, f"modules_to_save: {module}.{param}", rest.pop(key), base.shape).to(
                device, dtype
            )
        found[module] = ModuleCopy(tuple(params.items()))
    found.update(_token_rows(name, config, layout, rest, device, dtype))
    for module, adapter in found.items():
        if not all(torch.isfinite(t).all() for t in adapter.tensors() if t.is_floating_point()):
            raise AdapterInvalid(name, f"{module}: the saved copy or token rows contain NaN or infinity")
    return found, rest


def peft_ties(config, layout) -> str | None:
    """What PEFT's ensure_weight_tying ties on a base with tied embeddings (BaseTuner._check_tied_modules): "saved"
    when modules_to_save names an embedding, else "targets" when target_modules does (PEFT then adapts the input
    embedding, and the output one with the same LoRA, transposed); None when it ties nothing."""
    if not (layout.tied and getattr(config, "ensure_weight_tying", False)):
        return None
    if any(m.split(".")[-1] in EMBEDDING_LAYER_NAMES for m in config.modules_to_save or ()):
        return "saved"
    targets = config.target_modules
    if isinstance(targets, str):
        named = any(re.fullmatch(targets, m) for m in EMBEDDING_LAYER_NAMES)
    else:
        named = any(m.split(".")[-1] in EMBEDDING_LAYER_NAMES for m in targets or ())
    return "targets" if named else None


def _matches(targets, layout) -> list[str]:
    """peft's _set_trainable: every module whose name ends with one of targets."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    return [m for m in layout.modules if m and any(m.endswith(t) for t in targets)]


def _token_rows(name, config, layout, rest, device, dtype) -> dict[str, TokenRows]:
    given = getattr(config, "trainable_token_indices", None)
    if not given:
        return {}
    targets = given if isinstance(given, dict) else {layout.input_embedding: given}  # a list: the input embedding
    found = {}
    for target, ids in targets.items():
        modules = [m for m in _matches([target], layout) if f"{SAVED_PREFIX}{m}.{TOKEN_DELTA}" in rest]
        if len(modules) != 1:
            raise AdapterInvalid(name, f"trainable_token_indices: no saved token rows for {target!r}")
        module = modules[0]
        own = layout.modules[module]
        weight = own.weight  # Embedding: [vocab, dim]; Linear (an lm_head): [vocab, hidden]
        if not isinstance(own, (nn.Embedding, nn.Linear)):
            raise AdapterInvalid(
                name, f"trainable_token_indices: {module} is a {type(own).__name__}, not a token table"
            )
        delta = rest.pop(f"{SAVED_PREFIX}{module}.{TOKEN_DELTA}")
        if len(set(ids)) != len(ids) or not all(0 <= i < weight.shape[0] for i in ids):
            raise AdapterInvalid(
                name,
                f"trainable_token_indices for {module}: ids must be distinct and below its {weight.shape[0]} rows",
            )
        delta = _fit(name, f"trainable tokens of {module}", delta, (len(ids), weight.shape[1]))
        found[module] = _rows(ids, delta, weight.shape[0], isinstance(own, nn.Linear), device, dtype)
    head, embedding = layout.output_embedding, layout.input_embedding
    if layout.tied and embedding in found and head not in found and len(targets) == 1:
        # peft ties the output embedding's token rows to the input embedding's (tie_word_embeddings)
        rows = found[embedding]
        found[head] = TokenRows(rows.indices, rows.rows, rows.lookup, True)
    elif layout.tied and embedding in found and head in found:
        raise AdapterInvalid(
            name,
            "trainable_token_indices gives the tied input and output embeddings separately, which this server does"
            " not serve; give the ids for the input embedding only (PEFT then ties the output's)",
        )
    return found


def _rows(ids, delta, vocab, is_head, device, dtype) -> TokenRows:
    indices = torch.tensor(ids, dtype=torch.long, device=device)
    lookup = torch.full((vocab,), -1, dtype=torch.long, device=device)
    lookup[indices] = torch.arange(len(ids), device=device)
    return TokenRows(indices, delta.to(device, dtype), lookup, is_head)


def embedding_lora(config, module_name: str, module: nn.Embedding, tensors: dict, dtype) -> EmbeddingLora:
    """LoRA (peft's lora.Embedding) on one nn.Embedding; ValueError when the weights do not fit it."""
    if getattr(config, "use_dora", False) or getattr(config, "lora_bias", False):
        raise ValueError("LoRA on an embedding works without use_dora and lora_bias (in peft too)")
    r = pattern_value(config.rank_pattern, module_name, config.r)
    alpha = pattern_value(config.alpha_pattern, module_name, config.lora_alpha)
    expect_params(tensors, set(EMBEDDING_LORA_PARAMS))
    a = expect_shape(tensors, "lora_embedding_A", (r, module.num_embeddings))
    b = expect_shape(tensors, "lora_embedding_B", (module.embedding_dim, r))
    scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
    embed_scale = getattr(module, "embed_scale", None)
    if embed_scale is not None:
        embed_scale = torch.as_tensor(embed_scale, device=a.device)
    return EmbeddingLora(a.T.contiguous().to(dtype), b.T.contiguous().to(dtype), scaling, embed_scale)


def _check_base_copy(name: str, module: str, saved: torch.Tensor, base: torch.Tensor) -> None:
    """Equal, after rounding both to the coarser of their two dtypes (a float32 copy of a bfloat16 base is its exact
    widening)."""
    if tuple(saved.shape) != tuple(base.shape):
        raise AdapterInvalid(
            name,
            f"the weights file holds a copy of the base model's {module} with {saved.shape[0]} rows: the adapter"
            f" expects a base model with {saved.shape[0]} tokens, the served one has {base.shape[0]} (a resized"
            " vocabulary); serve it on the base model it was trained on",
        )
    coarser = min((saved.dtype, base.dtype), key=lambda d: -torch.finfo(d).eps)
    step = max(1, (1 << 24) // max(1, base[0].numel()))  # rows compared at a time: a whole copy is never made
    blocks = range(0, base.shape[0], step)
    if not all(
        torch.equal(saved[i : i + step].to(base.device, coarser), base[i : i + step].to(coarser)) for i in blocks
    ):
        raise AdapterInvalid(
            name,
            f"the weights file holds a copy of the base model's {module} (PEFT saves one when an adapter targets an"
            " embedding, or with save_embedding_layers) that differs from the served base's: the adapter was trained"
            " on another base model, or trained that embedding itself; serve it on the base model it was trained on,"
            " or re-save it with save_embedding_layers=False if the difference does not matter",
        )


def _fit(name: str, what: str, saved: torch.Tensor, shape: tuple) -> torch.Tensor:
    if tuple(saved.shape) != tuple(shape):
        resized = saved.dim() == 2 and saved.shape[1:] == tuple(shape[1:])
        vocab = " (a resized vocabulary: serve it on the base model it was trained on)" if resized else ""
        raise AdapterInvalid(
            name, f"{what} has shape {tuple(saved.shape)}, the served base model's {tuple(shape)}{vocab}"
        )
    return saved


_ENSURE_TYING = (
    "ensure_weight_tying=True with an embedding in modules_to_save, or with trainable_token_indices, on a model with"
    " tied embeddings is not served (PEFT then ties the adapter's own output-embedding copy or rows to its"
    " input-embedding ones); re-save the adapter with ensure_weight_tying=False"
)


# --- at admission, with the combination's adapters built


def check_combination(adapters, weights) -> None:
    """Refuses (422) a combination that replaces a module at a weight other than 1, or that replaces a module another
    of its adapters also changes. adapters: LoadedAdapters, weights: theirs."""
    for adapter, weight in zip(adapters, weights, strict=True):
        for module, layer in adapter.built.layers.items():
            if not getattr(layer, "replaces", False):
                continue
            if weight != 1:
                raise ValidationError(
                    f"adapter {adapter.name!r} replaces {module} (modules_to_save or trainable tokens): a replaced"
                    f" module has no delta to scale, so its weight must be 1, not {weight:g}"
                )
            others = [repr(a.name) for a in adapters if a is not adapter and module in a.built.layers]
            if others:
                raise ValidationError(
                    f"adapter {adapter.name!r} replaces {module} (modules_to_save or trainable tokens) and"
                    f" {', '.join(others)} also change it; PEFT cannot compose these either: request them separately"
                )
