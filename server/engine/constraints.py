"""Constrained output: grammars (JSON schema, regex, choice, Lark) compiled by llguidance, and the per-row token
masks the sampler applies to constrained rows only.

A `Grammar` is compiled once per (spec, tokenizer) and cached; each sequence gets its own `Constraint` (a copy of
the compiled matcher) that masks its logits and follows its tokens. The tokenizer's end-of-sequence ids are allowed
exactly where the grammar accepts; a grammar that can go no further ends the sequence.
"""

from __future__ import annotations

import collections
import json
import os
import re
import threading
from dataclasses import dataclass

import llguidance
import llguidance.hf
import numpy as np
import torch

from server.engine.output import BYTE_TOKEN
from server.errors import ValidationError
from server.model import tokenizer_ids

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


class TokenizerUnsupported(GrammarError):
    """A tokenizer whose tokens cannot be given to llguidance as bytes; the message says why."""


class ConstraintFailed(ValidationError):
    """A constrained row that cannot go on (its grammar met a limit, or needs text no token of this model writes):
    that request fails with the reason, never the others."""

    def __init__(self, reason: str):
        super().__init__(f"the output constraint cannot be followed with this model: {reason}")


class Grammar:
    """A compiled grammar: a matcher at its start, copied for each sequence."""

    def __init__(self, spec: GrammarSpec, matcher: llguidance.LLMatcher, vocab_size: int, executor):
        self.spec = spec
        self._matcher = matcher
        self.vocab_size = vocab_size
        self.executor = executor

    def constraint(self) -> Constraint:
        return Constraint(self._matcher.deep_copy(), self.vocab_size, self.executor)


class Constraint:
    """One sequence's position in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, executor: llguidance.LLExecutor | None):
        self.matcher = matcher
        self.vocab_size = vocab_size  # llguidance's: the larger of the tokenizer's and the embedding's
        self.executor = executor  # fills the masks of a batch's rows in parallel (None: in the calling thread)

    def advance(self, token: int) -> None:
        """Follows the sampled token; raises if the grammar does not allow it (the row fails, never others: the
        mask allowed it, so this is the server's fault)."""
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"grammar: token {token} not allowed: {_reason(self.matcher.get_error())}")

    @property
    def finished(self) -> bool:
        """Nothing may follow but the end of the sequence."""
        return self.matcher.is_stopped()


def mask_constrained(rows: list, logits: torch.Tensor) -> dict[int, torch.Tensor | Exception]:
    """Masks each constrained row of logits [rows, vocab] in place (the tokens its grammar forbids at -inf) and
    returns it, [1, vocab], by row index, or the error that row's grammar met; other rows are not touched. rows:
    Sequences, with `constraint`. vocab is what may be sampled: at most the tokenizer's ids and the embedding's."""
    constrained = [(row, seq.constraint) for row, seq in enumerate(rows) if seq.constraint is not None]
    if not constrained:
        return {}
    vocab = logits.shape[-1]
    bitmask = fill_masks([c for _, c in constrained], vocab)
    if len(constrained) == len(logits):
        apply_masks(logits, bitmask.to(logits.device, non_blocking=True))
    else:
        index = torch.tensor([row for row, _ in constrained], device=logits.device)
        masked = logits.index_select(0, index)  # [n, vocab]
        apply_masks(masked, bitmask.to(logits.device, non_blocking=True))
        logits.index_copy_(0, index, masked)
    failed: dict[int, Exception] = {}
    for (row, constraint), alive in zip(constrained, any_allowed(bitmask, vocab).tolist(), strict=True):
        if constraint.matcher.is_error():
            failed[row] = ConstraintFailed(_reason(constraint.matcher.get_error()))
        elif not alive:
            failed[row] = ConstraintFailed("no token this model can sample continues its grammar")
    return {row: failed.get(row, logits[row : row + 1]) for row, _ in constrained}


