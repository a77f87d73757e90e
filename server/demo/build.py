"""Builds the embedded demo: a tiny byte-level Llama and one adapter of each mixable type.

`python -m server.demo build` rewrites server/demo/model/ and the *-demo adapters in adapters_store/.
Weights are random (fixed seeds): enough to exercise every code path; they do not show readable behaviour.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from peft import (
    AdaLoraConfig,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    OFTConfig,
    PeftConfig,
    ShiraConfig,
    get_peft_model,
)
from transformers import AutoModelForCausalLM, ByT5Tokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

from server.config import DEMO_MODEL_DIR

DEMO_BASE_NAME = "mixserve-demo"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def demo_configs(targets: list[str] = ALL_LINEAR) -> dict[str, PeftConfig]:
    """One config per mixable type, initialised to random (non-identity) weights."""
    return {
        "lora": LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False),
        "loha": LoHaConfig(r=4, alpha=8, target_modules=targets, init_weights=False),
        "lokr": LoKrConfig(r=4, alpha=8, target_modules=targets, init_weights=False),
        "adalora": AdaLoraConfig(
            init_r=8, target_r=4, lora_alpha=8, total_step=100, target_modules=targets, init_lora_weights=False
        ),
        "oft": OFTConfig(r=0, oft_block_size=16, target_modules=targets, init_weights=False),
        "shira": ShiraConfig(r=4, target_modules=targets, init_weights=False, random_seed=0),
    }


def save_adapter(model_dir: Path, config: PeftConfig, out: Path, seed: int, base_name: str, scale: float = 1.0) -> None:
    """Wraps the base at model_dir with config, draws its weights from seed, saves the adapter to out."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    peft_model = get_peft_model(base, config)
    if scale != 1.0:
        with torch.no_grad():
            for param in peft_model.parameters():
                if param.requires_grad:
                    param.mul_(scale)
    if out.exists():
        shutil.rmtree(out)
    peft_model.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)
    config_path = out / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    saved["base_model_name_or_path"] = base_name
    if isinstance(saved.get("target_modules"), list):
        saved["target_modules"] = sorted(saved["target_modules"])  # peft saves a set: order varies per run
    config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


def build_base(out: Path, seed: int = 0) -> None:
    torch.manual_seed(seed)
    tokenizer = ByT5Tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def build(model_dir: Path = DEMO_MODEL_DIR, adapters_dir: Path = Path("adapters_store")) -> None:
    build_base(model_dir)
    for seed, (kind, config) in enumerate(demo_configs().items(), start=1):
        save_adapter(model_dir, config, adapters_dir / f"{kind}-demo", seed=seed, base_name=DEMO_BASE_NAME)
        print(f"built {adapters_dir / f'{kind}-demo'}")
