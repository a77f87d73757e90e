"""Small tokenizers of each kind that real checkpoints ship, trained here with `tokenizers` (no hub): byte-level BPE
(GPT-2, Llama 3, Qwen), byte-fallback BPE with "▁" word boundaries (Llama 2, Mistral), Unigram with Metaspace (T5,
ALBERT), WordPiece with the clean-up of spaces (BERT), a byte-level BPE with a chat template and non-special added
tokens (Qwen2.5's `<tool_call>`), and Mistral's template with its special `[TOOL_CALLS]`."""

from __future__ import annotations

import functools
import string

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "plain ascii, with spaces",
    "café crème brûlée",
    "漢字とかな混じり文",
    "emoji 🙂🚀 and ZWJ 👩‍💻!",
    "Ωmega ≠ ∞",
    '{"name": "Bob", "age": 42, "tags": ["a", "b"]} it is n\'t here . yes , he \'s',
    "the quick brown fox jumps over the lazy dog 0123456789",
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call> mixserve tokenizer check',
    string.printable,  # every ASCII character has a token: grammars can write JSON, tags, anything
]
# the Hermes/Qwen2.5 template, cut down: tools in the system turn, calls in <tool_call> tags
CHAT_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n# Tools\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>\n"
    "Call one in <tool_call></tool_call> tags.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_level() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]
    )
    tokenizer.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


def byte_fallback() -> PreTrainedTokenizerFast:
    """Llama 2's shape: "▁" for spaces, the 256 byte tokens <0x00>... in the vocabulary for characters it lacks
    (here every one outside the few most frequent), a decoder that strips the first space."""
    trained = Tokenizer(models.BPE())
    trained.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trained.pre_tokenizer = pre_tokenizers.Split("▁", "merged_with_next")
    trained.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(vocab_size=300, limit_alphabet=30))
    learned = trained.get_vocab()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for token, _ in sorted(learned.items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in _merges(trained)]
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = trained.normalizer
    tokenizer.pre_tokenizer = trained.pre_tokenizer
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _merges(tokenizer: Tokenizer) -> list:
    import json

    return json.loads(tokenizer.to_str())["model"]["merges"]


def unigram() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    tokenizer.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


def wordpiece() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=False)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(cleanup=True)
    trainer = trainers.WordPieceTrainer(vocab_size=400, special_tokens=["[PAD]", "[UNK]", "[SEP]"])
    tokenizer.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        sep_token="[SEP]",
        eos_token="[SEP]",
        pad_token="[PAD]",
        clean_up_tokenization_spaces=True,
    )


def chat() -> PreTrainedTokenizerFast:
    """Byte-level BPE with ChatML's special tokens and `<tool_call>`, `</tool_call>` added as non-special tokens."""
    tokenizer = byte_level()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.add_tokens([AddedToken("<tool_call>", special=False), AddedToken("</tool_call>", special=False)])
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


MISTRAL_TEMPLATE = (
    "{% if tools %}[AVAILABLE_TOOLS] {{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
    "{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content }}[/INST]"
    "{% elif m.role == 'assistant' and m.tool_calls %}[TOOL_CALLS] [{% for c in m.tool_calls %}"
    '{{ {"name": c.function.name, "arguments": c.function.arguments, "id": c.id} | tojson }}'
    "{% if not loop.last %}, {% endif %}{% endfor %}]</s>"
    "{% elif m.role == 'assistant' %}{{ m.content }}</s>"
    '{% elif m.role == \'tool\' %}[TOOL_RESULTS] {{ {"content": m.content, "call_id": m.tool_call_id} | tojson }}'
    "[/TOOL_RESULTS]{% endif %}{% endfor %}"
)


def mistral() -> PreTrainedTokenizerFast:
    """Mistral 7B v0.3's shape: byte-fallback BPE, control tokens ([TOOL_CALLS]...) special, calls written as
    `[TOOL_CALLS] [{"name": ..., "arguments": ...}]`."""
    tokenizer = byte_fallback()
    controls = ["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]"]
    tokenizer.add_special_tokens({"additional_special_tokens": [*controls, "[/TOOL_RESULTS]"]})
    tokenizer.chat_template = MISTRAL_TEMPLATE
    return tokenizer


KINDS = {
    "byte-level": byte_level,
    "byte-fallback": byte_fallback,
    "unigram": unigram,
    "wordpiece": wordpiece,
    "chat": chat,
    "mistral": mistral,
}


@functools.cache
def build(kind: str) -> PreTrainedTokenizerFast:
    """Each kind is trained once per test session; callers must not change what they get."""
    return KINDS[kind]()
