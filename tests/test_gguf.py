import ctypes
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

import export  # noqa: E402
import gguf_file  # noqa: E402
import gguf_vocab  # noqa: E402
from checkpoint import CheckpointError, model_checkpoint, save_checkpoint  # noqa: E402
from conftest import SHARED  # noqa: E402
from gguf_file import GGUFFormatError, export_gguf, load_gguf  # noqa: E402
from loader import load_model_and_tokenizer  # noqa: E402
from model import MobileLLM, ModelConfig, block_schedule  # noqa: E402
from tokenizer import char_tokenizer, load_tokenizer, tokenizers_tokenizer  # noqa: E402

Q = gguf.GGMLQuantizationType
BLOCK = {"attn_norm": "attention_norm", "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
         "attn_output": "attention.wo", "ffn_norm": "ffn_norm", "ffn_gate": "feed_forward.w1",
         "ffn_up": "feed_forward.w3", "ffn_down": "feed_forward.w2"}
CHARS = "\n !',.?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def tiny_model(seed=0, **kw):
    base = dict(vocab_size=len(CHARS), dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, block_size=32,
                rope_theta=500.0)
    torch.manual_seed(seed)
    return MobileLLM(ModelConfig(**{**base, **kw})).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0]                                                     # (T, V)


# --- GGUF files as llama.cpp's converter writes them, built here from llama.cpp's definitions -------------

def llama_cpp_rows(weight, n_heads):
    """llama.cpp's q/k row order: within each head, row 2i holds our row i and row 2i+1 our row i + D/2
    (its RoPE rotates neighbouring dims, ours the two halves)."""
    D = weight.shape[0] // n_heads
    order = [h * D + (i // 2 if i % 2 == 0 else D // 2 + i // 2) for h in range(n_heads) for i in range(D)]
    return weight[order]


def k_blocks(x, qtype):
    """float rows (R, C) -> llama.cpp K-quant blocks (R, C / 256 * bytes), encoded with a simple round-to-nearest
    (gguf's Python package only decodes K-quants). Layouts: ggml-quants.h's block_q4_K / block_q5_K / block_q6_K."""
    rows = x.shape[0]
    if qtype == Q.Q6_K:                          # 16 sub-blocks of 16: int8 scales, 6-bit values centred at 32
        sub = x.reshape(-1, 16, 16)
        scale = np.abs(sub).max(-1) / 31
        d = (scale.max(-1, keepdims=True) / 127).astype(np.float16)                              # (n, 1)
        sc = np.clip(np.round(scale / np.maximum(d.astype(np.float32), 1e-12)), 0, 127).astype(np.int8)
        step = d.astype(np.float32)[:, :, None] * sc[:, :, None]
        q = (np.clip(np.round(sub / np.where(step == 0, 1, step)), -32, 31) + 32).astype(np.uint8).reshape(-1, 256)
        lo, hi = (q & 15).reshape(-1, 2, 2, 64), (q >> 4).reshape(-1, 2, 4, 32)
        ql = (lo[:, :, 0] | lo[:, :, 1] << 4).reshape(-1, 128)
        qh = (hi[:, :, 0] | hi[:, :, 1] << 2 | hi[:, :, 2] << 4 | hi[:, :, 3] << 6).reshape(-1, 64)
        blocks = np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8)], axis=1)
        return blocks.reshape(rows, -1)
    levels = 15 if qtype == Q.Q4_K else 31       # 8 sub-blocks of 32: 6-bit scale and min, 4- or 5-bit values
    sub = x.reshape(-1, 8, 32)
    low = np.minimum(sub.min(-1), 0)
    scale, mins = (sub.max(-1) - low) / levels, -low
    d = (scale.max(-1, keepdims=True) / 63).astype(np.float16)
    dmin = (mins.max(-1, keepdims=True) / 63).astype(np.float16)
    sc = np.clip(np.round(scale / np.maximum(d.astype(np.float32), 1e-12)), 0, 63).astype(np.uint8)
    m = np.clip(np.round(mins / np.maximum(dmin.astype(np.float32), 1e-12)), 0, 63).astype(np.uint8)
    step = (d.astype(np.float32) * sc)[:, :, None]
    offset = (dmin.astype(np.float32) * m)[:, :, None]
    q = np.clip(np.round((sub + offset) / np.where(step == 0, 1, step)), 0, levels).astype(np.uint8)
    scales = np.concatenate([sc[:, :4] | (sc[:, 4:] >> 4) << 6, m[:, :4] | (m[:, 4:] >> 4) << 6,
                             (sc[:, 4:] & 15) | (m[:, 4:] & 15) << 4], axis=1)
    nibbles = (q & 15).reshape(-1, 4, 2, 32)
    qs = (nibbles[:, :, 0] | nibbles[:, :, 1] << 4).reshape(-1, 128)
    parts = [d.view(np.uint8), dmin.view(np.uint8), scales]
    if qtype == Q.Q5_K:
        parts.append(sum((q[:, i] >> 4 & 1) << i for i in range(8)).astype(np.uint8))            # (n, 32)
    return np.concatenate(parts + [qs], axis=1).reshape(rows, -1)


