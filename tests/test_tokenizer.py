import sys

import pytest

from tokenizer import Tokenizer, char_tokenizer, load_tokenizer, render_chat, tokenizers_tokenizer


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


def test_tokenizer_json_through_tokenizers_round_trips_through_its_spec():
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<s>": 0, "</s>": 1, "[UNK]": 2, "hello": 3, "world": 4}
    hf = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    hf.add_special_tokens(["<s>", "</s>"])
    tok = tokenizers_tokenizer(hf.to_str(), bos="<s>", eos="</s>", add_bos=True, chat_template="{{ x }}")
    assert tok.encode("hello world</s>") == [3, 4, 1] and (tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 5)
    again = load_tokenizer(tok.spec)       # the whole file travels in the spec: no path to find later
    assert again.encode("world hello") == [4, 3] and again.chat_template == "{{ x }}" and again.bos_id == 0
    assert tokenizers_tokenizer(hf.to_str(), bos="<s>").bos_id is None     # add_bos false: nothing prepended
    with pytest.raises(ValueError, match="'<pad>'"):
        tokenizers_tokenizer(hf.to_str(), eos="<pad>")


def test_chat_template_renders_like_transformers_and_its_special_tokens_encode_as_one_id(chat_tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    text = render_chat(chat_tokenizer.chat_template, messages, chat_tokenizer)
    # trim_blocks/lstrip_blocks drop the template's own line breaks; bos_token is the tokenizer's string
    assert text == "<|endoftext|><|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n" \
                   "<|im_start|>assistant\n"
    assert render_chat(chat_tokenizer.chat_template, messages, chat_tokenizer, add_generation_prompt=False) \
        == text.removesuffix("<|im_start|>assistant\n")
    ids = chat_tokenizer.encode(text)
    assert ids[:2] == [0, 1] and ids.count(1) == 3 and ids.count(2) == 2 and chat_tokenizer.eos_id == 2
    assert chat_tokenizer.decode(ids) == text


def test_chat_template_errors_and_helpers(chat_tokenizer, monkeypatch):
    with pytest.raises(ValueError, match="cannot render this conversation: unknown role: tool"):
        render_chat(chat_tokenizer.chat_template, [{"role": "tool", "content": "{}"}], chat_tokenizer)
    as_json = "{{ messages[0].content | tojson }}{{ messages[0].content | tojson(indent=1) }}"
    assert render_chat(as_json, [{"content": ["é<"]}], chat_tokenizer) == '["é<"][\n "é<"\n]'  # not HTML-escaped
    char = char_tokenizer("ab.")
    spelled = Tokenizer({}, 3, char.encode, char.decode, eos_id=2)       # no strings in its spec: the id decoded
    assert render_chat("{{ bos_token }}|{{ eos_token }}", [], spelled) == "|."
    monkeypatch.setitem(sys.modules, "jinja2", None)
    with pytest.raises(RuntimeError, match="pip install jinja2"):
        render_chat("{{ messages }}", [], chat_tokenizer)
