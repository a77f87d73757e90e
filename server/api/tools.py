"""Tool calls on /v1/chat/completions: the conversation with its tools as the prompt, the grammar of a required or
named call, and the calls read back from the generated text.

The format of a call is the chat template's: Hermes/Qwen's `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
(also this server's plain default, for a tokenizer without a template), Llama 3's bare JSON
`{"name": ..., "parameters": {...}}` (several separated by `;`) or Mistral's `[TOOL_CALLS] [{"name": ...,
"arguments": {...}}, ...]`, chosen by what the template holds. A required or
named call is constrained to that format with the listed functions' parameter schemas; with `auto` the text is read
as it comes and what is not a valid call of a listed function (its arguments valid against the function's parameters
schema) stays content.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

import jsonschema

from server.engine.constraints import JSON_OPTIONS, GrammarSpec

HERMES, LLAMA3, MISTRAL = "hermes", "llama3", "mistral"
OPEN, CLOSE = "<tool_call>", "</tool_call>"
MISTRAL_CALLS = "[TOOL_CALLS]"


def call_format(tokenizer) -> str:
    """The template's way of writing a call: Mistral's `[TOOL_CALLS] [...]` where the template writes that token,
    Llama 3's JSON where it speaks of ipython/python_tag, else Hermes/Qwen tags."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):
        template = " ".join(template.values())
    if MISTRAL_CALLS in template:
        return MISTRAL
    return LLAMA3 if ("<|python_tag|>" in template or "ipython" in template) else HERMES


def arguments_key(fmt: str) -> str:
    return "parameters" if fmt == LLAMA3 else "arguments"


def calls_marker(tokenizer) -> str:
    """How a grammar writes Mistral's `[TOOL_CALLS]`: its special token by id (a special token has no text), its
    text where it is an ordinary token, nothing where the tokenizer lacks it."""
    token = tokenizer.convert_tokens_to_ids(MISTRAL_CALLS)
    if token is None or token == tokenizer.unk_token_id:
        return ""
    return f"<[{token}]>" if token in tokenizer.all_special_ids else json.dumps(MISTRAL_CALLS)


def _call_id(fmt: str) -> str:
    """Mistral's templates take ids of 9 letters and digits only."""
    return uuid.uuid4().hex[:9] if fmt == MISTRAL else f"call_{uuid.uuid4().hex[:24]}"


def template_messages(messages) -> list[dict]:
    """The conversation as chat templates take it: assistant calls with their arguments as objects (templates
    write them with tojson), tool results with the id of their call."""
    out = []
    for m in messages:
        message: dict = {"role": m.role, "content": m.text}
        if m.tool_calls:
            message["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": _arguments_object(c.function.arguments)},
                }
                for c in m.tool_calls
            ]
        if m.tool_call_id:
            message["tool_call_id"] = m.tool_call_id
        out.append(message)
    return out


def plain_prompt(messages, tools) -> str:
    """The plain default for a tokenizer without a chat template: `<role>: <content>` per line (the tools first,
    calls in Hermes tags), then `assistant:`."""
    lines = [f"tools: {json.dumps([t.model_dump(exclude_none=True) for t in tools])}\n"] if tools else []
    for m in messages:
        calls = "".join(
            f"{OPEN}{json.dumps({'name': c.function.name, 'arguments': _arguments_object(c.function.arguments)})}"
            f"{CLOSE}"
            for c in m.tool_calls or ()
        )
        lines.append(f"{m.role}: {m.text}{calls}\n")
    return "".join(lines) + "assistant:"


def _arguments_object(arguments: str):
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


def required_grammar(tools, names: list[str], parallel: bool, fmt: str, marker: str = "") -> GrammarSpec:
    """A Lark grammar (llguidance's, with %json) of one call (or several, if parallel) of the named functions, each
    with arguments valid against its parameters schema. marker: Mistral's `[TOOL_CALLS]` (calls_marker)."""
    key = arguments_key(fmt)
    schemas = [
        {
            "type": "object",
            "properties": {"name": {"const": t.function.name}, key: t.function.parameters or {"type": "object"}},
            "required": ["name", key],
            "additionalProperties": False,
        }
        for t in tools
        if t.function.name in names
    ]
    body = {"anyOf": schemas} if len(schemas) > 1 else schemas[0]
    body = {**body, "x-guidance": JSON_OPTIONS}
    if fmt == LLAMA3:
        rules = ["call: %json " + json.dumps(body), 'start: call ("; " call)*' if parallel else "start: call"]
    elif fmt == MISTRAL:
        opening = f'{marker} " ["' if marker else '"["'
        more = '(", " call)* ' if parallel else ""
        rules = ["call: %json " + json.dumps(body), f'start: {opening} call {more}"]"']
    else:
        rules = [
            f"call: {json.dumps(OPEN + chr(10))} %json {json.dumps(body)} {json.dumps(chr(10) + CLOSE)}",
            'start: call ("\\n" call)*' if parallel else "start: call",
        ]
    return GrammarSpec("lark", "\n".join(rules))


@dataclass
class CallStart:
    """A call begins: its index in the answer, its function, its id."""

    index: int
    name: str
    id: str = field(default_factory=lambda: _call_id(HERMES))


