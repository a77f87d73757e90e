"""Weighted mixes (README, "Weighted mixes"): an adapter at weight w, alone, mixed, and beside other weights in one
batch, equals PEFT's mixed model with that adapter's scaling times w (OFT: mixserve's definition, by its
properties); weight 0 is the adapter left out; the canonical form shows the weights on every route."""

from __future__ import annotations

import asyncio

import pytest
import torch

from server.adapters.combination import MAX_WEIGHT, Combination
from server.adapters.kinds.oft import OFTLayerAdapter, _cayley
from server.auth import EVERYTHING
from server.engine.sampling import SamplingParams
from server.engine.sequence import GenerationRequest
from server.errors import ValidationError
from server.model import encode_prompt
from server.state import ServerState
from tests.builders import ADAPTERS
from tests.conftest import ATOL, EXACT, needs_float32
from tests.reference import reference_greedy, reference_logits

PROMPT = "The quick brown fox jumps over the lazy dog."
SIX = list(ADAPTERS)
WEIGHTED = [
    ({"lora": 0.5}),
    ({"adalora": -0.7}),
    ({"loha": 2.0}),
    ({"lokr": 0.3}),
    ({"shira": 1.5}),
    ({"oft": 0.5}),
    ({"oft.by-rank": -1.0}),
    ({"oft.shared-coft": 0.6}),  # COFT: |w| <= 1 keeps PEFT's projection from acting again (tests/reference.py)
    ({"lora.rs-bias": 0.4}),
    ({"loha.dense": -0.25}),
    ({"lokr.decomposed": 1.7}),
    ({"lora.patterns": 3.0, "oft.by-rank": 0.8}),
    ({"shira": 0.5, "oft": -0.5, "lora": 2.0, "adalora": 0.3, "loha": 0.7, "lokr": 1.3}),
]


def _label(weights: dict) -> str:
    return "+".join(f"{n}@{w}" for n, w in weights.items())


@pytest.fixture(scope="module")
def scorer(llama):
    runner, registry, tokenizer = llama.runner()
    return runner, registry, encode_prompt(tokenizer, PROMPT)


def _score(scorer, weights: dict) -> torch.Tensor:
    runner, registry, ids = scorer
    adapters = registry.load_blocking(list(weights))
    slots = tuple(a.slot for a in adapters)
    return runner.score(torch.tensor([ids]), [slots], [tuple(weights[a.name] for a in adapters)])[0].cpu()


@pytest.mark.parametrize("weights", WEIGHTED, ids=[_label(w) for w in WEIGHTED])
def test_weighted_logits_equal_the_reference(scorer, llama, weights):
    ours = _score(scorer, weights)
    names, ids = list(weights), scorer[2]
    expected = reference_logits(llama.model_dir, llama.store, names, ids, weights=weights)
    full = reference_logits(llama.model_dir, llama.store, names, ids)
    assert (expected - full).abs().max() > 1e-2, "the weight should change the output"
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


@needs_float32("the rotation's identities hold to float32's rounding")
@pytest.mark.parametrize("name", ["oft", "oft.by-rank", "oft.shared-coft"])
def test_oft_weight_is_the_rotation_of_the_scaled_generator(scorer, name):
    """w = 1 is PEFT's rotation, w = 0 the identity, and R(-w) is R(w) transposed: its inverse, exactly so for the
    exact Cayley transform (w and -w compose to the identity), as far as PEFT's Neumann series is orthogonal for an
    adapter trained with that."""
    _, registry, _ = scorer
    (adapter,) = registry.load_blocking([name])
    exact = not adapter.built.config.use_cayley_neumann
    for layer in adapter.built.layers.values():
        assert layer.rotation(1.0) is layer.blocks
        n, size, _ = layer.blocks.shape
        eye = torch.eye(size).expand(n, size, size)
        assert torch.equal(layer.rotation(0.0).cpu(), eye)
        for w in (0.3, 1.0, 1.7):
            rotation, inverse = layer.rotation(w).cpu(), layer.rotation(-w).cpu()
            torch.testing.assert_close(inverse, rotation.transpose(1, 2), atol=1e-6, rtol=0)
            if exact:
                torch.testing.assert_close(torch.bmm(rotation, inverse), eye, atol=1e-6, rtol=0)


def test_oft_rotations_of_other_weights_are_kept_bounded(scorer):
    _, registry, _ = scorer
    (adapter,) = registry.load_blocking(["oft"])
    layer = next(iter(adapter.built.layers.values()))
    first = layer.rotation(0.25)
    assert layer.rotation(0.25) is first  # built once
    for i in range(layer.WEIGHTS_KEPT + 2):
        layer.rotation(0.01 * (i + 1))
    assert len(layer._weighted) == layer.WEIGHTS_KEPT
    torch.testing.assert_close(layer.rotation(0.25), first, atol=0, rtol=0)  # rebuilt alike


@pytest.fixture(scope="module")
def state(llama):
    state = ServerState.start(llama.settings(max_batch_size=16))
    yield state
    state.stop()


