"""Generated text, token by token, for every kind of tokenizer: the pieces add up to decoding everything at once (with
the tokenizer's clean-up of spaces or without), at a cost per token that does not grow with the answer; stop sequences
found across tokens, also when they end inside a character; streams never shown any of a stop sequence."""

import random

import pytest
from transformers import ByT5Tokenizer

from server.engine.output import CLEAN_UP_REACH, GeneratedText, pieces, shown, without_stop
from tests import tokenizer_kinds

KINDS = [*tokenizer_kinds.KINDS, "byt5"]
TEXTS = ["plain ascii, with spaces", "café crème brûlée", "漢字とかな混じり文", "emoji 🙂🚀 and ZWJ 👩‍💻!", "Ωmega ≠ ∞"]


def tokenizer_of(kind: str):
    return ByT5Tokenizer() if kind == "byt5" else tokenizer_kinds.build(kind)


@pytest.fixture(params=KINDS)
def tokenizer(request):
    return tokenizer_of(request.param)


class CountingDecoder:
    def __init__(self, tokenizer):
        self.tokenizer, self.decoded = tokenizer, 0

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def decode(self, ids, **kwargs):
        self.decoded += len(ids)
        return self.tokenizer.decode(ids, **kwargs)


def decoded(tokenizer, ids, clean_up=None) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=clean_up)


def feed(generated: GeneratedText, ids) -> list[str]:
    out = [generated.add(token) for token in ids]
    return [*out, generated.finish()]


@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_equals_decoding_at_once(tokenizer, text):
    ids = tokenizer.encode(text * 3, add_special_tokens=False)
    counting = CountingDecoder(tokenizer)
    generated = GeneratedText(counting)
    for i, token in enumerate(ids):
        generated.add(token)
        assert decoded(tokenizer, ids[: i + 1]).startswith(generated.text) and "\ufffd" not in generated.text
    generated.finish()
    assert generated.text == decoded(tokenizer, ids)
    assert counting.decoded <= 16 * len(ids), "each token decodes a short window, not the whole answer"


@pytest.mark.parametrize("clean_up", [None, False])
def test_random_walks_over_ids_add_up_to_the_full_decode(tokenizer, clean_up):
    """Any ids at all (partial characters, invalid byte runs, special tokens between bytes), with the tokenizer's
    own clean-up of spaces and without: the pieces add up to decoding them at once, and no piece is taken back."""
    rng = random.Random(0)
    size = len(tokenizer)
    for _ in range(60):
        ids = [rng.randrange(size) for _ in range(rng.randrange(1, 25))]
        generated = GeneratedText(tokenizer, clean_up=clean_up)
        assert "".join(feed(generated, ids)) == generated.text == decoded(tokenizer, ids, clean_up), ids


def test_a_run_of_byte_fallback_tokens_is_text_once_it_ends():
    """The ByteFallback decoder turns a whole invalid run into one replacement character per byte: ';' is not text
    until the run it starts ends (the issue's <0x3B> <0x80> ▁the)."""
    tokenizer = tokenizer_kinds.build("byte-fallback")
    ids = tokenizer.convert_tokens_to_ids(["<0x3B>", "<0x80>", "▁the"])
    generated = GeneratedText(tokenizer)
    assert feed(generated, ids) == ["", "", "\ufffd\ufffd the", ""]
    assert generated.text == decoded(tokenizer, ids) == "\ufffd\ufffd the"


@pytest.mark.parametrize("kind", ["unigram", "byte-fallback", "wordpiece"])
def test_word_boundaries_and_clean_up_are_in_the_pieces(kind):
    """Metaspace's "▁" and WordPiece's "##" (and its clean-up: "n't", "here.") come out as the answer has them."""
    tokenizer = tokenizer_of(kind)
    text = "the quick brown fox, it is n't here . yes"
    ids = tokenizer.encode(text, add_special_tokens=False)
    parts = feed(GeneratedText(tokenizer), ids)
    assert "".join(parts) == decoded(tokenizer, ids)
    assert " quick" in "".join(parts[:-1]) or kind == "wordpiece"  # wordpiece holds its last characters
    assert "##" not in "".join(parts) and "▁" not in "".join(parts)


def test_clean_up_holds_only_what_more_text_could_change():
    tokenizer = tokenizer_kinds.build("wordpiece")
    ids = tokenizer.encode("it is n't here . yes , he 's the quick brown fox", add_special_tokens=False)
    generated = GeneratedText(tokenizer)
    for token in ids:
        generated.add(token)
    full = decoded(tokenizer, ids)
    assert full == "it isn't here. yes, he's the quick brown fox"
    assert generated.text == full[:-CLEAN_UP_REACH]
    generated.finish()
    assert generated.text == full


@pytest.mark.parametrize("stop", ["brûlée", "é c", "🙂🚀", "🙂"])
def test_a_stop_sequence_split_across_tokens_ends_the_text_and_is_never_shown(tokenizer, stop):
    text = "café crème brûlée, emoji 🙂🚀 and more"
    ids = tokenizer.encode(text, add_special_tokens=False)
    full = decoded(tokenizer, ids)
    if stop not in full:  # WordPiece splits words around some characters
        pytest.skip(f"{stop!r} is not in this tokenizer's decode of the text: {full!r}")
    stops = ("zzz", stop)
    generated = GeneratedText(tokenizer, stops)
    streamed, used = "", 0
    for token in ids:
        used += 1
        streamed += generated.add(token)
        now = shown(streamed, stops, generated.stop_sequence)
        assert stop not in now
        if generated.stop_sequence:
            break
    assert generated.stop_sequence == stop and streamed == generated.text
    at = full.index(stop)
    assert generated.text == full[: at + len(stop)]
    assert decoded(tokenizer, ids[:used]).startswith(generated.text), "the text before the stop is the decode's"
    assert shown(streamed, stops, stop) == without_stop(generated.text, stop) == full[:at]


def test_what_could_begin_a_stop_is_held_back_until_it_cannot():
    tokenizer = ByT5Tokenizer()
    generated = GeneratedText(tokenizer, ("END",))
    text = "".join(generated.add(t) for t in tokenizer.encode("the EN", add_special_tokens=False))
    assert text == "the EN" and shown(text, ("END",), None) == "the "
    text += "".join(generated.add(t) for t in tokenizer.encode("D", add_special_tokens=False))
    assert generated.stop_sequence == "END" and shown(text, ("END",), "END") == "the "


def test_a_stop_is_found_in_the_cleaned_up_text():
    tokenizer = tokenizer_kinds.build("wordpiece")
    ids = tokenizer.encode("it is n't here . yes , he 's", add_special_tokens=False)
    stopped = GeneratedText(tokenizer, ("here.",))
    feed(stopped, ids)
    assert stopped.stop_sequence == "here." and stopped.text == "it isn't here."


def test_pieces_of_a_prompt_add_up_to_it(tokenizer):
    ids = tokenizer.encode(" ".join(TEXTS), add_special_tokens=False)
    assert "".join(pieces(tokenizer, ids)) == decoded(tokenizer, ids)
    assert pieces(tokenizer, []) == []
