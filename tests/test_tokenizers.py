"""Every kind of tokenizer real checkpoints ship, each paired with a tiny model behind the real server: every route
(plain and streamed) gives the full decode of the tokens it generated, stop sequences cut that text (also inside a
character), constrained output (JSON schema, regex, tool calls) is valid or refused with a clear 4xx, never a 5xx.
And an unexpected 500 keeps the keep-alive connection."""

from __future__ import annotations

import http.client
import json
import math
import random
import re

import httpx
import jsonschema
import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerBase

from server.config import Settings
from server.demo import tiny
from server.engine.output import GeneratedText
from tests import tokenizer_kinds
from tests.conftest import ServerThread

# name -> (tokenizer kind, embedding rows relative to the tokenizer's ids)
SETUPS = {
    "byte-level": ("byte-level", 0),
    "byte-fallback": ("byte-fallback", 0),
    "unigram": ("unigram", 0),
    "wordpiece": ("wordpiece", 0),
    "chat": ("chat", 0),
    "mistral": ("mistral", 0),  # tool calls as [TOOL_CALLS] [{...}], the marker a special token
    "embedding-padded": ("byte-level", 64),  # checkpoints pad their embedding past the tokenizer (Qwen2.5)
    "tokenizer-past-embedding": ("pad-added", -1),  # a pad token added without resizing the embedding
}
# WordPiece decodes words apart ("{ " name " : ..."): it cannot write most grammars' text, and says so (422)
CANNOT_CONSTRAIN = {"wordpiece"}
PROMPT = "café crème, 漢字 🙂 the quick brown fox"
ANSWER = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["answer", "n"],
    "additionalProperties": False,
}
REGEX = "(yes|no), [0-9]"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"enum": ["Paris", "Oslo"]}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }
]
SAMPLED = {"do_sample": True, "temperature": 1.0, "seed": 7, "max_new_tokens": 16}


def tokenizer_of(kind: str):
    if kind == "pad-added":
        tokenizer = tokenizer_kinds.byte_level()
        tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
        return tokenizer
    return tokenizer_kinds.build(kind)


@pytest.fixture(scope="module", params=list(SETUPS))
def setup(request, tmp_path_factory):
    """(name, tokenizer, server): a tiny Llama over the tokenizer, served."""
    kind, extra_rows = SETUPS[request.param]
    tokenizer = tokenizer_of(kind)
    root = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    config = tiny.config(hidden=32, intermediate=64, layers=1, heads=2, kv_heads=1, positions=512)
    config.vocab_size = 1 + max(tokenizer.get_vocab().values()) + extra_rows
    config.eos_token_id, config.bos_token_id = tokenizer.eos_token_id, tokenizer.bos_token_id
    pad = tokenizer.pad_token_id
    config.pad_token_id = pad if pad is not None and pad < config.vocab_size else tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "store").mkdir()
    settings = Settings(
        model=str(root / "model"), adapters_dir=root / "store", device="cpu", dtype="float32", max_new_tokens=64
    )
    with ServerThread(settings) as server:
        yield request.param, server.state.tokenizer, server


@pytest.fixture(scope="module")
def client(setup):
    with setup[2].client() as client:
        client.model_id = setup[2].state.settings.model_id  # what /v1 calls the base model
        yield client


def decoded(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def events(client: httpx.Client, path: str, body: dict) -> list[dict]:
    with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200, response.read()
        lines = [line.removeprefix("data:").strip() for line in response.iter_lines() if line.startswith("data:")]
    return [json.loads(line) for line in lines if line != "[DONE]"]


def generate(client, **parameters) -> dict:
    response = client.post("/generate", json={"inputs": PROMPT, "parameters": {"details": True, **parameters}})
    assert response.status_code == 200, response.text
    return response.json()


def joined(tokens: list[dict]) -> str:
    return "".join(t["text"] for t in tokens if not t["special"])


def completion(client, stream: bool, **body) -> str:
    body = {"model": client.model_id, "prompt": PROMPT, "max_tokens": 16, "temperature": 1.0, "seed": 7, **body}
    if not stream:
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]
    chunks = events(client, "/v1/completions", {**body, "stream": True})
    return "".join(c["choices"][0]["text"] for c in chunks if c["choices"])


