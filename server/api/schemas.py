"""Request and response bodies of the native API: TGI's and LoRAX's /generate, /generate_stream, /info, /tokenize."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.adapters.merges import Merge, uses_density, uses_sign
from server.api.structured import ResponseFormat, TgiGrammar
from server.engine.constraints import GrammarSpec
from server.errors import ValidationError

MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 256
MAX_TOP_N_TOKENS = 5

# TGI/LoRAX options this server does not implement, with the only values it accepts for them.
_UNIMPLEMENTED_DEFAULTS = {
    "best_of": (None, 1),
    "typical_p": (None, 1.0),
    "truncate": (None,),
    "watermark": (None, False),
}


class AdapterRef(BaseModel):
    """An adapter with a weight: its effect scaled by `weight` (README, "Weighted mixes"); a bare name means 1."""

    model_config = ConfigDict(extra="forbid")

    name: str
    weight: float = Field(1.0, description="finite, from -10 to 10; 0 leaves the adapter out")


AdapterList = list[str | AdapterRef]


def adapter_pairs(entries: AdapterList | None) -> list[tuple[str, float]] | None:
    """(name, weight) pairs of a request's adapter list, as Combination.parse takes them."""
    if entries is None:
        return None
    return [(e, 1.0) if isinstance(e, str) else (e.name, e.weight) for e in entries]


class MergedAdapters(BaseModel):
    """LoRAX's merged_adapters. `linear` (or none): the weighted mix of the adapters, each delta times its weight
    (any types and ranks; README, "Weighted mixes"). Any other strategy of PEFT's `add_weighted_adapter` (LoRAX's
    ties, dare_linear, dare_ties; also cat, svd, magnitude_prune and the *_svd ones): one merged LoRA adapter,
    computed once and cached (server/adapters/merges.py)."""

    ids: list[str] = Field(min_length=1)
    weights: list[float] | None = Field(None, description="one per id; default: all 1")
    merge_strategy: str | None = Field(None, description="linear (the weighted mix), ties, dare_linear, dare_ties, ...")
    density: float | None = Field(None, description="the fraction kept: ties, dare_*, magnitude_prune (else ignored)")
    majority_sign_method: str | None = Field(None, description="total (default) or frequency: ties, dare_ties")

    @model_validator(mode="after")
    def _valid(self) -> MergedAdapters:
        if self.weights is not None and len(self.weights) != len(self.ids):
            raise ValueError(f"merged_adapters: {len(self.ids)} ids and {len(self.weights)} weights")
        if self.merge_strategy in (None, "linear"):
            return self
        try:
            self.merge()
        except ValidationError as exc:
            raise ValueError(f"merged_adapters: {exc.message}") from None
        return self

    def merge(self) -> Merge:
        weights = self.weights or [1.0] * len(self.ids)
        pairs = list(zip(self.ids, weights, strict=True))
        strategy = self.merge_strategy
        density = self.density if uses_density(strategy) else None  # LoRAX clients always send one
        sign = self.majority_sign_method if uses_sign(strategy) else None
        return Merge.of(strategy, pairs, density, sign)

    def pairs(self) -> list[tuple[str, float]]:
        """(name, weight) pairs, as Combination.parse takes them: the adapters, or the one merged adapter."""
        if self.merge_strategy in (None, "linear"):
            return list(zip(self.ids, self.weights or [1.0] * len(self.ids), strict=True))
        return [(self.merge().name, 1.0)]


class GenerateParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapters: AdapterList | None = Field(None, description="the combination; same as the top-level `adapters`")
    adapter_id: str | None = Field(
        None, description="TGI/LoRAX style: one adapter name, or several joined by '+' (weights as 'a@0.5+b')"
    )
    merged_adapters: MergedAdapters | None = Field(
        None, description="LoRAX style: the weighted mix of ids (linear), or their merge (ties, dare_*, ...)"
    )
    adapter_source: str | None = Field(
        None,
        description="LoRAX's: local, s3 or hub; when given, it must be where the adapters come from (the server's"
        " configuration decides that: a client cannot name a bucket or URL), else 422",
    )
    api_token: str | None = Field(None, description="accepted for LoRAX clients; unused")
    max_new_tokens: int | None = Field(None, ge=1, description="default: 100, capped by the server's limit")
    do_sample: bool | None = False
    temperature: float | None = Field(None, gt=0)
    top_k: int | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: list[str] | None = Field(None, max_length=MAX_STOP_SEQUENCES)
    ignore_eos_token: bool | None = Field(False, description="generate max_new_tokens even past end-of-sequence")
    return_full_text: bool | None = False
    details: bool | None = False
    decoder_input_details: bool | None = Field(False, description="with details: the prompt tokens' logprobs")
    top_n_tokens: int | None = Field(None, ge=0, le=MAX_TOP_N_TOKENS, description="alternatives per token")
    return_k_alternatives: int | None = Field(None, ge=0, le=MAX_TOP_N_TOKENS, description="LoRAX: as top_n_tokens")
    best_of: int | None = None
    typical_p: float | None = None
    truncate: int | None = None
    watermark: bool | None = None
    grammar: TgiGrammar | None = Field(None, description="TGI: {'type': 'json' | 'regex', 'value': ...}")
    response_format: ResponseFormat | None = Field(None, description="LoRAX: {'type': 'json_object', 'schema': ...}")

    @model_validator(mode="after")
    def _implemented(self) -> GenerateParameters:
        unsupported = [
            f"{name}={getattr(self, name)!r}"
            for name, allowed in _UNIMPLEMENTED_DEFAULTS.items()
            if getattr(self, name) not in allowed
        ]
        if unsupported:
            raise ValueError(f"not supported by this server: {', '.join(unsupported)}")
        if any(not s for s in self.stop or ()):
            raise ValueError("stop sequences must not be empty")
        if self.grammar is not None and self.response_format is not None:
            raise ValueError("grammar and response_format: at most one constraint per request")
        self.grammar_spec()  # raises for a malformed one
        return self

    def grammar_spec(self) -> GrammarSpec | None:
        if self.grammar is not None:
            return self.grammar.spec()
        return self.response_format.spec() if self.response_format is not None else None

    @property
    def alternatives(self) -> int:
        return self.top_n_tokens or self.return_k_alternatives or 0


class GenerateRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "inputs": "Hello",
                    "adapters": ["digits", {"name": "excited", "weight": 0.5}],
                    "parameters": {"max_new_tokens": 20, "details": True},
                }
            ]
        },
    )

    inputs: str = Field(min_length=1)
    adapters: AdapterList | None = Field(
        None,
        description="the combination: names, or {'name', 'weight'} objects (a bare name: weight 1); empty or absent:"
        " the base model",
    )
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool | None = Field(False, description="at POST /: answer as /generate_stream does")


class Token(BaseModel):
    id: int
    text: str
    logprob: float
    special: bool


class InputToken(BaseModel):
    id: int
    text: str
    logprob: float | None = Field(description="null for the first token")


class Details(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    prompt_tokens: int
    seed: int | None
    prefill: list[InputToken] = Field(default_factory=list, description="with decoder_input_details")
    tokens: list[Token]
    top_tokens: list[list[Token]] | None = Field(None, description="with top_n_tokens")
    adapters: list[str] = Field(
        description="the adapters applied, in canonical composition order: 'name', or 'name@weight' when not 1"
    )


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None


class StreamDetails(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    input_length: int
    prompt_tokens: int
    seed: int | None


class StreamResponse(BaseModel):
    """One server-sent event of /generate_stream: a token; the last one also carries the text and details."""

    index: int
    token: Token
    top_tokens: list[Token] | None = None
    generated_text: str | None = None
    details: StreamDetails | None = None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"inputs": "Hello world"}]})

    inputs: str
    add_special_tokens: bool = Field(True, description="frame the text as a prompt (BOS where the model uses one)")


class TokenizedToken(BaseModel):
    id: int
    text: str
    start: int | None = Field(description="character offset in inputs; null for added special tokens")
    stop: int | None


class Info(BaseModel):
    model_id: str
    model_dtype: str
    model_quantization: str = "none"  # the base's Linear layers: none, bnb-nf4, bnb-fp4, bnb-int8, int8-weight-only
    model_device_type: str
    model_pipeline_tag: str = "text-generation"
    max_concurrent_requests: int
    max_best_of: int = 1
    max_stop_sequences: int = MAX_STOP_SEQUENCES
    max_input_tokens: int
    max_total_tokens: int | None
    max_new_tokens: int
    max_batch_size: int
    max_adapters_per_request: int
    adapters_loaded: int
    adapters_available: int
    router: str = "mixserve"
    version: str


class ErrorResponse(BaseModel):
    error: str
    error_type: str
