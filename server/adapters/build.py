"""From an adapter's files to its weights on each Linear layer, checked against the base model.

Nothing here touches the live model: a failure leaves no trace.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import re
from dataclasses import dataclass

import torch
from peft import PeftConfig
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers.pytorch_utils import Conv1D

from server.adapters.host import HostCopy, copy_to_host, footprint
from server.adapters.kinds import CANONICAL_ORDER, KINDS, Kind, LayerAdapter
from server.adapters.mixing import BaseLayout
from server.adapters.modules import EMBEDDING_LORA_PARAMS, SAVED_PREFIX, embedding_lora, module_adapters, peft_ties
from server.adapters.store import AdapterFiles
from server.errors import AdapterInvalid

_ROUTED_EXPERT = re.compile(r"\.experts\.\d+\.")


@dataclass
class BuiltAdapter:
    name: str
    version: str
    kind: Kind
    config: PeftConfig
    layers: dict[str, LayerAdapter]  # module name -> weights on that layer

    signature: tuple = ()
    host: HostCopy | None = None  # where the weights are, in the host tier after a device (server/adapters/host.py)

    @functools.cached_property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors())  # a tensor two layers share counts once

    def host_nbytes(self, pin: bool) -> int:
        """Host memory that this adapter takes in the host tier (pin: evicted from a GPU, as allocated)."""
        return self.host.nbytes if self.host else footprint(self._tensors(), pin) if pin else self.nbytes

    def to(self, device: torch.device) -> BuiltAdapter:
        if device.type == "cpu":  # adapters are built on the CPU, and host copies are there: nothing to copy
            return self
        if self.host:
            self.host.wait()
        moved: dict[int, torch.Tensor] = {}  # a tensor two layers share (tied token rows) stays one tensor

        def to(t: torch.Tensor) -> torch.Tensor:
            if id(t) not in moved:
                moved[id(t)] = t.to(device, non_blocking=True)
            return moved[id(t)]

        layers = {name: layer.map_tensors(to) for name, layer in self.layers.items()}
        return dataclasses.replace(self, layers=layers, host=None)

    def to_host(self, pin: bool) -> BuiltAdapter:
        """A copy in one host buffer, pinned when pin (from a GPU: the copy is asynchronous, see HostCopy)."""
        copy, views = copy_to_host(self._tensors(), pin)
        layers = {name: layer.map_tensors(lambda t: views[id(t)]) for name, layer in self.layers.items()}
        return dataclasses.replace(self, layers=layers, host=copy)

    def _tensors(self) -> list[torch.Tensor]:
        return list({id(t): t for layer in self.layers.values() for t in layer.tensors()}.values())


def build_adapter(
    files: AdapterFiles, layout: BaseLayout, device: torch.device, dtype: torch.dtype, max_rank: int | None = None
) -> BuiltAdapter:
    """max_rank: the most ranks one layer's low-rank delta may take in its rank pool (MIXSERVE_MAX_LORA_RANK)."""
    name = files.name
    kind, config = parse_config(name, files.config)
    params = targeted_parameters(name, config, layout)
    modules, tensors = module_adapters(name, config, layout, files.tensors, device, dtype)
    targeted = targeted_modules(name, config, layout, bool(params) or bool(modules)) | params.keys()
    by_module = _group_tensors(name, kind, tensors)
    missing, extra = targeted - by_module.keys(), by_module.keys() - targeted - _trained_biases(name, by_module, layout)
    if missing:
        raise AdapterInvalid(
            name, f"no weights for targeted module(s) {_few(missing)}: the weights file is incomplete; re-save it"
        )
    if extra:
        raise AdapterInvalid(
            name,
            f"weights for module(s) {_few(extra)} that the config does not target: the config and the weights file"
            " disagree; re-save the adapter with PEFT's save_pretrained",
        )
    layers = {}
    conv1d = sorted(m for m in by_module if isinstance(layout.linears.get(m), Conv1D))
    if conv1d and not kind.on_conv1d:
        able = ", ".join(k.peft_type for k in KINDS.values() if k.on_conv1d)
        raise AdapterInvalid(
            name, f"{kind.peft_type} cannot target Conv1D layers such as {conv1d[0]} (neither can PEFT); {able} can"
        )
    for module_name in sorted(by_module):
        tensors = {
            param: t.to(device=device, dtype=torch.float32 if t.is_floating_point() else t.dtype)
            for param, t in by_module[module_name].items()
        }
        if not all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()):
            raise AdapterInvalid(
                name, f"{module_name}: weights contain NaN or infinity (a broken training run or file)"
            )
        try:
            if module_name in params:
                layer = kind.build_parameters(config, module_name, params[module_name], tensors, dtype)
            elif module_name in layout.embeddings:
                layer = embedding_lora(config, module_name, layout.embeddings[module_name], tensors, dtype)
            else:
                shape = dataclasses.replace(layout.shape(module_name), max_pooled_ranks=max_rank)
                layer = kind.build(config, module_name, shape, tensors, dtype)
        except ValueError as exc:
            raise AdapterInvalid(name, f"does not fit the base model at {module_name}: {exc}") from exc
        if layer is not None and dtype != torch.float32 and not all(torch.isfinite(t).all() for t in layer.tensors()):
            raise AdapterInvalid(
                name,
                f"{module_name}: weights overflow {str(dtype).removeprefix('torch.')}, the serving dtype; serve the"
                " model in float32 or bfloat16, or retrain with smaller weights",
            )
        if layer is not None:
            _check_rank(name, kind, module_name, layer, max_rank)
            layers[module_name] = layer
    both = sorted(layers.keys() & modules.keys())
    if both:
        raise AdapterInvalid(
            name,
            f"{both[0]} is both a target and saved whole or in token rows; PEFT refuses that too: save one of them",
        )
    layers.update(modules)
    return BuiltAdapter(
        name=name, version=files.version, kind=kind, config=config, layers=layers, signature=files.signature
    )


