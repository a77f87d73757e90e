"""vLLM's tokenizer routes, which lm-evaluation-harness's API clients use to tokenize through the server itself (its
`remote` tokenizer backend, picked when a server answers them): GET /tokenizer_info, POST /detokenize, and the
`{"prompt"}` form of POST /tokenize (TGI's `{"inputs"}` form stays native.py's).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from server.api.errors import NATIVE_ERRORS
from server.api.serving import state_of
from server.errors import ValidationError
from server.model import encode_prompt

router = APIRouter(responses=NATIVE_ERRORS, tags=["Tokenizer"])


class PromptTokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"prompt": "Hello world"}]})

    prompt: str
    add_special_tokens: bool = Field(True, description="frame the text as a prompt (BOS where the model uses one)")
    return_token_strs: bool = False
    model: str | None = Field(None, description="accepted: every combination shares the base model's tokenizer")


class PromptTokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"tokens": [75, 108, 108, 114]}]})

    tokens: list[int]
    model: str | None = Field(None, description="accepted: every combination shares the base model's tokenizer")


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    """The tokenizer's configuration as its tokenizer_config.json holds it (without file paths), its class, its
    special tokens and chat template."""

    model_config = ConfigDict(extra="allow")

    tokenizer_class: str
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    unk_token: str | None
    chat_template: str | None = None


def tokenize_prompt(body: PromptTokenizeRequest, request: Request) -> PromptTokenizeResponse:
    state = state_of(request)
    tokenizer = state.tokenizer
    if body.add_special_tokens:
        ids = encode_prompt(tokenizer, body.prompt)
    else:
        ids = tokenizer.encode(body.prompt, add_special_tokens=False)
    return PromptTokenizeResponse(
        count=len(ids),
        max_model_len=state.max_total_tokens,
        tokens=ids,
        token_strs=tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None,
    )


@router.post("/detokenize", response_model=DetokenizeResponse, summary="The text of token ids (vLLM's route)")
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    state = state_of(request)
    vocab = state.engine.tokenizer_ids
    if any(not 0 <= token < vocab for token in body.tokens):
        raise ValidationError(f"tokens: ids outside the tokenizer's vocabulary (0..{vocab - 1})")
    return DetokenizeResponse(prompt=state.tokenizer.decode(body.tokens))


@router.get("/tokenizer_info", response_model=TokenizerInfo, summary="The tokenizer's configuration (vLLM's route)")
async def tokenizer_info(request: Request) -> TokenizerInfo:
    tokenizer = state_of(request).tokenizer
    kwargs = getattr(tokenizer, "init_kwargs", None) or {}
    config = {k: _plain(v) for k, v in kwargs.items() if not _path(k)}
    for name in ("bos", "eos", "pad", "unk"):
        config[f"{name}_token"] = getattr(tokenizer, f"{name}_token", None)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one
        template = template.get("default")
    return TokenizerInfo(**{**config, "tokenizer_class": type(tokenizer).__name__, "chat_template": template})


def _path(key: str) -> bool:
    """Whether a configuration key names where the server keeps files (vocab_file, name_or_path, ...)."""
    return key.endswith("_file") or key.endswith("name_or_path")


def _plain(value):
    """A configuration value as JSON holds it: added tokens by their text, anything else unknown by its repr."""
    if hasattr(value, "content"):
        return value.content
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)
