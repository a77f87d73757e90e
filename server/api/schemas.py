"""Request and response bodies of the native (TGI/LoRAX-compatible) API."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# TGI options this server does not implement, with the only values it accepts for them.
_UNIMPLEMENTED_DEFAULTS = {
    "best_of": (None, 1),
    "typical_p": (None, 1.0),
    "truncate": (None,),
    "watermark": (None, False),
    "top_n_tokens": (None, 0),
    "frequency_penalty": (None, 0.0),
    "grammar": (None,),
    "decoder_input_details": (None, False),
}


class GenerateParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapters: list[str] | None = Field(None, description="adapter names; same as the top-level `adapters`")
    adapter_id: str | None = Field(None, description="LoRAX/TGI style: one adapter name, or several joined by '+'")
    adapter_source: str | None = Field(None, description="accepted for LoRAX clients; the store is the source")
    api_token: str | None = Field(None, description="accepted for LoRAX clients; unused")
    max_new_tokens: int | None = Field(None, ge=1, description="default: 100, capped by the server's limit")
    do_sample: bool = False
    temperature: float | None = Field(None, gt=0)
    top_k: int | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: list[str] = Field(default_factory=list, max_length=4)
    return_full_text: bool = False
    details: bool = False
    best_of: int | None = None
    typical_p: float | None = None
    truncate: int | None = None
    watermark: bool | None = None
    top_n_tokens: int | None = None
    frequency_penalty: float | None = None
    grammar: dict | None = None
    decoder_input_details: bool | None = None

    @model_validator(mode="after")
    def _implemented(self) -> GenerateParameters:
        unsupported = [
            f"{name}={getattr(self, name)!r}"
            for name, allowed in _UNIMPLEMENTED_DEFAULTS.items()
            if getattr(self, name) not in allowed
        ]
        if unsupported:
            raise ValueError(f"not supported by this server: {', '.join(unsupported)}")
        if any(not s for s in self.stop):
            raise ValueError("stop sequences must not be empty")
        return self


class GenerateRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"inputs": "The cat", "adapters": ["lora-demo", "oft-demo"], "parameters": {"max_new_tokens": 20}}
            ]
        },
    )

    inputs: str = Field(min_length=1)
    adapters: list[str] | None = Field(None, description="the combination; empty or absent: the base model")
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = Field(False, description="accepted for TGI clients; streaming is served at /generate_stream")


class Token(BaseModel):
    id: int
    text: str
    logprob: float
    special: bool


class Details(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    seed: int | None
    prefill: list[Token] = Field(default_factory=list)
    tokens: list[Token]
    adapters: list[str] = Field(description="the adapters applied, in canonical composition order")


class StreamDetails(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    seed: int | None


class StreamResponse(BaseModel):
    index: int
    token: Token
    generated_text: str | None = None
    details: StreamDetails | None = None


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class ErrorResponse(BaseModel):
    error: str
    error_type: str
