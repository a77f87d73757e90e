"""Constrained output: grammars (JSON schema, regex, choice, Lark) compiled by llguidance, and the per-row token
masks the sampler applies to constrained rows only.

A `Grammar` is compiled once per (spec, tokenizer) and cached; each sequence gets its own `Constraint` (a copy of
the compiled matcher) that masks its logits and follows its tokens. The tokenizer's end-of-sequence ids are allowed
exactly where the grammar accepts; a grammar that can go no further ends the sequence.
"""

from __future__ import annotations

import collections
import json
import threading
from dataclasses import dataclass

import llguidance
import llguidance.hf
import torch

CACHE_SIZE = 256  # compiled grammars kept (most recently used)
# JSON as json.dumps writes it: one way to write each value, so a model's whitespace cannot run on forever
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class GrammarSpec:
    """What a request constrains its output to. kind: json_schema (value: the schema as canonical JSON text),
    regex, choice (value: a JSON list of strings), lark (a Lark grammar with llguidance's extensions)."""

    kind: str
    value: str  # JSON text for json_schema and choice

    @classmethod
    def json_schema(cls, schema: dict | bool) -> GrammarSpec:
        """Keys keep their order: properties are generated in the order the schema lists them."""
        return cls("json_schema", json.dumps(schema, separators=(",", ":")))

    @classmethod
    def choice(cls, choices: list[str]) -> GrammarSpec:
        return cls("choice", json.dumps(list(choices)))

    def source(self) -> str:
        """The grammar in llguidance's terms."""
        if self.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(self.value, defaults=JSON_OPTIONS)
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.value)
        if self.kind == "choice":
            return llguidance.LLMatcher.grammar_from_lark(choice_lark(json.loads(self.value)))
        if self.kind == "lark":
            return llguidance.LLMatcher.grammar_from_lark(self.value)
        raise ValueError(f"unknown grammar kind {self.kind!r}")


def choice_lark(choices: list[str]) -> str:
    """A grammar matching exactly one of the strings (Lark string literals take JSON's escapes)."""
    return "start: " + " | ".join(json.dumps(c) for c in choices)


class GrammarError(ValueError):
    """A grammar that does not compile; the message says why."""


class Grammar:
    """A compiled grammar: a matcher at its start, copied for each sequence."""

    def __init__(self, spec: GrammarSpec, matcher: llguidance.LLMatcher, vocab_size: int):
        self.spec = spec
        self._matcher = matcher
        self.vocab_size = vocab_size

    def constraint(self) -> Constraint:
        return Constraint(self._matcher.deep_copy(), self.vocab_size)


class Constraint:
    """One sequence's position in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int):
        self.matcher = matcher
        self.vocab_size = vocab_size

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Writes the allowed next tokens into bitmask[row] (int32 words, bit i of word w: token 32w+i)."""
        words = bitmask[row]
        self.matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * words.element_size())
        if self.matcher.is_error():
            raise RuntimeError(f"grammar: {_reason(self.matcher.get_error())}")

    def advance(self, token: int) -> None:
        """Follows the sampled token; raises if the grammar does not allow it (the row fails, never others)."""
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"grammar: token {token} not allowed: {_reason(self.matcher.get_error())}")

    @property
    def finished(self) -> bool:
        """Nothing may follow but the end of the sequence."""
        return self.matcher.is_stopped()


def mask_constrained(rows: list, logits: torch.Tensor) -> dict[int, torch.Tensor | Exception]:
    """Logits [1, vocab] of each constrained row (by row index) with the tokens its grammar forbids at -inf, or the
    error that row's grammar met; other rows are not touched (nor copied). rows: Sequences, with `constraint`."""
    constrained = [(row, seq.constraint) for row, seq in enumerate(rows) if seq.constraint is not None]
    if not constrained:
        return {}
    vocab = logits.shape[-1]  # the grammars' vocabulary may be the model's, larger (sampling stops at the tokenizer's)
    words = (max(vocab, *(c.vocab_size for _, c in constrained)) + 31) // 32
    bitmask = torch.full((len(constrained), words), -1, dtype=torch.int32)
    failed: dict[int, Exception] = {}
    for i, (row, constraint) in enumerate(constrained):
        try:
            constraint.fill(bitmask, i)
        except Exception as exc:  # noqa: BLE001 - this row's grammar failed: handed to the caller for this row
            failed[row] = exc
    masked = logits[[row for row, _ in constrained]]  # [n, vocab], a copy
    masked.masked_fill_(~allowed(bitmask.to(masked.device), vocab), -torch.inf)
    return {row: failed.get(row, masked[i : i + 1]) for i, (row, _) in enumerate(constrained)}