def chat(client, stream: bool, **body) -> tuple[int, dict | list[dict]]:
    messages = [{"role": "user", "content": PROMPT}]
    body = {"model": client.model_id, "messages": messages, "max_tokens": 16, "seed": 7, **body}
    if not stream:
        response = client.post("/v1/chat/completions", json=body)
        return response.status_code, response.json()
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        lines = [line[5:].strip() for line in response.iter_lines() if line.startswith("data:")]
        return response.status_code, [json.loads(line) for line in lines if line != "[DONE]"]


def test_every_route_gives_the_full_decode_of_its_tokens(setup, client):
    _, tokenizer, _ = setup
    plain = generate(client, **SAMPLED)
    tokens = plain["details"]["tokens"]
    full = decoded(tokenizer, [t["id"] for t in tokens])
    assert plain["generated_text"] == joined(tokens) == full

    streamed = events(client, "/generate_stream", {"inputs": PROMPT, "parameters": SAMPLED})
    assert [e["token"]["id"] for e in streamed] == [t["id"] for t in tokens]
    assert joined([e["token"] for e in streamed]) == streamed[-1]["generated_text"] == full

    assert completion(client, stream=False) == completion(client, stream=True) == full  # the same seed, tokens

    status, answer = chat(client, stream=False)
    assert status == 200
    status, chunks = chat(client, stream=True)
    assert status == 200
    deltas = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert deltas == answer["choices"][0]["message"]["content"]


def test_a_stop_sequence_cuts_the_full_decode_also_inside_a_character(setup, client):
    full = generate(client, **SAMPLED)["generated_text"]
    wide = [i for i, char in enumerate(full) if len(char.encode()) > 1 and char != "\ufffd" and i >= 1]
    end = wide[0] + 1 if wide else min(len(full), 6)  # a stop ending in a character of several bytes, if any
    stop = full[max(0, end - 3) : end]
    if not stop.strip():
        pytest.skip(f"the answer has no text to stop at: {full!r}")
    at = full.index(stop)

    stopped = generate(client, **SAMPLED, stop=[stop])
    assert stopped["generated_text"] == full[: at + len(stop)]
    assert stopped["details"]["finish_reason"] == "stop_sequence"
    assert joined(stopped["details"]["tokens"]) == stopped["generated_text"]
    streamed = events(client, "/generate_stream", {"inputs": PROMPT, "parameters": {**SAMPLED, "stop": [stop]}})
    assert joined([e["token"] for e in streamed]) == streamed[-1]["generated_text"] == full[: at + len(stop)]

    assert completion(client, stream=False, stop=[stop]) == completion(client, stream=True, stop=[stop]) == full[:at]


def _valid_or_refused(name: str, status: int, text: str | None, check) -> None:
    assert status < 500, text
    if name in CANNOT_CONSTRAIN and status != 200:
        return
    assert status == 200, text
    check(text)


def _json(text: str) -> None:
    jsonschema.validate(json.loads(text), ANSWER)


def _regex(text: str) -> None:
    assert re.fullmatch(REGEX, text), text


@pytest.mark.parametrize("grammar", [{"type": "json", "value": ANSWER}, {"type": "regex", "value": REGEX}])
def test_constrained_output_is_valid_on_every_route(setup, client, grammar):
    name, _, _ = setup
    check = _json if grammar["type"] == "json" else _regex
    parameters = {**SAMPLED, "max_new_tokens": 64, "grammar": grammar}
    response = client.post("/generate", json={"inputs": PROMPT, "parameters": parameters})
    _valid_or_refused(name, response.status_code, response.json().get("generated_text", response.text), check)

    with client.stream("POST", "/generate_stream", json={"inputs": PROMPT, "parameters": parameters}) as response:
        response.read()
    lines = [json.loads(line[5:]) for line in response.text.splitlines() if line.startswith("data:")]
    if response.status_code != 200:  # failed before its first token: a stream starts with its first token
        _valid_or_refused(name, response.status_code, response.text, check)
    elif "error" in lines[-1]:  # the stream had begun: the error is its last event
        assert name in CANNOT_CONSTRAIN and lines[-1]["error_type"] == "validation", lines[-1]
    else:
        check(lines[-1]["generated_text"])

    guided = {"guided_json": ANSWER} if grammar["type"] == "json" else {"guided_regex": REGEX}
    status, answer = chat(client, stream=False, max_tokens=64, **guided)
    text = answer["choices"][0]["message"]["content"] if status == 200 else json.dumps(answer)
    _valid_or_refused(name, status, text, check)