def any_allowed(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """[n] bool: whether bitmask [n, words] allows some token below vocab."""
    whole, rest = divmod(vocab, 32)
    alive = (bitmask[:, :whole] != 0).any(dim=1)
    if rest:
        alive |= (bitmask[:, whole] & ((1 << rest) - 1)) != 0
    return alive


def fill_masks(constraints: list[Constraint], vocab: int) -> torch.Tensor:
    """The allowed next tokens of each constraint, [n, words] int32 (bit i of word w: token 32w+i), filled by
    llguidance's threads at once (or one after the other, without an executor). A row whose grammar fails allows
    nothing (its matcher says why)."""
    words = (max(vocab, *(c.vocab_size for c in constraints)) + 31) // 32
    bitmask = torch.zeros((len(constraints), words), dtype=torch.int32)
    executor = constraints[0].executor
    if executor is None:
        for row, constraint in zip(bitmask, constraints, strict=True):
            constraint.matcher.unsafe_compute_mask_ptr(row.data_ptr(), words * 4)
    else:
        matchers = [(c.matcher, i) for i, c in enumerate(constraints)]
        executor.unsafe_compute_mask_ptr(matchers, bitmask.data_ptr(), words * 4, len(constraints))
    return bitmask


def apply_masks(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """logits [n, vocab] in place: -inf where bitmask [n, words] (on logits' device) has a 0 bit."""
    torch.where(allowed(bitmask, logits.shape[-1]), logits, logits.new_tensor(-torch.inf), out=logits)


def allowed(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """bitmask [n, words] int32 -> [n, vocab] bool, True where a token is allowed, on bitmask's device. Read as
    bytes (little-endian, as on x86 and ARM): token 8b+i is bit i of byte b."""
    data = bitmask.contiguous().view(torch.uint8)  # [n, 4 * words]
    if data.device.type == "cpu":  # numpy's unpacking: 20 times torch's shifts and masks, measured at 16 x 152k
        bits = np.unpackbits(data.numpy(), axis=1, count=vocab, bitorder="little")
        return torch.from_numpy(bits.view(np.bool_))
    bits = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=data.device)
    return (data[:, :, None] & bits).ne(0).reshape(bitmask.shape[0], -1)[:, :vocab]


class Grammars:
    """Compiles grammars for one tokenizer, caches them by spec; safe to call from any thread (compiling
    releases the GIL). The tokenizer's vocabulary is read once, at the first compile."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: frozenset[int]):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the embedding's rows
        self.eos_ids = sorted(eos_ids)
        self._lltokenizer: llguidance.LLTokenizer | TokenizerUnsupported | None = None
        self._cache: collections.OrderedDict[GrammarSpec, Grammar] = collections.OrderedDict()
        self._lock = threading.Lock()  # the cache's: `cached` is called on the event loop
        self._tokenizer_lock = threading.Lock()  # held while the vocabulary is read (seconds)
        # llguidance's threads for the masks of a step's rows, half the cores; with fewer than 4 cores none: the
        # engine's thread fills them, as handing a 16-row, 152k-token fill (0.2-0.5 ms) to another thread costs
        # more on a busy machine (measured with bench.structured's masks on 2 cores)
        threads = (os.cpu_count() or 1) // 2
        self._executor = llguidance.LLExecutor(num_threads=threads) if threads > 1 else None

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
        if problem := llguidance.LLMatcher.validate_grammar(source):  # before the tokenizer: its error is the user's
            raise GrammarError(_reason(problem))
        lltokenizer = self.lltokenizer()
        matcher = llguidance.LLMatcher(lltokenizer, source, log_level=0)
        if matcher.is_error():
            raise GrammarError(_reason(matcher.get_error()))
        grammar = Grammar(spec, matcher, lltokenizer.vocab_size, self._executor)
        with self._lock:
            self._cache[spec] = grammar
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return grammar

    def lltokenizer(self) -> llguidance.LLTokenizer:
        """Built at the first compile; a tokenizer that cannot be read raises TokenizerUnsupported, every time."""
        with self._tokenizer_lock:
            if self._lltokenizer is None:
                try:
                    self._lltokenizer = _lltokenizer(self.tokenizer, self.vocab_size, self.eos_ids)
                except Exception as exc:  # noqa: BLE001 - kept, and raised for each request that needs it
                    reason = exc.args[0] if isinstance(exc, TokenizerUnsupported) else f"{type(exc).__name__}: {exc}"
                    self._lltokenizer = TokenizerUnsupported(
                        f"this model's tokenizer ({type(self.tokenizer).__name__}) cannot be constrained: {reason}"
                    )
            if isinstance(self._lltokenizer, TokenizerUnsupported):
                raise TokenizerUnsupported(self._lltokenizer.args[0])
            return self._lltokenizer


def _lltokenizer(tokenizer, embedding_rows: int, eos_ids: list[int]) -> llguidance.LLTokenizer:
    """llguidance's view of the tokenizer, built from the bytes of each token (TokenTable), so that it reads every
    kind of tokenizer alike. Its vocabulary is the larger of the tokenizer's and the embedding's."""
    table = TokenTable.of(tokenizer, embedding_rows)
    wrapper = llguidance.TokenizerWrapper(table)
    return llguidance.LLTokenizer(wrapper, n_vocab=len(table.tokens), eos_token=eos_ids or [table.eos_token_id])


class TokenTable:
    """Each id's bytes as they appear in generated text, for llguidance (its TokenizerWrapper's fields). Special
    tokens are b"\\xff" + their name (a grammar may name them: `<|im_end|>`), never text; added tokens that are not
    special (`<tool_call>`) are their text, so a grammar that spells them lets the model write them either way; ids
    past the embedding, ids without a token and tokens whose text depends on what precedes them beyond a space
    (none of the common kinds) are unusable special entries, never allowed."""

    def __init__(self, tokens: list[bytes], special_token_ids: list[int], eos_token_id: int):
        self.tokens = tokens
        self.special_token_ids = special_token_ids
        self.eos_token_id = eos_token_id
        self.bos_token_id = None
        special = set(special_token_ids)
        self._ids = {token: i for i, token in enumerate(tokens) if i not in special and token}
        self._longest = max(map(len, self._ids), default=1)

    @classmethod
    def of(cls, tokenizer, embedding_rows: int) -> TokenTable:
        size = max(embedding_rows, tokenizer_ids(tokenizer))
        text = _texts(tokenizer, size)
        special = set(getattr(tokenizer, "all_special_ids", []))
        for i, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
            if i < size:
                text[i] = added.content.encode() if not (added.special or i in special) else None
                if added.special:
                    special.add(i)
        tokens, special_ids = [], []
        for i in range(size):
            if i in special or text[i] is None or i >= embedding_rows:
                name = tokenizer.convert_ids_to_tokens(i) if i in special and i < embedding_rows else None
                tokens.append(b"\xff" + (name.encode() if name else b"<[%d]>" % i))
                special_ids.append(i)
            else:
                tokens.append(text[i])
        eos = getattr(tokenizer, "eos_token_id", None)
        return cls(tokens, special_ids, eos if eos is not None else special_ids[0] if special_ids else 0)

    def __call__(self, text: bytes | str) -> list[int]:
        """Greedy longest match: how llguidance tokenizes text a grammar forces. Raises where no token begins the
        rest (the row fails with that reason: WordPiece, say, writes no space alone, and no "{" at the start)."""
        data = text if isinstance(text, bytes) else text.encode()
        ids, at = [], 0
        while at < len(data):
            end = next((e for e in range(min(len(data), at + self._longest), at, -1) if data[at:e] in self._ids), None)
            if end is None:
                raise ValueError(
                    f"no token of this tokenizer begins with {data[at : at + 8]!r}, which the grammar needs"
                )
            ids.append(self._ids[data[at:end]])
            at = end
        return ids


def _texts(tokenizer, size: int) -> list[bytes | None]:
    """Each id's bytes in the middle of a text, None where it has none: for the byte tokenizer (ByT5) its byte;
    for a tokenizer llguidance can read (byte-level and byte-fallback BPE), as llguidance reads it; for the others
    (Metaspace, WordPiece...), what the token adds to the decode of a plain token before it, and the byte of a
    byte-fallback token."""
    from transformers import ByT5Tokenizer, PreTrainedTokenizerFast

    if isinstance(tokenizer, ByT5Tokenizer):
        offset = tokenizer.offset
        return [bytes([i - offset]) if offset <= i < offset + 256 else None for i in range(size)]
    if isinstance(tokenizer, PreTrainedTokenizerFast):
        try:
            read = llguidance.hf.from_tokenizer(tokenizer, n_vocab=size, eos_token=0, slices=[])
        except Exception:  # noqa: BLE001 - "can't determine decoder type" and the like: read below instead
            pass
        else:
            return [read.decode_bytes([i]) or None for i in range(size)]
    anchor = tokenizer.encode("a", add_special_tokens=False)
    if not anchor:
        raise TokenizerUnsupported(f"{type(tokenizer).__name__} encodes 'a' as no tokens")
    known = tokenizer_ids(tokenizer)
    rows = [anchor + [i] for i in range(known)]
    if isinstance(tokenizer, PreTrainedTokenizerFast):
        decoded = tokenizer.backend_tokenizer.decode_batch(rows, skip_special_tokens=False)
    else:
        decoded = [tokenizer.decode(row, skip_special_tokens=False, clean_up_tokenization_spaces=False) for row in rows]
    before = tokenizer.decode(anchor, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    names = tokenizer.convert_ids_to_tokens(list(range(known)))
    texts: list[bytes | None] = []
    for name, text in zip(names, decoded, strict=True):
        if name is not None and BYTE_TOKEN.fullmatch(name):
            texts.append(bytes([int(name[3:5], 16)]))
        elif name is None or not text.startswith(before) or "\ufffd" in text[len(before) :]:
            texts.append(None)
        else:
            texts.append(text[len(before) :].encode())
    return texts + [None] * (size - known)


def _reason(message: str, limit: int = 400) -> str:
    """llguidance's error on one line, without the parser's state dump (an error of TokenTable's: its message)."""
    if raised := re.search(r"PyErr \{ type: <class '\w+'>, value: \w+\((['\"])(.*?)\1\)", message):
        message = raised.group(2)
    text = " ".join(line.strip() for line in message.split("<state>")[0].splitlines() if line.strip())
    return (text[:limit] + "...") if len(text) > limit else text or "unknown error"
