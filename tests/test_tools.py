"""Tool calls on /v1/chat/completions with the real openai client: the tools and the conversation through the chat
template, required and named calls constrained to valid calls, auto calls read from the text in the template's
format (Hermes/Qwen tags, Llama 3 JSON), streamed as OpenAI streams them, and a second turn with the tool's result.

The models are random and tiny, with a context long enough for the tools in the prompt; the functions' parameters
are bounded (enums, small integers), so that a constrained call always ends well within max_tokens.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, ByT5Tokenizer

from server.api.tools import CallReader, ConstrainedCallReader, assemble, call_format
from server.demo import tiny
from tests.builders import ADAPTERS
from tests.conftest import World

HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n# Tools\n<tools>{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n"
    "</tools>\nFor each function call, return a json object with function name and arguments within"
    " <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n{% endif %}'
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant\n"
    "{%- for call in message.tool_calls %}\n<tool_call>\n"
    '{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}\n</tool_call>'
    "{%- endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n"
    "</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{%- if tools %}<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.\n'
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}<|eot_id|>{% endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}<|start_header_id|>assistant<|end_header_id|>\n\n"
    '{%- for call in message.tool_calls %}{"name": "{{ call.function.name }}", "parameters": '
    "{{ call.function.arguments | tojson }}}{% endfor %}<|eot_id|>"
    "{%- elif message.role == 'tool' %}<|start_header_id|>ipython<|end_header_id|>\n\n{{ message.content }}<|eot_id|>"
    "{%- else %}<|start_header_id|>{{ message.role }}<|end_header_id|>\n\n{{ message.content }}<|eot_id|>{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Rome", "Oslo"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TIME = {"type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The forecast", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def _world(root: Path, template: str | None) -> World:
    """A tiny Llama with a context for the tools in the prompt, the byte tokenizer with this chat template, and
    two adapters (LoRA and OFT)."""
    torch.manual_seed(0)
    config = tiny.config(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, positions=2048)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20)
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tokenizer = ByT5Tokenizer()
    tokenizer.chat_template = template
    tokenizer.save_pretrained(model_dir)
    for seed, name in enumerate(("lora", "oft"), start=1):
        config, scale = ADAPTERS[name]
        tiny.save_adapter(model_dir, config, root / "store" / name, seed=seed, base_name="tools", scale=scale)
    return World("llama", model_dir, root / "store")


@pytest.fixture(scope="module", params=["hermes", "llama3", "plain"])
def server(request, serve, tmp_path_factory):
    template = {"hermes": HERMES_TEMPLATE, "llama3": LLAMA3_TEMPLATE, "plain": None}[request.param]
    world = _world(tmp_path_factory.mktemp(f"tools-{request.param}"), template)
    return serve(world.settings(max_new_tokens=256, max_input_tokens=2000))


@pytest.fixture()
def oai(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _check(call) -> dict:
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, SCHEMAS[call.function.name])
    assert call.id.startswith("call_") and call.type == "function"
    return arguments


def test_required_call_is_a_valid_call_with_any_adapters(oai):
    for model, temperature in (("lora", 0), ("oft+lora", 1.0), ("oft", 0.7)):
        chat = oai.chat.completions.create(
            model=model,
            messages=ASK,
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=False,
            max_tokens=200,
            temperature=temperature,
            seed=5,
        )
        choice = chat.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert len(choice.message.tool_calls) == 1 and choice.message.content is None
        _check(choice.message.tool_calls[0])


def test_parallel_calls_end_where_the_model_ends_them(oai, server):
    """With parallel calls the grammar takes one call or more and allows the end after each: a model that ends as
    soon as it may (EOS pushed up by logit_bias, still masked inside a call) makes one valid call."""
    eos = str(server.state.tokenizer.eos_token_id)
    for seed in range(3):
        choice = oai.chat.completions.create(
            model="oft",
            messages=ASK,
            tools=TOOLS,
            tool_choice="required",
            max_tokens=200,
            temperature=1,
            seed=seed,
            logit_bias={eos: 100},
        ).choices[0]
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
        _check(choice.message.tool_calls[0])


def test_named_call_streamed_as_openai_streams_calls(oai):
    kwargs = dict(
        model="lora",
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=200,
        temperature=0,
    )
    plain = oai.chat.completions.create(**kwargs).choices[0]
    assert plain.finish_reason == "tool_calls" and plain.message.tool_calls[0].function.name == "get_time"
    _check(plain.message.tool_calls[0])
    chunks = list(oai.chat.completions.create(**kwargs, stream=True))
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or ()]
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == "get_time" and deltas[0].index == 0
    arguments = [d.function.arguments for d in deltas[1:]]
    assert len(arguments) > 1 and "".join(arguments) == plain.message.tool_calls[0].function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)


def test_auto_reads_calls_from_text_in_the_template_format(oai, server):
    """The model's text is forced (guided_regex) to a call in the template's format, or to one of an unknown
    function: auto finds the first, and leaves the second as content."""
    fmt = call_format(server.state.tokenizer)
    call = {"name": "get_weather", "arguments" if fmt == "hermes" else "parameters": {"city": "Rome", "days": 3}}
    unknown = {**call, "name": "launch"}
    for value, expect_call in ((call, True), (unknown, False)):
        text = json.dumps(value)
        text = f"Sure. <tool_call>\n{text}\n</tool_call>" if fmt == "hermes" else text
        for stream in (False, True):
            chat = oai.chat.completions.create(
                model="oft",
                messages=ASK,
                tools=TOOLS,
                max_tokens=200,
                temperature=0,
                extra_body={"guided_choice": [text]},
                stream=stream,
            )
            content, calls, finish = _collect(chat, stream)
            if expect_call:
                assert finish == "tool_calls" and [c["name"] for c in calls] == ["get_weather"]
                assert json.loads(calls[0]["arguments"]) == {"city": "Rome", "days": 3}
                assert content == ("Sure. " if fmt == "hermes" else None)
            else:
                assert finish == "stop" and not calls and content == text


def _collect(chat, stream: bool):
    if not stream:
        message = chat.choices[0].message
        calls = [{"name": c.function.name, "arguments": c.function.arguments} for c in message.tool_calls or ()]
        return message.content, calls, chat.choices[0].finish_reason
    content, calls, finish = "", [], None
    for chunk in chat:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for d in delta.tool_calls or ():
            if d.id:
                calls.append({"name": d.function.name, "arguments": ""})
            calls[d.index]["arguments"] += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return content or None, calls, finish


def test_two_turns_send_the_tool_result_back_through_the_template(oai, server):
    first = oai.chat.completions.create(
        model="lora",
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=200,
        temperature=0,
    )
    calls = first.choices[0].message.tool_calls
    assert calls
    messages = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in calls]},
        *({"role": "tool", "tool_call_id": c.id, "content": json.dumps({"forecast": "sunny"})} for c in calls),
    ]
    second = oai.chat.completions.create(model="lora", messages=messages, tools=TOOLS, max_tokens=8, temperature=0)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    tokenizer = server.state.tokenizer
    if tokenizer.chat_template:
        rendered = tokenizer.apply_chat_template(
            [
                *ASK,
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {
                            "id": c.id,
                            "type": "function",
                            "function": {"name": c.function.name, "arguments": json.loads(c.function.arguments)},
                        }
                        for c in calls
                    ],
                },
                *({"role": "tool", "tool_call_id": c.id, "content": json.dumps({"forecast": "sunny"})} for c in calls),
            ],
            tools=TOOLS,
            tokenize=False,
            add_generation_prompt=True,
        )
        assert '{"forecast": "sunny"}' in rendered and "get_weather" in rendered
        assert second.usage.prompt_tokens == len(tokenizer.encode(rendered, add_special_tokens=False))
    else:
        assert second.usage.prompt_tokens > first.usage.prompt_tokens + 20


def test_tool_choice_none_and_errors(oai):
    free = oai.chat.completions.create(
        model="lora", messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=6, temperature=0
    )
    assert free.choices[0].message.tool_calls is None and free.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.UnprocessableEntityError) as missing:
        oai.chat.completions.create(
            model="lora",
            messages=ASK,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )
    assert "nope" in missing.value.body["message"]
    with pytest.raises(openai.UnprocessableEntityError):
        oai.chat.completions.create(model="lora", messages=ASK, tool_choice="required")


# --- reading calls, without a server


@pytest.mark.parametrize(
    ("fmt", "text", "content", "names"),
    [
        ("hermes", 'Hi <tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>', "Hi ", ["f"]),
        (
            "hermes",
            '<tool_call>{"name": "f", "arguments": {}}</tool_call>\n'
            '<tool_call>{"name": "g", "arguments": {}}</tool_call>',
            None,
            ["f", "g"],
        ),
        (
            "hermes",
            '<tool_call>{"name": "zz", "arguments": {}}</tool_call>',
            '<tool_call>{"name": "zz", "arguments": {}}</tool_call>',
            [],
        ),
        (
            "hermes",
            '<tool_call>{"name": "f", "arguments": 3}</tool_call>',
            '<tool_call>{"name": "f", "arguments": 3}</tool_call>',
            [],
        ),
        (  # a name that is not a string (a model may write any JSON value) is no call, and no error
            "hermes",
            '<tool_call>{"name": ["f"], "arguments": {}}</tool_call>',
            '<tool_call>{"name": ["f"], "arguments": {}}</tool_call>',
            [],
        ),
        ("llama3", '{"name": {"f": 1}, "parameters": {}}', '{"name": {"f": 1}, "parameters": {}}', []),
        ("hermes", 'a <tool_call>{"name": "f"', 'a <tool_call>{"name": "f"', []),
        ("hermes", "a < b <tool_ c", "a < b <tool_ c", []),
        ("llama3", '{"name": "f", "parameters": {"x": "y"}}', None, ["f"]),
        ("llama3", '{"name": "f", "parameters": {}}; {"name": "g", "parameters": {}}', None, ["f", "g"]),
        ("llama3", '{"name": "f", "parameters": {}} trailing', '{"name": "f", "parameters": {}} trailing', []),
        ("llama3", "The answer is {x}", "The answer is {x}", []),
    ],
)
def test_call_reader_streamed_in_any_pieces_equals_whole(fmt, text, content, names):
    for size in (len(text), 1, 3, 7):
        reader, pieces = CallReader(fmt, ["f", "g"]), []
        for at in range(0, len(text), size):
            pieces += reader.feed(text[at : at + size])
        pieces += reader.finish()
        found, calls = assemble(pieces)
        assert (found or None) == content, (size, pieces)
        assert [c["name"] for c in calls] == names
        assert all(json.loads(c["arguments"]) is not None for c in calls)


def test_call_reader_not_parallel_keeps_the_second_call_as_content():
    reader = CallReader("hermes", ["f"], parallel=False)
    two = '<tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>{"name": "f", "arguments": {}}</tool_call>'
    pieces = reader.feed(two) + reader.finish()
    assert [type(p).__name__ for p in pieces] == ["CallStart", "CallArguments", "str"]


F_ARGUMENTS = '{"a": "}\\"{", "b": [1, {"c": 2}]}'  # braces and an escaped quote inside a string


@pytest.mark.parametrize(
    ("fmt", "text"),
    [
        (
            "hermes",
            f'<tool_call>\n{{"name": "f", "arguments": {F_ARGUMENTS}}}\n</tool_call>\n'
            '<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>',
        ),
        ("llama3", f'{{"name": "f", "parameters": {F_ARGUMENTS}}}; {{"name": "g", "parameters": {{}}}}'),
    ],
)
def test_constrained_calls_stream_their_arguments_as_written(fmt, text):
    """A required call's text, as its grammar writes it, read in pieces of any size: each call starts once its name
    is complete and its arguments come as they are written, adding up to exactly the model's text."""
    assert json.loads(F_ARGUMENTS) == {"a": '}"{', "b": [1, {"c": 2}]}
    for size in (len(text), 1, 2, 5):
        reader, pieces = ConstrainedCallReader(fmt), []
        for at in range(0, len(text), size):
            pieces += reader.feed(text[at : at + size])
        content, calls = assemble(pieces + reader.finish())
        assert content == "" and [(c["name"], c["arguments"]) for c in calls] == [("f", F_ARGUMENTS), ("g", "{}")]
        if size == 1:
            assert sum(1 for p in pieces if type(p).__name__ == "CallArguments") > len(F_ARGUMENTS) // 2