def add_weight(writer, name, array, qtype):
    if array.ndim == 1 or qtype == Q.F32:
        writer.add_tensor(name, array)
    elif qtype == Q.F16:
        writer.add_tensor(name, array.astype(np.float16))
    elif qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        writer.add_tensor(name, k_blocks(array, qtype), raw_dtype=qtype)
    else:
        writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)


def write_llama_gguf(path, model, qtype=Q.F32, arch="llama", keys=None, tensors=None, vocab=None):
    """model as a llama.cpp LLaMA GGUF written with GGUFWriter (one blk.i per block application),
    plus extra metadata keys, extra tensors and vocabulary metadata."""
    c = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(c.depth)
    writer.add_context_length(c.block_size)
    writer.add_embedding_length(c.dim)
    writer.add_feed_forward_length(c.ffn_dim)
    writer.add_head_count(c.n_heads)
    writer.add_head_count_kv(c.n_kv_heads)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    gguf_file._add_metadata(writer, {**(vocab or {"tokenizer.ggml.model": "no_vocab"}), **(keys or {})})
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    arrays = {"token_embd.weight": sd["tok_embeddings.weight"], "output_norm.weight": sd["norm.weight"]}
    if not c.tie_embeddings:
        arrays["output.weight"] = sd["output.weight"]
    for i, b in enumerate(block_schedule(c)):
        for theirs, ours in BLOCK.items():
            w = sd[f"layers.{b}.{ours}.weight"]
            if theirs in ("attn_q", "attn_k"):
                w = llama_cpp_rows(w, c.n_heads if theirs == "attn_q" else c.n_kv_heads)
            arrays[f"blk.{i}.{theirs}.weight"] = w
    for name, array in {**arrays, **(tensors or {})}.items():
        add_weight(writer, name, np.ascontiguousarray(array), qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- weights ---------------------------------------------------------------------------------------------

# relative RMS error of the logits allowed per storage type (about twice what each gives; weights decoded
# in a wrong layout give ~1.4, uncorrelated logits)
TOLERANCE = {Q.F32: 0, Q.F16: 2e-3, Q.BF16: 1.5e-2, Q.Q8_0: 4e-2, Q.Q6_K: 0.12, Q.Q5_0: 0.25, Q.Q5_1: 0.25,
             Q.Q5_K: 0.25, Q.Q4_0: 0.45, Q.Q4_1: 0.45, Q.Q4_K: 0.45}


@pytest.mark.parametrize("qtype", list(TOLERANCE), ids=lambda q: q.name)
def test_each_quantization_type_loads_close_to_the_float_model(tmp_path, qtype):
    # dim 256, FFN 512: every row holds whole 256-value K-quant blocks
    model = tiny_model(dim=256, n_heads=4, n_kv_heads=2, ffn_dim=512, n_layers=1, init_std=0.05)
    loaded, tokenizer = load_gguf(write_llama_gguf(tmp_path / "m.gguf", model, qtype))
    assert tokenizer is None and loaded.config == replace(model.config, init_std=0.02)    # init_std is not stored
    ids = list(range(20))
    ours, theirs = logits(model, ids), logits(loaded, ids)
    error = (theirs - ours).norm() / ours.norm()
    assert error <= TOLERANCE[qtype]
    if qtype != Q.F32:
        assert error > 0          # really quantized: the comparison can fail
    assert torch.equal(loaded.output.weight, loaded.tok_embeddings.weight) and loaded.num_params() == model.num_params()


def test_q_k_rows_are_unpermuted_from_llama_cpp_layout(tmp_path, monkeypatch):
    model = tiny_model(tie_embeddings=False)
    path = write_llama_gguf(tmp_path / "m.gguf", model)
    ids = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]
    loaded, _ = load_gguf(path)
    assert not loaded.config.tie_embeddings
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=0, atol=1e-5)
    monkeypatch.setattr(gguf_file, "rope_pairs_halved", lambda weight, n_heads: weight)     # no unpermuting
    wrong, _ = load_gguf(path)
    assert (logits(wrong, ids) - logits(model, ids)).abs().max() > 1e-3


