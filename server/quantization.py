"""The base model's quantization (MIXSERVE_QUANTIZATION): which backend quantizes its Linear layers at load, and the
checks that make a bad combination a clear error at start.

Adapters never read a quantized layer's storage: every wrapped layer calls the base layer's own forward
(server/adapters/mixing.py), so any backend whose quantized Linear is a linear map of its input serves every type.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import torch

# mode -> the package that implements it
BACKENDS = {
    "bnb-nf4": "bitsandbytes",
    "bnb-fp4": "bitsandbytes",
    "bnb-int8": "bitsandbytes",
    "int8-weight-only": "torchao",
}
MODES = ("none", *BACKENDS)


class QuantizationError(ValueError):
    """A quantization the server cannot start with: the message says why and what to change."""


def check(mode: str, path: Path) -> None:
    """What settings can tell before loading: mode's backend is installed; a checkpoint saved quantized is not asked
    to be quantized again, and its own backend is installed."""
    saved = _saved(path)
    if saved and mode != "none":
        raise QuantizationError(
            f"{path} is saved quantized ({_name(saved)}) and loads as saved: leave MIXSERVE_QUANTIZATION at none"
            f" (it is {mode})"
        )
    if saved:
        _check_installed(_name(saved), f"{path}, saved quantized ({_name(saved)}),")
    else:
        _check_installed(mode, f"MIXSERVE_QUANTIZATION={mode}")


def _check_installed(mode: str, what: str) -> None:
    package = BACKENDS.get(mode)
    if package is not None and importlib.util.find_spec(package) is None:
        raise QuantizationError(f"{what} needs {package}, which is not installed (pip install 'mixserve[quant]')")


def quantization_of(model: torch.nn.Module) -> str:
    """The base's quantization, as /info and the logs name it: a mode, or the saved checkpoint's method; 'none'."""
    return _name(getattr(model.config, "quantization_config", None))


def _name(config) -> str:
    """A mode's name for transformers' quantization_config (a dict as saved in config.json, or its object)."""
    if config is None:
        return "none"
    config = config if isinstance(config, dict) else config.to_dict()
    method = config.get("quant_method", "unknown")
    method = str(getattr(method, "value", method))  # transformers' QuantizationMethod, or its value as saved
    if method == "bitsandbytes":
        return f"bnb-{config.get('bnb_4bit_quant_type', 'fp4')}" if config.get("load_in_4bit") else "bnb-int8"
    if method == "torchao" and "Int8WeightOnlyConfig" in json.dumps(config.get("quant_type"), default=str):
        return "int8-weight-only"
    return method


def saved_name(path: Path) -> str | None:
    """The quantization the checkpoint at path was saved with; None for a float checkpoint."""
    saved = _saved(path)
    return _name(saved) if saved else None


def _saved(path: Path) -> dict | None:
    config_file = path / "config.json"
    return json.loads(config_file.read_text()).get("quantization_config") if config_file.is_file() else None


def loading_options(mode: str, path: Path, device: torch.device, dtype: torch.dtype) -> dict:
    """The from_pretrained arguments that load the checkpoint at path quantized as mode asks (or as it was saved)."""
    check(mode, path)
    if _saved(path):
        return {"device_map": {"": device}}
    if mode == "none":
        return {}
    if mode.startswith("bnb-"):
        from transformers import BitsAndBytesConfig

        config = (
            BitsAndBytesConfig(load_in_8bit=True)
            if mode == "bnb-int8"
            else BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type=mode.removeprefix("bnb-"), bnb_4bit_compute_dtype=dtype
            )
        )
    else:
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        config = TorchAoConfig(Int8WeightOnlyConfig())
    return {"quantization_config": config, "device_map": {"": device}}


def prepare(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Checks that a quantized model has a quantized Linear layer (else the backend skipped them all), and makes
    its layers compute in dtype: bitsandbytes' fused 4-bit CPU kernel (used on CPUs with AVX512-BF16) rounds its
    input to bfloat16, so it is turned off unless dtype is bfloat16; the layer then dequantizes its weight and
    multiplies in dtype (the function of docs/contract.md's quantized reference).

    bitsandbytes int8 (LLM.int8) runs without its outlier decomposition (threshold 0, also on a checkpoint saved
    with another): with it, the input columns computed in float16 instead of int8 are those where any token of the
    batch exceeds the threshold, so a row's output would depend on what shares its batch. Without it, each token's
    activations are quantized to int8 on their own (a scale per token)."""
    name = quantization_of(model)
    if name == "none":
        return
    if not any(quantized(m) for m in model.modules()):
        raise QuantizationError(f"{name}: the backend quantized no Linear layer of this model")
    for module in model.modules():
        if dtype != torch.bfloat16 and hasattr(module, "support_avx512bf16_for_cpu"):  # bitsandbytes' Linear4bit
            module.support_avx512bf16_for_cpu = False
        if hasattr(getattr(module, "state", None), "threshold"):  # bitsandbytes' Linear8bitLt
            module.state.threshold = 0.0
    if name == "bnb-int8":  # said once here (README), not at every layer's call
        logging.getLogger("bitsandbytes.autograd._functions").addFilter(_not_the_float16_cast)


def _not_the_float16_cast(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def quantized(module: torch.nn.Module) -> bool:
    """Whether module is a Linear layer whose weight is stored quantized (not a plain floating-point tensor)."""
    weight = getattr(module, "weight", None)
    return (
        isinstance(module, torch.nn.Linear)
        and isinstance(weight, torch.Tensor)
        and (type(weight) not in (torch.Tensor, torch.nn.Parameter) or not weight.is_floating_point())
    )


def base_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers as stored (quantized weights at their packed size)."""
    return sum(_stored_bytes(t) for t in (*model.parameters(), *model.buffers()))


def _stored_bytes(tensor: torch.Tensor) -> int:
    if hasattr(tensor, "quant_state"):  # bitsandbytes 4-bit: packed data, a float32 scale per block
        absmax = getattr(tensor.quant_state, "absmax", None)
        scales = absmax.numel() * absmax.element_size() if absmax is not None else 0
        return tensor.data.numel() * tensor.data.element_size() + scales
    if type(tensor).__name__ == "Int8Params":  # bitsandbytes int8: int8 rows, a float32 scale per row
        return tensor.data.numel() * tensor.data.element_size() + tensor.data.shape[0] * 4
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter):  # torchao: the tensors it holds
        names, _ = tensor.__tensor_flatten__() if hasattr(tensor, "__tensor_flatten__") else ([], None)
        if names:
            return sum(_stored_bytes(getattr(tensor, n)) for n in names)
    return tensor.numel() * tensor.element_size()
