"""End to end over a real uvicorn on loopback, with httpx."""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import pytest

from server.model import encode_prompt
from tests.conftest import ATOL, DEVICE, DTYPE, dtype_name
from tests.reference import canonical, reference_greedy, reference_logits

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def server(serve, llama):
    return serve(llama.settings(max_adapters_per_request=4, max_new_tokens=64, max_input_tokens=100))


@pytest.fixture()
def client(server):
    with server.client() as c:
        yield c


def generate(client: httpx.Client, **body) -> httpx.Response:
    return client.post("/generate", json={"inputs": PROMPT, **body})


def test_health(client):
    response = client.get("/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


@pytest.mark.parametrize("names", [[], ["oft"], ["lokr", "lora", "shira"]], ids=["base", "one", "three"])
def test_generate_equals_reference(client, server, llama, names):
    response = generate(client, adapters=names, parameters={"max_new_tokens": 10, "details": True})
    assert response.status_code == 200, response.text
    body = response.json()
    details = body["details"]
    tokenizer = server.state.tokenizer
    ids = encode_prompt(tokenizer, PROMPT)
    expected = reference_greedy(llama.model_dir, llama.store, names, ids, 10)
    tokens = [t["id"] for t in details["tokens"]]
    assert tokens == expected[: len(tokens)]
    assert details["adapters"] == canonical(llama.store, names)
    assert details["generated_tokens"] == len(tokens)
    assert details["finish_reason"] in ("length", "eos_token")
    assert details["seed"] is None
    assert body["generated_text"] == tokenizer.decode(tokens, skip_special_tokens=True)
    # the first token's logprob is the reference's log-softmax at the prompt's last position
    first = reference_logits(llama.model_dir, llama.store, names, ids)[-1].log_softmax(-1)[tokens[0]]
    assert math.isclose(details["tokens"][0]["logprob"], float(first), abs_tol=ATOL)


def test_combination_fields_are_equivalent(client):
    outputs = [
        generate(client, adapters=["loha", "oft"], parameters={"max_new_tokens": 6}),
        generate(client, parameters={"adapters": ["loha", "oft"], "max_new_tokens": 6}),
        generate(client, parameters={"adapter_id": "loha+oft", "max_new_tokens": 6}),
        generate(client, adapters=["loha", "oft"], parameters={"adapter_id": "loha+oft", "max_new_tokens": 6}),
    ]
    assert all(o.status_code == 200 for o in outputs), [o.text for o in outputs]
    assert len({o.json()["generated_text"] for o in outputs}) == 1


def test_adapters_listing(client):
    generate(client, adapters=["lora", "adalora"], parameters={"max_new_tokens": 1})
    loaded = {a["name"]: a for a in client.get("/adapters").json()["adapters"]}
    assert {"lora", "adalora"} <= set(loaded)
    lora = loaded["lora"]
    assert lora["loaded"] is True and lora["type"] == "LORA" and lora["rank"] == 4
    assert "model.layers.0.self_attn.q_proj" in lora["target_modules"]
    assert lora["bytes"] > 0 and lora["last_used"] >= lora["loaded_at"]
    assert loaded["adalora"]["rank"] == 6
    everything = {a["name"]: a for a in client.get("/adapters", params={"all": "true"}).json()["adapters"]}
    assert set(everything) >= set(loaded) | {"lokr.decomposed", "oft.by-rank"}
    unloaded = [a for a in everything.values() if not a["loaded"]]
    assert unloaded and all(a["type"] for a in unloaded)


def test_sampling_is_reproducible_with_a_seed(client):
    params = {
        "max_new_tokens": 12,
        "do_sample": True,
        "temperature": 0.9,
        "top_k": 50,
        "top_p": 0.95,
        "repetition_penalty": 1.1,
        "seed": 1234,
        "details": True,
    }
    first = generate(client, adapters=["lokr"], parameters=params).json()
    second = generate(client, adapters=["lokr"], parameters=params).json()
    assert first == second
    assert first["details"]["seed"] == 1234
    unseeded = generate(client, parameters={**params, "seed": None}).json()
    assert isinstance(unseeded["details"]["seed"], int)


def test_stop_sequence_and_full_text(client):
    free = generate(client, parameters={"max_new_tokens": 12}).json()["generated_text"]
    stop = free[3:5]
    assert len(stop) == 2
    body = generate(
        client, parameters={"max_new_tokens": 12, "stop": [stop], "details": True, "return_full_text": True}
    ).json()
    assert body["details"]["finish_reason"] == "stop_sequence"
    assert body["generated_text"] == PROMPT + free[: free.index(stop) + len(stop)]


@pytest.mark.parametrize(
    "body, status, reason",
    [
        ({"adapters": ["nope"]}, 404, "adapter 'nope' not found"),
        ({"parameters": {"adapter_id": "lora+nope"}}, 404, "adapter 'nope' not found"),
        ({"adapters": ["lora", "oft", "lora"]}, 422, "adapters listed more than once: lora"),
        ({"adapters": ["lora", "oft", "loha", "lokr", "shira"]}, 422, "5 adapters requested; at most 4"),
        ({"adapters": ["lora"], "parameters": {"adapter_id": "oft"}}, 422, "given differently"),
        ({"parameters": {"adapter_id": "lora++oft"}}, 422, "invalid adapter name ''"),
        ({"parameters": {"temperature": 0}}, 422, "parameters.temperature: Input should be greater than 0"),
        ({"parameters": {"top_p": 1.5}}, 422, "parameters.top_p"),
        ({"parameters": {"max_new_tokens": 0}}, 422, "parameters.max_new_tokens"),
        ({"parameters": {"max_new_tokens": 65}}, 422, "max_new_tokens is 65; at most 64"),
        ({"parameters": {"stop": ["a", "b", "c", "d", "e"]}}, 422, "parameters.stop"),
        ({"parameters": {"best_of": 2}}, 422, "not supported by this server: best_of=2"),
        ({"parameters": {"no_such": 1}}, 422, "parameters.no_such: Extra inputs are not permitted"),
        ({"inputs": ""}, 422, "inputs: String should have at least 1 character"),
        ({"inputs": "x" * 101}, 422, "inputs are 101 tokens; at most 100"),
        ({"inputs": 5}, 422, "inputs: Input should be a valid string"),
    ],
)
def test_invalid_requests_get_a_clear_4xx(client, body, status, reason):
    response = client.post("/generate", json={"inputs": PROMPT, **body})
    assert response.status_code == status, response.text
    assert reason in response.json()["error"]
    assert set(response.json()) == {"error", "error_type"}
    assert generate(client, parameters={"max_new_tokens": 1}).status_code == 200


@pytest.mark.parametrize("content", [b"{bad", b"", b"[1, 2]", b'{"inputs": "x"'])
def test_malformed_json_is_422(client, content):
    response = client.post("/generate", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["error_type"] == "validation"


def test_unknown_route_is_a_json_404(client):
    response = client.get("/nope")
    assert response.status_code == 404 and response.json()["error_type"] == "http"


def test_concurrent_requests_each_get_their_own_combination(server):
    combinations = [[], ["lora"], ["oft", "shira"], ["loha", "lokr", "adalora"], ["lora.rs-bias"], ["oft"]] * 2
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 8}}
    with server.client() as client:
        alone = [client.post("/generate", json={**body, "adapters": c}).json() for c in combinations]

    async def together():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            return await asyncio.gather(*(client.post("/generate", json={**body, "adapters": c}) for c in combinations))

    responses = asyncio.run(together())
    assert [r.json() for r in responses] == alone
    assert len({r["generated_text"] for r in alone}) > 3