@pytest.mark.parametrize("mode", ["named", "required", "auto"])
def test_tool_calls_are_valid_calls_or_text(setup, client, mode):
    name, _, _ = setup
    choice = {"named": {"type": "function", "function": {"name": "get_weather"}}, "required": "required"}
    body = {"tools": TOOLS, "tool_choice": choice.get(mode, "auto"), "parallel_tool_calls": False, "max_tokens": 64}
    for stream in (False, True):
        status, answer = chat(client, stream=stream, **body)
        assert status < 500, answer
        if mode == "auto" or (name in CANNOT_CONSTRAIN and status != 200):
            continue
        assert status == 200, answer
        if stream:
            if "error" in answer[-1]:
                assert name in CANNOT_CONSTRAIN, answer[-1]
                continue
            arguments: dict[int, str] = {}
            for chunk in answer:
                for call in (chunk["choices"][0]["delta"].get("tool_calls") or []) if chunk["choices"] else []:
                    arguments[call["index"]] = arguments.get(call["index"], "") + call["function"]["arguments"]
            calls = list(arguments.values())
        else:
            calls = [c["function"]["arguments"] for c in answer["choices"][0]["message"]["tool_calls"]]
        assert calls, answer
        for arguments in calls:
            jsonschema.validate(json.loads(arguments), TOOLS[0]["function"]["parameters"])


def test_a_grammar_that_spells_an_added_token_lets_the_model_write_it():
    """Qwen2.5's `<tool_call>` is an added token that is not special: where the grammar's text spells it, the mask
    offers it (as llguidance tokenizes forced text: the one token), and a model that writes it out instead is
    followed too; the answer has the text either way."""
    from server.engine.constraints import Grammars, GrammarSpec, allowed, fill_masks

    tokenizer = tokenizer_kinds.build("chat")
    grammars = Grammars(tokenizer, len(tokenizer), frozenset({tokenizer.eos_token_id}))
    grammar = grammars.compile(GrammarSpec("regex", "<tool_call>[ab]</tool_call>"))
    added = tokenizer.convert_tokens_to_ids("<tool_call>")
    assert allowed(fill_masks([grammar.constraint()], len(tokenizer)), len(tokenizer))[0, added]
    for first in (added, tokenizer.convert_tokens_to_ids("<")):
        constraint = grammar.constraint()
        constraint.advance(first)
        ids = [first]
        while not constraint.finished:
            ids.append(int(allowed(fill_masks([constraint], len(tokenizer)), len(tokenizer))[0].nonzero()[0]))
            constraint.advance(ids[-1])
        assert re.fullmatch("<tool_call>[ab]</tool_call>", tokenizer.decode(ids, skip_special_tokens=True))


def test_an_invalid_schema_is_a_422_before_the_tokenizer_is_read(setup, client):
    response = client.post(
        "/generate", json={"inputs": "x", "parameters": {"grammar": {"type": "json", "value": {"type": "objekt"}}}}
    )
    assert response.status_code == 422 and "objekt" in response.json()["error"]


