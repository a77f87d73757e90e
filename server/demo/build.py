"""Builds the embedded demo: a small byte-level Llama trained on synthetic English, and one adapter of each mixable
type trained to write that English in a style of its own (see corpus.STYLES).

`python -m server.demo build` (or `make demo`) rewrites server/demo/model/ and adapters_store/<style>/ in a few
minutes on 2 CPU cores. Seeds and thread count are fixed and `python -m server.demo` pins the CPU kernels to their
AVX2 versions, so a rebuild with the pinned torch on any x86-64 CPU with AVX2 reproduces the committed files bit for
bit (another architecture or BLAS may round differently).
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import torch
from peft import AdaLoraConfig, LoHaConfig, LoKrConfig, LoraConfig, OFTConfig, PeftConfig, ShiraConfig, get_peft_model
from transformers import AutoModelForCausalLM, ByT5Tokenizer, GenerationConfig, LlamaForCausalLM

from server.config import DEMO_MODEL_DIR
from server.demo import tiny
from server.demo.corpus import STYLES, Style, plain_text, styled_paragraph

DEMO_BASE_NAME = "mixserve-demo"
THREADS = 2
SEQUENCE = 128
BATCH = 16


def adapter_configs(targets: list[str] | str = "all-linear") -> dict[str, PeftConfig]:
    """The demo's adapter type for each style (corpus.STYLES), at its default initialisation (an identity)."""
    return {
        "LORA": LoraConfig(r=8, lora_alpha=16, target_modules=targets),
        "LOHA": LoHaConfig(r=8, alpha=16, target_modules=targets),
        "LOKR": LoKrConfig(r=4, alpha=8, target_modules=targets),
        "ADALORA": AdaLoraConfig(init_r=8, target_r=8, lora_alpha=16, total_step=10**6, target_modules=targets),
        "OFT": OFTConfig(r=0, oft_block_size=16, target_modules=targets),
        "SHIRA": ShiraConfig(r=8, target_modules=targets, random_seed=0),
    }


SURPRISE = 4.0
STEPS = {"uppercase": 400}  # rewriting every letter takes longer to learn fluently than the other styles
LEARNING_RATES = {"LORA": 3e-3, "LOHA": 3e-3, "LOKR": 3e-3, "ADALORA": 3e-3, "OFT": 3e-3, "SHIRA": 3e-3}


def encode(tokenizer: ByT5Tokenizer, paragraphs: list[str]) -> torch.Tensor:
    """One token stream: each paragraph's bytes, then end-of-sequence."""
    ids: list[int] = []
    for text in paragraphs:
        ids += tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    return torch.tensor(ids)


def batches(stream: torch.Tensor, steps: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - SEQUENCE - 1, (BATCH,), generator=generator)
        yield torch.stack([stream[s : s + SEQUENCE] for s in starts.tolist()])


def train(model: torch.nn.Module, stream: torch.Tensor, steps: int, lr: float, seed: int, surprise: float = 0) -> float:
    """Next-token training. With surprise > 0 (adapters), the tokens the base model would not have predicted —
    where the style shows — weigh 1 + surprise times as much: a style that changes one token in thirty is
    learned in a few hundred steps."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    loss = torch.tensor(0.0)
    for batch in batches(stream, steps, seed):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = model(input_ids=inputs).logits
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        weights = torch.ones_like(losses)
        if surprise:
            with torch.no_grad(), model.disable_adapter():
                weights += surprise * (model(input_ids=inputs).logits.argmax(-1) != targets)
        loss = (losses * weights).sum() / weights.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    model.eval()
    return float(loss.detach())


def build_base(out: Path, steps: int = 600, seed: int = 0) -> float:
    torch.manual_seed(seed)
    tokenizer = ByT5Tokenizer()
    config = tiny.config(hidden=128, intermediate=320, layers=3, heads=4, kv_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    rng = random.Random(seed)
    loss = train(model, encode(tokenizer, [plain_text(rng) for _ in range(6000)]), steps, 3e-3, seed)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return loss


def build_adapter(model_dir: Path, style: Style, out: Path, steps: int = 200, seed: int = 1) -> float:
    torch.manual_seed(seed)
    tokenizer = ByT5Tokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    model = get_peft_model(base, adapter_configs()[style.peft_type])
    rng = random.Random(seed)
    stream = encode(tokenizer, [styled_paragraph(rng, style) for _ in range(3000)])
    loss = train(model, stream, steps, LEARNING_RATES[style.peft_type], seed, surprise=SURPRISE)
    tiny.save_peft(model, out, DEMO_BASE_NAME)
    return loss


def build(model_dir: Path = DEMO_MODEL_DIR, adapters_dir: Path = Path("adapters_store")) -> None:
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    started = time.monotonic()
    loss = build_base(model_dir)
    print(f"base model: loss {loss:.3f} ({time.monotonic() - started:.0f} s)", flush=True)
    for seed, style in enumerate(STYLES, start=1):
        began = time.monotonic()
        loss = build_adapter(model_dir, style, adapters_dir / style.name, steps=STEPS.get(style.name, 200), seed=seed)
        print(f"{style.name} ({style.peft_type}): loss {loss:.3f} ({time.monotonic() - began:.0f} s)", flush=True)
    print(f"built in {time.monotonic() - started:.0f} s")
