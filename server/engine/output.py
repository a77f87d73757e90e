"""Generated tokens as text: the one detokenizer every route reads (token texts, streams, answers, stop sequences),
and what a stream may show before a stop sequence is ruled out.

The text of a sequence is always the full decode of its tokens (`tokenizer.decode(tokens, skip_special_tokens=True)`,
with the tokenizer's clean-up of spaces unless the output is constrained), cut after a stop sequence; each token's
piece is what it adds to that text, so the pieces add up to it whatever the tokenizer.
"""

from __future__ import annotations

import codecs
import re

from transformers import PreTrainedTokenizerBase

BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece's byte fallback (Llama 2, Mistral, Gemma)
# clean_up_tokenization replaces ten patterns one after the other; adding text can change the cleaned text's last
# sum(len(pattern) - 1) = 19 characters at most, never before them
CLEAN_UP_REACH = 19
# No clean-up pattern holds these characters, nor deletes one: text that ends with one of them cleans up the same alone
# as followed by anything, so the clean-up runs on the text after the last of them only
_OUTSIDE_CLEAN_UP = re.compile(r"[^ .?!,'ntmsvre](?=[ .?!,'ntmsvre]*\Z)")


class GeneratedText:
    """The text of a sequence's generated tokens, fed one token at a time.

    As TGI's `decode_token`: each token's text is what decoding a short window of recent tokens (from the prefix
    offset) gains over the window without it (up to the read offset), so a token costs the same however long the
    answer. A token that ends inside a character, or inside a run of byte-fallback tokens (the ByteFallback decoder
    turns a whole invalid run into one "\\ufffd" per byte, so a run is text only once it ends), adds nothing until
    the text it ends is final. Windows are decoded without the clean-up of spaces; the clean-up (" ." -> ".", " 's"
    -> "'s"...) is applied to the whole text, whose last CLEAN_UP_REACH characters are held back until the answer
    ends, since more text may still change them. The byte tokenizer's text comes from an incremental UTF-8 decoder.
    """

    def __init__(self, tokenizer, stops: tuple[str, ...] = (), clean_up: bool | None = None):
        self.tokenizer = tokenizer
        self.stops = stops
        self.clean_up = _cleans_up(tokenizer) if clean_up is None else clean_up
        self.text = ""  # the pieces so far; once a stop sequence is found, the answer ending with it
        self.stop_sequence: str | None = None
        self._tokens: list[int] = []
        self._prefix = 0  # the window decoded for each token starts here
        self._read = 0  # tokens up to here are in _raw
        self._raw = ""  # the decode of tokens[:_read], without clean-up
        self._cleaned, self._cleaned_to = "", 0  # the clean-up of _raw[:_cleaned_to]
        self._special = frozenset(tokenizer.all_special_ids)
        self._bytes = _byte_decoder(tokenizer, self._special)  # the byte tokenizer's decode, token by token

    def add(self, token: int) -> str:
        """token's piece of the text ("" while held). Once a stop sequence is complete, `stop_sequence` is set and
        `text` ends with it; later tokens add nothing."""
        if self.stop_sequence is not None:
            return ""
        self._tokens.append(token)
        if token in self._special:  # skipped: a byte run goes on across it
            return ""
        if self._bytes is not None:
            if 0 <= token - self.tokenizer.offset < 256:
                self._raw += self._bytes.decode(bytes([token - self.tokenizer.offset]))
        elif not BYTE_TOKEN.fullmatch(self.tokenizer.convert_ids_to_tokens(token) or ""):
            before, after = self._window()
            if len(after) > len(before) and not after.endswith("\ufffd"):
                self._raw += after[len(before) :]
                self._prefix, self._read = self._read, len(self._tokens)
        return self._piece(final=False)

    def finish(self) -> str:
        """The rest of the text, held until now: after it, `text` is the full decode of the tokens (cut after a
        stop sequence)."""
        if self.stop_sequence is not None:
            return ""
        if self._bytes is not None:
            self._raw += self._bytes.decode(b"", final=True)
        else:
            before, after = self._window()
            self._raw += after[len(before) :]
            self._prefix = self._read = len(self._tokens)
        return self._piece(final=True)

    def _window(self) -> tuple[str, str]:
        return self._decode(self._tokens[self._prefix : self._read]), self._decode(self._tokens[self._prefix :])

    def _piece(self, final: bool) -> str:
        full = self._cleaned_up() if self.clean_up else self._raw
        held = 0 if final or not self.clean_up else CLEAN_UP_REACH
        if self.stops:
            start = max(0, len(self.text) - max(map(len, self.stops)))
            found = [(at + len(stop), stop) for stop in self.stops if (at := full.find(stop, start)) >= 0]
            if found:
                end, self.stop_sequence = min(found)
                full, held = full[:end], 0
        piece = full[len(self.text) : max(len(self.text), len(full) - held)]
        self.text += piece
        return piece

    def _cleaned_up(self) -> str:
        """The clean-up of _raw, at the cost of its end since the last character that no pattern touches (transformers'
        own clean-up; a tokenizer's override of it runs on the whole text)."""
        clean = self.tokenizer.clean_up_tokenization
        if getattr(clean, "__func__", None) is not PreTrainedTokenizerBase.clean_up_tokenization:
            return clean(self._raw)
        safe = _OUTSIDE_CLEAN_UP.search(self._raw, self._cleaned_to)
        if safe is not None:
            self._cleaned += clean(self._raw[self._cleaned_to : safe.end()])
            self._cleaned_to = safe.end()
        return self._cleaned + clean(self._raw[self._cleaned_to :])

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _byte_decoder(tokenizer, special: frozenset[int]):
    """For the byte tokenizer (ByT5, the demo's) whose added tokens are all special (skipped): an incremental UTF-8
    decoder that drops what is not UTF-8, as its decode does, at a fraction of the cost of decoding windows."""
    from transformers import ByT5Tokenizer

    if type(tokenizer) is not ByT5Tokenizer or not special.issuperset(tokenizer.added_tokens_decoder):
        return None
    return codecs.getincrementaldecoder("utf-8")("ignore")


def _cleans_up(tokenizer) -> bool:
    """Whether tokenizer.decode cleans up spaces by default: transformers skips it for BPE models, where it would
    remove spaces the text has."""
    if not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return False
    backend = getattr(tokenizer, "backend_tokenizer", None)
    forced = getattr(tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)
    return backend is None or type(backend.model).__name__ != "BPE" or forced


def shown(text: str, stops: tuple[str, ...], stop_sequence: str | None) -> str:
    """What a stream may show of text so far: without the stop sequence that ended it, and without the end that
    could still begin one."""
    if stop_sequence is not None:
        return without_stop(text, stop_sequence)
    return text[: len(text) - _could_begin_stop(text, stops)]


def without_stop(text: str, stop: str | None) -> str:
    """The text as OpenAI returns it: without the stop sequence that ended it."""
    return text[: len(text) - len(stop)] if stop and text.endswith(stop) else text


def _could_begin_stop(text: str, stops: tuple[str, ...]) -> int:
    """How much of text's end could begin a stop sequence."""
    held = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                held = max(held, n)
                break
    return held


def pieces(tokenizer, tokens: list[int]) -> list[str]:
    """What each token adds to the decode of them all (a prompt's tokens, say); they add up to it."""
    text = GeneratedText(tokenizer)
    out = [text.add(token) for token in tokens]
    if out:
        out[-1] += text.finish()
    return out