def test_our_layer_sharing_keys_fold_the_unrolled_layers_back_and_are_checked(tmp_path):
    model = tiny_model(share="immediate")
    keys = {"nanomobilellm.share": "immediate", "nanomobilellm.share_repeats": 2, "nanomobilellm.n_layers": 2}
    loaded, _ = load_gguf(write_llama_gguf(tmp_path / "ls.gguf", model, keys=keys))
    assert loaded.config.share == "immediate" and loaded.config.n_layers == 2
    assert loaded.num_params() == model.num_params()
    assert torch.equal(logits(loaded, [1, 2, 3]), logits(model, [1, 2, 3]))
    plain, _ = load_gguf(write_llama_gguf(tmp_path / "plain.gguf", model))          # no keys: the deep model
    assert plain.config.n_layers == 4 and plain.config.share == "none"
    unshared = tiny_model(n_layers=4)                 # 4 different blocks that the keys claim are 2 shared ones
    with pytest.raises(GGUFFormatError, match="blk.1.attn_q.weight differs from blk.0.attn_q.weight"):
        load_gguf(write_llama_gguf(tmp_path / "lie.gguf", unshared, keys=keys))


# --- vocabularies ----------------------------------------------------------------------------------------

def byte_level_vocab(pre):
    """A tiny gpt2-kind vocabulary: the 256 byte tokens (id = byte value), merges he, Ġt, Ġthe, 12, and two
    control tokens."""
    alphabet = gguf_vocab.byte_level_alphabet()
    tokens = [alphabet[b] for b in range(256)] + ["he", "Ġt", "Ġthe", "12", "<|im_start|>", "<|endoftext|>"]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [1] * 260 + [3, 3], "tokenizer.ggml.merges": ["h e", "Ġ t", "Ġt he", "1 2"],
            "tokenizer.ggml.bos_token_id": 261, "tokenizer.ggml.eos_token_id": 261,
            "tokenizer.chat_template": "{{ messages[0]['content'] }}"}


