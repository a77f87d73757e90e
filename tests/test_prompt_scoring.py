"""Scoring prompts on /v1/completions as lm-evaluation-harness asks (echo, logprobs: k, max_tokens 1 or 0), the base
model's ids on /v1 (served name, folder name, path; '<base>:a+b'), and vLLM's tokenizer routes."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch

from server.engine import passes
from tests.reference import reference_logits

ROWS = {  # request -> (model, prompts as token ids): two requests with different mixes, sent at once
    "mix": ("oft+lora", [[75, 108, 111, 111, 114, 35, 122, 114, 117], [87, 100, 104, 35, 102, 100, 119]]),
    "single": ("loha", [[84, 119, 118, 104, 35, 108, 118, 35, 100, 35, 119, 104, 118, 119]]),
}


@pytest.fixture(scope="module")
def server(serve, llama):
    return serve(llama.settings(served_model_name="tiny-served"))


def completion(server, **body) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/completions", json={"temperature": 0, **body}, timeout=120)


def expected_rows(llama, tokenizer, names: list[str], ids: list[int], k: int) -> tuple[list, list]:
    """The reference's logprob of each prompt token and its top-k by text, with the token itself (as the server's:
    where two texts coincide, the larger logprob)."""
    logprobs = torch.log_softmax(reference_logits(llama.model_dir, llama.store, names, ids)[:-1], dim=-1)
    taken, tops = [None], [None]
    for position, token in enumerate(ids[1:]):
        values, top = logprobs[position].topk(k)
        row = {}
        for text, value in [
            *zip(map(tokenizer.decode, ([t] for t in top.tolist())), values.tolist()),
            (tokenizer.decode([token]), float(logprobs[position, token])),
        ]:
            row[text] = max(value, row.get(text, -float("inf")))
        taken.append(float(logprobs[position, token]))
        tops.append(row)
    return taken, tops


@pytest.mark.parametrize("score_bytes", [passes.SCORE_BYTES, 1], ids=["together", "one by one"])
def test_echo_scores_every_prompt_position_of_every_row_with_its_top_logprobs(server, llama, score_bytes, monkeypatch):
    monkeypatch.setattr(passes, "SCORE_BYTES", score_bytes)
    tokenizer = server.state.tokenizer

    async def send():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            bodies = [
                {"model": model, "prompt": prompts, "echo": True, "logprobs": 3, "max_tokens": 1, "temperature": 0}
                for model, prompts in ROWS.values()
            ]
            return await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))

    for (model, prompts), response in zip(ROWS.values(), asyncio.run(send()), strict=True):
        assert response.status_code == 200, response.text
        for ids, choice in zip(prompts, response.json()["choices"], strict=True):
            logprobs = choice["logprobs"]
            taken, tops = expected_rows(llama, tokenizer, model.split("+"), ids, 3)
            n = len(ids)
            assert len(logprobs["tokens"]) == len(logprobs["top_logprobs"]) == n + 1  # the prompt and one token
            assert logprobs["tokens"][:n] == [tokenizer.decode([t]) for t in ids]
            offsets = [0]
            for token in logprobs["tokens"][:-1]:
                offsets.append(offsets[-1] + len(token))
            assert logprobs["text_offset"] == offsets
            assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
            assert logprobs["token_logprobs"][1:n] == pytest.approx(taken[1:], abs=1e-4)
            for got, want in zip(logprobs["top_logprobs"][1:n], tops[1:], strict=True):
                assert got.keys() == want.keys() and list(got.values()) == pytest.approx(list(want.values()), abs=1e-4)
            # the actual token's logprob is the one among the alternatives: lm_eval compares them for greediness
            for at in range(1, n + 1):
                top = logprobs["top_logprobs"][at]
                assert top[logprobs["tokens"][at]] == logprobs["token_logprobs"][at]


def test_max_tokens_zero_with_echo_scores_the_prompt_only(server):
    ids = ROWS["mix"][1][0]
    scored = completion(server, model="oft+lora", prompt=ids, echo=True, logprobs=1, max_tokens=0)
    assert scored.status_code == 200, scored.text
    choice = scored.json()["choices"][0]
    assert choice["finish_reason"] == "length" and choice["text"] == server.state.tokenizer.decode(ids)
    assert len(choice["logprobs"]["token_logprobs"]) == len(ids)
    assert scored.json()["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    one = completion(server, model="oft+lora", prompt=ids, echo=True, logprobs=1, max_tokens=1).json()["choices"][0]
    assert one["logprobs"]["token_logprobs"][: len(ids)] == choice["logprobs"]["token_logprobs"]
    plain = completion(server, model="oft+lora", prompt=ids, echo=True, max_tokens=0).json()["choices"][0]
    assert plain["finish_reason"] == "length" and plain["logprobs"] is None

    with httpx.stream(
        "POST",
        f"{server.url}/v1/completions",
        json={"model": "lora", "prompt": ids, "echo": True, "max_tokens": 0, "stream": True},
        timeout=120,
    ) as stream:
        events = [line for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and '"finish_reason":"length"' in "".join(events)

    refused = completion(server, model="lora", prompt=ids, max_tokens=0)
    assert refused.status_code == 422
    assert "max_tokens: 0" in refused.json()["error"]["message"] and "echo" in refused.json()["error"]["message"]
    assert completion(server, model="lora", prompt=ids, max_tokens=1).status_code == 200  # still serving


def test_the_base_model_answers_to_its_served_name_folder_and_path(server, llama):
    path, folder = str(llama.model_dir), llama.model_dir.name
    listed = httpx.get(f"{server.url}/v1/models").json()["data"]
    assert [m["id"] for m in listed if m["parent"] is None] == ["tiny-served", folder, path]
    assert {m["parent"] for m in listed if m["parent"]} == {"tiny-served"}

    def text(model: str) -> str:
        response = completion(server, model=model, prompt="Hello", max_tokens=6)
        assert response.status_code == 200, (model, response.text)
        return response.json()["choices"][0]["text"]

    base, mix = text(folder), text("oft+lora@0.5")
    assert base != mix
    assert text("tiny-served") == text(path) == base
    for prefix in ("tiny-served", folder, path):
        assert text(f"{prefix}:oft+lora@0.5") == mix
    unknown = completion(server, model=f"{path}:nothing", prompt="Hello", max_tokens=1)
    assert unknown.status_code == 404 and "nothing" in unknown.json()["error"]["message"]
    empty = completion(server, model=f"{folder}:", prompt="Hello", max_tokens=1)
    assert empty.status_code == 422 and "names no adapter" in empty.json()["error"]["message"]


def test_vllm_tokenizer_routes(server, llama):
    tokenizer = server.state.tokenizer
    info = httpx.get(f"{server.url}/tokenizer_info")
    assert info.status_code == 200
    assert info.json()["eos_token"] == tokenizer.eos_token and info.json()["tokenizer_class"] == "ByT5Tokenizer"
    assert str(llama.model_dir) not in info.text  # no server paths

    tokenized = httpx.post(f"{server.url}/tokenize", json={"prompt": "</s>Hi", "add_special_tokens": False})
    assert tokenized.json() == {
        "count": 3,
        "max_model_len": server.state.max_total_tokens,
        "tokens": [tokenizer.eos_token_id, *tokenizer.encode("Hi", add_special_tokens=False)],
        "token_strs": None,
    }
    tgi = httpx.post(f"{server.url}/tokenize", json={"inputs": "Hi"}).json()  # TGI's form is unchanged
    assert [t["text"] for t in tgi] == ["H", "i"]
    ids = tokenized.json()["tokens"]
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": ids}).json() == {"prompt": "</s>Hi"}
    refused = httpx.post(f"{server.url}/detokenize", json={"tokens": [10**6]})
    assert refused.status_code == 422 and "vocabulary" in refused.json()["error"]


def test_prompts_are_scored_in_groups_whose_logits_fit_the_bound(monkeypatch):
    """The scheduler bounds a batch's tokens, not rows x longest prompt x vocabulary: scoring splits the batch in
    order so that its logits stay under SCORE_BYTES (a prompt alone may be over it)."""
    from types import SimpleNamespace

    monkeypatch.setattr(passes, "SCORE_BYTES", 10 * 100 * 8 * 3)
    seqs = [SimpleNamespace(request=SimpleNamespace(prompt_ids=[0] * n)) for n in (10, 10, 10, 40, 5, 2000, 1)]
    groups = passes._under_score_bytes(seqs, vocab=100)
    assert [[len(s.request.prompt_ids) for s in g] for g in groups] == [[10, 10, 10], [40], [5], [2000], [1]]