def test_stream_is_tgi_shaped_and_equals_the_plain_response(client):
    body = {"inputs": PROMPT, "adapters": ["lora", "oft"], "parameters": {"max_new_tokens": 9, "details": True}}
    plain = client.post("/generate", json=body).json()
    with client.stream("POST", "/generate_stream", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")]
    assert [e["index"] for e in events] == list(range(len(events)))
    assert [e["token"] for e in events] == plain["details"]["tokens"]
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    assert events[-1]["generated_text"] == plain["generated_text"]
    assert events[-1]["details"] == {
        "finish_reason": plain["details"]["finish_reason"],
        "generated_tokens": plain["details"]["generated_tokens"],
        "input_length": plain["details"]["prompt_tokens"],
        "prompt_tokens": plain["details"]["prompt_tokens"],
        "seed": None,
    }


def test_stream_reports_errors_before_it_starts_as_http_errors(client):
    response = client.post("/generate_stream", json={"inputs": PROMPT, "adapters": ["nope"]})
    assert response.status_code == 404 and response.json()["error_type"] == "adapter_not_found"


def test_root_route_serves_plain_and_streamed_as_tgi(client):
    body = {"inputs": PROMPT, "parameters": {"adapter_id": "lokr+oft", "max_new_tokens": 5}}
    plain = client.post("/", json=body)
    assert plain.status_code == 200 and plain.headers["x-adapters"] == "oft+lokr"
    assert plain.json() == [client.post("/generate", json=body).json()]  # a list, as TGI's root route
    with client.stream("POST", "/", json={**body, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")]
    assert events[-1]["generated_text"] == plain.json()[0]["generated_text"]


def test_request_id_and_timing_headers(client):
    response = generate(client, adapters=["lora"], parameters={"max_new_tokens": 3, "ignore_eos_token": True})
    assert len(response.headers["x-request-id"]) == 32
    assert response.headers["x-adapters"] == "lora"
    assert response.headers["x-generated-tokens"] == "3"
    assert int(response.headers["x-inference-time"]) >= 0 and int(response.headers["x-queue-time"]) >= 0
    echoed = client.post(
        "/generate",
        json={"inputs": PROMPT, "parameters": {"max_new_tokens": 1}},
        headers={"x-request-id": "my-trace-42"},
    )
    assert echoed.headers["x-request-id"] == "my-trace-42"


def test_info_and_tokenize(client, server):
    info = client.get("/info").json()
    assert info["model_id"] == server.state.settings.model_id
    assert info["model_dtype"] == dtype_name(DTYPE) and info["model_device_type"] == DEVICE
    assert info["max_input_tokens"] == 100 and info["max_adapters_per_request"] == 4
    assert info["adapters_available"] >= 12
    tokens = client.post("/tokenize", json={"inputs": "héllo"}).json()
    assert [t["id"] for t in tokens] == encode_prompt(server.state.tokenizer, "héllo")
    assert "".join(t["text"] for t in tokens) == "héllo" or tokens[1]["text"] == ""


def test_details_with_prompt_logprobs_and_alternatives(client, llama, server):
    body = {
        "inputs": PROMPT,
        "adapters": ["loha"],
        "parameters": {"max_new_tokens": 4, "details": True, "decoder_input_details": True, "top_n_tokens": 3},
    }
    details = client.post("/generate", json=body).json()["details"]
    ids = encode_prompt(server.state.tokenizer, PROMPT)
    assert [t["id"] for t in details["prefill"]] == ids and details["prefill"][0]["logprob"] is None
    expected = reference_logits(llama.model_dir, llama.store, ["loha"], ids).log_softmax(-1)
    for position, token in enumerate(details["prefill"][1:]):
        assert math.isclose(token["logprob"], float(expected[position, token["id"]]), abs_tol=ATOL)
    assert details["prompt_tokens"] == len(ids)
    for chosen, alternatives in zip(details["tokens"], details["top_tokens"], strict=True):
        assert len(alternatives) == 3 and alternatives[0]["id"] == chosen["id"]  # greedy: the best is chosen
        assert alternatives[0]["logprob"] >= alternatives[1]["logprob"] >= alternatives[2]["logprob"]


def test_ignore_eos_token_generates_the_full_length(client):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 30, "ignore_eos_token": True, "details": True}}
    assert client.post("/generate", json=body).json()["details"]["generated_tokens"] == 30


@pytest.mark.parametrize(
    "parameters",
    [
        {"temperature": 5e-324},
        {"do_sample": True, "repetition_penalty": 1e-300},
        {"temperature": 1e-300, "top_k": 1},
        {"do_sample": True, "temperature": 1e-6, "top_p": 0.5, "repetition_penalty": 1e300},
    ],
)
def test_extreme_sampling_parameters_still_answer(client, parameters):
    response = generate(client, parameters={"max_new_tokens": 4, **parameters})
    assert response.status_code == 200, response.text
