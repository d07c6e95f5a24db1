"""
GGUF in and out: llama.cpp's model files load as MobileLLMs, and our models export to llama.cpp with their
vocabulary (`pip install gguf`).

  python export.py --init_from=out-shakespeare-char --format=gguf --out=model.gguf              # fp32 (F32)
  python export.py --init_from=facebook/MobileLLM-125M --format=gguf --dtype=fp16 --out=m.gguf  # any source

  from gguf_file import load_gguf, export_gguf
  model, tokenizer = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")   # also: loader.py takes any *.gguf path
  export_gguf(model, tokenizer, "model.gguf", tensor_type="Q8_0")

Weights. MobileLLM is llama.cpp's LLaMA architecture: blk.i.{attn_norm, attn_q, attn_k, attn_v, attn_output,
ffn_norm, ffn_gate, ffn_up, ffn_down}, token_embd, output_norm and output (absent: tied to token_embd).
llama.cpp rotates neighbouring dims (2i, 2i+1) where model.py rotates halves (i, i + D/2), so the rows of
attn_q and attn_k are stored permuted (rope_pairs_adjacent) and unpermuted on load (rope_pairs_halved).
Quantized tensors (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, ...) are dequantized to float32 by the
gguf package. llama.cpp has no layer sharing: a layer-shared model is written once per block application,
with keys of ours (nanomobilellm.share, .share_repeats, .n_layers) from which load_gguf rebuilds it.

Vocabulary (gguf_vocab.py). A GGUF carries its tokenizer (tokenizer.ggml.*); it is rebuilt as a Hugging Face
tokenizer.json that tokenizes as llama.cpp does (tokenizer.py's "tokenizers" kind):
  gpt2   byte-level BPE: tokens, merges, and the pre-tokenizer named by tokenizer.ggml.pre (PRE_TOKENIZERS)
  llama  SentencePiece BPE: pieces merged by score, <0xNN> byte fallback, "▁" for spaces, a dummy prefix space
On export each of our tokenizer kinds becomes one of these: char -> llama (one piece per character, no
merges; llama.cpp assumes EOS id 2 for a llama vocabulary without one), tiktoken gpt2 -> gpt2 (merges from
tiktoken's ranks), sentencepiece -> llama (the .model's pieces, scores and types), tokenizers (byte-level
BPE) -> gpt2. Padded embeddings get unused [PADn] tokens, as llama.cpp's converter writes them.
"""
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from checkpoint import atomic_write
from gguf_vocab import GGUFFormatError, tokenizer_from_gguf, vocab_metadata
from model import MobileLLM, ModelConfig, block_schedule, rope_tables

BLOCK_TENSORS = {                 # llama.cpp's name in blk.i -> ours in layers.b
    "attn_norm": "attention_norm", "attn_q": "attention.wq", "attn_k": "attention.wk",
    "attn_v": "attention.wv", "attn_output": "attention.wo", "ffn_norm": "ffn_norm",
    "ffn_gate": "feed_forward.w1", "ffn_up": "feed_forward.w3", "ffn_down": "feed_forward.w2",   # SwiGLU
}
TOP_TENSORS = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}
SHARE_KEYS = ("nanomobilellm.share", "nanomobilellm.share_repeats", "nanomobilellm.n_layers")
EXPORT_TYPES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}   # export.py --dtype -> tensor type


def _require_gguf():
    try:
        import gguf
    except ImportError as e:
        raise RuntimeError("GGUF files need the gguf package: pip install gguf") from e
    return gguf


# --- llama.cpp's rotary layout ---------------------------------------------------------------------

