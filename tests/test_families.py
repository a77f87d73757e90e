"""Every popular model family served exactly: each combination in one mixed batch (one of them weighted) equals a
fresh PeftMixedModel."""

from __future__ import annotations

import asyncio
import copy
import json
from types import SimpleNamespace

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, GPTNeoConfig, MistralConfig

from server.adapters.combination import Combination
from server.adapters.mixing import MixingContext
from server.adapters.store import AdapterStore
from server.config import Settings
from server.engine.attention import MaskLayout, UnsupportedModel
from server.engine.runner import ModelRunner
from server.engine.sampling import SamplingParams
from server.engine.sequence import GenerationRequest
from server.errors import AdapterInvalid
from server.model import encode_prompt
from server.state import ServerState
from tests.conftest import ATOL, DEVICE, DTYPE, EXACT, dtype_name, private_model
from tests.families import ADAPTERS, DECODER, FAMILIES, PEFT_CANNOT_BUILD, WINDOW, build_family
from tests.reference import reference_logits

NEW_TOKENS = 8
PROMPTS = ["The quick brown fox jumps over the lazy dog.", "Short one.", "A prompt of a middle length", "Hi there!"]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    model_dir, store, built = build_family(tmp_path_factory.mktemp(request.param), request.param)
    settings = Settings(
        model=str(model_dir), adapters_dir=store, device=DEVICE, dtype=dtype_name(DTYPE), max_batch_size=8
    )
    state = ServerState.start(settings)
    yield model_dir, store, built, state
    state.stop()


def test_every_combination_in_one_mixed_batch_equals_the_reference(family):
    model_dir, store, built, state = family
    combinations = [[]] + [[name] for name in built] + ([built[::-1]] if len(built) > 1 else [])
    weighted = dict(zip(built, (0.5, -0.7, 1.6), strict=False))  # README, "Weighted mixes"
    requests = [
        GenerationRequest(
            f"r{i}",
            encode_prompt(state.tokenizer, PROMPTS[i % len(PROMPTS)]),
            Combination(tuple(names), tuple(weights.get(n, 1.0) for n in names)),
            SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True),
        )
        for i, (names, weights) in enumerate([(c, {}) for c in combinations] + [(list(weighted), weighted)])
    ]

    async def run_all():
        return await asyncio.gather(*(state.engine.generate(r) for r in requests))

    runner, decodes = state.engine.runner, []
    runner.decode = lambda decode=runner.decode: decodes.append(1) or decode()
    try:
        seqs = asyncio.run(run_all())
    finally:
        del runner.decode
    assert len(decodes) < NEW_TOKENS * len(requests), "the rows should have shared passes"
    for seq in seqs:
        prompt, names = seq.request.prompt_ids, list(seq.request.adapters.names)
        weights = dict(zip(names, seq.request.adapters.weights, strict=True))
        assert len(prompt) + len(seq.tokens) > WINDOW
        logits = reference_logits(model_dir, store, names, prompt + seq.tokens[:-1], weights=weights)
        logits = logits[len(prompt) - 1 :].float()
        if names:
            base = reference_logits(model_dir, store, [], prompt + seq.tokens[:-1])[len(prompt) - 1 :]
            assert (logits - base).abs().max() > 1e-2, f"{names} should move the logits"
        assert seq.tokens == logits.argmax(-1).tolist() or not EXACT, names  # reduced precision: near-ties
        expected = logits.log_softmax(-1).gather(1, torch.tensor(seq.tokens)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(seq.logprobs), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("window", [WINDOW, 4096])
def test_a_model_the_engine_would_serve_differently_is_refused_at_start(window, monkeypatch):
    """Whatever the window's size: the self-check shrinks it (in the config both read) below its prompts."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(MistralConfig(**{**DECODER, "sliding_window": window})).eval()
    ModelRunner(model, MixingContext())  # the window honoured: accepted
    assert model.config.sliding_window == window
    monkeypatch.setattr(MaskLayout, "of", classmethod(lambda cls, config: cls({None: None})))  # windows dropped
    with pytest.raises(UnsupportedModel, match="disagree with the model's own forward"):
        ModelRunner(model, MixingContext())
    assert model.config.sliding_window == window


def test_gpt_neo_local_attention_is_refused():
    with pytest.raises(UnsupportedModel, match="local attention layers"):
        ModelRunner(
            AutoModelForCausalLM.from_config(
                GPTNeoConfig(num_layers=2, hidden_size=64, num_heads=4, attention_types=[[["global", "local"], 1]])
            ),
            MixingContext(),
        )


@pytest.mark.parametrize(
    "config, reason",
    [
        ({"layer_types": ["full_attention", "chunked_attention"]}, r"layer types \['chunked_attention'\]"),
        ({"layer_types": ["sliding_attention"], "sliding_window": None}, "without a sliding_window"),
        ({"model_type": "bloom", "sliding_window": 8}, "ALiBi with sliding windows"),
        ({"attention_chunk_size": 8192}, "attention_chunk_size"),
    ],
)
def test_attention_layouts_the_runner_cannot_build_are_refused(config, reason):
    with pytest.raises(UnsupportedModel, match=reason):
        MaskLayout.of(SimpleNamespace(**{"model_type": "test", **config}))


def test_types_peft_cannot_build_on_conv1d_are_refused_with_the_reason(tmp_path):
    model_dir, store, _ = build_family(tmp_path, "gpt2")
    for name in PEFT_CANNOT_BUILD["gpt2"]:
        with pytest.raises(TypeError, match="not supported"):
            get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), copy.deepcopy(ADAPTERS[name][0]))
    loha = store / "loha"
    loha.mkdir()
    config = {"peft_type": "LOHA", "r": 2, "alpha": 4, "target_modules": ["c_attn"]}
    (loha / "adapter_config.json").write_text(json.dumps(config))
    tensors = {}
    for layer in (0, 1):
        prefix = f"base_model.model.transformer.h.{layer}.attn.c_attn."
        for part, shape in (("w1_a", (192, 2)), ("w1_b", (2, 64)), ("w2_a", (192, 2)), ("w2_b", (2, 64))):
            tensors[prefix + "hada_" + part] = torch.randn(shape)
    save_file(tensors, loha / "adapter_model.safetensors")
    _, registry = private_model(model_dir, AdapterStore(store))
    with pytest.raises(AdapterInvalid, match="LOHA cannot target Conv1D layers such as transformer.h.0.attn.c_attn"):
        registry.load_blocking(["loha"])
    assert registry.load_blocking(["lora"])[0].name == "lora"