def _check_rank(name: str, kind: Kind, module_name: str, layer: LayerAdapter, max_rank: int | None) -> None:
    """A LoRA or AdaLoRA above MIXSERVE_MAX_LORA_RANK is refused (a LoHa whose r x r ranks exceed it is built dense,
    not pooled, and served)."""
    factors = layer.low_rank if layer.low_rank is not None else getattr(layer, "with_bias", None)
    if max_rank is None or factors is None or kind.peft_type == "LOHA":
        return
    rank = factors[0].shape[0]
    if rank > max_rank:
        merged = (
            " (a merge's: cat adds its sources' ranks, the others keep the largest)"
            if name.startswith("merge:")
            else ""
        )
        raise AdapterInvalid(
            name,
            f"{module_name}: {kind.peft_type} rank {rank}{merged} exceeds MIXSERVE_MAX_LORA_RANK ({max_rank}), the"
            " most ranks this server computes for every row of a decode batch per adapter; use one of rank"
            f" {max_rank} or less, or ask the operator to raise the setting",
        )


def check_mixable(name: str, peft_type) -> None:
    if peft_type not in KINDS:
        raise AdapterInvalid(
            name, f"adapter type {peft_type!r} cannot be mixed; supported types: {', '.join(CANONICAL_ORDER)}"
        )


def parse_config(name: str, raw: dict) -> tuple[Kind, PeftConfig]:
    peft_type = raw.get("peft_type")
    check_mixable(name, peft_type)
    kind = KINDS[peft_type]
    problems = kind.raw_problems(raw)
    if problems:
        raise AdapterInvalid(name, "; ".join(problems))
    try:
        config = PeftConfig.from_peft_type(**raw)
    except Exception as exc:
        raise AdapterInvalid(name, f"invalid adapter_config.json: {exc}") from exc
    problems = kind.problems(config)
    if problems:
        raise AdapterInvalid(name, "; ".join(problems))
    return kind, config


def targeted_parameters(name: str, config: PeftConfig, layout: BaseLayout) -> dict[str, dict]:
    """LoRA's target_parameters, as peft matches them: {module: {parameter: (shape, transposed)}}, each module's
    parameters in the order peft nests its wrappers (registration order, the first innermost)."""
    targets = sorted(set(getattr(config, "target_parameters", None) or ()))
    if not targets:
        return {}
    found: dict[str, dict] = {}
    for module_name, module in layout.modules.items():
        for param_name, param in module.named_parameters(recurse=False):
            key = f"{module_name}.{param_name}"
            if key in targets or any(key.endswith(f".{t}") for t in targets):
                if module_name in layout.linears:
                    raise AdapterInvalid(name, f"target_parameters: {key} belongs to a Linear layer; target the layer")
                transposed = bool(getattr(module, "is_transposed", False))
                found.setdefault(module_name, {})[param_name] = (tuple(param.shape), transposed)
    if not found:
        raise AdapterInvalid(name, f"target_parameters {targets} match no parameter of the base model")
    return found


