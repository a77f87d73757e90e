"""Tiny deterministic base models and adapters of every type, built in the tests from configs."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import AdaLoraConfig, LoHaConfig, LoKrConfig, LoraConfig, OFTConfig, ShiraConfig, get_peft_model
from transformers import AutoModelForCausalLM, ByT5Tokenizer, Qwen2Config

from server.demo import tiny

ARCHITECTURES = {
    "llama": lambda: tiny.config(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, positions=256),
    # Qwen2: biases on q/k/v, untied head
    "qwen2": lambda: tiny.config(
        hidden=64,
        intermediate=96,
        layers=2,
        heads=4,
        kv_heads=2,
        positions=256,
        architecture=Qwen2Config,
        tie_word_embeddings=False,
    ),
}

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]

# name -> (config, weight scale). Targets differ per adapter so that layers hold different subsets. The scales keep
# each adapter's effect on the logits near what trained adapters show (about 0.3 to 3), not far above the logits.
ADAPTERS = {
    "lora": (
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
        0.3,
    ),
    "loha": (LoHaConfig(r=2, alpha=4, target_modules="all-linear", init_weights=False), 1.0),
    "lokr": (LoKrConfig(r=4, alpha=8, target_modules=["q_proj", "o_proj", "up_proj"], init_weights=False), 0.3),
    "adalora": (
        AdaLoraConfig(
            init_r=6,
            target_r=4,
            lora_alpha=8,
            total_step=10,
            target_modules=["q_proj", "k_proj", "gate_proj"],
            init_lora_weights=False,
        ),
        0.16,
    ),
    "oft": (
        OFTConfig(
            r=0, oft_block_size=16, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], init_weights=False
        ),
        0.3,
    ),
    "shira": (
        ShiraConfig(r=2, target_modules=["q_proj", "up_proj", "down_proj"], init_weights=False, random_seed=3),
        0.05,
    ),
}

# Options each type has beyond its defaults, served by separate code paths.
VARIANTS = {
    "lora.rs-bias": (
        LoraConfig(r=4, lora_alpha=8, use_rslora=True, lora_bias=True, target_modules=ATTN, init_lora_weights=False),
        0.1,
    ),
    "lora.patterns": (
        LoraConfig(
            r=4,
            lora_alpha=8,
            rank_pattern={"v_proj": 2},
            alpha_pattern={"down_proj": 3},
            target_modules=["q_proj", "v_proj", "down_proj"],
            init_lora_weights=False,
        ),
        0.2,
    ),
    "loha.dense": (LoHaConfig(r=6, alpha=4, target_modules=ATTN, init_weights=False), 1.0),
    # factor 8: w1 is 8x8 and r=2 is below 8/2, so peft stores both Kronecker factors decomposed
    "lokr.decomposed": (
        LoKrConfig(r=2, alpha=4, decompose_both=True, decompose_factor=8, target_modules=MLP, init_weights=False),
        0.5,
    ),
    "oft.shared-coft": (
        OFTConfig(
            r=0, oft_block_size=8, block_share=True, coft=True, eps=5e-2, target_modules=ATTN, init_weights=False
        ),
        1.0,
    ),
    "oft.by-rank": (
        OFTConfig(r=4, oft_block_size=0, use_cayley_neumann=False, target_modules=MLP, init_weights=False),
        1.0,
    ),
}

ADALORA_PRUNED = "adalora.pruned"


def build_base(directory: Path, architecture: str, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    tokenizer = ByT5Tokenizer()
    model = AutoModelForCausalLM.from_config(ARCHITECTURES[architecture]())
    # random init of this size gives near-uniform logits: widen them so that greedy choices are clear
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build_store(model_dir: Path, store: Path) -> Path:
    store.mkdir(parents=True, exist_ok=True)
    for seed, (name, (config, scale)) in enumerate({**ADAPTERS, **VARIANTS}.items(), start=1):
        tiny.save_adapter(model_dir, config, store / name, seed=seed, base_name=str(model_dir.name), scale=scale)
    _save_pruned_adalora(model_dir, store / ADALORA_PRUNED)
    return store


def _save_pruned_adalora(model_dir: Path, out: Path) -> None:
    """An AdaLoRA adapter after rank allocation: peft saves pruned tensors and a rank_pattern."""
    torch.manual_seed(99)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    config = AdaLoraConfig(
        init_r=6, target_r=3, lora_alpha=8, total_step=10, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.mul_(0.15)
    model.peft_config["default"].rank_pattern = {
        "model.layers.0.self_attn.q_proj.lora_E": [True, False, True, False, False, True],
        "model.layers.1.self_attn.v_proj.lora_E": [False] * 6,
    }
    model.save_pretrained(out)
