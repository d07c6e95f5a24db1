"""
GGUF vocabularies for gguf_file.py, both ways. A GGUF carries its tokenizer (tokenizer.ggml.*); it is rebuilt
as a Hugging Face tokenizer.json that tokenizes as llama.cpp does (tokenizer_from_gguf), and each of our
tokenizer kinds is written as one (vocab_metadata): char -> llama, tiktoken gpt2 -> gpt2, sentencepiece ->
llama, tokenizers (byte-level BPE) -> gpt2. gguf_file.py's docstring says what each kind becomes.
"""
import json
from pathlib import Path

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6      # tokenizer.ggml.token_type

GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _split(regex):
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


def _byte_level(use_regex):
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


# tokenizer.ggml.pre -> the Hugging Face pre-tokenizer that splits text as llama.cpp's regexes for it do
PRE_TOKENIZERS = {
    "gpt-2": _byte_level(True),
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                     _byte_level(True)]},
    "llama-bpe": {"type": "Sequence", "pretokenizers": [_split(LLAMA3_REGEX), _byte_level(False)]},
    "default": {"type": "Sequence", "pretokenizers": [_split(r"[\p{P}\$\+<=>\^~\|]+"), _split(GPT2_REGEX),
                                                      _split(r"\p{N}+"), _split("[0-9][0-9][0-9]"),
                                                      _byte_level(False)]},
}
IGNORE_MERGES = {"llama-bpe"}     # llama.cpp takes a whole pre-token that is in the vocabulary as one token


class GGUFFormatError(ValueError):
    """A GGUF file that is unreadable, or holds a model or vocabulary that MobileLLM cannot represent."""



# --- vocabulary: GGUF -> tokenizer.json ----------------------------------------------------------------

def tokenizer_from_gguf(meta, n_vocab, path="this GGUF"):
    """The tokenizer of the file's vocabulary (tokenizer.py's "tokenizers" kind), None when it has none."""
    from tokenizer import tokenizers_tokenizer
    kind = meta.get("tokenizer.ggml.model", "no_vocab")
    if kind in ("no_vocab", "none"):
        return None
    tokens = meta.get("tokenizer.ggml.tokens", [])
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(tokens) != n_vocab or len(types) != n_vocab:
        raise GGUFFormatError(f"{path}: its vocabulary has {len(tokens)} tokens ({len(types)} token types) but "
                              f"the embedding has {n_vocab} rows")
    if len(set(tokens)) != len(tokens):
        raise GGUFFormatError(f"{path}: its vocabulary has duplicate token strings")
    if kind == "gpt2":      # llama.cpp's defaults for add_bos when the file does not say
        hf, add_bos = _byte_level_bpe_json(meta, tokens, types, path), meta.get("tokenizer.ggml.pre") in IGNORE_MERGES
    elif kind == "llama":
        hf, add_bos = _sentencepiece_bpe_json(meta, tokens, types), True
    else:
        raise GGUFFormatError(f"{path}: tokenizer.ggml.model {kind!r} is not supported (only 'gpt2' and 'llama')")
    add_bos = meta.get("tokenizer.ggml.add_bos_token", add_bos)
    bos, eos = (meta.get(f"tokenizer.ggml.{name}_token_id") for name in ("bos", "eos"))
    return tokenizers_tokenizer(json.dumps(hf, ensure_ascii=False),
                                bos=tokens[bos] if bos is not None and bos < n_vocab else None,
                                eos=tokens[eos] if eos is not None and eos < n_vocab else None,
                                add_bos=add_bos and bos is not None, chat_template=meta.get("tokenizer.chat_template"))


def _added_tokens(tokens, types):
    """Control and unknown tokens as special added tokens, user-defined ones as plain added tokens: matched
    whole in the text, as llama.cpp's special-token partition does."""
    return [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": types[i] != USER_DEFINED}
            for i in range(len(tokens)) if types[i] in (CONTROL, UNKNOWN, USER_DEFINED)]


def _tokenizer_json(tokens, types, merges, normalizer, pre_tokenizer, decoder, **model):
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": _added_tokens(tokens, types),
            "normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "post_processor": None, "decoder": decoder,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      **model, "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges}}


