"""Tool calls on /v1/chat/completions: the conversation with its tools as the prompt, the grammar of a required or
named call, and the calls read back from the generated text.

The format of a call is the chat template's: Hermes/Qwen's `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
(also this server's plain default, for a tokenizer without a template) or Llama 3's bare JSON
`{"name": ..., "parameters": {...}}` (several separated by `;`), chosen by what the template holds. A required or
named call is constrained to that format with the listed functions' parameter schemas; with `auto` the text is read
as it comes and what is not a valid call of a listed function stays content.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from server.engine.constraints import JSON_OPTIONS, GrammarSpec

HERMES, LLAMA3 = "hermes", "llama3"
OPEN, CLOSE = "<tool_call>", "</tool_call>"


def call_format(tokenizer) -> str:
    """The template's way of writing a call: Llama 3's JSON where the template speaks of ipython/python_tag,
    else Hermes/Qwen tags."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):
        template = " ".join(template.values())
    return LLAMA3 if ("<|python_tag|>" in template or "ipython" in template) else HERMES


def arguments_key(fmt: str) -> str:
    return "parameters" if fmt == LLAMA3 else "arguments"


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


def required_grammar(tools, names: list[str], parallel: bool, fmt: str) -> GrammarSpec:
    """A Lark grammar (llguidance's, with %json) of one call (or several, if parallel) of the named functions, each
    with arguments valid against its parameters schema."""
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
    else:
        rules = [
            f"call: {json.dumps(OPEN + chr(10))} %json {json.dumps(body)} {json.dumps(chr(10) + CLOSE)}",
            'start: call ("\\n" call)*' if parallel else "start: call",
        ]
    return GrammarSpec("lark", "\n".join(rules))


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


class CallReader:
    """Generated text fed piece by piece (as a stream delivers it, or all at once): out come content pieces (str)
    and calls (ParsedCall), in order, each as soon as it is certain. Content that is only whitespace (around calls)
    is dropped when there were calls. Both the streamed and the plain answer read text through this, so they
    agree."""

    def __init__(self, fmt: str, names: list[str], parallel: bool = True):
        self.fmt, self.names, self.parallel = fmt, set(names), parallel
        self.calls = 0
        self._pending = ""
        self._held = ""  # whitespace-only content not yet sent
        self._spoke = False  # some content other than whitespace was sent
        self._bare_json: bool | None = None  # Llama 3: the answer is one JSON text (None: not yet known)

    def feed(self, text: str) -> list[str | ParsedCall]:
        self._pending += text
        return self._read(final=False)

    def finish(self) -> list[str | ParsedCall]:
        out = self._read(final=True)
        if self._held and not self.calls:
            out.append(self._held)
        self._held = ""
        return out

    def _read(self, final: bool) -> list[str | ParsedCall]:
        out: list[str | ParsedCall] = []
        if self.fmt == LLAMA3:
            self._read_llama3(out, final)
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
            call = self._call(block[len(OPEN) : -len(CLOSE)])
            if call is None:
                self._content(out, block)
            else:
                out.append(call)

    def _read_llama3(self, out: list, final: bool) -> None:
        if self._bare_json is None:
            stripped = self._pending.lstrip()
            if not stripped and not final:
                return
            self._bare_json = stripped.startswith("{")
        if not self._bare_json:
            self._content(out, self._pending)
            self._pending = ""
            return
        if not final:
            return
        calls = self._llama3_calls(self._pending)
        if calls is None:
            self._content(out, self._pending)
        else:
            out.extend(calls)
        self._pending = ""

    def _llama3_calls(self, text: str) -> list[ParsedCall] | None:
        """Every JSON object of text (separated by ';') as a call, or None if any is not a valid call."""
        decoder, at, calls = json.JSONDecoder(), 0, []
        while True:
            while at < len(text) and (text[at].isspace() or (calls and text[at] == ";")):
                at += 1
            if at == len(text):
                return calls or None
            try:
                value, at = decoder.raw_decode(text, at)
            except json.JSONDecodeError:
                return None
            call = self._call_of(value)
            if call is None:
                return None
            calls.append(call)

    def _call(self, text: str) -> ParsedCall | None:
        try:
            return self._call_of(json.loads(text))
        except json.JSONDecodeError:
            return None

    def _call_of(self, value) -> ParsedCall | None:
        """A call of a listed function with an arguments object, else None; past the first call when not parallel,
        None."""
        if not isinstance(value, dict) or value.get("name") not in self.names:
            return None
        arguments = value.get("arguments", value.get("parameters"))
        if not isinstance(arguments, dict) or (self.calls and not self.parallel):
            return None
        self.calls += 1
        return ParsedCall(value["name"], json.dumps(arguments, ensure_ascii=False))

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


def _could_begin(text: str, marker: str) -> int:
    """How much of text's end could begin marker."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
