"""Structured output at the edge: the request fields of each API that constrain the output, read into one
GrammarSpec, and compiled off the event loop (cached) before the request is queued.

OpenAI: `response_format` (`json_object`, `json_schema`); vLLM's `guided_json`, `guided_regex`, `guided_choice`,
`guided_grammar` (Lark) and `structured_outputs`. TGI: `parameters.grammar` (`json`, `json_schema`, `regex`);
LoRAX: `parameters.response_format` (`json_object` with an optional `schema`, or OpenAI's form).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.engine.constraints import Grammar, GrammarError, GrammarSpec, TokenizerUnsupported
from server.errors import ValidationError


class JsonSchemaFormat(BaseModel):
    name: str | None = Field(None, description="accepted; unused")
    description: str | None = None
    schema_: dict | bool | None = Field(None, alias="schema", description="the JSON schema; absent: any object")
    strict: bool | None = Field(None, description="accepted; the schema is always enforced")

    model_config = ConfigDict(populate_by_name=True)


class ResponseFormat(BaseModel):
    """OpenAI's response_format; LoRAX's form `{"type": "json_object", "schema": {...}}` too."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None
    schema_: dict | bool | None = Field(None, alias="schema", description="LoRAX: the schema of a json_object")

    model_config = ConfigDict(populate_by_name=True)

    def spec(self) -> GrammarSpec | None:
        if self.type == "text":
            return None
        if self.type == "json_schema":
            if self.json_schema is None:
                raise ValueError("response_format: json_schema needs its 'json_schema' object")
            return _schema(self.json_schema.schema_)
        return _schema(self.schema_)


class TgiGrammar(BaseModel):
    """TGI's parameters.grammar."""

    type: Literal["json", "json_schema", "regex"]
    value: Any = Field(description="json: a JSON schema (object or text); json_schema: {name, schema}; regex: text")

    def spec(self) -> GrammarSpec:
        if self.type == "regex":
            if not isinstance(self.value, str):
                raise ValueError("grammar: a regex value is a string")
            return GrammarSpec("regex", self.value)
        value = _json_value(self.value, "grammar.value")
        if self.type == "json_schema":
            if not isinstance(value, dict) or "schema" not in value:
                raise ValueError("grammar: a json_schema value is {'name', 'schema'}")
            value = value["schema"]
        return _schema(value)


class StructuredOutputs(BaseModel):
    """vLLM's structured_outputs: exactly one of its fields."""

    model_config = ConfigDict(extra="forbid")

    json_: Any = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = Field(None, description="a Lark grammar")


class GuidedFields(BaseModel):
    """vLLM's extra fields, shared by /v1/completions and /v1/chat/completions."""

    response_format: ResponseFormat | None = None
    guided_json: Any = Field(None, description="vLLM: a JSON schema (object or text)")
    guided_regex: str | None = Field(None, description="vLLM: a regular expression")
    guided_choice: list[str] | None = Field(None, description="vLLM: the output is one of these strings")
    guided_grammar: str | None = Field(None, description="vLLM: a Lark grammar")
    structured_outputs: StructuredOutputs | None = Field(None, description="vLLM: json, regex, choice or grammar")
    logprobs_mode: Literal["raw_logprobs", "processed_logprobs"] = Field(
        "raw_logprobs",
        description="vLLM's: logprobs of the model's own distribution (raw), or, for a constrained request, of the"
        " distribution its constraint leaves (processed: the allowed tokens' renormalised)",
    )

    @model_validator(mode="after")
    def _one_constraint(self):
        self.grammar_spec()  # raises for several constraints or a malformed one
        return self

    def grammar_spec(self) -> GrammarSpec | None:
        """The one constraint these fields ask for; ValueError when several are given or one is malformed."""
        outputs = self.structured_outputs
        given = {
            "response_format": self.response_format.spec() if self.response_format else None,
            "guided_json": _schema(_json_value(self.guided_json, "guided_json"))
            if self.guided_json is not None
            else None,
            "guided_regex": GrammarSpec("regex", self.guided_regex) if self.guided_regex is not None else None,
            "guided_choice": _choice(self.guided_choice) if self.guided_choice is not None else None,
            "guided_grammar": GrammarSpec("lark", self.guided_grammar) if self.guided_grammar is not None else None,
            "structured_outputs": _structured(outputs) if outputs is not None else None,
        }
        asked = {name: spec for name, spec in given.items() if spec is not None}
        if len(asked) > 1:
            raise ValueError(f"at most one constraint per request; given: {', '.join(asked)}")
        return next(iter(asked.values()), None)


def _structured(outputs: StructuredOutputs) -> GrammarSpec:
    specs = [
        _schema(_json_value(outputs.json_, "structured_outputs.json")) if outputs.json_ is not None else None,
        GrammarSpec("regex", outputs.regex) if outputs.regex is not None else None,
        _choice(outputs.choice) if outputs.choice is not None else None,
        GrammarSpec("lark", outputs.grammar) if outputs.grammar is not None else None,
    ]
    specs = [s for s in specs if s is not None]
    if len(specs) != 1:
        raise ValueError("structured_outputs: exactly one of json, regex, choice, grammar")
    return specs[0]


def _schema(schema) -> GrammarSpec:
    if schema is None:
        return GrammarSpec.json_schema({"type": "object"})
    if schema is False:
        raise ValueError("the JSON schema false accepts no answer")
    if not isinstance(schema, dict | bool):
        raise ValueError("a JSON schema is an object")
    return GrammarSpec.json_schema({} if schema is True else schema)


def _choice(choices: list[str]) -> GrammarSpec:
    if not choices or any(not c for c in choices):
        raise ValueError("guided_choice: a non-empty list of non-empty strings")
    return GrammarSpec.choice(choices)


def _json_value(value, where: str):
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not JSON: {exc}") from exc
    return value


async def compile_grammar(state, spec: GrammarSpec | None) -> Grammar | None:
    """The compiled grammar, from the cache or compiled in a worker thread (never on the event loop nor the
    engine's thread); a grammar that does not compile is a 422 with the reason."""
    if spec is None:
        return None
    grammars = state.grammars
    try:
        return grammars.cached(spec) or await asyncio.to_thread(grammars.compile, spec)
    except TokenizerUnsupported as exc:
        raise ValidationError(str(exc)) from exc
    except GrammarError as exc:
        raise ValidationError(f"the output constraint ({spec.kind}) does not compile: {exc}") from exc