@pytest.mark.parametrize("pre, number", [("gpt-2", [32, 259]), ("smollm", [32, 49, 50])])   # " 12"
def test_gpt2_vocabulary_is_byte_level_bpe_with_its_pre_tokenizer(tmp_path, pre, number):
    model = tiny_model(vocab_size=262)
    _, tok = load_gguf(write_llama_gguf(tmp_path / "m.gguf", model, vocab=byte_level_vocab(pre)))
    text = "the the 12<|im_start|>é"
    assert tok.encode(text) == [116, 256, 258] + number + [260, 195, 169]    # t he, Ġthe, ..., é as 2 bytes
    assert tok.decode(tok.encode(text)) == text
    assert (tok.eos_id, tok.bos_id, tok.vocab_size) == (261, None, 262)         # add_bos absent: gpt2 adds none
    assert tok.chat_template == "{{ messages[0]['content'] }}"
    assert load_tokenizer(tok.spec).encode(text) == tok.encode(text)           # the spec reloads it offline


@pytest.mark.parametrize("pre, pieces", [       # worked out by hand from llama.cpp's regexes for each name
    ("gpt-2", ["Hello", ",", "Ġworld", "!!!", "Ġ12345", "ĊĊ"]),
    ("smollm", ["Hello", ",", "Ġworld", "!!!", "Ġ", "1", "2", "3", "4", "5", "ĊĊ"]),     # digits one by one
    ("llama-bpe", ["Hello", ",", "Ġworld", "!!!", "Ġ", "123", "45", "ĊĊ"]),             # up to 3 digits
    ("default", ["Hello", ",", "Ġworld", "!!!", "Ġ", "123", "45", "ĊĊ"]),               # punctuation, 3 digits
])
def test_each_known_pre_tokenizer_splits_text_as_llama_cpp(pre, pieces):
    tokenizers = pytest.importorskip("tokenizers")
    tok = gguf_vocab.tokenizer_from_gguf(byte_level_vocab(pre), 262)
    hf = tokenizers.Tokenizer.from_str(tok.spec["json"])
    assert [piece for piece, _ in hf.pre_tokenizer.pre_tokenize_str("Hello, world!!! 12345\n\n")] == pieces


def sentencepiece_vocab():
    """A tiny llama-kind vocabulary: <unk>, <s>, </s>, the 256 byte-fallback tokens, pieces with scores."""
    pieces = {"▁": -10, "h": -11, "e": -12, "l": -13, "o": -14, "w": -15, "r": -16, "d": -17, "ll": -1, "he": -2,
              "▁he": -3, "llo": -4, "▁hello": -5, "or": -7, "▁w": -8}
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + list(pieces)
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": [0.0] * 259 + [float(s) for s in pieces.values()],
            "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(pieces),
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}


def test_llama_vocabulary_merges_by_score_with_byte_fallback_and_a_dummy_prefix(tmp_path):
    vocab = sentencepiece_vocab()
    model = tiny_model(vocab_size=len(vocab["tokenizer.ggml.tokens"]))
    _, tok = load_gguf(write_llama_gguf(tmp_path / "m.gguf", model, vocab=vocab))
    piece = {t: i for i, t in enumerate(vocab["tokenizer.ggml.tokens"])}
    # "▁hello▁world": ll, he, ▁he, llo, ▁hello (best scores first); then or, ▁w; "wor" is no piece
    expected = [piece[p] for p in ("▁hello", "▁w", "or", "l", "d", "▁")] + [3 + 0xC3, 3 + 0xA9]   # é: bytes
    assert tok.encode("hello world é") == expected
    assert tok.decode(expected) == "hello world é"
    assert tok.encode("</s>") == [2] and tok.bos_id == 1 and tok.eos_id == 2    # add_bos defaults to true


# --- export round trips: our model -> GGUF -> load_gguf ---------------------------------------------------

