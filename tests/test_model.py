from transformers import AutoTokenizer, ByT5Tokenizer

from server.model import encode_prompt, load_tokenizer


def test_saved_byt5_tokenizer_wins_over_the_model_types_default(world_factory):
    qwen2 = world_factory("qwen2")
    tokenizer = load_tokenizer(qwen2.model_dir)
    assert isinstance(tokenizer, ByT5Tokenizer)
    assert encode_prompt(tokenizer, "hi") == [107, 108]  # bytes + 3, no EOS appended
    assert not isinstance(AutoTokenizer.from_pretrained(qwen2.model_dir), ByT5Tokenizer)  # the trap