def _request(state, prompt: str, weights: dict, new_tokens: int, rid: str) -> GenerationRequest:
    ids = encode_prompt(state.tokenizer, prompt)
    return GenerationRequest(rid, ids, _parse_world(state, weights), SamplingParams(max_new_tokens=new_tokens))


def _parse_world(state, weights: dict) -> Combination:
    return Combination.parse({"adapters": list(weights.items())}, EVERYTHING, state.registry.peft_type, (6, "limit"))


def _generate_together(state, rows: list[tuple[str, dict]], new_tokens: int = 10) -> list:
    async def run():
        handles = [state.engine.submit(_request(state, p, w, new_tokens, f"w{i}")) for i, (p, w) in enumerate(rows)]
        return [await h.result() for h in handles]

    return asyncio.run(run())


def test_rows_with_the_same_adapters_at_different_weights_share_a_batch_and_equal_the_reference(state, llama):
    """Every type at several weights (and at 1, and none) in one running batch: prefill and decode, per row."""
    rows = [("Base row", {})]
    for name in SIX:
        rows += [(f"{name} full", {name: 1.0}), (f"{name} at half", {name: 0.5}), (f"{name} negative", {name: -0.8})]
    rows.append(
        ("all six, weighted", {"shira": 0.5, "oft": -0.5, "lora": 2.0, "adalora": 0.3, "loha": 0.7, "lokr": 1.3})
    )
    seqs = _generate_together(state, rows[:16])
    seqs += _generate_together(state, rows[16:])
    batched = [s for s in seqs if s.admitted_at < min(o.finished_at for o in seqs)]
    assert len(batched) >= 8, "the rows should have run together"
    for (prompt, weights), seq in zip(rows, seqs, strict=True):
        names, ids = list(weights), seq.request.prompt_ids
        if EXACT:  # in reduced precision a near-tie may go either way: the logprobs below still hold
            expected = reference_greedy(llama.model_dir, llama.store, names, ids, len(seq.tokens), weights=weights)
            assert seq.tokens == expected, prompt
        logits = reference_logits(llama.model_dir, llama.store, names, ids + seq.tokens[:-1], weights=weights).float()
        lp = logits[len(ids) - 1 :].log_softmax(-1).gather(1, torch.tensor(seq.tokens)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(seq.logprobs), lp, atol=ATOL, rtol=0)


def test_a_weighted_row_is_the_same_alone_and_beside_other_weights(state):
    target = ("The target", {"oft": 0.4, "lora": -1.2, "lokr": 0.6, "shira": 2.0})
    (alone,) = _generate_together(state, [target])
    crowd = [(f"crowd {i}", {"oft": 0.1 * i + 0.1, "lora": 1.0, "lokr": -0.5, "shira": 1.0}) for i in range(5)]
    together = _generate_together(state, [*crowd, target])
    assert together[-1].tokens == alone.tokens
    assert together[-1].logprobs == pytest.approx(alone.logprobs, abs=ATOL)


class _Names:
    def __init__(self, types: dict[str, str]):
        self.types = types

    def __call__(self, name: str) -> str:
        return self.types[name]


TYPES = _Names({"pirate": "OFT", "digits": "LORA", "excited": "LOKR"})


def _parse(pairs, **sources) -> Combination:
    return Combination.parse({"adapters": pairs, **sources}, EVERYTHING, TYPES, (4, "limit"))


def test_canonical_form_shows_weights_and_drops_weight_zero():
    combo = _parse([("digits", 1.0), ("pirate", 0.5), ("excited", -2)])
    assert str(combo) == "pirate@0.5+digits+excited@-2" and combo.parts == ["pirate@0.5", "digits", "excited@-2"]
    assert combo.names == ("pirate", "digits", "excited") and combo.weights == (0.5, 1.0, -2.0)
    assert str(_parse([("digits", 1.0), ("pirate", 0.0)])) == "digits"  # weight 0: the adapter left out
    assert str(_parse([("digits", 1e-5)])) == "digits@1e-05"
    assert _parse([("pirate", 0.5)]) != _parse([("pirate", 0.25)])


@pytest.mark.parametrize(
    ("pairs", "reason"),
    [
        ([("digits", float("nan"))], "digits: nan"),
        ([("digits", float("inf"))], "digits: inf"),
        ([("digits", MAX_WEIGHT + 0.5)], f"finite numbers from -{MAX_WEIGHT:g} to {MAX_WEIGHT:g}: digits: 10.5"),
        ([("digits", 0.5), ("digits", 1.0)], "listed more than once: digits"),
    ],
)
def test_weights_are_validated_in_one_place(pairs, reason):
    with pytest.raises(ValidationError, match=reason.replace("(", r"\(").replace("+", r"\+")):
        _parse(pairs)


def test_weights_given_differently_in_two_fields_are_refused():
    with pytest.raises(ValidationError, match="given differently"):
        _parse([("digits", 0.5)], model=[("digits", 1.0)])


def test_weight_zero_equals_leaving_the_adapter_out_exactly(state):
    zero, without = (
        _generate_together(state, [("Zero", weights)])[0] for weights in ({"oft": 0.0, "lora": 1}, {"lora": 1})
    )
    assert zero.request.adapters == without.request.adapters
    assert zero.tokens == without.tokens and zero.logprobs == without.logprobs