def allowed(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """bitmask [n, words] int32 -> [n, vocab] bool, on bitmask's device. Read as bytes (little-endian, as on x86
    and ARM): token 8b+i is bit i of byte b."""
    data = bitmask.contiguous().view(torch.uint8)  # [n, 4 * words]
    bits = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=data.device)
    return (data[:, :, None] & bits).ne(0).reshape(bitmask.shape[0], -1)[:, :vocab]


class Grammars:
    """Compiles grammars for one tokenizer, caches them by spec; safe to call from any thread (compiling
    releases the GIL). The tokenizer's vocabulary is read once, at the first compile."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: frozenset[int]):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_ids = sorted(eos_ids)
        self._lltokenizer: llguidance.LLTokenizer | None = None
        self._cache: collections.OrderedDict[GrammarSpec, Grammar] = collections.OrderedDict()
        self._lock = threading.Lock()  # the cache's: `cached` is called on the event loop
        self._tokenizer_lock = threading.Lock()  # held while the vocabulary is read (seconds)

    def cached(self, spec: GrammarSpec) -> Grammar | None:
        with self._lock:
            grammar = self._cache.get(spec)
            if grammar is not None:
                self._cache.move_to_end(spec)
            return grammar

    def compile(self, spec: GrammarSpec) -> Grammar:
        """The compiled grammar (cached); raises GrammarError with the reason when it does not compile."""
        grammar = self.cached(spec)
        if grammar is not None:
            return grammar
        try:
            source = spec.source()
        except ValueError as exc:
            raise GrammarError(str(exc)) from exc
        matcher = llguidance.LLMatcher(self.lltokenizer(), source, log_level=0)
        if matcher.is_error():
            raise GrammarError(_reason(matcher.get_error()))
        grammar = Grammar(spec, matcher, self.vocab_size)
        with self._lock:
            self._cache[spec] = grammar
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return grammar

    def lltokenizer(self) -> llguidance.LLTokenizer:
        with self._tokenizer_lock:
            if self._lltokenizer is None:
                self._lltokenizer = _lltokenizer(self.tokenizer, self.vocab_size, self.eos_ids)
            return self._lltokenizer


def _lltokenizer(tokenizer, vocab_size: int, eos_ids: list[int]) -> llguidance.LLTokenizer:
    """llguidance's view of the tokenizer: a fast tokenizer through its own JSON, the byte tokenizer (ByT5) by its
    byte table; another kind cannot be constrained."""
    from transformers import ByT5Tokenizer, PreTrainedTokenizerFast

    if isinstance(tokenizer, PreTrainedTokenizerFast):
        return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos_ids)
    if isinstance(tokenizer, ByT5Tokenizer):
        wrapper = llguidance.TokenizerWrapper(_ByteTokens(tokenizer, eos_ids, vocab_size))
        return llguidance.LLTokenizer(wrapper, n_vocab=vocab_size, eos_token=eos_ids)
    raise GrammarError(
        f"constrained output needs a fast tokenizer or the byte tokenizer; this is {type(tokenizer).__name__}"
    )


class _ByteTokens:
    """ByT5's vocabulary for llguidance: ids offset..offset+255 are the bytes, the rest (up to the model's vocabulary
    size) special."""

    def __init__(self, tokenizer, eos_ids: list[int], vocab_size: int):
        self.offset = tokenizer.offset
        self.eos_token_id = eos_ids[0]
        self.bos_token_id = None
        n = max(len(tokenizer), vocab_size)
        byte_ids = range(self.offset, self.offset + 256)
        self.tokens = [bytes([i - self.offset]) if i in byte_ids else b"\xff<special_%d>" % i for i in range(n)]
        self.special_token_ids = [i for i in range(n) if i not in byte_ids]

    def __call__(self, text: bytes | str) -> list[int]:
        data = text if isinstance(text, bytes) else text.encode()
        return [b + self.offset for b in data]


def _reason(message: str, limit: int = 400) -> str:
    """llguidance's error on one line, without the parser's state dump."""
    text = " ".join(line.strip() for line in message.split("<state>")[0].splitlines() if line.strip())
    return (text[:limit] + "...") if len(text) > limit else text or "unknown error"
