"""Tiny random-weight models of the popular families, each built from its transformers config class.

Every model has two layers, an untied head (so that adapters visibly move the logits) and the ByT5 tokenizer;
windowed families get a window shorter than the prompts of the tests, so that a window that is not honoured
changes the answer.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import AdaLoraConfig, LoHaConfig, LoraConfig, OFTConfig
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    ByT5Tokenizer,
    FalconConfig,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    MistralConfig,
    MixtralConfig,
    OPTConfig,
    Phi3Config,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
    Starcoder2Config,
)

from server.demo.tiny import save_adapter

WINDOW = 6
_COMMON = {"vocab_size": 384, "eos_token_id": 1, "pad_token_id": 0, "bos_token_id": None, "tie_word_embeddings": False}
DECODER = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    **_COMMON,
}
_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}

FAMILIES = {
    "mistral": lambda: MistralConfig(sliding_window=WINDOW, **DECODER),
    "phi3": lambda: Phi3Config(sliding_window=WINDOW, **DECODER),
    "starcoder2": lambda: Starcoder2Config(sliding_window=WINDOW, **DECODER),
    "gemma2": lambda: Gemma2Config(sliding_window=WINDOW, head_dim=16, **DECODER),
    "gemma3": lambda: Gemma3TextConfig(
        sliding_window=WINDOW, head_dim=16, layer_types=["sliding_attention", "full_attention"], **DECODER
    ),
    "qwen2-window": lambda: Qwen2Config(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1, **DECODER),
    "falcon": lambda: FalconConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, multi_query=True, **_COMMON
    ),
    "falcon-new": lambda: FalconConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_kv_heads=2,
        new_decoder_architecture=True,
        **_COMMON,
    ),
    "falcon-alibi": lambda: FalconConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, alibi=True, multi_query=False, **_COMMON
    ),
    "bloom": lambda: BloomConfig(hidden_size=64, n_layer=2, n_head=4, **_COMMON),
    "opt": lambda: OPTConfig(
        hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64, **_COMMON
    ),
    "qwen2_moe": lambda: Qwen2MoeConfig(shared_expert_intermediate_size=64, **_MOE, **DECODER),
    "qwen3_moe": lambda: Qwen3MoeConfig(**_MOE, **DECODER),
    "mixtral": lambda: MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **DECODER),
    "gpt2": lambda: GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **_COMMON),
}

ADAPTERS = {
    "lora": (LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False), 0.3),
    "loha": (LoHaConfig(r=2, alpha=4, target_modules="all-linear", init_weights=False), 1.0),
    "oft": (OFTConfig(r=0, oft_block_size=8, target_modules="all-linear", init_weights=False), 0.3),
    # on GPT-2's Conv1D layers, beside LoRA the other type PEFT builds there
    "adalora": (
        AdaLoraConfig(
            init_r=6, target_r=4, lora_alpha=8, total_step=10, target_modules="all-linear", init_lora_weights=False
        ),
        0.15,
    ),
}
ONLY_FOR = {"adalora": {"gpt2"}}

PEFT_CANNOT_BUILD = {"gpt2": {"loha", "oft"}}  # on GPT-2's Conv1D layers


def build_family(
    root: Path, family: str, seed: int = 0, adapters: bool = True, config=None
) -> tuple[Path, Path, list[str]]:
    """The model's folder, its store and the names of the adapters PEFT could build for it; config: the family's
    model with these settings instead of FAMILIES's."""
    torch.manual_seed(seed)
    model_dir, store = root / family, root / f"{family}-adapters"
    tokenizer = ByT5Tokenizer()
    model = AutoModelForCausalLM.from_config(config or FAMILIES[family]())
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20)  # random init gives near-uniform logits: widen them
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    built = [
        name
        for name in ADAPTERS
        if adapters and name not in PEFT_CANNOT_BUILD.get(family, ()) and family in ONLY_FOR.get(name, {family})
    ]
    for i, name in enumerate(built, start=1):
        config, scale = ADAPTERS[name]
        save_adapter(model_dir, copy.deepcopy(config), store / name, seed=i, base_name=family, scale=scale)
    return model_dir, store, built