@pytest.fixture(scope="module")
def server(serve, llama):
    return serve(llama.settings(max_new_tokens=32))


def test_every_route_takes_weights_and_answers_with_the_canonical_form(server, llama):
    weights = {"oft": 0.5, "lora": -0.75}
    ids = encode_prompt(server.state.tokenizer, PROMPT)
    expected = reference_greedy(llama.model_dir, llama.store, list(weights), ids, 6, weights=weights)
    text = server.state.tokenizer.decode(expected, skip_special_tokens=True)
    entries = [{"name": "lora", "weight": -0.75}, {"name": "oft", "weight": 0.5}]
    native = [
        {"inputs": PROMPT, "adapters": entries},
        {"inputs": PROMPT, "parameters": {"adapters": entries}},
        {"inputs": PROMPT, "parameters": {"adapter_id": "lora@-0.75+oft@0.5"}},
    ]
    with server.client() as client:
        for body in native:
            body.setdefault("parameters", {}).update(max_new_tokens=6, details=True)
            for route in ("/generate", "/generate_stream"):
                response = client.post(route, json=body)
                assert response.status_code == 200, response.text
                assert response.headers["x-adapters"] == "oft@0.5+lora@-0.75"
            answer = client.post("/generate", json=body).json()
            assert answer["generated_text"] == text
            assert answer["details"]["adapters"] == ["oft@0.5", "lora@-0.75"]
        base = server.state.settings.model_id
        for openai in ({"model": "oft@0.5+lora@-0.75"}, {"model": base, "adapters": entries}):
            body = {**openai, "prompt": PROMPT, "max_tokens": 6, "temperature": 0}
            response = client.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            assert response.headers["x-adapters"] == "oft@0.5+lora@-0.75"
            assert response.json()["choices"][0]["text"] == text
        messages = [{"role": "user", "content": "hi"}]
        chat = client.post("/v1/chat/completions", json={"model": base, "adapters": entries, "messages": messages})
        assert chat.status_code == 200 and chat.headers["x-adapters"] == "oft@0.5+lora@-0.75", chat.text


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"adapters": [{"name": "lora", "weight": 11}]}, "adapter weights must be finite numbers from -10 to 10"),
        ({"parameters": {"adapter_id": "lora@half"}}, "'lora@half': the weight after '@' is not a number"),
        ({"adapters": [{"name": "lora", "weight": 0.5, "scale": 2}]}, "Extra inputs are not permitted"),
        ({"parameters": {"merged_adapters": {"ids": ["lora"], "weights": [0.5, 1]}}}, "1 ids and 2 weights"),
        (
            {"parameters": {"merged_adapters": {"ids": ["lora"], "merge_strategy": "ties"}}},
            "merge_strategy 'ties' needs a density in (0, 1]",
        ),
    ],
)
def test_bad_weights_get_a_clear_422(server, body, reason):
    with server.client() as client:
        response = client.post("/generate", json={"inputs": "x", **body})
    assert response.status_code == 422 and reason in response.json()["error"], response.text
    assert response.json()["error_type"] == "validation"


def test_non_finite_weights_are_refused_on_both_apis(server):
    with server.client() as client:
        native = client.post(
            "/generate",
            content=b'{"inputs": "x", "adapters": [{"name": "lora", "weight": NaN}]}',
            headers={"content-type": "application/json"},
        )
        openai = client.post("/v1/completions", json={"model": "lora@inf", "prompt": "x", "max_tokens": 1})
    assert native.status_code == 422 and "lora: nan" in native.json()["error"], native.text
    assert openai.status_code == 422 and "lora: inf" in openai.json()["error"]["message"], openai.text


def test_vllm_router_metric_keeps_adapter_names_only(server):
    with server.client() as client:
        body = {"inputs": "m", "adapters": [{"name": "lokr", "weight": 0.5}]}
        assert client.post("/generate", json=body).status_code == 200
        metrics = client.get("/metrics").text
    line = next(x for x in metrics.splitlines() if x.startswith("mixserve:lora_requests_info{"))
    assert "@" not in line


@pytest.mark.parametrize("terms", [2, 3, 4, 5, 6])
def test_rows_at_their_own_weights_rotate_as_each_weight_alone(terms):
    """OFT's Neumann series is a polynomial in w: one product for rows at different weights equals each row rotated
    by its own R(w) (PEFT's series of w Q), for every number of terms PEFT accepts."""
    torch.manual_seed(terms)
    size, in_features = 8, 32
    generator = torch.randn(in_features // size, size * (size - 1) // 2) * 0.1
    cayley = (size, in_features, True, terms)
    layer = OFTLayerAdapter(_cayley(generator, *cayley), generator, cayley)
    assert layer.rotates_per_row
    weights = (0.5, -1.3, 2.0, 0.25)
    x = torch.randn(len(weights), 3, in_features)
    together = layer.rotate(x, layer.rotation_per_row(weights))
    for row, w in enumerate(weights):
        torch.testing.assert_close(
            together[row], layer.rotate(x[row : row + 1], layer.rotation(w))[0], atol=1e-6, rtol=0
        )