def test_an_auto_call_whose_arguments_break_the_schema_stays_content():
    """`auto` reads calls from free text: a call of a listed function whose arguments its parameters schema refuses
    is text, as a call of an unknown function is; a valid one is a call."""
    schema = {"type": "object", "properties": {"city": {"enum": ["Paris"]}}, "required": ["city"]}
    reader = CallReader("hermes", ["f"], schemas={"f": schema})
    bad = '<tool_call>{"name": "f", "arguments": {"city": "Rome"}}</tool_call>'
    good = '<tool_call>{"name": "f", "arguments": {"city": "Paris"}}</tool_call>'
    content, calls = assemble(reader.feed(bad + " " + good) + reader.finish())
    assert content == bad + " " and [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("f", {"city": "Paris"})
    ]


def test_mistral_calls_are_read_from_their_array_with_or_without_the_marker():
    """Mistral writes `[TOOL_CALLS] [{"name": ..., "arguments": ...}, ...]`; [TOOL_CALLS] is a special token, so
    the text holds only the array. Both readers, in pieces of any size; ids as its templates take them."""
    text = f' [{{"name": "f", "arguments": {F_ARGUMENTS}}}, {{"name": "g", "arguments": {{}}}}]'
    for reader_of in (lambda: CallReader("mistral", ["f", "g"]), lambda: ConstrainedCallReader("mistral")):
        for size in (len(text), 1, 4):
            reader, pieces = reader_of(), []
            for at in range(0, len(text), size):
                pieces += reader.feed(text[at : at + size])
            content, calls = assemble(pieces + reader.finish())
            assert content == "" and [(c["name"], c["arguments"]) for c in calls] == [("f", F_ARGUMENTS), ("g", "{}")]
            assert all(re.fullmatch("[0-9a-f]{9}", c["id"]) for c in calls)
    marked = CallReader("mistral", ["f"])
    assert assemble(marked.feed('[TOOL_CALLS] [{"name": "f", "arguments": {}}]') + marked.finish())[1]
    for plain in ("[1, 2]", "hello [x]", '[{"name": "h", "arguments": {}}]'):
        reader = CallReader("mistral", ["f"])
        assert assemble(reader.feed(plain) + reader.finish()) == (plain, [])
