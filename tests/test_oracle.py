"""The first test oracle (docs/contract.md): every combination equals a fresh PeftMixedModel in canonical order."""

from __future__ import annotations

import asyncio
from itertools import combinations

import pytest
import torch
from peft.tuners.mixed import COMPATIBLE_TUNER_TYPES
from safetensors.torch import load_file

from server.adapters.combination import Combination
from server.adapters.kinds import CANONICAL_ORDER
from server.adapters.store import AdapterStore
from server.config import DEMO_MODEL_DIR
from server.engine.runner import ModelRunner
from server.engine.sampling import SamplingParams
from server.engine.sequence import GenerationRequest
from server.model import encode_prompt, load_tokenizer
from server.state import ServerState
from tests.builders import ADALORA_PRUNED, ADAPTERS, VARIANTS
from tests.conftest import ATOL, REPO, needs_float32, private_model
from tests.reference import CANONICAL, canonical, reference_greedy, reference_logits

TYPES = list(ADAPTERS)  # one adapter per type, named after it
COMBINATIONS = (
    [[t] for t in TYPES]
    + [list(pair) for pair in combinations(TYPES, 2)]
    + [TYPES, list(reversed(TYPES))]
    + [[v] for v in VARIANTS]
    + [[ADALORA_PRUNED], [ADALORA_PRUNED, "oft.shared-coft", "lora.rs-bias", "loha.dense", "lokr.decomposed"]]
    + [["lora", "lora.rs-bias", "lora.patterns", "oft", "oft.by-rank"]]  # several of one type
)
PROMPT = "The quick brown fox jumps over the lazy dog."


def test_every_mixable_type_is_served_in_the_designed_order():
    assert set(CANONICAL_ORDER) == {t.value for t in COMPATIBLE_TUNER_TYPES}
    assert list(CANONICAL_ORDER) == CANONICAL


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def oracle_world(request, world_factory):
    world = world_factory(request.param)
    runner, registry, tokenizer = world.runner()
    return world, runner, registry, encode_prompt(tokenizer, PROMPT)


@pytest.mark.parametrize("names", COMBINATIONS, ids=["+".join(c) for c in COMBINATIONS])
def test_logits_equal_reference(oracle_world, names):
    world, runner, registry, ids = oracle_world
    adapters = registry.load_blocking(names)
    assert [a.name for a in adapters] == canonical(world.store, names)
    ours = runner.score(torch.tensor([ids]), [tuple(a.slot for a in adapters)])[0].cpu()
    expected = reference_logits(world.model_dir, world.store, names, ids)
    base = reference_logits(world.model_dir, world.store, [], ids)
    assert (expected - base).abs().max() > 1e-2, "the combination should change the output"
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def engine_world(world_factory):
    world = world_factory("llama")
    state = ServerState.start(world.settings())
    yield world, state
    state.stop()


@needs_float32("greedy tokens equal the reference's; test_precision holds reduced precision, with near-ties")
@pytest.mark.parametrize("names", [[]] + COMBINATIONS[:22], ids=["base"] + ["+".join(c) for c in COMBINATIONS[:22]])
def test_greedy_tokens_equal_reference(engine_world, names):
    world, state = engine_world
    ids = encode_prompt(state.tokenizer, PROMPT)
    request = GenerationRequest("oracle", ids, Combination(tuple(names)), SamplingParams(max_new_tokens=12))
    seq = asyncio.run(state.engine.generate(request))
    expected = reference_greedy(world.model_dir, world.store, names, ids, 12)
    assert seq.tokens == expected[: len(seq.tokens)]
    assert len(seq.tokens) == 12 or seq.finish_reason == "eos_token"


def test_decomposed_lokr_really_decomposes_both_factors(llama):
    keys = load_file(llama.store / "lokr.decomposed" / "adapter_model.safetensors")
    assert any(k.endswith("lokr_w1_a") for k in keys) and not any(k.endswith("lokr_w1") for k in keys)


DEMO = sorted(p.name for p in (REPO / "adapters_store").iterdir() if (p / "adapter_config.json").is_file())


@pytest.fixture(scope="module")
def demo_world():
    model, registry = private_model(DEMO_MODEL_DIR, AdapterStore(REPO / "adapters_store"))
    return ModelRunner(model, registry.context), registry, load_tokenizer(DEMO_MODEL_DIR)


@pytest.mark.parametrize("names", [[n] for n in DEMO] + [DEMO], ids=lambda names: "+".join(names))
def test_trained_demo_adapters_equal_the_reference(demo_world, names):
    runner, registry, tokenizer = demo_world
    ids = encode_prompt(tokenizer, "Tell me about the weather in the harbour today.")
    adapters = registry.load_blocking(names)
    ours = runner.score(torch.tensor([ids]), [tuple(a.slot for a in adapters)])[0].cpu()
    expected = reference_logits(DEMO_MODEL_DIR, REPO / "adapters_store", names, ids)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)
