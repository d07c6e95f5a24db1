import pytest

from tokenizer import char_tokenizer, load_tokenizer


def test_char_tokenizer_round_trips_and_rejects_unknown_characters():
    tok = char_tokenizer("\n abc")
    assert tok.vocab_size == 5 and tok.decode(tok.encode("cab a\n")) == "cab a\n"
    with pytest.raises(ValueError, match="'z'"):
        tok.encode("zab")


def test_gpt2_through_tiktoken_offline(shared_dir):
    tok = load_tokenizer({"kind": "tiktoken", "encoding": "gpt2"})
    assert tok.encode("hello world") == [31373, 995] and tok.eos_id == 50256 and tok.vocab_size == 50257
    assert tok.decode(tok.encode("To be, or not to be")) == "To be, or not to be"


def test_spec_round_trips_and_unknown_kind_is_an_error():
    tok = char_tokenizer("xy")
    assert load_tokenizer(tok.spec).encode("yx") == [1, 0]
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        load_tokenizer({"kind": "bytes"})