def targeted_modules(name: str, config: PeftConfig, layout: BaseLayout, has_parameters: bool = False) -> set[str]:
    """The modules peft would wrap for this config on the base model (a mixed model's rules)."""
    config = copy.copy(config)
    if config.target_modules is None:
        defaults = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(layout.model_type)
        if defaults is None:
            raise AdapterInvalid(
                name,
                f"target_modules is not set and peft has no default for {layout.model_type!r}; set it in"
                " adapter_config.json to the modules the adapter was trained on",
            )
        config.target_modules = set(defaults)
    if isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear":
        config.target_modules = set(layout.linears) - {layout.output_embedding}  # then the rules below, as in peft
    found = {m for m in layout.modules if m and check_target_module_exists(config, m)}
    if peft_ties(config, layout) == "targets":  # the tied embeddings' LoRA: the input's, and the output's transposed
        found |= {layout.input_embedding, layout.output_embedding}
    routed = sorted(m for m in found if _ROUTED_EXPERT.search(m))
    if routed:
        raise AdapterInvalid(
            name,
            f"targets {routed[0]}, a routed expert that sees only the tokens routed to it, which is not served;"
            " retrain targeting the attention or shared layers",
        )
    embeddings = sorted(m for m in found if m in layout.embeddings)
    if embeddings and config.peft_type != "LORA":
        raise AdapterInvalid(
            name,
            f"{config.peft_type.value} on the embedding {embeddings[0]} is not served (mixserve serves LoRA on embeddings"
            " only, whatever PEFT can build there): retrain with it left out of target_modules, or use LoRA",
        )
    not_linear = {m for m in found if m not in layout.linears and m not in layout.embeddings}
    if not_linear:
        m = min(not_linear)
        raise AdapterInvalid(
            name,
            f"targets {m} ({type(layout.modules[m]).__name__}); only Linear, Conv1D and (for LoRA) Embedding layers are"
            " supported",
        )
    if not found and not has_parameters:
        raise AdapterInvalid(
            name,
            f"target_modules {config.target_modules!r} match no layer of the base model: the adapter was trained for"
            " another architecture; serve it on its own base model",
        )
    return found


def _trained_biases(name: str, by_module: dict[str, dict], layout: BaseLayout) -> set[str]:
    """The modules not targeted whose biases the file trains (config.bias='all': saved as `<module>.bias`)."""
    found = {m for m, tensors in by_module.items() if set(tensors) == {"bias"}}
    other = sorted(m for m in found if m not in layout.linears)
    if other:
        m = other[0]
        raise AdapterInvalid(
            name,
            f"bias='all' trained the bias of {m} ({type(layout.modules[m]).__name__}), which is served on Linear and"
            " Conv1D layers only (as a per-request delta of their output); retrain with bias='lora_only' or 'none'",
        )
    return found


def _group_tensors(name: str, kind: Kind, tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """`base_model.model.<module>.<param>` -> {module: {param: tensor}}."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    names = kind.param_names + (EMBEDDING_LORA_PARAMS if kind.peft_type == "LORA" else ())
    for key, tensor in tensors.items():
        param = next((p for p in names if key.endswith("." + p)), None)
        if not key.startswith(SAVED_PREFIX) or param is None:
            raise AdapterInvalid(
                name,
                f"unexpected tensor {key!r}: it is none of a {kind.peft_type} adapter's weights"
                f" ({', '.join(kind.param_names)} under {SAVED_PREFIX}<module>), so it holds something that is not"
                " served, or the file was not saved by PEFT for this config; re-save the adapter with PEFT",
            )
        module = key[len(SAVED_PREFIX) : -len(param) - 1]
        while module.endswith(".base_layer"):  # peft's nested wrappers of several target_parameters of one module
            module = module.removesuffix(".base_layer")
            param = "base_layer." + param
        grouped.setdefault(module, {})[param] = tensor
    return grouped


def _few(names: set[str]) -> str:
    shown = sorted(names)[:3]
    more = f" and {len(names) - len(shown)} more" if len(names) > len(shown) else ""
    return ", ".join(shown) + more