@pytest.mark.parametrize("share, tied", [("none", True), ("immediate", True), ("reverse", False)])
def test_export_round_trip_char_model_gives_identical_logits_and_ids(tmp_path, share, tied):
    tok = char_tokenizer(CHARS)
    model = tiny_model(share=share, tie_embeddings=tied)
    path = export_gguf(model, tok, tmp_path / "m.gguf")
    assert not list(tmp_path.glob(".*tmp*"))                     # the temp file was renamed into place
    _, tensors = gguf_file.read_gguf(path)
    assert len(tensors) == 2 + (not tied) + 9 * model.config.depth        # a tied embedding is stored once
    loaded, loaded_tok = load_gguf(path)
    assert loaded.config == model.config and loaded.num_params() == model.num_params()
    text = "Hello, world!\nIt's  a test."
    assert loaded_tok.encode(text) == tok.encode(text) and loaded_tok.decode(tok.encode(text)) == text
    assert torch.equal(logits(loaded, tok.encode(text)), logits(model, tok.encode(text)))


@pytest.mark.parametrize("dtype, tensor_type, tolerance", [("fp16", "F16", 2e-3), ("bf16", "BF16", 2e-2),
                                                     ("q8_0", "Q8_0", 2e-2)])
def test_export_tensor_types_through_export_py(tmp_path, dtype, tensor_type, tolerance, capsys):
    tok = char_tokenizer(CHARS)
    model = tiny_model()
    save_checkpoint(model_checkpoint(model, tok.spec), tmp_path / "out")
    export.main([f"--init_from={tmp_path / 'out'}", "--format=gguf", "--out", str(tmp_path / "m.gguf"),
                 "--dtype", dtype])
    assert f"MB, {dtype}, 2 layers, char vocabulary)" in capsys.readouterr().out
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert types["blk.0.attn_q.weight"] == tensor_type and types["blk.0.attn_norm.weight"] == "F32"
    loaded, _ = load_model_and_tokenizer(str(tmp_path / "m.gguf"))           # through the one loader
    ids = tok.encode("to be or not to be")
    ours, theirs = logits(model, ids), logits(loaded, ids)
    assert 0 < (theirs - ours).abs().max() / ours.abs().max() <= tolerance


def test_export_round_trip_sentencepiece(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    text = ("the quick brown fox jumps over the lazy dog. " * 3 + "hello world, a tiny corpus for a tiny model.\n") * 20
    (tmp_path / "corpus.txt").write_text(text)
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=300, model_type="bpe", byte_fallback=True,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   user_defined_symbols=["<|im_start|>"], minloglevel=2)
    tok = load_tokenizer({"kind": "sentencepiece", "model_file": str(tmp_path / "sp.model")})
    model = tiny_model(vocab_size=tok.vocab_size + 4)                                # padded embedding
    loaded, loaded_tok = load_gguf(export_gguf(model, tok, tmp_path / "m.gguf"))
    for sample in ("the lazy fox", "hello  world, jumps!", "ünïcödé ☃ 42", "  two\nlines "):
        assert loaded_tok.encode(sample) == tok.encode(sample), sample
        assert loaded_tok.decode(tok.encode(sample)) == tok.decode(tok.encode(sample))
    # a user-defined piece is one id, split off before the pieces are merged as llama.cpp does (SentencePiece
    # itself writes the dummy-prefix "▁" before it: ["▁", "<|im_start|>"])
    assert loaded_tok.encode("<|im_start|>") == tok.encode("<|im_start|>")[1:] == [3]
    assert (loaded_tok.bos_id, loaded_tok.eos_id) == (tok.bos_id, tok.eos_id) == (1, 2)
    assert loaded_tok.vocab_size == model.config.vocab_size
    assert torch.equal(logits(loaded, tok.encode("the dog")), logits(model, tok.encode("the dog")))


def trained_byte_level_bpe():
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([tokenizers.pre_tokenizers.Digits(individual_digits=True),
                                                           tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)])
    hf.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(["the quick brown fox jumps over the lazy dog 1234"] * 50, trainer)
    return tokenizers_tokenizer(hf.to_str(), bos="<|endoftext|>", eos="<|endoftext|>", chat_template="{{ x }}")


