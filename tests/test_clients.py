"""The clients people already use, unchanged, against a real server on loopback."""

from __future__ import annotations

import openai
import pytest
from huggingface_hub import InferenceClient
from lorax import Client as LoraxClient
from lorax.types import MergedAdapters
from prometheus_client.parser import text_string_to_metric_families

from server.model import encode_prompt
from tests.reference import reference_greedy

PROMPT = "The weather today"


@pytest.fixture(scope="module")
def server(serve, llama):
    return serve(llama.settings(max_new_tokens=64))


@pytest.fixture()
def oai(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _greedy(server, llama, names, prompt_ids, n):
    return server.state.tokenizer.decode(
        reference_greedy(llama.model_dir, llama.store, names, prompt_ids, n), skip_special_tokens=True
    )


def test_openai_models_lists_the_base_and_every_adapter(oai, server):
    models = {m.id: m for m in oai.models.list().data}
    settings = server.state.settings
    base, ids = settings.model_id, {settings.model_id, settings.model}  # its folder's name and its path
    assert all(models[i].parent is None for i in ids)
    assert {"lora", "oft", "lokr.decomposed"} <= set(models)
    assert all(models[n].parent == base for n in models if n not in ids)


def test_openai_completions_with_a_combination_in_model(oai, server, llama):
    completion = oai.completions.create(model="oft+lora", prompt=PROMPT, max_tokens=8, temperature=0)
    ids = encode_prompt(server.state.tokenizer, PROMPT)
    choice = completion.choices[0]
    assert choice.text == _greedy(server, llama, ["oft", "lora"], ids, completion.usage.completion_tokens)
    assert completion.usage.prompt_tokens == len(ids)
    assert completion.usage.completion_tokens <= 8
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    streamed = oai.completions.create(model="oft+lora", prompt=PROMPT, max_tokens=8, temperature=0, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].usage.completion_tokens == completion.usage.completion_tokens


def test_openai_chat_streamed_equals_plain(oai):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    plain = oai.chat.completions.create(model="loha", messages=messages, max_tokens=12, temperature=0)
    assert plain.choices[0].message.role == "assistant"
    assert plain.usage.completion_tokens >= 1 and plain.choices[0].finish_reason in ("stop", "length")
    stream = oai.chat.completions.create(
        model="loha",
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == plain.usage.total_tokens


def test_openai_extra_body_adapters_and_logprobs(oai, server):
    chat = oai.chat.completions.create(
        model=server.state.settings.model_id,
        messages=[{"role": "user", "content": "x"}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"adapters": ["shira", "adalora"]},
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in content)


def test_openai_stop_sequence_is_not_in_the_text(oai):
    free = oai.completions.create(model="lora", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    stop = free[4:6]
    stopped = oai.completions.create(model="lora", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert stopped.choices[0].text == free[: free.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    streamed = oai.completions.create(
        model="lora", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop], stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == free[: free.index(stop)]


def test_openai_errors_are_openai_shaped(oai):
    with pytest.raises(openai.NotFoundError) as missing:
        oai.completions.create(model="lora+nope", prompt="x", max_tokens=2)
    assert "nope" in missing.value.body["message"]
    with pytest.raises(openai.UnprocessableEntityError) as invalid:
        oai.completions.create(model="lora", prompt="x", max_tokens=2, n=3)
    assert "n" in invalid.value.body["message"]


def test_huggingface_hub_text_generation_with_adapter_id(server, llama):
    client = InferenceClient(base_url=server.url)
    output = client.text_generation(PROMPT, adapter_id="oft+lokr", max_new_tokens=10, details=True)
    ids = encode_prompt(server.state.tokenizer, PROMPT)
    expected = reference_greedy(llama.model_dir, llama.store, ["oft", "lokr"], ids, 10)
    tokens = [t.id for t in output.details.tokens]
    assert tokens == expected[: len(tokens)]
    streamed = list(client.text_generation(PROMPT, adapter_id="oft+lokr", max_new_tokens=10, stream=True, details=True))
    assert [s.token.id for s in streamed] == tokens
    assert streamed[-1].generated_text == output.generated_text
    assert streamed[-1].details.input_length == len(ids)


def test_lorax_client_adapter_id_and_merged_adapters(server):
    client = LoraxClient(server.url)
    by_id = client.generate(PROMPT, adapter_id="lora+shira", max_new_tokens=8)
    merged = client.generate(
        PROMPT,
        merged_adapters=MergedAdapters(ids=["shira", "lora"], weights=[1.0, 1.0], density=1.0, merge_strategy="linear"),
        max_new_tokens=8,
    )
    assert by_id.generated_text == merged.generated_text
    assert by_id.details.prompt_tokens == len(encode_prompt(server.state.tokenizer, PROMPT))
    streamed = list(client.generate_stream(PROMPT, adapter_id="lora+shira", max_new_tokens=8))
    assert "".join(r.token.text for r in streamed) == by_id.generated_text or streamed[-1].generated_text == (
        by_id.generated_text
    )
    weighted = client.generate(  # linear: the weighted mix (README, "Merged adapters")
        PROMPT,
        merged_adapters=MergedAdapters(ids=["shira", "lora"], weights=[0.5, 0.5], density=1.0),
        max_new_tokens=8,
    )
    assert (
        weighted.generated_text
        == client.generate(PROMPT, adapter_id="lora@0.5+shira@0.5", max_new_tokens=8).generated_text
    )
    with pytest.raises(Exception, match="merges combine LoRA adapters only"):
        client.generate(
            PROMPT,
            merged_adapters=MergedAdapters(
                ids=["shira", "lora"], weights=[0.5, 0.5], density=0.5, merge_strategy="ties"
            ),
            max_new_tokens=2,
        )


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_parse_and_move(server):
    with server.client() as client:
        client.post("/generate", json={"inputs": "m", "adapters": ["lora"], "parameters": {"max_new_tokens": 1}})
        before = _samples(client.get("/metrics").text)
        client.post("/generate", json={"inputs": "m", "adapters": ["lokr"], "parameters": {"max_new_tokens": 3}})
        client.post("/generate", json={"inputs": "m", "adapters": ["nope"]})
        after = _samples(client.get("/metrics").text)

    def moved(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert moved("mixserve:requests_total", route="/generate", status="200") == 1
    assert moved("mixserve:requests_total", route="/generate", status="404") == 1
    assert moved("mixserve:generation_tokens_total") >= 1
    assert moved("mixserve:time_to_first_token_seconds_count") == 1
    assert moved("mixserve:request_duration_seconds_count", route="/generate") == 2
    assert after[("mixserve:adapters_resident", ())] >= 1
    pools = {what: after[("mixserve:rank_pool_bytes", (("what", what),))] for what in ("allocated", "held")}
    assert pools["allocated"] >= pools["held"] > 0  # lora's ranks, at least
    info = [k for k in after if k[0] == "mixserve:lora_requests_info"]
    assert info and {label for label, _ in info[0][1]} == {"running_lora_adapters", "waiting_lora_adapters", "max_lora"}
    assert ("mixserve:num_requests_waiting", ()) in after and ("mixserve:kv_cache_usage_perc", ()) in after
