"""Tiny byte-level models and adapters built from configs: the demo's (build.py), the tests' and the benchmarks'."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from peft import PeftConfig, get_peft_model
from transformers import AutoModelForCausalLM, ByT5Tokenizer, LlamaConfig, PretrainedConfig


def config(
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    kv_heads: int,
    positions: int = 1024,
    architecture: type[PretrainedConfig] = LlamaConfig,
    **extra,
) -> PretrainedConfig:
    """A Llama-style decoder config of these sizes over the ByT5 tokenizer's bytes (pad and eos its own, no bos);
    extra: other fields of the architecture's config."""
    tokenizer = ByT5Tokenizer()
    return architecture(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=positions,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **extra,
    )


def save_peft(model, out: Path, base_name: str) -> None:
    """save_pretrained, made reproducible: no README, the base named, keys sorted, target modules in order."""
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)
    config_path = out / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    saved["base_model_name_or_path"] = base_name
    if isinstance(saved.get("target_modules"), list):
        saved["target_modules"] = sorted(saved["target_modules"])  # peft saves a set: order varies per run
    config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


def save_adapter(model_dir: Path, config: PeftConfig, out: Path, seed: int, base_name: str, scale: float = 1.0):
    """An untrained adapter with random (non-identity) weights, for tests and benchmarks: wraps the base at
    model_dir with config, draws its weights from seed (scaled), saves it to out."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    peft_model = get_peft_model(base, config)
    if scale != 1.0:
        with torch.no_grad():
            for param in peft_model.parameters():
                if param.requires_grad:
                    param.mul_(scale)
    save_peft(peft_model, out, base_name)
