"""The oracle of docs/contract.md: a fresh PeftMixedModel with exactly the combination, loaded in canonical order."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import PeftConfig, PeftMixedModel
from peft.tuners.adalora import AdaLoraLayer
from peft.tuners.oft.layer import OFTRotationModule
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import set_peft_model_state_dict
from peft.utils.other import TrainableTokensWrapper
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.conftest import DEVICE, DTYPE

# docs/contract.md: nesting, innermost first; within a type, the order of the request
CANONICAL = ["SHIRA", "OFT", "LORA", "ADALORA", "LOHA", "LOKR"]


def peft_type(store: Path, name: str) -> str:
    return json.loads((store / name / "adapter_config.json").read_text())["peft_type"]


def canonical(store: Path, names: list[str]) -> list[str]:
    return sorted(names, key=lambda n: CANONICAL.index(peft_type(store, n)))


def reference_model(
    model_dir: Path, store: Path, names: list[str], dtype: torch.dtype = DTYPE, weights: dict | None = None
):
    """PeftMixedModel (or the plain base for no adapters) with `names` active, loaded in canonical order, on the base
    in dtype (with PEFT's defaults: adapter weights stay in float32), on the tests' device; weights: {name: w} for
    those not at 1 (see _weigh)."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    if not names:
        return base.to(DEVICE)
    mixed = None
    ordered = canonical(store, names)
    for i, name in enumerate(ordered):
        internal = f"a{i}"  # store names may hold '.', which peft adapter names cannot
        config = PeftConfig.from_pretrained(store / name)
        pattern = getattr(config, "rank_pattern", None) if config.peft_type == "ADALORA" else None
        if pattern:
            config.rank_pattern = None  # PeftMixedModel cannot resize AdaLoRA modules; done below
        if mixed is None:
            mixed = PeftMixedModel(base, config, internal)  # from_pretrained would refuse OFT first
        else:
            mixed.add_adapter(internal, config)
        if pattern:
            _resize_adalora(mixed, internal, config, pattern)
        tensors = load_file(store / name / "adapter_model.safetensors")
        if getattr(config, "bias", "none") != "none":
            tensors = _replace_trained_biases(base, tensors, config.modules_to_save or ())
        with _token_rows_of_own_adapters_only():
            result = set_peft_model_state_dict(mixed, tensors, internal)
        assert not result.unexpected_keys, result.unexpected_keys
        missing = [k for k in result.missing_keys if internal in k.split(".") and ".ranknum." not in k]
        missing = [k for k in missing if not _tied_token_rows(mixed, k)]
        assert not missing, missing  # else random weights would stay in the oracle (AdaLoRA's ranknum is not saved)
    mixed.set_adapter([f"a{i}" for i in range(len(ordered))])
    for i, name in enumerate(ordered):
        if (weights or {}).get(name, 1.0) != 1.0:
            _weigh(mixed, f"a{i}", weights[name])
    return mixed.eval().to(DEVICE)


@torch.no_grad()
def _replace_trained_biases(base, tensors: dict, saved_modules) -> dict:
    """The tensors less the trained base biases (config.bias 'all' / 'lora_only'), which replace the base's biases,
    as PEFT's loading does; by module path, because in a mixed model another adapter may wrap the layer first, and
    PEFT's keys (`<module>.base_layer.bias`) would then miss it. The biases of modules_to_save copies stay."""
    rest = {}
    for key, tensor in tensors.items():
        path = key.removeprefix("base_model.model.").replace(".base_layer", "")
        saved = any(path.removesuffix(".bias").endswith(m) for m in saved_modules)
        if key.endswith(".bias") and ".lora_" not in key and not saved:
            base.get_parameter(path).copy_(tensor)
        else:
            rest[key] = tensor
    return rest


@torch.no_grad()
def _weigh(mixed, internal: str, weight: float) -> None:
    """The adapter at that weight through PEFT's own API where PEFT has one: set_scale (LoRA, LoHa, LoKr, SHiRA;
    for AdaLoRA, whose scaling is not alpha / r, the scaling itself times the weight, which is what set_scale does
    to the others). PEFT cannot scale OFT: mixserve's definition, the rotation of the scaled generator, is PEFT's
    rotation of oft_R times the weight (after COFT's projection, which PEFT then leaves alone for |w| <= 1)."""
    for path, module in mixed.named_modules():
        if isinstance(module, OFTRotationModule) and internal in path.split("."):
            projected = module._project_batch(module.weight, eps=module.eps) if module.coft else module.weight
            module.weight.copy_(projected * weight)
        elif isinstance(module, BaseTunerLayer) and internal in getattr(module, "scaling", {}):
            if isinstance(module, AdaLoraLayer):
                module.scaling[internal] *= weight
            elif not hasattr(module, "oft_R"):
                module.set_scale(internal, weight)


@contextmanager
def _token_rows_of_own_adapters_only():
    """PEFT 0.21's TrainableTokensWrapper asks every adapter loaded after its own for its token rows (a KeyError):
    like ModulesToSaveWrapper, it should map only its own adapters' keys (docs/contract.md)."""
    original = TrainableTokensWrapper.adapter_state_dict_load_map

    def own_only(self, adapter_name):
        return original(self, adapter_name) if adapter_name in self.token_adapter.token_indices else {}

    TrainableTokensWrapper.adapter_state_dict_load_map = own_only
    try:
        yield
    finally:
        TrainableTokensWrapper.adapter_state_dict_load_map = original


def _tied_token_rows(mixed, key: str) -> bool:
    """Trainable token rows of a tied output embedding: PEFT shares the input embedding's and does not save them."""
    if ".token_adapter." not in key:
        return False
    layer = mixed.base_model.model.get_submodule(key[len("base_model.model.") :].split(".token_adapter.")[0])
    return layer.token_adapter.tied_adapter is not None


def _resize_adalora(mixed, internal: str, config, pattern: dict) -> None:
    """peft's AdaLoraModel.resize_modules_by_rank_pattern, for a mixed model."""
    for key, mask in pattern.items():
        layer = mixed.base_model.model.get_submodule(key.removesuffix(".lora_E"))
        while not isinstance(layer, AdaLoraLayer):
            layer = layer.base_layer
        ranknum = layer.ranknum[internal]
        rank = sum(mask)
        layer.update_layer(internal, rank, config.lora_alpha, config=config)
        if rank > 0:
            with torch.no_grad():
                layer.ranknum[internal].copy_(ranknum)


@torch.no_grad()
def reference_logits(
    model_dir: Path,
    store: Path,
    names: list[str],
    ids: list[int],
    dtype: torch.dtype = DTYPE,
    weights: dict | None = None,
) -> torch.Tensor:
    """The logits of ids (on the CPU, wherever they were computed)."""
    return reference_model(model_dir, store, names, dtype, weights)(torch.tensor([ids], device=DEVICE)).logits[0].cpu()


@torch.no_grad()
def reference_greedy(
    model_dir: Path,
    store: Path,
    names: list[str],
    ids: list[int],
    new_tokens: int,
    weights: dict | None = None,
    dtype: torch.dtype = DTYPE,
) -> list[int]:
    model = reference_model(model_dir, store, names, dtype, weights)
    out = model.generate(
        torch.tensor([ids], device=DEVICE),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=DEVICE),
        max_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(ids) :].tolist()