@pytest.mark.parametrize("setup", ["byte-level"], indirect=True)
def test_processed_logprobs_are_those_the_constraint_leaves(setup, client):
    """Raw by default: the model's own distribution; processed: renormalised over the tokens the grammar allows,
    so a token the grammar forces has logprob 0 and the alternatives' probabilities add up to 1."""
    body = {"guided_regex": "(yes|no)!{3}", "max_tokens": 16, "logprobs": True, "top_logprobs": 5}
    status, raw = chat(client, stream=False, **body)
    status2, processed = chat(client, stream=False, logprobs_mode="processed_logprobs", **body)
    assert status == status2 == 200
    raw_tokens, tokens = raw["choices"][0]["logprobs"]["content"], processed["choices"][0]["logprobs"]["content"]
    assert [t["token"] for t in tokens] == [t["token"] for t in raw_tokens]  # the same answer (seeded)
    assert re.fullmatch("(yes|no)!{3}", processed["choices"][0]["message"]["content"])
    assert all(t["logprob"] < 0 for t in raw_tokens)
    assert tokens[-1]["logprob"] == pytest.approx(0.0, abs=1e-6)  # the last '!' is forced
    for token in tokens:
        assert sum(math.exp(t["logprob"]) for t in token["top_logprobs"]) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("setup", ["byte-level"], indirect=True)
def test_an_unexpected_500_keeps_the_keep_alive_connection(setup, monkeypatch):
    """One connection (http.client never reconnects by itself): a request that fails unexpectedly, then another."""
    from server.api import native

    _, _, server = setup

    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(native, "encode_prompt", broken)
    host, port = server.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        body = json.dumps({"inputs": "x", "parameters": {"max_new_tokens": 1}})
        connection.request("POST", "/generate", body, {"content-type": "application/json"})
        failed = connection.getresponse()
        assert failed.status == 500 and json.loads(failed.read()) == {
            "error": "internal error: RuntimeError",
            "error_type": "internal",
        }
        assert failed.getheader("connection") != "close"
        sock = connection.sock
        connection.request("GET", "/health")
        answer = connection.getresponse()
        assert answer.status == 200 and json.loads(answer.read()) == {"status": "ok"}
        assert connection.sock is sock, "the same connection"
    finally:
        connection.close()


def test_masks_filled_by_llguidance_threads_equal_masks_filled_one_by_one():
    """With 4 cores or more, llguidance's executor fills a step's masks in parallel; here it is asked for, and the
    masks must be the same as the engine thread's own, row by row, at rows in different places of a schema."""
    import llguidance

    from server.engine.constraints import Grammars, GrammarSpec, allowed, fill_masks

    tokenizer = tokenizer_kinds.build("byte-level")
    grammars = Grammars(tokenizer, len(tokenizer), frozenset({tokenizer.eos_token_id}))
    one_by_one = grammars.compile(GrammarSpec.json_schema(ANSWER))
    constraints = []
    for steps in range(6):
        constraint = one_by_one.constraint()
        for _ in range(steps):
            constraint.advance(int(allowed(fill_masks([constraint], len(tokenizer)), len(tokenizer))[0].nonzero()[-1]))
        constraints.append(constraint)
    alone = fill_masks(constraints, len(tokenizer))
    for constraint in constraints:
        constraint.executor = llguidance.LLExecutor(num_threads=2)
    assert torch.equal(fill_masks(constraints, len(tokenizer)), alone)
    assert len({tuple(row.tolist()) for row in alone}) > 1


def test_the_clean_up_of_a_growing_text_equals_the_whole_clean_up_and_costs_its_new_end_only(monkeypatch):
    whole, cleaned = PreTrainedTokenizerBase.clean_up_tokenization, []

    def counting(self, text: str) -> str:
        cleaned.append(len(text))
        return whole(self, text)

    monkeypatch.setattr(PreTrainedTokenizerBase, "clean_up_tokenization", counting)
    rng, text = random.Random(0), GeneratedText.__new__(GeneratedText)
    text.tokenizer = PreTrainedTokenizerBase.__new__(PreTrainedTokenizerBase)
    for _ in range(300):
        text._raw, text._cleaned, text._cleaned_to = "", "", 0
        for _ in range(rng.randint(1, 30)):
            text._raw += "".join(rng.choice(" .?!,'ntmsvreax\n") for _ in range(rng.randint(0, 4)))
            assert text._cleaned_up() == whole(None, text._raw), text._raw

    cleaned.clear()
    text._raw, text._cleaned, text._cleaned_to = "", "", 0
    for _ in range(2000):
        text._raw += " word,"
        text._cleaned_up()
    assert sum(cleaned) < 10 * len(text._raw)  # the whole text each time would be ~1000x