def test_export_round_trip_tokenizers_byte_level_bpe(tmp_path):
    tok = trained_byte_level_bpe()
    model = tiny_model(vocab_size=tok.vocab_size, share="immediate")
    path = export_gguf(model, tok, tmp_path / "m.gguf")
    meta, _ = gguf_file.read_gguf(path)
    assert meta["tokenizer.ggml.pre"] == "smollm" and meta["tokenizer.ggml.model"] == "gpt2"
    loaded, loaded_tok = load_gguf(path)
    for sample in ("the lazy dog 2024", "quick  brown\nfox é<|im_start|>"):
        assert loaded_tok.encode(sample) == tok.encode(sample) and loaded_tok.decode(tok.encode(sample)) == sample
    assert (loaded_tok.eos_id, loaded_tok.chat_template) == (tok.eos_id, "{{ x }}")
    assert loaded.num_params() == model.num_params() and loaded.config.share == "immediate"
    assert torch.equal(logits(loaded, tok.encode("the fox")), logits(model, tok.encode("the fox")))


def test_tiktoken_gpt2_vocabulary_tokenizes_as_tiktoken(shared_dir):
    """The metadata export writes, read back as the loader reads it (50k tokens: no file, to stay fast)."""
    tok = load_tokenizer({"kind": "tiktoken", "encoding": "gpt2"})
    meta = gguf_vocab.vocab_metadata(tok, 50304)                               # nanoGPT's padded embedding
    assert meta["tokenizer.ggml.pre"] == "gpt-2" and meta["tokenizer.ggml.tokens"][50303] == "[PAD50303]"
    loaded = gguf_vocab.tokenizer_from_gguf(meta, 50304)
    for text in ("hello world", "To be, or not to be:  that is 12345 the question.\n\n",
                 "naïve café — 東京 🙂", "<|endoftext|>The end"):
        assert loaded.encode(text) == tok.encode(text), text
        assert loaded.decode(tok.encode(text)) == text
    assert loaded.eos_id == 50256


def test_a_file_without_vocabulary_loads_with_no_tokenizer(tmp_path):
    model = tiny_model()
    loaded, tok = load_gguf(export_gguf(model, None, tmp_path / "m.gguf"))
    assert tok is None and torch.equal(logits(loaded, [1, 2]), logits(model, [1, 2]))


# --- bad input: one clear error each -----------------------------------------------------------------------

def test_without_the_gguf_package_the_error_says_what_to_install(tmp_path, monkeypatch):
    path = export_gguf(tiny_model(), None, tmp_path / "m.gguf")
    monkeypatch.setitem(sys.modules, "gguf", None)                        # import gguf now fails
    with pytest.raises(RuntimeError, match="pip install gguf"):
        load_gguf(path)


