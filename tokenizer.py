"""
The tokenizers a checkpoint can be trained with, behind one small interface.

A tokenizer is described by a JSON-able spec (stored in data/<name>/meta.json and in checkpoints):
  {"kind": "char", "chars": "\\n !$&',-.3:;?AB..."}       character level (shakespeare_char)
  {"kind": "tiktoken", "encoding": "gpt2"}                 OpenAI's GPT-2 BPE through tiktoken
  {"kind": "sentencepiece", "model_file": "tokenizer.model"}   Meta's LLaMA-2 32k (facebook/MobileLLM-*)
  {"kind": "tokenizers", "json": "<a whole tokenizer.json>", "bos": "<s>" or None, "eos": "</s>" or None,
   "add_bos": false, "chat_template": "{% for message in messages %}..." or None}
      any Hugging Face tokenizer.json (SmolLM2's GPT-2-style BPE among them), through the `tokenizers`
      library; the file is stored inside the spec, so a checkpoint reloads it offline

render_chat turns a conversation into an instruct model's prompt with its chat template, as transformers does.
"""
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, Optional


@dataclass
class Tokenizer:
    spec: dict
    vocab_size: int
    encode: Callable[[str], list]
    decode: Callable[[list], str]
    bos_id: Optional[int] = None   # prepended to prompts when the model was trained that way (LLaMA: <s> = 1)
    eos_id: Optional[int] = None   # generation stops here (GPT-2: <|endoftext|>, LLaMA: </s> = 2)
    chat_template: Optional[str] = None   # jinja2 template of an instruct model's conversations (HF's format)


def char_tokenizer(chars):
    stoi = {c: i for i, c in enumerate(chars)}

    def encode(text):
        unknown = sorted(set(text) - stoi.keys())
        if unknown:
            raise ValueError(f"characters not in this model's vocabulary: {''.join(unknown)!r}")
        return [stoi[c] for c in text]

    return Tokenizer({"kind": "char", "chars": chars}, len(chars), encode, lambda ids: "".join(chars[i] for i in ids))


def tiktoken_tokenizer(encoding="gpt2"):
    import tiktoken
    try:
        enc = tiktoken.get_encoding(encoding)
    except Exception as e:  # tiktoken downloads its files on first use and raises network errors when offline
        raise RuntimeError(f"could not load tiktoken's {encoding!r} encoding: tiktoken downloads its files on first "
                           f"use ({type(e).__name__}). Offline? Point TIKTOKEN_CACHE_DIR at a folder holding "
                           "its cached files") from e
    return Tokenizer({"kind": "tiktoken", "encoding": encoding}, enc.n_vocab,
                     lambda text: enc.encode(text, allowed_special={"<|endoftext|>"}), enc.decode,
                     eos_id=enc.eot_token)


def sentencepiece_tokenizer(model_file):
    try:
        import sentencepiece
    except ImportError as e:
        raise RuntimeError("this model uses a SentencePiece tokenizer: pip install sentencepiece") from e
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    return Tokenizer({"kind": "sentencepiece", "model_file": str(model_file)}, sp.get_piece_size(),
                     sp.encode, sp.decode, bos_id=sp.bos_id(), eos_id=sp.eos_id())


def tokenizers_tokenizer(tokenizer_json, bos=None, eos=None, add_bos=False, chat_template=None):
    """A Hugging Face tokenizer.json (its text) through the `tokenizers` library. bos/eos are token strings;
    add_bos: prepend bos to prompts (tokenizer_config.json's add_bos_token)."""
    try:
        import tokenizers
    except ImportError as e:
        raise RuntimeError("this model uses a Hugging Face tokenizer.json: pip install tokenizers") from e
    tok = tokenizers.Tokenizer.from_str(tokenizer_json)
    spec = {"kind": "tokenizers", "json": tokenizer_json, "bos": bos, "eos": eos, "add_bos": bool(add_bos),
            "chat_template": chat_template}

    def token_id(token):
        if token is None:
            return None
        i = tok.token_to_id(token)
        if i is None:
            raise ValueError(f"special token {token!r} is not in this tokenizer's vocabulary")
        return i

    return Tokenizer(spec, tok.get_vocab_size(with_added_tokens=True),
                     lambda text: tok.encode(text, add_special_tokens=False).ids,
                     lambda ids: tok.decode(ids, skip_special_tokens=False),
                     bos_id=token_id(bos) if add_bos else None, eos_id=token_id(eos), chat_template=chat_template)


def load_tokenizer(spec):
    kind = spec.get("kind")
    if kind == "char":
        return char_tokenizer(spec["chars"])
    if kind == "tiktoken":
        return tiktoken_tokenizer(spec.get("encoding", "gpt2"))
    if kind == "sentencepiece":
        return sentencepiece_tokenizer(spec["model_file"])
    if kind == "tokenizers":
        return tokenizers_tokenizer(spec["json"], spec.get("bos"), spec.get("eos"), spec.get("add_bos", False),
                                    spec.get("chat_template"))
    raise ValueError(f"unknown tokenizer kind {kind!r} (expected char, tiktoken, sentencepiece or tokenizers)")


def tokenizer_identity(spec):
    """What decides how a tokenizer spec encodes: a tokenizer.json's content (not its chat template or
    special-token settings), a SentencePiece model file's bytes (not its path), else the whole spec."""
    if spec.get("kind") == "tokenizers":
        return json.loads(spec["json"])
    if spec.get("kind") == "sentencepiece" and Path(spec["model_file"]).is_file():
        return Path(spec["model_file"]).read_bytes()
    return spec


def same_tokenizer(spec, other):
    """Whether two tokenizer specs encode text into the same ids (data of one fits a model of the other)."""
    return tokenizer_identity(spec) == tokenizer_identity(other)


def render_chat(template, messages, tokenizer, add_generation_prompt=True):
    """A conversation ([{"role": ..., "content": ...}]) as text, through a Hugging Face chat template, rendered
    the way transformers' apply_chat_template renders it: jinja2's sandbox with trim_blocks and lstrip_blocks,
    loop controls, `raise_exception(message)`, a JSON `tojson` and `strftime_now`; the variables are
    `messages`, `add_generation_prompt` (end with the assistant's header) and `bos_token`/`eos_token`."""
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
        raise RuntimeError("chat templates are rendered with jinja2: pip install jinja2") from e

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    env.filters["tojson"] = lambda x, ensure_ascii=False, **options: json.dumps(x, ensure_ascii=ensure_ascii, **options)
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                bos_token=special_token_text(tokenizer, "bos"),
                                                eos_token=special_token_text(tokenizer, "eos"))
    except jinja2.TemplateError as e:
        raise ValueError(f"the chat template cannot render this conversation: {e}") from e


def special_token_text(tokenizer, name):
    """'bos' or 'eos' as text: the tokenizers kind keeps the strings in its spec; others decode the id."""
    if tokenizer.spec.get(name) is not None:
        return tokenizer.spec[name]
    token_id = getattr(tokenizer, f"{name}_id")
    return "" if token_id is None else tokenizer.decode([token_id])