def rope_pairs_adjacent(weight, n_heads):
    """Reorder the output rows of wq or wk (n_heads * D, dim) for llama.cpp's rotary embedding.
    model.py rotates each head's halves (dims i and i + D/2 form a pair); llama.cpp's LLaMA rotates
    neighbours (2i, 2i + 1). Moving row i to 2i and row i + D/2 to 2i + 1 gives the same rotated pairs,
    and the same reordering of q and k leaves every attention score q.k unchanged."""
    out, dim = weight.shape
    return weight.reshape(n_heads, 2, out // n_heads // 2, dim).transpose(1, 2).reshape(out, dim)


def rope_pairs_halved(weight, n_heads):
    """The inverse of rope_pairs_adjacent: llama.cpp's q/k rows (n_heads * D, dim) back in model.py's layout."""
    out, dim = weight.shape
    return weight.reshape(n_heads, out // n_heads // 2, 2, dim).transpose(1, 2).reshape(out, dim)


# --- reading ---------------------------------------------------------------------------------------

def read_gguf(path):
    """(metadata {key: value}, {tensor name: gguf ReaderTensor}) of a GGUF file; one GGUFFormatError when
    the file is missing, truncated or not GGUF."""
    gguf = _require_gguf()
    path = Path(path)
    if not path.is_file():
        raise GGUFFormatError(f"no GGUF file at {path}")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise GGUFFormatError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF')")
    try:
        reader = gguf.GGUFReader(path)
        meta = {name: field.contents() for name, field in reader.fields.items()}
    except Exception as e:  # the reader raises ValueError, KeyError, IndexError, ... on cut or damaged files
        raise GGUFFormatError(f"{path} ({path.stat().st_size / 2**20:.1f} MB) starts as a GGUF file but cannot be "
                              f"read: cut short (an unfinished download?) or damaged ({type(e).__name__}: {e})") from e
    return meta, {t.name: t for t in reader.tensors}


def tensor_weight(tensor):
    """A GGUF tensor as a float32 torch tensor, in PyTorch's shape order (rows, cols)."""
    gguf = _require_gguf()
    try:
        values = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)   # ndarray: memmap views are slow
    except NotImplementedError:
        raise GGUFFormatError(f"tensor {tensor.name} has type {tensor.tensor_type.name}, which cannot be read "
                              "as weights (the gguf package does not dequantize it)") from None
    values = np.array(values, dtype=np.float32)      # a writable copy: the reader's arrays map the file
    return torch.from_numpy(values).reshape(tuple(reversed(tensor.shape.tolist())))


def _listed(names):
    return ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")


def _metadata_problems(meta, arch):
    """Everything in the metadata that MobileLLM's LLaMA architecture has no place for."""
    problems = [] if arch == "llama" else [f"general.architecture {arch!r} (only 'llama')"]
    scaling, factor = meta.get(f"{arch}.rope.scaling.type", "none"), meta.get(f"{arch}.rope.scaling.factor", 1.0)
    if scaling != "none" or factor != 1.0:
        problems.append(f"rope scaling ({scaling}, factor {factor}; only plain RoPE)")
    if meta.get(f"{arch}.expert_count", 0):
        problems.append(f"{meta[f'{arch}.expert_count']} experts (mixture of experts)")
    problems += [f"no {arch}.{key}" for key in ("embedding_length", "block_count", "feed_forward_length",
                                               "attention.head_count") if f"{arch}.{key}" not in meta]
    problems += [f"{arch}.{key} varies by layer" for key in ("feed_forward_length", "attention.head_count",
                                                            "attention.head_count_kv")
                 if isinstance(meta.get(f"{arch}.{key}"), list)]
    dim, heads = meta.get(f"{arch}.embedding_length"), meta.get(f"{arch}.attention.head_count")
    if isinstance(dim, int) and isinstance(heads, int) and heads:
        problems += [f"{arch}.{key} {meta[f'{arch}.{key}']} != embedding_length / head_count"
                     for key in ("attention.key_length", "attention.value_length", "rope.dimension_count")
                     if meta.get(f"{arch}.{key}", dim // heads) != dim // heads]
    return problems


def _tensor_problems(tensors, n_blocks):
    """Tensors that MobileLLM has no place for (n_blocks: block_count), and a missing embedding."""
    known = {f"{theirs}.weight" for theirs in TOP_TENSORS}
    known |= {f"blk.{i}.{theirs}.weight" for i in range(n_blocks) for theirs in BLOCK_TENSORS}
    biases = sorted(n for n in tensors if n.endswith(".bias"))
    unknown = sorted(n for n in tensors if n not in known and n not in biases)
    problems = [f"bias tensors ({_listed(biases)})"] if biases else []
    if unknown:
        problems.append(f"unknown tensors ({_listed(unknown)})")
    if "token_embd.weight" not in tensors:
        problems.append("no token_embd.weight")
    return problems


def _shortest(value):
    """A float32 from the file as the shortest decimal that rounds to it (1e-5, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def config_from_gguf(meta, tensors, path="this GGUF"):
    """ModelConfig from llama.* metadata; one GGUFFormatError naming every problem. The config is the
    unrolled one (n_layers = block_count) unless our share keys say how to fold it (see shared_config)."""
    arch = meta.get("general.architecture")
    n_blocks = meta.get(f"{arch}.block_count")
    problems = _metadata_problems(meta, arch) + _tensor_problems(tensors, n_blocks if isinstance(n_blocks, int) else 0)
    if problems:
        raise GGUFFormatError(f"{path} cannot be represented by MobileLLM: " + "; ".join(problems))
    heads = meta[f"{arch}.attention.head_count"]
    try:
        return ModelConfig(
            vocab_size=int(tensors["token_embd.weight"].shape[1]), dim=meta[f"{arch}.embedding_length"],
            n_layers=meta[f"{arch}.block_count"], n_heads=heads,
            n_kv_heads=meta.get(f"{arch}.attention.head_count_kv", heads),
            ffn_dim=meta[f"{arch}.feed_forward_length"], block_size=meta.get(f"{arch}.context_length", 2048),
            rope_theta=_shortest(meta.get(f"{arch}.rope.freq_base", 10000.0)),
            norm_eps=_shortest(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            tie_embeddings="output.weight" not in tensors)
    except ValueError as e:
        raise GGUFFormatError(f"{path} cannot be represented by MobileLLM: {e}") from e


def shared_config(meta, config, path="this GGUF"):
    """The layer-shared config our export recorded (nanomobilellm.* keys), or config when there is none."""
    if not any(key in meta for key in SHARE_KEYS):
        return config
    try:
        shared = replace(config, share=meta[SHARE_KEYS[0]], share_repeats=meta[SHARE_KEYS[1]],
                         n_layers=meta[SHARE_KEYS[2]])
    except (KeyError, ValueError) as e:
        raise GGUFFormatError(f"{path} has unusable layer-sharing keys ({type(e).__name__}: {e})") from e
    if shared.depth != config.n_layers:
        raise GGUFFormatError(f"{path}: sharing {shared.n_layers} blocks as {shared.share!r} x{shared.share_repeats} "
                              f"gives {shared.depth} block applications, but the file has {config.n_layers} layers")
    return shared


def state_dict_from_gguf(tensors, config, path="this GGUF"):
    """Our state_dict from the GGUF tensors: q/k rows unpermuted; with layer sharing, block b from its first
    application, after checking that every other application of it holds the same weights."""
    sd = {f"{ours}.weight": tensor_weight(tensors[f"{theirs}.weight"])
          for theirs, ours in TOP_TENSORS.items() if f"{theirs}.weight" in tensors}
    first_use = {}
    for depth, block in enumerate(block_schedule(config)):
        for theirs, ours in BLOCK_TENSORS.items():
            name = f"blk.{depth}.{theirs}.weight"
            if name not in tensors:
                raise GGUFFormatError(f"{path} has no {name}")
            weight = tensor_weight(tensors[name])
            if theirs in ("attn_q", "attn_k"):
                weight = rope_pairs_halved(weight, config.n_heads if theirs == "attn_q" else config.n_kv_heads)
            key = f"layers.{block}.{ours}.weight"
            if key not in sd:
                sd[key], first_use[key] = weight.contiguous(), name
            elif not torch.equal(sd[key], weight):
                raise GGUFFormatError(f"{path}: {name} differs from {first_use[key]}, though the file says both "
                                      f"are applications of shared block {block}")
    if config.tie_embeddings:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    return sd


def model_with_weights(config, sd):
    """A MobileLLM whose parameters ARE the tensors of sd. Built on the meta device, so no weight is randomly
    initialized only to be overwritten (seconds saved on a 135M model)."""
    with torch.device("meta"):
        model = MobileLLM(config)
    model.load_state_dict(sd, assign=True)
    if config.tie_embeddings:          # assign gave the head a parameter of its own: share the embedding's again
        model.output.weight = model.tok_embeddings.weight
    model.rope_cos, model.rope_sin = rope_tables(config.head_dim, config.block_size, config.rope_theta)
    return model


def load_gguf(path, device="cpu"):
    """A llama.cpp GGUF file -> (model in eval mode, tokenizer from its vocabulary, or None without one)."""
    meta, tensors = read_gguf(path)
    config = shared_config(meta, config_from_gguf(meta, tensors, path), path)
    try:
        model = model_with_weights(config, state_dict_from_gguf(tensors, config, path))
    except RuntimeError as e:   # a tensor of the wrong shape
        raise GGUFFormatError(f"the tensors in {path} do not match its metadata: {e}") from e
    return model.to(device).eval(), tokenizer_from_gguf(meta, config.vocab_size, path)


def _add_metadata(writer, meta):
    """Write {key: value} with GGUF's types: bool, uint32 for ints, float32, string, array (of int32, float32 or
    string)."""
    for key, value in meta.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)


# --- writing -------------------------------------------------------------------------------------------

def gguf_tensors(model):
    """GGUF tensor name -> float32 numpy weight in llama.cpp's LLaMA layout, one blk.i per block application;
    a tied embedding is stored once (token_embd)."""
    c = model.config
    if c.ffn_type != "swiglu":
        raise GGUFFormatError(f"llama.cpp's LLaMA architecture needs ffn_type='swiglu', got {c.ffn_type!r}")
    tensors = {"token_embd.weight": model.tok_embeddings.weight, "output_norm.weight": model.norm.weight}
    if not c.tie_embeddings:
        tensors["output.weight"] = model.output.weight
    for i, b in enumerate(model.schedule):
        for theirs, ours in BLOCK_TENSORS.items():
            weight = model.layers[b].get_parameter(f"{ours}.weight")
            if theirs in ("attn_q", "attn_k"):
                weight = rope_pairs_adjacent(weight, c.n_heads if theirs == "attn_q" else c.n_kv_heads)
            tensors[f"blk.{i}.{theirs}.weight"] = weight
    return {name: t.detach().float().contiguous().numpy() for name, t in tensors.items()}


def _add_tensor(writer, name, array, tensor_type):
    """Norms stay F32 (as llama.cpp writes them); a matrix whose rows do not split into the type's blocks is F16."""
    gguf = _require_gguf()
    qtype = gguf.GGMLQuantizationType[tensor_type]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if array.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, array)
    elif qtype == gguf.GGMLQuantizationType.F16 or array.shape[-1] % block:
        writer.add_tensor(name, array.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)


def export_gguf(model, tokenizer, path, tensor_type="F32"):
    """Write model (and tokenizer's vocabulary; None: no vocabulary) as a llama.cpp LLaMA GGUF, atomically.
    tensor_type: F32, F16, BF16 or Q8_0 for the matrices. A layer-shared model is unrolled (one blk.i per block
    application) and our nanomobilellm.* keys record how to fold it back."""
    gguf = _require_gguf()
    if tensor_type not in EXPORT_TYPES.values():
        raise ValueError(f"tensor_type must be one of {', '.join(EXPORT_TYPES.values())}, got {tensor_type!r}")
    return atomic_write(path, lambda tmp: _write_gguf(gguf, model, tokenizer, tmp, tensor_type))


def _write_gguf(gguf, model, tokenizer, tmp, tensor_type):
    c = model.config
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_context_length(c.block_size)
    writer.add_embedding_length(c.dim)
    writer.add_block_count(len(model.schedule))
    writer.add_feed_forward_length(c.ffn_dim)
    writer.add_head_count(c.n_heads)
    writer.add_head_count_kv(c.n_kv_heads)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_vocab_size(c.vocab_size)
    file_types = gguf.LlamaFileType
    writer.add_file_type({"F32": file_types.ALL_F32, "F16": file_types.MOSTLY_F16,
                          "BF16": file_types.MOSTLY_BF16, "Q8_0": file_types.MOSTLY_Q8_0}[tensor_type])
    if c.share != "none":
        _add_metadata(writer, dict(zip(SHARE_KEYS, (c.share, c.share_repeats, c.n_layers))))
    _add_metadata(writer, vocab_metadata(tokenizer, c.vocab_size))
    for name, array in gguf_tensors(model).items():
        _add_tensor(writer, name, array, tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
