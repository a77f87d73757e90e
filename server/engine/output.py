"""Generated tokens as text: incremental detokenization, stop sequences, and what a stream may show so far.

Both APIs use it: the engine to end a sequence at a stop sequence, the OpenAI stream for its deltas.
"""

from __future__ import annotations


class GeneratedText:
    """The text of a sequence's generated tokens, fed one token at a time.

    Each token's text is what decoding a short window of recent tokens gains from it (TGI's and vLLM's prefix and
    read offsets), so a token costs the same however long the answer; a token that ends inside a character adds
    nothing until the character is complete. Windows are decoded without the tokenizer's clean-up of spaces
    (which can shorten a window as it grows), so the pieces add up to the whole; the text a stop sequence ends is
    cleaned up as decoding it at once would be. `text` ends with the first stop sequence found, if any (TGI returns
    it, OpenAI does not).
    """

    def __init__(self, tokenizer, stops: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stops = stops
        self.text = ""
        self.stop_sequence: str | None = None
        self._tokens: list[int] = []
        self._prefix = 0  # the window decoded for each token starts here
        self._read = 0  # tokens up to here are in text

    def add(self, token: int) -> bool:
        """Appends token's text; True when it completes a stop sequence (text is then cut after it)."""
        self._tokens.append(token)
        before = self._decode(self._tokens[self._prefix : self._read])
        after = self._decode(self._tokens[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return False
        checked = len(self.text)
        self.text += after[len(before) :]
        self._prefix, self._read = self._read, len(self._tokens)
        for stop in self.stops:
            at = self.text.find(stop, max(0, checked - len(stop) + 1))
            if at >= 0:
                self.text = self.text[: at + len(stop)]
                if getattr(self.tokenizer, "clean_up_tokenization_spaces", False):
                    self.text = self.tokenizer.clean_up_tokenization(self.text)
                self.stop_sequence = stop
                return True
        return False

    def shown(self) -> str:
        """What a stream may show so far: the text without the stop sequence, and without the end that could
        still begin one."""
        if self.stop_sequence is not None:
            return without_stop(self.text, self.stop_sequence)
        return self.text[: len(self.text) - _could_begin_stop(self.text, self.stops)]

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)


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
