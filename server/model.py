"""The resident base model and its tokenizer, loaded from a local path."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, ByT5Tokenizer, PreTrainedModel

from server.quantization import QuantizationError, base_bytes, loading_options, prepare, quantization_of, saved_name

log = logging.getLogger(__name__)


def load_model(path: Path, device: torch.device, dtype: torch.dtype, quantization: str = "none") -> PreTrainedModel:
    """The model at path in dtype on device; its Linear layers quantized as `quantization` asks (server/quantization.py),
    or as the checkpoint was saved (server.quantization.quantization_of names which)."""
    options = loading_options(quantization, path, device, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True, **options)
    except Exception as exc:
        if not options:
            raise
        how = quantization if quantization != "none" else f"as saved: {saved_name(path)}"
        raise QuantizationError(f"{path} cannot be loaded quantized ({how}) on {device.type}: {exc}") from exc
    if not options:
        model.to(device)
    prepare(model, dtype)
    model.eval().requires_grad_(False)
    log.info(
        "loaded %s (%s, %.1fM parameters, %.1f MB, quantization %s) on %s as %s",
        path,
        model.config.model_type,
        sum(p.numel() for p in model.parameters()) / 1e6,
        base_bytes(model) / 1e6,
        quantization_of(model),
        device,
        dtype,
    )
    return model


def load_tokenizer(path: Path):
    """The tokenizer saved with the model, by its saved class.

    AutoTokenizer may prefer the model type's tokenizer over a saved ByT5Tokenizer (for Qwen2 it builds an empty
    BPE tokenizer that returns no ids), so the saved class is honoured and the result checked.
    """
    config_file = path / "tokenizer_config.json"
    saved_class = json.loads(config_file.read_text()).get("tokenizer_class") if config_file.is_file() else None
    if saved_class == "ByT5Tokenizer":
        tokenizer = ByT5Tokenizer.from_pretrained(path)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    probe = "mixserve tokenizer check"
    ids = tokenizer.encode(probe, add_special_tokens=False)
    if not ids or probe not in tokenizer.decode(ids):
        raise RuntimeError(
            f"the tokenizer at {path} ({type(tokenizer).__name__}, saved as {saved_class}) does not round-trip text"
        )
    return tokenizer


def tokenizer_ids(tokenizer, eos_ids=()) -> int:
    """One past the highest id the tokenizer has: checkpoints pad their vocabulary past it (Qwen2.5: 151,936 rows
    for 151,665 tokens), and such ids have no text, so they are never sampled. Ids may leave gaps (an EOS at 300
    after 258 tokens): a count of tokens is not the bound."""
    return 1 + max(len(tokenizer) - 1, *tokenizer.get_vocab().values(), *tokenizer.all_special_ids, *eos_ids)


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Prompt ids as the tokenizer frames them (BOS where it adds one), without a trailing EOS (ByT5 adds one)."""
    ids = tokenizer.encode(text, add_special_tokens=True)
    plain = tokenizer.encode(text, add_special_tokens=False)
    if ids and ids[-1] == tokenizer.eos_token_id and plain[-1:] != ids[-1:]:
        ids = ids[:-1]
    return ids