@dataclass
class CallArguments:
    """More of a call's arguments (JSON text, as the model wrote it)."""

    index: int
    text: str


Piece = str | CallStart | CallArguments  # content, or a call's parts


def assemble(pieces: list[Piece]) -> tuple[str, list[dict]]:
    """The content and the calls ({"id", "name", "arguments"}) that pieces add up to."""
    calls: list[dict] = []
    for piece in pieces:
        if isinstance(piece, CallStart):
            calls.append({"id": piece.id, "name": piece.name, "arguments": ""})
        elif isinstance(piece, CallArguments):
            calls[piece.index]["arguments"] += piece.text
    return "".join(p for p in pieces if isinstance(p, str)), calls


class CallReader:
    """Generated text fed piece by piece (as a stream delivers it, or all at once): out come content (str) and
    calls (CallStart, then CallArguments), in order, each as soon as it is certain: a call once it is complete and
    valid, since text that is not a valid call stays content. Content that is only whitespace (around calls) is
    dropped when there were calls. Both the streamed and the plain answer read text through this, so they
    agree."""

    def __init__(self, fmt: str, names: list[str], parallel: bool = True, schemas: dict[str, dict] | None = None):
        """schemas: each function's parameters schema; a call whose arguments it refuses is no call (content)."""
        self.fmt, self.names, self.parallel = fmt, set(names), parallel
        self._validators = {name: _validator(schema) for name, schema in (schemas or {}).items()}
        self.calls = 0
        self._pending = ""
        self._held = ""  # whitespace-only content not yet sent
        self._spoke = False  # some content other than whitespace was sent
        self._bare_json: bool | None = None  # Llama 3: the answer is one JSON text (None: not yet known)

    def feed(self, text: str) -> list[Piece]:
        self._pending += text
        return self._read(final=False)

    def finish(self) -> list[Piece]:
        out = self._read(final=True)
        if self._held and not self.calls:
            out.append(self._held)
        self._held = ""
        return out

    def _read(self, final: bool) -> list[Piece]:
        out: list[Piece] = []
        if self.fmt in (LLAMA3, MISTRAL):
            self._read_bare_json(out, final)
        else:
            self._read_hermes(out, final)
        return out

    def _read_hermes(self, out: list, final: bool) -> None:
        while self._pending:
            start = self._pending.find(OPEN)
            if start < 0:
                keep = 0 if final else _could_begin(self._pending, OPEN)
                self._content(out, self._pending[: len(self._pending) - keep])
                self._pending = self._pending[len(self._pending) - keep :]
                return
            self._content(out, self._pending[:start])
            self._pending = self._pending[start:]
            end = self._pending.find(CLOSE)
            if end < 0:
                if final:  # a call never closed stays content
                    self._content(out, self._pending)
                    self._pending = ""
                return
            block, self._pending = self._pending[: end + len(CLOSE)], self._pending[end + len(CLOSE) :]
            call = self._calls([_members(block[len(OPEN) : -len(CLOSE)].strip())])
            if call is None:
                self._content(out, block)
            else:
                out.extend(call)

    def _read_bare_json(self, out: list, final: bool) -> None:
        """Llama 3: the answer is calls when it is JSON objects (separated by ';'); Mistral: when it is a JSON
        array of them (after `[TOOL_CALLS]`, which as a special token has no text)."""
        if self._bare_json is None:
            stripped = self._pending.lstrip()
            if not stripped and not final:
                return
            self._bare_json = stripped.startswith("[" if self.fmt == MISTRAL else "{")
        if not self._bare_json:
            self._content(out, self._pending)
            self._pending = ""
            return
        if not final:
            return
        calls = self._calls(_array(self._pending) if self.fmt == MISTRAL else _objects(self._pending))
        if calls is None:
            self._content(out, self._pending)
        else:
            out.extend(calls)
        self._pending = ""

    def _calls(self, objects: list[dict[str, tuple[object, str]] | None]) -> list[Piece] | None:
        """The calls these objects (their members: value and text) are, or None unless each is a call of a listed
        function with an arguments object (and one at most, when not parallel)."""
        pieces: list[Piece] = []
        for members in objects:
            name = members.get("name", (None,))[0] if members else None
            if not isinstance(name, str) or name not in self.names:  # a model may write any JSON value there
                return None
            arguments = members.get("arguments", members.get("parameters"))
            if arguments is None or not isinstance(arguments[0], dict):
                return None
            validator = self._validators.get(name)
            if validator is not None and not _valid(validator, arguments[0]):
                return None
            index = self.calls + len(pieces) // 2
            pieces += [CallStart(index, members["name"][0], _call_id(self.fmt)), CallArguments(index, arguments[1])]
        if not pieces or (not self.parallel and self.calls + len(pieces) // 2 > 1):
            return None
        self.calls += len(pieces) // 2
        return pieces

    def _content(self, out: list, text: str) -> None:
        """Content is sent as it comes, once some is more than whitespace; whitespace before that is held."""
        if self._spoke:
            if text:
                out.append(text)
            return
        self._held += text
        if self._held.strip():
            out.append(self._held)
            self._held, self._spoke = "", True


class ConstrainedCallReader:
    """The text of a required or named call, which its grammar writes in exactly one way (required_grammar):
    each call's start as soon as its name is complete, its arguments as they are written."""

    def __init__(self, fmt: str):
        key = arguments_key(fmt)
        self.fmt = fmt
        if fmt == MISTRAL:  # [TOOL_CALLS] [{...}, {...}]: the marker (a special token, no text) and '[' first
            before = f"(?:, |\\s*(?:{re.escape(MISTRAL_CALLS)})?\\s*\\[)"
        else:
            opening = re.escape(OPEN + "\n") if fmt == HERMES else ""
            separator = "\n" if fmt == HERMES else "; "
            before = f"(?:{separator})?{opening}"
        self._start = re.compile(before + f'\\{{"name": "([^"]*)", "{key}": ')
        self._end = re.compile(re.escape("}\n" + CLOSE) if fmt == HERMES else re.escape("}"))
        self.calls = 0
        self._pending = ""
        self._arguments: str | None = None  # the current call's arguments so far, while they are written

    def feed(self, text: str) -> list[Piece]:
        self._pending += text
        out: list[Piece] = []
        while True:
            if self._arguments is not None:
                text = self._arguments + self._pending
                end = _value_end(text)
                written = text[len(self._arguments) : end]
                if written:
                    out.append(CallArguments(self.calls - 1, written))
                if end is None:
                    self._arguments, self._pending = text, ""
                    return out
                self._arguments, self._pending = None, text[end:]
            closing = self._end.match(self._pending)
            self._pending = self._pending[closing.end() :] if closing else self._pending
            start = self._start.match(self._pending)
            if start is None:
                return out
            out.append(CallStart(self.calls, start.group(1), _call_id(self.fmt)))
            self.calls += 1
            self._pending, self._arguments = self._pending[start.end() :], ""

    def finish(self) -> list[Piece]:
        return []  # what is left is the end of the last call, or of a call cut short


def _validator(schema: dict):
    """A JSON schema validator for a function's parameters (None: a schema jsonschema cannot read; not checked)."""
    try:
        validator = jsonschema.validators.validator_for(schema)
        validator.check_schema(schema)
        return validator(schema)
    except jsonschema.SchemaError:
        return None


def _valid(validator, value) -> bool:
    try:
        return validator.is_valid(value)
    except Exception:  # noqa: BLE001 - a schema jsonschema fails on (an unresolvable $ref, say): not a valid call
        return False


def _members(text: str) -> dict[str, tuple[object, str]] | None:
    """A JSON object's members, each as (value, its text), or None if text is not exactly one JSON object."""
    members, end = _object_members(text, 0)
    return members if members is not None and end == len(text) else None


def _objects(text: str) -> list[dict[str, tuple[object, str]] | None]:
    """The JSON objects of text, separated by ';' (Llama 3's parallel calls); a None where one does not parse."""
    objects, at = [], 0
    while True:
        while at < len(text) and (text[at].isspace() or (objects and text[at] == ";")):
            at += 1
        if at == len(text):
            return objects
        members, at = _object_members(text, at)
        if members is None:
            return [None]
        objects.append(members)


def _array(text: str) -> list[dict[str, tuple[object, str]] | None]:
    """The JSON objects of a JSON array (Mistral's calls, after an optional `[TOOL_CALLS]`); [None] unless text is
    exactly one array of objects."""
    text = text.strip().removeprefix(MISTRAL_CALLS).strip()
    if not text.startswith("[") or not text.endswith("]"):
        return [None]
    objects, at = [], 1
    while True:
        while at < len(text) and (text[at].isspace() or (objects and text[at] == ",")):
            at += 1
        if at == len(text) - 1:
            return objects or [None]
        members, at = _object_members(text, at)
        if members is None:
            return [None]
        objects.append(members)


_DECODER = json.JSONDecoder()


def _object_members(text: str, at: int) -> tuple[dict[str, tuple[object, str]] | None, int]:
    """The members of the JSON object at text[at:], each as (value, its text), and where the object ends."""

    def skip(i: int) -> int:
        while i < len(text) and text[i].isspace():
            i += 1
        return i

    try:
        _DECODER.raw_decode(text, at)  # the whole object parses
        members, i = {}, skip(at + 1)
        while text[i] != "}":
            key, i = _DECODER.raw_decode(text, i)
            i = skip(skip(i) + 1)  # past ':'
            value, end = _DECODER.raw_decode(text, i)
            members[key], i = (value, text[i:end]), skip(end)
            i = skip(i + 1) if text[i] == "," else i
        return members, i + 1
    except (json.JSONDecodeError, IndexError, TypeError):
        return None, at


def _value_end(text: str) -> int | None:
    """Where the JSON object or array that text begins with ends, if it is complete."""
    depth, in_string, escaped = 0, False, False
    for i, char in enumerate(text):
        if in_string:
            escaped, in_string = (not escaped and char == "\\"), in_string and (escaped or char != '"')
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _could_begin(text: str, marker: str) -> int:
    """How much of text's end could begin marker."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
