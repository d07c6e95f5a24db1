"""
The tokenizers a checkpoint can be trained with, behind one small interface.

A tokenizer is described by a JSON-able spec (stored in data/<name>/meta.json and in checkpoints):
  {"kind": "char", "chars": "\\n !$&',-.3:;?AB..."}       character level (shakespeare_char)
  {"kind": "tiktoken", "encoding": "gpt2"}                 OpenAI's GPT-2 BPE through tiktoken
  {"kind": "sentencepiece", "model_file": "tokenizer.model"}   Meta's LLaMA-2 32k (facebook/MobileLLM-*)
"""
from dataclasses import dataclass
from typing import Callable, Optional


@dataclass
class Tokenizer:
    spec: dict
    vocab_size: int
    encode: Callable[[str], list]
    decode: Callable[[list], str]
    bos_id: Optional[int] = None   # prepended to prompts when the model was trained that way (LLaMA: <s> = 1)
    eos_id: Optional[int] = None   # generation stops here (GPT-2: <|endoftext|>, LLaMA: </s> = 2)


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
        raise RuntimeError(f"could not load tiktoken's {encoding!r} encoding ({type(e).__name__}: {e}). Offline? "
                           "Point TIKTOKEN_CACHE_DIR at a folder holding its cached files") from e
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


def load_tokenizer(spec):
    kind = spec.get("kind")
    if kind == "char":
        return char_tokenizer(spec["chars"])
    if kind == "tiktoken":
        return tiktoken_tokenizer(spec.get("encoding", "gpt2"))
    if kind == "sentencepiece":
        return sentencepiece_tokenizer(spec["model_file"])
    raise ValueError(f"unknown tokenizer kind {kind!r} (expected char, tiktoken or sentencepiece)")