def test_non_gguf_truncated_and_missing_files_are_clear_errors(tmp_path):
    (tmp_path / "text.gguf").write_text("not a model at all\n" * 20)
    with pytest.raises(GGUFFormatError, match="text.gguf is not a GGUF file \\(it does not start with"):
        load_gguf(tmp_path / "text.gguf")
    data = export_gguf(tiny_model(), char_tokenizer(CHARS), tmp_path / "m.gguf").read_bytes()
    for cut in (40, len(data) // 2, len(data) - 8):           # in the metadata, in the tensors, at the end
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(GGUFFormatError, match=r"cut.gguf \(0.\d MB\) starts as a GGUF file but cannot be read: "
                                                  r"cut short \(an unfinished download\?\) or damaged"):
            load_gguf(tmp_path / "cut.gguf")
    with pytest.raises(CheckpointError, match="no GGUF file at .*missing.gguf"):        # loader's check, first
        load_model_and_tokenizer(str(tmp_path / "missing.gguf"))
    with pytest.raises(GGUFFormatError, match="no GGUF file at"):
        load_gguf(tmp_path / "missing.gguf")


def test_what_mobilellm_cannot_represent_is_named_in_one_error(tmp_path):
    model = tiny_model()
    keys = {"gpt2.rope.scaling.type": "yarn", "gpt2.expert_count": 4}
    extra = {"blk.0.attn_q.bias": np.zeros(64, np.float32), "blk.0.mystery.weight": np.zeros(64, np.float32)}
    with pytest.raises(GGUFFormatError) as e:
        load_gguf(write_llama_gguf(tmp_path / "m.gguf", model, arch="gpt2", keys=keys, tensors=extra))
    for problem in ("general.architecture 'gpt2'", "bias tensors (blk.0.attn_q.bias)", "rope scaling (yarn, factor 1.0",
                    "4 experts", "unknown tensors (blk.0.mystery.weight)"):
        assert problem in str(e.value)
    with pytest.raises(GGUFFormatError, match="key_length 32 != embedding_length / head_count"):
        load_gguf(write_llama_gguf(tmp_path / "k.gguf", model, keys={"llama.attention.key_length": 32}))


def test_unsupported_tensor_type_names_the_tensor(tmp_path):
    model = tiny_model()
    integers = {"blk.1.attn_v.weight": np.ones((32, 64), np.int32)}             # written as an I32 tensor
    with pytest.raises(GGUFFormatError, match="tensor blk.1.attn_v.weight has type I32"):
        load_gguf(write_llama_gguf(tmp_path / "m.gguf", model, tensors=integers))


def test_vocabulary_size_mismatch_and_unknown_pre_tokenizer_are_clear_errors(tmp_path):
    with pytest.raises(GGUFFormatError, match="262 tokens .* but the embedding has 300 rows"):
        load_gguf(write_llama_gguf(tmp_path / "a.gguf", tiny_model(vocab_size=300), vocab=byte_level_vocab("gpt-2")))
    with pytest.raises(GGUFFormatError, match="pre-tokenizer 'qwen2' is unknown here"):
        load_gguf(write_llama_gguf(tmp_path / "b.gguf", tiny_model(vocab_size=262), vocab=byte_level_vocab("qwen2")))
    with pytest.raises(GGUFFormatError, match="tokenizer has 59 tokens but the model only 50"):
        export_gguf(tiny_model(vocab_size=50), char_tokenizer(CHARS), tmp_path / "c.gguf")
    assert not (tmp_path / "c.gguf").exists() and not list(tmp_path.glob(".*tmp*"))


def test_tokenizers_other_than_byte_level_bpe_are_refused_on_export(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    with pytest.raises(GGUFFormatError, match="only a byte-level BPE tokenizer.json"):
        export_gguf(tiny_model(vocab_size=2), tokenizers_tokenizer(hf.to_str()), tmp_path / "m.gguf")


# --- the real model -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2():
    """The real SmolLM2-135M-Instruct from ../shared/models, loaded once: (model, tokenizer)."""
    path = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} is not there")
    return load_model_and_tokenizer(str(path))


def test_smollm2_q4_1_loads_tokenizes_and_answers(smollm2):
    jinja2 = pytest.importorskip("jinja2")
    model, tok = smollm2
    c = model.config
    assert (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.ffn_dim, c.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert c.tie_embeddings and c.rope_theta == 100000.0 and model.num_params() == 134_515_008
    assert tok.encode("The capital of France is") == [504, 3575, 282, 4649, 314]     # SmolLM2's own tokenization
    assert tok.encode("Hello world! 123") == [19556, 905, 17, 216, 33, 34, 35]       # digits one by one
    for text in ("  multiple   spaces\n\ttabs", "Café déjà vu: 3.14159 € 東京 🙂", "x = [1, 2]  # done"):
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|im_start|>") == [1] and tok.eos_id == 2 and tok.bos_id is None
    prompt = jinja2.Template(tok.chat_template).render(
        messages=[{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True)
    answer = ""
    for token in model.generate_tokens(torch.tensor([tok.encode(prompt)]), 20, temperature=0):
        answer += tok.decode(token[0].tolist())
        if "Paris" in answer:
            break
    assert "Paris" in answer, answer


def test_smollm2_greedy_text_equals_transformers_on_its_hf_export(smollm2, tmp_path):
    """The same weights through hf.py's export and transformers' own Llama: same ids, logits, greedy text."""
    transformers = pytest.importorskip("transformers")
    from hf import export_hf
    model, tok = smollm2
    export_hf(model, tmp_path, tok)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    prompt = "The capital of France is"
    ids = tok.encode(prompt)
    assert hf_tok(prompt)["input_ids"] == ids
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0]
        theirs = hf_model(torch.tensor([ids])).logits
        assert (ours - theirs).abs().max() < 1e-3
        text = model.generate(torch.tensor([ids]), 24, temperature=0)[0].tolist()
        hf_text = hf_model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0].tolist()
    assert tok.decode(text) == hf_tok.decode(hf_text), (tok.decode(text), hf_tok.decode(hf_text))


# --- llama.cpp itself, where llama-cpp-python's bindings import -------------------------------------------

def llama_cpp_model(path, **kw):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python's bindings are not installed")
    return llama_cpp.Llama(str(path), n_ctx=64, n_threads=1, verbose=False, **kw)


def llama_cpp_detokenize(llm, ids):
    """Text from ids by llama.cpp's own llama_detokenize, which drops the SentencePiece prefix space as we do
    (llama-cpp-python's Llama.detokenize joins the pieces and keeps that space unless a BOS comes first)."""
    import llama_cpp
    text = ctypes.create_string_buffer(1024)
    n = llama_cpp.llama_detokenize(llama_cpp.llama_model_get_vocab(llm.model), (llama_cpp.llama_token * len(ids))(*ids),
                                   len(ids), text, len(text), False, True)
    return text.raw[:n].decode()


@pytest.mark.parametrize("kind", ["char", "sentencepiece", "tokenizers"])
def test_llama_cpp_tokenizes_and_computes_our_export_as_we_do(tmp_path, kind):
    if kind == "char":
        tok, text = char_tokenizer(CHARS), "Hello, world!\nIt's  a test."
    elif kind == "sentencepiece":
        spm = pytest.importorskip("sentencepiece")
        (tmp_path / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog.\n" * 50)
        spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "sp"),
                                       vocab_size=300, model_type="bpe", byte_fallback=True,
                                       normalization_rule_name="identity", remove_extra_whitespaces=False,
                                       minloglevel=2)
        tok = load_tokenizer({"kind": "sentencepiece", "model_file": str(tmp_path / "sp.model")})
        text = "the lazy ☃ fox"
    else:
        tok, text = trained_byte_level_bpe(), "the lazy dog 2024<|im_start|> é"
    model = tiny_model(vocab_size=tok.vocab_size, share="immediate")
    llm = llama_cpp_model(export_gguf(model, tok, tmp_path / "m.gguf"), logits_all=True)
    ids = llm.tokenize(text.encode(), add_bos=False, special=True)
    assert ids == tok.encode(text) and llama_cpp_detokenize(llm, ids) == tok.decode(ids)
    llm.eval(ids)
    theirs = torch.from_numpy(llm.scores[:len(ids)].copy())
    torch.testing.assert_close(theirs, logits(model, ids), rtol=0, atol=1e-3)


def test_llama_cpp_tokenizes_smollm2_as_our_loader_does(shared_dir):
    path = shared_dir / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} is not there")
    llm = llama_cpp_model(path, vocab_only=True)
    meta, _ = gguf_file.read_gguf(path)
    tok = gguf_vocab.tokenizer_from_gguf(meta, 49152)
    for text in ("The capital of France is", "Hello world! 123", "  multiple   spaces\n\ttabs",
                 "Café déjà vu: 3.14159 € 東京 🙂", "<|im_start|>user\nHi<|im_end|>\n"):
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text), text