def _byte_level_bpe_json(meta, tokens, types, path):
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise GGUFFormatError(f"{path}: pre-tokenizer {pre!r} is unknown here (known: {', '.join(PRE_TOKENIZERS)})")
    merges = [[m[:m.index(" ", 1)], m[m.index(" ", 1) + 1:]] for m in meta.get("tokenizer.ggml.merges", [])]
    decoder = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    return _tokenizer_json(tokens, types, merges, None, PRE_TOKENIZERS[pre], decoder,
                           ignore_merges=pre in IGNORE_MERGES)


def _sentencepiece_bpe_json(meta, tokens, types):
    """llama.cpp's SPM tokenizer as BPE: it merges the adjacent pair whose joined piece scores highest, which
    is BPE with one merge per way of splitting each normal piece, ranked by the piece's score."""
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    ids = {t: i for i, t in enumerate(tokens)}
    ranked = sorted((-scores[i], i, ids[t[:k]], ids[t[k:]]) for i, t in enumerate(tokens) if types[i] == NORMAL
                    for k in range(1, len(t)) if t[:k] in ids and t[k:] in ids)
    merges = [[tokens[left], tokens[right]] for _, _, left, right in ranked]
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    escape = [{"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]
    prepend = [{"type": "Prepend", "prepend": "▁"}] if prefix else []
    strip = [{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if prefix else []
    normalizer = {"type": "Sequence", "normalizers": prepend + escape}
    decoder = {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                                                {"type": "ByteFallback"}, {"type": "Fuse"}] + strip}
    unk = next((t for t, kind in zip(tokens, types) if kind == UNKNOWN), None)
    return _tokenizer_json(tokens, types, merges, normalizer, None, decoder, unk_token=unk,
                           byte_fallback=BYTE in types, fuse_unk=unk is not None)


# --- vocabulary: our tokenizers -> GGUF ----------------------------------------------------------------

def byte_level_alphabet():
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the others for chr(256 + n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def _char_vocab(tokenizer):
    chars = tokenizer.spec["chars"]
    if "▁" in chars:
        raise GGUFFormatError("this character vocabulary holds '▁', which llama.cpp uses for the space")
    return {"model": "llama", "tokens": ["▁" if c == " " else c for c in chars], "token_type": [NORMAL] * len(chars),
            "scores": [0.0] * len(chars), "add_space_prefix": False, "add_bos_token": False}


def _tiktoken_vocab(tokenizer):
    """GPT-2's BPE from tiktoken's ranks: tiktoken merges the adjacent pair whose joined bytes have the lowest
    rank (= id), so every split of a token into two tokens is a merge at that token's rank."""
    import tiktoken
    if tokenizer.spec.get("encoding") != "gpt2":
        raise GGUFFormatError(f"tiktoken encoding {tokenizer.spec.get('encoding')!r} has no llama.cpp pre-tokenizer "
                              "here (only 'gpt2')")
    enc = tiktoken.get_encoding("gpt2")
    raw = [enc.decode_single_token_bytes(i) for i in range(enc.n_vocab)]
    special = {enc.encode_single_token(s) for s in enc.special_tokens_set}
    byte_char = byte_level_alphabet()
    tokens = [raw[i].decode() if i in special else "".join(byte_char[b] for b in raw[i]) for i in range(len(raw))]
    rank = {b: i for i, b in enumerate(raw) if i not in special}
    merges = sorted((i, rank[b[:k]], rank[b[k:]]) for b, i in rank.items()
                    for k in range(1, len(b)) if b[:k] in rank and b[k:] in rank)
    return {"model": "gpt2", "pre": "gpt-2", "tokens": tokens,
            "token_type": [CONTROL if i in special else NORMAL for i in range(len(raw))],
            "merges": [f"{tokens[left]} {tokens[right]}" for _, left, right in merges],
            "bos_token_id": enc.eot_token, "eos_token_id": enc.eot_token, "add_bos_token": False}


def _sentencepiece_vocab(tokenizer):
    from sentencepiece import sentencepiece_model_pb2
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(tokenizer.spec["model_file"]).read_bytes())
    problems = []
    if proto.trainer_spec.model_type != proto.trainer_spec.BPE:
        problems.append("it is not a BPE model (llama.cpp's 'llama' vocabulary merges pieces as BPE)")
    if proto.normalizer_spec.name not in ("identity", "") or proto.normalizer_spec.remove_extra_whitespaces:
        problems.append("it normalizes text, which llama.cpp does not")
    if problems:
        raise GGUFFormatError(f"SentencePiece model {tokenizer.spec['model_file']}: " + "; ".join(problems))
    return {"model": "llama", "tokens": [p.piece for p in proto.pieces], "scores": [p.score for p in proto.pieces],
            "token_type": [int(p.type) for p in proto.pieces],      # SentencePiece's types are llama.cpp's
            "add_space_prefix": proto.normalizer_spec.add_dummy_prefix, "bos_token_id": tokenizer.bos_id,
            "eos_token_id": tokenizer.eos_id, "add_bos_token": tokenizer.bos_id is not None}


def _canonical_pre_tokenizer(pre_tokenizer):
    """A pre-tokenizer as the tokenizers library writes it (fills in defaulted fields), for comparison."""
    import tokenizers
    hf = _tokenizer_json([], [], [], None, pre_tokenizer, None)
    return json.loads(tokenizers.Tokenizer.from_str(json.dumps(hf)).to_str())["pre_tokenizer"]


def _tokenizers_vocab(tokenizer):
    import tokenizers
    hf = json.loads(tokenizers.Tokenizer.from_str(tokenizer.spec["json"]).to_str())
    pre = next((name for name, p in PRE_TOKENIZERS.items()
                if _canonical_pre_tokenizer(p) == hf["pre_tokenizer"]), None)
    if hf["model"]["type"] != "BPE" or hf["normalizer"] is not None or pre is None:
        raise GGUFFormatError("only a byte-level BPE tokenizer.json without normalizer, whose pre-tokenizer is one "
                              f"of llama.cpp's ({', '.join(PRE_TOKENIZERS)}), can be written as a GGUF vocabulary")
    tokens, types = [None] * tokenizer.vocab_size, [NORMAL] * tokenizer.vocab_size
    for token, i in hf["model"]["vocab"].items():
        tokens[i] = token
    for added in hf["added_tokens"]:
        tokens[added["id"]], types[added["id"]] = added["content"], CONTROL if added["special"] else USER_DEFINED
    if None in tokens:
        raise GGUFFormatError(f"this tokenizer.json leaves ids unused ({tokens.index(None)} first)")
    ids = {t: i for i, t in enumerate(tokens)}
    return {"model": "gpt2", "pre": pre, "tokens": tokens, "token_type": types,
            "merges": [" ".join(m) if isinstance(m, list) else m for m in hf["model"]["merges"]],
            "bos_token_id": ids.get(tokenizer.spec.get("bos")), "eos_token_id": ids.get(tokenizer.spec.get("eos")),
            "add_bos_token": tokenizer.spec.get("add_bos", False)}


VOCAB_WRITERS = {"char": _char_vocab, "tiktoken": _tiktoken_vocab, "sentencepiece": _sentencepiece_vocab,
                 "tokenizers": _tokenizers_vocab}


def vocab_metadata(tokenizer, n_vocab):
    """Our tokenizer as GGUF metadata (tokenizer.ggml.* and the chat template), padded with unused [PADn] tokens
    to the embedding's n_vocab rows. None: no vocabulary (llama.cpp then makes n_vocab dummy tokens)."""
    if tokenizer is None:
        return {"tokenizer.ggml.model": "no_vocab"}
    kind = tokenizer.spec.get("kind")
    if kind not in VOCAB_WRITERS:
        raise GGUFFormatError(f"tokenizer kind {kind!r} cannot be written as a GGUF vocabulary")
    vocab = VOCAB_WRITERS[kind](tokenizer)
    pad = n_vocab - len(vocab["tokens"])
    if pad < 0:
        raise GGUFFormatError(f"the tokenizer has {len(vocab['tokens'])} tokens but the model only {n_vocab} "
                              "embeddings")
    vocab["tokens"] = vocab["tokens"] + [f"[PAD{i}]" for i in range(n_vocab - pad, n_vocab)]
    vocab["token_type"] = vocab["token_type"] + [UNUSED] * pad
    if "scores" in vocab:
        vocab["scores"] = vocab["scores"] + [-1000.0] * pad
    meta = {f"tokenizer.ggml.{key}": value for key, value in vocab.items() if value is not None}
    if tokenizer.chat_template:
        meta["tokenizer.chat_template"] = tokenizer.chat_template
    return meta
