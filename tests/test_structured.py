"""Constrained output (JSON schema, regex, choice) on every route, per row, in batches with free rows and any adapters.

The test models are random: left free, their answers rarely end by themselves. The grammars here bound the answer's
length (enums, bounded numbers and strings, small arrays), so that every answer ends by the grammar's end, well
within max_tokens, and its validity is checked each time; one test cuts answers short on purpose.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import threading

import httpx
import jsonschema
import openai
import pytest
import torch
from huggingface_hub import InferenceClient
from lorax import Client as LoraxClient

from server.config import Settings
from server.engine.constraints import Grammars, GrammarSpec, mask_constrained
from server.model import load_tokenizer
from tests.conftest import DEVICE, DTYPE, REPO, dtype_name

# Bounded: every path through it ends within ~120 bytes.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 4},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "colour": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
        "address": {
            "type": "object",
            "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}, "main": {"type": "boolean"}},
            "required": ["zip", "main"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "colour", "tags", "address"],
    "additionalProperties": False,
}
ANSWER = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["answer", "n"],
    "additionalProperties": False,
}
COMBINATIONS = [[], ["lora"], ["oft", "lokr"], ["shira", "loha", "adalora"]]
MAX_TOKENS = 160  # more than any answer of PERSON takes, in bytes


@pytest.fixture(scope="module")
def server(serve, llama):
    return serve(llama.settings(max_new_tokens=256))


@pytest.fixture()
def oai(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _valid(text: str, schema: dict) -> dict:
    value = json.loads(text)
    jsonschema.validate(value, schema)
    return value


# --- the grammar side, without a server


def _bpe_tokenizer():
    """A small byte-level BPE tokenizer (a fast one, as most models have), trained here on a little text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    text = [json.dumps({"answer": "yes", "n": i, "name": "Alice and Bob"}) for i in range(50)] + ["no nope yes 1234ab"]
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<pad>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(text * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", pad_token="<pad>")


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_eos_is_allowed_exactly_where_the_grammar_accepts(llama, kind):
    """Random walks through the allowed tokens: at every step the end-of-sequence token is allowed exactly when
    the text so far is a complete answer (it parses and validates, or matches the regex); with the byte tokenizer
    of the test models and a fast (BPE) one."""
    tokenizer = load_tokenizer(llama.model_dir) if kind == "byte" else _bpe_tokenizer()
    eos = tokenizer.eos_token_id
    grammars = Grammars(tokenizer, len(tokenizer), frozenset({eos}))
    cases = [
        (GrammarSpec.json_schema({"type": "integer"}), lambda t: _parses(t, {"type": "integer"})),
        (GrammarSpec.json_schema(ANSWER), lambda t: _parses(t, ANSWER)),
        (GrammarSpec("regex", r"[0-9]{2,4}(ab)?"), lambda t: re.fullmatch(r"[0-9]{2,4}(ab)?", t)),
        (GrammarSpec.choice(["no", "nope", "yes"]), lambda t: t in ("no", "nope", "yes")),
    ]
    for spec, complete in cases:
        grammar = grammars.compile(spec)
        for seed in range(20):
            rng, row = random.Random(seed), _Row(grammar.constraint())
            tokens: list[int] = []
            for _ in range(40):
                logits = mask_constrained([row], torch.zeros(1, len(tokenizer)))[0][0]
                allowed = torch.isfinite(logits).nonzero().flatten().tolist()
                text = tokenizer.decode(tokens)
                assert (eos in allowed) == bool(complete(text)), (spec, text)
                choices = [t for t in allowed if t != eos]
                if not choices or rng.random() < 0.2 and eos in allowed:
                    break
                tokens.append(rng.choice(choices))
                row.constraint.advance(tokens[-1])


class _Row:
    def __init__(self, constraint):
        self.constraint = constraint


def _parses(text: str, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def test_a_forbidden_token_fails_its_row_only(llama):
    tokenizer = load_tokenizer(llama.model_dir)
    grammars = Grammars(tokenizer, len(tokenizer), frozenset({tokenizer.eos_token_id}))
    constraint = grammars.compile(GrammarSpec.choice(["yes"])).constraint()
    with pytest.raises(RuntimeError, match="not allowed"):
        constraint.advance(tokenizer.encode("n", add_special_tokens=False)[0])


def test_a_cache_lookup_never_waits_for_the_vocabulary_being_read(llama, monkeypatch):
    """`cached` runs on the event loop: it must not wait behind the first compile's reading of the vocabulary."""
    from server.engine import constraints

    tokenizer = load_tokenizer(llama.model_dir)
    grammars = Grammars(tokenizer, len(tokenizer), frozenset({tokenizer.eos_token_id}))
    reading, release, looked_up = threading.Event(), threading.Event(), threading.Event()
    convert = constraints._lltokenizer

    def slow_conversion(*args):
        reading.set()
        release.wait(60)
        return convert(*args)

    monkeypatch.setattr(constraints, "_lltokenizer", slow_conversion)
    compiling = threading.Thread(target=grammars.compile, args=(GrammarSpec.choice(["yes"]),))
    compiling.start()
    try:
        assert reading.wait(60)
        lookup = threading.Thread(target=lambda: grammars.cached(GrammarSpec.choice(["no"])) or looked_up.set())
        lookup.start()
        assert looked_up.wait(60), "the lookup waited for the vocabulary"
    finally:
        release.set()
        compiling.join(60)
    assert grammars.cached(GrammarSpec.choice(["yes"])) is not None


# --- through the server


def test_json_schema_answers_validate_with_every_combination_greedy_and_sampled(oai):
    for adapters in COMBINATIONS:
        for temperature, seed in ((0, None), (1.0, 7)):
            chat = oai.chat.completions.create(
                model="+".join(adapters) or oai_model(oai),
                messages=[{"role": "user", "content": "Describe someone"}],
                max_tokens=MAX_TOKENS,
                temperature=temperature,
                seed=seed,
                response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
            )
            choice = chat.choices[0]
            assert choice.finish_reason == "stop", (adapters, choice)
            value = _valid(choice.message.content, PERSON)
            assert list(value) == list(PERSON["properties"])  # in the schema's order


def oai_model(oai) -> str:
    return oai.models.list().data[0].id


def test_streamed_equals_plain_and_validates(oai):
    kwargs = dict(
        model="oft+lora",
        messages=[{"role": "user", "content": "Answer"}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER, "strict": True}},
    )
    plain = oai.chat.completions.create(**kwargs)
    chunks = list(oai.chat.completions.create(**kwargs, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop"
    _valid(text, ANSWER)


def test_json_object_and_vllm_guided_fields(oai):
    guided = {"guided_json": ANSWER, "guided_choice": ["left", "right"], "guided_regex": r"[A-Z][a-z]{1,3}-[0-9]{2}"}
    for field, value in guided.items():
        completion = oai.completions.create(
            model="loha", prompt="Say", max_tokens=MAX_TOKENS, temperature=0.8, seed=3, extra_body={field: value}
        )
        text = completion.choices[0].text
        assert completion.choices[0].finish_reason == "stop", (field, text)
        if field == "guided_json":
            _valid(text, ANSWER)
        elif field == "guided_choice":
            assert text in value
        else:
            assert re.fullmatch(value, text), text
    structured = oai.completions.create(
        model="loha",
        prompt="Say",
        max_tokens=8,
        temperature=0,
        extra_body={"structured_outputs": {"choice": ["up", "down"]}},
    )
    assert structured.choices[0].text in ("up", "down")
    anything = oai.chat.completions.create(
        model="lora",
        messages=[{"role": "user", "content": "JSON please"}],
        max_tokens=6,
        temperature=0,
        response_format={"type": "json_object"},
    )
    assert anything.choices[0].message.content.startswith("{")  # any object: the model decides how long


def test_cut_by_max_tokens_says_length(oai, server):
    chat = oai.chat.completions.create(
        model="lora",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=5,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
    )
    assert chat.choices[0].finish_reason == "length"
    with pytest.raises(ValueError):
        _valid(chat.choices[0].message.content, PERSON)
    with server.client() as client:
        body = {"inputs": "x", "parameters": {"max_new_tokens": 5, "details": True, "grammar": _json(PERSON)}}
        assert client.post("/generate", json=body).json()["details"]["finish_reason"] == "length"


def _json(schema: dict) -> dict:
    return {"type": "json", "value": schema}


def test_native_grammar_json_regex_and_lorax_response_format(server):
    client = InferenceClient(base_url=server.url)
    out = client.text_generation(
        "Person:", adapter_id="lokr", max_new_tokens=MAX_TOKENS, grammar=_json(PERSON), details=True
    )
    assert out.details.finish_reason == "eos_token"
    _valid(out.generated_text, PERSON)
    streamed = list(
        client.text_generation(
            "Person:", adapter_id="lokr", max_new_tokens=MAX_TOKENS, grammar=_json(PERSON), stream=True, details=True
        )
    )
    assert streamed[-1].generated_text == out.generated_text
    regex = client.text_generation(
        "Code:",
        max_new_tokens=20,
        grammar={"type": "regex", "value": "[a-f0-9]{4}-[a-f0-9]{2}"},
        do_sample=True,
        seed=1,
    )
    assert re.fullmatch("[a-f0-9]{4}-[a-f0-9]{2}", regex), regex
    lorax = LoraxClient(server.url).generate(
        "Answer:",
        adapter_id="oft",
        max_new_tokens=40,
        response_format={"type": "json_object", "schema": ANSWER},
    )
    assert lorax.details.finish_reason == "eos_token"
    _valid(lorax.generated_text, ANSWER)
    with server.client() as http:  # a schema as text, TGI's other form
        body = {"inputs": "x", "parameters": {"max_new_tokens": 40, "grammar": _json(json.dumps(ANSWER))}}
        _valid(http.post("/generate", json=body).json()["generated_text"], ANSWER)


def test_constrained_rows_leave_free_rows_exactly_as_alone(server):
    """Free greedy rows answer the same whether they share their batch with constrained rows or run alone; the
    constrained rows, sampled and greedy, with every kind of adapter, all validate."""
    free = [
        {"inputs": f"Free row {i}", "adapters": c, "parameters": {"max_new_tokens": 24}}
        for i, c in enumerate(COMBINATIONS)
    ]
    constrained = [
        {
            "inputs": f"Constrained {i}",
            "adapters": c,
            "parameters": {"max_new_tokens": MAX_TOKENS, "grammar": _json(PERSON), "details": True}
            | ({"do_sample": True, "seed": i} if i % 2 else {}),
        }
        for i, c in enumerate(COMBINATIONS * 2)
    ]
    with server.client() as client:
        alone = [client.post("/generate", json=body).json()["generated_text"] for body in free]

    async def together():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            responses = await asyncio.gather(*(client.post("/generate", json=b) for b in constrained + free))
            return [r.json() for r in responses]

    answers = asyncio.run(together())
    assert [a["generated_text"] for a in answers[len(constrained) :]] == alone
    for answer in answers[: len(constrained)]:
        assert answer["details"]["finish_reason"] == "eos_token"
        _valid(answer["generated_text"], PERSON)


def test_constraint_errors_are_422_with_the_reason(server, oai):
    with server.client() as client:
        bad = client.post(
            "/generate", json={"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": "[a-"}}}
        )
        assert bad.status_code == 422 and "regex" in bad.json()["error"]
        schema = client.post("/generate", json={"inputs": "x", "parameters": {"grammar": _json({"type": "nope"})}})
        assert schema.status_code == 422 and "nope" in schema.json()["error"]
        unsatisfiable = _json({"type": "integer", "minimum": 5, "maximum": 2})
        nothing = client.post("/generate", json={"inputs": "x", "parameters": {"grammar": unsatisfiable}})
        assert nothing.status_code == 422 and "nsatisfiable" in nothing.json()["error"]
        assert (
            client.post("/generate", json={"inputs": "x", "parameters": {"grammar": _json(False)}}).status_code == 422
        )
        both = {"grammar": _json(ANSWER), "response_format": {"type": "json_object"}}
        assert client.post("/generate", json={"inputs": "x", "parameters": both}).status_code == 422
        stop = {"grammar": _json(ANSWER), "stop": ["}"]}
        refused = client.post("/generate", json={"inputs": "x", "parameters": stop})
        assert refused.status_code == 422 and "stop" in refused.json()["error"]
    with pytest.raises(openai.UnprocessableEntityError) as invalid:
        oai.chat.completions.create(
            model="lora",
            messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "nope"}}},
        )
    assert "does not compile" in invalid.value.body["message"]
    with pytest.raises(openai.UnprocessableEntityError):
        oai.completions.create(model="lora", prompt="x", extra_body={"guided_regex": "a", "guided_choice": ["b"]})


def test_the_demo_model_answers_valid_json_with_its_adapters(serve):
    """The trained demo (byte tokenizer, no chat template) with one adapter of each type and mixes of them."""
    demo = serve(Settings(model="demo", adapters_dir=REPO / "adapters_store", device=DEVICE, dtype=dtype_name(DTYPE)))
    client = openai.OpenAI(base_url=f"{demo.url}/v1", api_key="unused", max_retries=0)
    combinations = [[], ["uppercase"], ["digits", "excited"], ["pirate", "british"], ["signoff"]]
    for adapters in combinations:
        for temperature in (0, 0.9):
            completion = client.completions.create(
                model="+".join(adapters) or demo.state.settings.model_id,
                prompt="My neighbor Alice has three red cats. ",
                max_tokens=MAX_TOKENS,
                temperature=temperature,
                seed=11,
                extra_body={"guided_json": PERSON},
            )
            assert completion.choices[0].finish_reason == "stop", (adapters, completion.choices[0])
            _valid(completion.choices[0].text, PERSON)
