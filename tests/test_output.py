"""Generated text, token by token: the same text as decoding everything at once, at a cost per token that does not
grow with the answer; stop sequences found across tokens; streams never shown any of a stop sequence."""

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import ByT5Tokenizer, PreTrainedTokenizerFast

from server.engine.output import GeneratedText, without_stop

TEXTS = ["plain ascii, with spaces", "café crème brûlée", "漢字とかな混じり文", "emoji 🙂🚀 and ZWJ 👩‍💻!", "Ωmega ≠ ∞"]


def byte_level_bpe() -> PreTrainedTokenizerFast:
    """A GPT-2 / Llama-3 style byte-level BPE, trained here on a few lines (no hub)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(TEXTS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


@pytest.fixture(params=["byt5", "byte-level-bpe"])
def tokenizer(request):
    return ByT5Tokenizer() if request.param == "byt5" else byte_level_bpe()


class CountingDecoder:
    def __init__(self, tokenizer):
        self.tokenizer, self.longest = tokenizer, 0

    def decode(self, ids, **kwargs):
        self.longest = max(self.longest, len(ids))
        return self.tokenizer.decode(ids, **kwargs)


@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_equals_decoding_at_once(tokenizer, text):
    ids = tokenizer.encode(text * 3, add_special_tokens=False)
    counting = CountingDecoder(tokenizer)
    generated = GeneratedText(counting)
    for i, token in enumerate(ids):
        assert not generated.add(token)
        so_far = tokenizer.decode(ids[: i + 1], skip_special_tokens=True)
        assert so_far.startswith(generated.text) and "\ufffd" not in generated.text
    assert generated.text == tokenizer.decode(ids, skip_special_tokens=True)
    assert counting.longest <= 8, "each token decodes a short window, not the whole answer"


def test_random_bytes_never_lose_or_invent_text():
    tokenizer = ByT5Tokenizer()
    rng = random.Random(0)
    text = "".join(rng.choice("aé漢🙂 ") for _ in range(400))
    ids = tokenizer.encode(text, add_special_tokens=False)
    generated = GeneratedText(tokenizer)
    for token in ids:
        generated.add(token)
    assert generated.text == text


@pytest.mark.parametrize("stop", ["brûlée", "é c", "🙂🚀"])
def test_a_stop_sequence_split_across_tokens_ends_the_text_and_is_never_shown(tokenizer, stop):
    text = "café crème brûlée, emoji 🙂🚀 and more"
    at = text.index(stop)
    ids = tokenizer.encode(text, add_special_tokens=False)
    generated = GeneratedText(tokenizer, ("zzz", stop))
    shown, stopped = "", False
    for token in ids:
        stopped = generated.add(token)
        now = generated.shown()
        assert now.startswith(shown) and stop not in now
        shown = now
        if stopped:
            break
    assert stopped and generated.stop_sequence == stop
    assert generated.text == text[: at + len(stop)]
    assert shown == without_stop(generated.text, stop) == text[:at]


def test_what_could_begin_a_stop_is_held_back_until_it_cannot():
    tokenizer = ByT5Tokenizer()
    generated = GeneratedText(tokenizer, ("END",))
    for token in tokenizer.encode("the EN", add_special_tokens=False):
        generated.add(token)
    assert generated.text == "the EN" and generated.shown() == "the "
    for token in tokenizer.encode("D", add_special_tokens=False):
        assert generated.add(token)
    assert generated.shown() == "the "


def test_a_tokenizer_that_cleans_up_spaces_loses_no_text():
    """Clean-up (" ." -> ".") can shorten a window as it grows; pieces are decoded without it."""
    tokenizer = byte_level_bpe()
    tokenizer.clean_up_tokenization_spaces = True
    text = "it is n't here . yes , he 's 'n' they 're ! done"
    ids = tokenizer.encode(text, add_special_tokens=False)
    generated = GeneratedText(tokenizer)
    for token in ids:
        generated.add(token)
    assert generated.text == tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    stopped = GeneratedText(tokenizer, ("yes",))
    assert any(stopped.add(token) for token in ids)
    assert stopped.text == "it isn't here. yes"  # as decoding at once with clean-up
