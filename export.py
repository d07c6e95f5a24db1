"""
Export a MobileLLM: a phone program, an ExecuTorch .pte with the XNNPACK delegate (fp32, the paper's
W8A8, or 8da4w) or a TorchScript lite-interpreter .ptl, which bench_mobile.py times; or the model for
llama.cpp (a .gguf, gguf_file.py) or transformers (a Hugging Face directory, hf.py).

  python export.py --init_from out-shakespeare-char --dtype w8a8 --out model.pte   # our checkpoint -> .pte
  python export.py --init_from out-quant --dtype w8a8 --out model.pte              # an int8 checkpoint (below)
  python export.py --init_from mobilellm-125m-ls:n_layers=2 --dtype 8da4w           # a preset, random weights
  python export.py --init_from facebook/MobileLLM-125M --format ptl --out model.ptl # lite interpreter
  python export.py --init_from out-shakespeare-char --format gguf --dtype fp16 --out model.gguf   # llama.cpp
  python export.py --init_from model.gguf --format hf --out out-hf                  # transformers, lm-eval's hf

In Python: `path = export.cached_pte(model, "w8a8", max_seq_len=256)` (exported once per weights and
options, kept in out-mobile/cache/), or `data, info = export.export_pte(model, "w8a8")` for the bytes.
--init_from takes what loader.py loads, a preset with overrides `NAME[:field=value+...]` included (random
weights, seed --seed). An int8 checkpoint from quantize.py is dequantized to its float-equivalent weights
and re-quantized by ExecuTorch's XNNPACK int8 flow, which makes the same per-channel symmetric int8 weights.

How the program is built (the ideas, top to bottom):
  * ExportLLM: a thin forward over a MobileLLM's own modules (no weight is copied): KV cache laid out
    (B, T, H_kv, D), one buffer pair per block *application*, written and read by ExecuTorch's
    llama::sdpa_with_kv_cache, one op per application (the portable index_copy_/SDPA kernels are slow).
    RMSNorm, RoPE and reshapes are written so that XNNPACK takes all of them (rotate-half as a DxD matmul,
    the mean of squares as a 4-D mean, views with one inferred dim): XNNPACK runs all around the cache op.
  * Lowering, piece by piece: each block application is two XNNPACK delegates (FrontHalf: norm, q/k/v,
    RoPE; BackHalf: output projection, SwiGLU), with the KV-cache op between them, plus the head. Each
    piece is lowered on its own (xnnpack_lowering.py), and only block 0's: every other block computes the
    same on other weights, so it gets block 0's delegates with its own weights swapped in (restamped,
    through executorch_private.py). A 125M model is three lowerings, not thirty blocks' worth of whole-graph passes.
  * Shared blocks (MobileLLM-LS): both applications of a block call its one pair of lowered halves, and
    the emitted program points both DelegateCalls at ONE delegate (share_identical_delegates): each shared
    weight is packed once at init and re-read right after, from cache where the block fits it (ExecuTorch
    would pack and stream it twice). LS-125M lowers no more than 125M does.
  * w8a8 = the paper's W8A8: XNNPACKQuantizer, dynamic per-token int8 activations, per-channel int8 weights.
    8da4w = the same activations with 4-bit weights in groups of 32 (torchao), half the bytes again.
    Both look tokens up in an int8 copy of the tied embedding (a scale per row): the lookup is not an
    XNNPACK op, so the table is stored apart from the head's packed weights, but in 1 byte, not 4.
"""
import argparse
import copy
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import CheckpointError, atomic_write
from configurator import HelpFormatter, at_least, usage_description
from gguf_file import EXPORT_TYPES as GGUF_TYPES, export_gguf
from hf import export_hf
from int8 import Int8Embedding, Int8Linear, dequantize_per_channel, is_quantized, quantize_per_channel
from loader import dtype_name, load_model_and_tokenizer, require_source
from model import MobileLLM
from xnnpack_lowering import emit_composed, lower, lowered_alike, quantize_8da4w, tensor_bytes

EXPORT_VERSION = {"fp32": 4, "w8a8": 5, "8da4w": 5}   # bump a dtype's when its programs change (cache key)
CACHE_DIR = Path("out-mobile/cache")    # out*/ is git-ignored
PROGRAM_DTYPES = ("fp32", "w8a8", "8da4w")
OLD_PROGRAM_DTYPES = {"int8": "w8a8"}   # the W8A8 program's former name, still taken on the command line
FORMAT_DTYPES = {"pte": PROGRAM_DTYPES, "ptl": ("fp32",), "gguf": tuple(GGUF_TYPES), "hf": ("fp32",)}
LOWERINGS = ("shared", "naive")         # identical block delegates shared (MobileLLM-LS), or ExecuTorch's own
SUFFIX_FORMATS = {".pte": "pte", ".ptl": "ptl", ".gguf": "gguf"}       # --out's suffix names its --format
MAX_SEQ_LEN = 256                       # a program's KV cache length unless --max_seq_len says (or a shorter context)
MIN_SEQ_LEN = 3                         # the dynamic token count 1..max_seq_len-1 must hold the 2-token example


class ExportError(Exception):
    """Bad input or a missing tool, with one message saying what to do."""


def require_executorch():
    """Import ExecuTorch, without the three lines of noise its import prints on a CPU torch: torchao (which
    ExecuTorch brings) cannot load its CUDA kernels, and torch calls one of torchao's enums' registration
    deprecated. Neither concerns a CPU export; the loggers' levels are restored after the import."""
    noisy = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in noisy]
    for log in noisy:
        log.setLevel(logging.ERROR)
    try:
        import executorch.exir  # noqa: F401
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  registers torch.ops.llama.*
    except ImportError as e:
        raise ExportError(f"ExecuTorch is not installed ({e}): pip install -r requirements-extra.txt "
                          "(executorch==1.4.0 matches torch 2.13.0)") from e
    finally:
        for log, level in zip(noisy, levels):
            log.setLevel(level)


# --- the model source ---------------------------------------------------------------------------------

def check_source(init_from):
    """One clear error, before any slow work, for an --init_from that cannot load: a preset spec that does not
    parse, or a local file or folder that is not there (anything else fails, clearly, when it loads)."""
    try:
        require_source(init_from)
    except (CheckpointError, ValueError) as e:
        raise ExportError(f"--init_from {init_from!r}: {e}") from e


def program_dtype(name):
    """A --dtype of export.py or bench_mobile.py as its one spelling: dtype_name's, or an old name's new one."""
    return OLD_PROGRAM_DTYPES.get(name, dtype_name(name))


def dequantized(qmodel):
    """An int8 model (int8.py) as the float model its int8 weights stand for (w = q * scale), ready
    for ExecuTorch's own int8 flow, which makes the same per-channel symmetric int8 weights again. The
    tied embedding/head stays one tensor."""
    model = MobileLLM(qmodel.config).eval()
    float_state = {}
    for name, module in qmodel.named_modules():
        if isinstance(module, (Int8Linear, Int8Embedding)):
            float_state[f"{name}.weight"] = dequantize_per_channel(module.qweight, module.scale)
    state = {k: v for k, v in qmodel.state_dict().items() if not k.endswith((".qweight", ".scale"))}
    model.load_state_dict({**state, **float_state})
    return model


def program_seq_len(model, requested=0):
    """The KV cache length of a program of `model`: `requested` (--max_seq_len), or for 0 the model's context
    up to MAX_SEQ_LEN. One clear error where it exceeds the model's context."""
    block_size = model.config.block_size
    if not (requested == 0 or MIN_SEQ_LEN <= requested <= block_size):
        raise ExportError(f"--max_seq_len ({requested}) must be in {MIN_SEQ_LEN}..{block_size}, the model's "
                          f"block_size (0: the model's context, at most {MAX_SEQ_LEN})")
    return requested or min(MAX_SEQ_LEN, block_size)


def load_source(init_from, seed=0):
    """(the float MobileLLM to export, its tokenizer): anything loader.load_model_and_tokenizer reads (our
    checkpoints, HF dirs, GGUF files, a preset with overrides: random weights drawn from seed, no tokenizer);
    an int8 model is dequantized."""
    check_source(init_from)
    try:
        model, tokenizer = load_model_and_tokenizer(init_from, seed=seed)
    except (CheckpointError, ValueError, RuntimeError, OSError) as e:
        raise ExportError(f"--init_from {init_from!r}: {e}") from e
    if is_quantized(model):
        tqdm.write(f"note: {init_from} holds int8 weights: exported from the float weights they stand for, which "
                   "--dtype w8a8 (.pte) or q8_0 (.gguf) quantize to 8 bits again")
        model = dequantized(model)
    return model, tokenizer


def source_hash(model):
    """Hash of config + weights: the cache key of an exported program."""
    h = hashlib.sha256(json.dumps(asdict(model.config), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor_bytes(tensor))
    return h.hexdigest()[:16]


# --- the export-friendly forward ---------------------------------------------------------------------

def rms_norm(norm, x):
    """model.RMSNorm's math, written so XNNPACK takes it: the mean of squares as a 4-D mean over the
    innermost dims (XNNPACK's only mean). x: (1, T, C)."""
    ms = (x * x).view(1, -1, 1, x.size(-1)).mean((2, 3), keepdim=True).view(1, -1, 1)    # (1, T, 1)
    return x * torch.rsqrt(ms + norm.eps) * norm.weight


def rotate_half_matrix(head_dim):
    """R with x @ R.T == cat(-x2, x1): model.apply_rope's rotate-half as a (D, D) matmul (XNNPACK has no
    slicing of dynamic-length tensors, but a tiny linear costs nothing)."""
    half = head_dim // 2
    r = torch.zeros(head_dim, head_dim)
    r[torch.arange(half), torch.arange(half) + half] = -1.0
    r[torch.arange(half) + half, torch.arange(half)] = 1.0
    return r


class FrontHalf(nn.Module):
    """The first half of a block application, one XNNPACK delegate: attention norm, q/k/v, RoPE.
    (x (1, T, C), cos, sin (T, 1, D)) -> q (1, T, H, D), k, v (1, T, H_kv, D)."""

    def __init__(self, block, config):
        super().__init__()
        self.block, self.config = block, config
        self.register_buffer("rotate_half", rotate_half_matrix(config.head_dim), persistent=False)

    def rope(self, x, cos, sin):                                        # x: (1, T, H, D)
        return x * cos + F.linear(x, self.rotate_half) * sin

    def forward(self, x, cos, sin):
        c, attn = self.config, self.block.attention
        h = rms_norm(self.block.attention_norm, x)
        q = self.rope(attn.wq(h).view(1, -1, c.n_heads, c.head_dim), cos, sin)             # (1, T, H, D)
        k = self.rope(attn.wk(h).view(1, -1, c.n_kv_heads, c.head_dim), cos, sin)          # (1, T, H_kv, D)
        v = attn.wv(h).view(1, -1, c.n_kv_heads, c.head_dim)                                # (1, T, H_kv, D)
        return q, k, v


class BackHalf(nn.Module):
    """The second half, one XNNPACK delegate: output projection, SwiGLU, residuals.
    (x (1, T, C), y (1, T, H, D) the attention's output) -> x (1, T, C)."""

    def __init__(self, block, config):
        super().__init__()
        self.block, self.config = block, config

    def forward(self, x, y):
        x = x + self.block.attention.wo(y.view(1, -1, self.config.dim))
        return x + self.block.feed_forward(rms_norm(self.block.ffn_norm, x))


class Head(nn.Module):
    """Final norm and LM head, one XNNPACK delegate: x (1, 1, C) -> logits (1, V)."""

    def __init__(self, model):
        super().__init__()
        self.norm, self.output = model.norm, model.output

    def forward(self, x):
        return self.output(rms_norm(self.norm, x)).view(1, -1)


def unshared_applications(model):
    """The block of each application in model.schedule, a repeated block as a copy of its weights. A
    constant used by two delegates makes ExecuTorch's partitioner duplicate it, and every duplication
    re-validates and recompiles the whole graph: with a copy per application, lowering the whole graph
    (the naive lowering) stays linear in the depth."""
    seen, blocks = set(), []
    for b in model.schedule:
        blocks.append(copy.deepcopy(model.layers[b]) if b in seen else model.layers[b])
        seen.add(b)
    return blocks


class ExportLLM(nn.Module):
    """forward(tokens (1, T), input_pos (T,) = start..start+T-1) -> logits of the last token (1, V), with a
    static KV cache inside. `halves`: (front, back) of each block application in model.schedule, and
    `head`: FrontHalf/BackHalf/Head modules (default: over the model's own weights, a repeated block as a
    copy), or the same lowered to XNNPACK (lowered_pieces)."""

    def __init__(self, model, max_seq_len, int8_embedding=False, halves=None, head=None):
        super().__init__()
        c = model.config
        if max_seq_len > c.block_size:
            raise ExportError(f"max_seq_len ({max_seq_len}) exceeds the model's block_size ({c.block_size})")
        self.model, self.max_seq_len, self.int8_embedding = model, max_seq_len, int8_embedding
        if int8_embedding:              # int8.py's embedding: symmetric per row, as the int8 head
            table, scale = quantize_per_channel(model.tok_embeddings.weight.detach())       # (V, C), (V,)
            self.register_buffer("embedding_int8", table, persistent=False)
            self.register_buffer("embedding_scale", scale[:, None], persistent=False)        # (V, 1)
        halves = halves or [(FrontHalf(b, c), BackHalf(b, c)) for b in unshared_applications(model)]
        self.fronts = nn.ModuleList(front for front, _ in halves)     # an LS model's lowered halves repeat
        self.backs = nn.ModuleList(back for _, back in halves)
        self.head = head or Head(model)
        shape = (1, max_seq_len, c.n_kv_heads, c.head_dim)                                  # (B, L, H_kv, D)
        for i in range(len(model.schedule)):
            self.register_buffer(f"k_cache_{i}", torch.zeros(shape), persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(shape), persistent=False)

    def embed(self, tokens):                                                        # (1, T) -> (1, T, C)
        if not self.int8_embedding:
            return self.model.tok_embeddings(tokens)
        return F.embedding(tokens, self.embedding_int8).float() * F.embedding(tokens, self.embedding_scale)

    def forward(self, tokens, input_pos):
        m = self.model
        T = tokens.size(1)
        start = input_pos[0].item()
        torch._check(start >= 0)                    # the data-dependent cache position's range, for torch.export
        torch._check(start + T <= self.max_seq_len)
        cos, sin = m.rope_cos.narrow(0, start, T), m.rope_sin.narrow(0, start, T)          # (T, D/2)
        cos, sin = torch.cat([cos, cos], -1)[:, None, :], torch.cat([sin, sin], -1)[:, None, :]  # (T, 1, D)
        x = self.embed(tokens)                                                              # (1, T, C)
        for i, (front, back) in enumerate(zip(self.fronts, self.backs)):
            q, k, v = front(x, cos, sin)
            x = back(x, self.attention(i, q, k, v, start))                                  # (1, T, C)
        return self.head(x[:, -1:, :])                                                      # (1, V)

    def attention(self, i, q, k, v, start):             # q: (1, T, H, D), k, v: (1, T, H_kv, D) -> (1, T, H, D)
        """Write k, v into application i's cache at `start` and attend over it: one ExecuTorch op."""
        k_cache, v_cache = getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}")
        return torch.ops.llama.sdpa_with_kv_cache(q, k, v, k_cache, v_cache, start, q.size(1), None, 0, True)


# --- the program: pieces lowered by xnnpack_lowering.py, composed, emitted --------------------------

def untied_copy(model):
    """A copy whose LM head has its own weight: 8da4w makes the head int4 while the embedding table
    stays float (the source model stays tied and untouched)."""
    model = copy.deepcopy(model)
    model.output.weight = nn.Parameter(model.output.weight.detach().clone())
    return model


@torch.no_grad()
def export_pte(model, dtype="fp32", max_seq_len=0, share_blocks=True, static_len=None):
    """Lower a MobileLLM to an ExecuTorch program (bytes) with the XNNPACK delegate and a static KV cache.
    share_blocks: each unique block's halves lowered once and shared by its applications (see the top);
    False is the naive lowering of the whole graph. static_len: a fixed token count instead of a dynamic
    1..max_seq_len-1 (for runners that fill the inputs themselves). max_seq_len: the KV cache length
    (program_seq_len; 0: the model's context, at most MAX_SEQ_LEN). Returns (bytes, info dict)."""
    require_executorch()
    max_seq_len = program_seq_len(model, max_seq_len)
    if dtype not in PROGRAM_DTYPES:
        raise ExportError(f"dtype must be one of {PROGRAM_DTYPES}, got {dtype!r}")
    t0 = time.perf_counter()
    if dtype == "8da4w":
        model = quantize_8da4w(untied_copy(model))
    T = static_len or 2
    example = (torch.zeros(1, T, dtype=torch.long), torch.arange(T))
    seq = None if static_len else torch.export.Dim("seq", min=1, max=max_seq_len - 1)
    dynamic_shapes = None if seq is None else ({1: seq}, {0: seq})
    if not share_blocks:
        module = ExportLLM(model, max_seq_len, int8_embedding=dtype != "fp32").eval()
        data, info = lower(module, example, dynamic_shapes, dtype)
    else:
        halves, head, pieces_lowered = lowered_pieces(model, dtype, T, seq)
        lower_s = round(time.perf_counter() - t0, 1)
        module = ExportLLM(model, max_seq_len, dtype != "fp32", halves, head)
        data, info = emit_composed(module, example, dynamic_shapes)
        info = dict(lower_pieces_s=lower_s, pieces_lowered=pieces_lowered, **info)
    return data, dict(info, export_s=round(time.perf_counter() - t0, 1))


def lowered_pieces(model, dtype, T, seq):
    """Each unique block's front and back halves and the head, lowered to XNNPACK one delegate each
    (lowered_alike: block 0's halves are lowered, the other blocks reuse them with their own weights), for
    ExportLLM(halves=, head=). An LS model's repeated applications call the same lowered halves. T, seq:
    the example token count and its dynamic dimension (None: static). Returns (halves per application,
    head, number of pieces lowered)."""
    c = model.config
    dims = lambda *ds: None if seq is None else tuple({d: seq} for d in ds)
    x, y = torch.randn(1, T, c.dim), torch.randn(1, T, c.n_heads, c.head_dim)
    cos, sin = torch.randn(T, 1, c.head_dim), torch.randn(T, 1, c.head_dim)  # distinct: export merges a repeated input
    fronts, n_fronts = lowered_alike([FrontHalf(b, c).eval() for b in model.layers], (x, cos, sin), dims(1, 0, 0),
                                     dtype, f"lowering {dtype} front halves")
    backs, n_backs = lowered_alike([BackHalf(b, c).eval() for b in model.layers], (x, y), dims(1, 1), dtype,
                                   f"lowering {dtype} back halves")
    head, _ = lowered_alike([Head(model).eval()], (torch.randn(1, 1, c.dim),), None, dtype, "lowering the head")
    return [(fronts[b], backs[b]) for b in model.schedule], head[0], n_fronts + n_backs + 1


def cached_pte(model, dtype, max_seq_len, share_blocks=True, static_len=None, cache_dir=CACHE_DIR):
    """export_pte, cached on disk by (config + weights, dtype, options, EXPORT_VERSION): a 125M-class program
    takes a minute or two to lower on 2 cores, the naive lowering far longer. A cached program is handed out
    only when its size and sha256 are those its .json recorded (a truncated or altered file is exported
    again). Returns the .pte path."""
    max_seq_len = program_seq_len(model, max_seq_len)                  # 0 and 256 name one program
    key = hashlib.sha256(json.dumps([source_hash(model), dtype, max_seq_len, share_blocks, static_len,
                                     EXPORT_VERSION[dtype], torch.__version__]).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"{key}.pte"
    if path.is_file() and whole_program(path):
        return path
    if path.is_file():
        tqdm.write(f"{path} is not the program this cache wrote (truncated or changed since): exporting it again")
    require_writable(path.parent, "--cache_dir")
    takes = "a minute or two" if share_blocks else "4 to 20 minutes, lowered naively"
    tqdm.write(f"exporting {dtype}, {len(model.schedule)} block applications, to {path} (once; a 125M "
               f"model takes {takes} on 2 cores: docs/on-device.md)")
    data, info = export_pte(model, dtype, max_seq_len, share_blocks, static_len)
    record = dict(info, size=len(data), sha256=hashlib.sha256(data).hexdigest())
    atomic_write(path.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(record)))  # what the program is ...
    atomic_write(path, lambda tmp: tmp.write_bytes(data))     # ... then the program: never half of one
    phases = ", ".join(f"{k[:-2]} {v} s" for k, v in info.items() if k.endswith("_s") and k != "export_s")
    tqdm.write(f"exported in {info['export_s']} s" + (f" ({phases})" if phases else ""))
    return path


def whole_program(path):
    """Whether the cached program at path is the one its .json describes, byte for byte (size, sha256)."""
    try:
        info = json.loads(path.with_suffix(".json").read_text())
        if info.get("size") != path.stat().st_size:
            return False
        with open(path, "rb") as f:
            return info.get("sha256") == hashlib.file_digest(f, "sha256").hexdigest()
    except (OSError, ValueError, AttributeError):
        return False


def require_writable(folder, flag):
    """One clear error, before a long export, where folder cannot be written (or made: its nearest existing
    folder is checked, and nothing is created)."""
    folder = Path(folder).absolute()
    existing = next(f for f in (folder, *folder.parents) if f.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ExportError(f"{flag} {folder} cannot be written ({existing} is not a writable folder): choose another")


# --- TorchScript lite interpreter (.ptl) ------------------------------------------------------------

class LiteForward(nn.Module):
    """forward(tokens (1, T), input_pos (T,)) -> last-token logits (1, V) through model.py's own KV cache."""

    def __init__(self, model, max_seq_len):
        super().__init__()
        self.model = model
        model.setup_cache(1, max_seq_len)

    def forward(self, tokens, input_pos):
        return self.model(tokens, input_pos=input_pos)[0][:, -1]


@torch.no_grad()
def export_ptl(model, path, max_seq_len=0):
    """TorchScript for PyTorch Mobile's lite interpreter. TorchScript is deprecated; this is the legacy
    path (ExecuTorch replaces it). optimize_for_mobile needs a torch built with XNNPACK for TorchScript, and
    `_save_for_lite_interpreter` is PyTorch Mobile's documented save call, despite its underscore.
    max_seq_len: as export_pte's."""
    from torch.utils.mobile_optimizer import optimize_for_mobile
    max_seq_len = program_seq_len(model, max_seq_len)
    example = (torch.zeros(1, 2, dtype=torch.long), torch.arange(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                                     # torch.jit deprecation notices
        scripted = torch.jit.trace(LiteForward(copy.deepcopy(model), max_seq_len).eval(), example)
    try:
        scripted = optimize_for_mobile(scripted)
    except RuntimeError as e:
        if "XNNPACK" not in str(e):
            raise
        warnings.warn("optimize_for_mobile needs XNNPACK for TorchScript, which this torch build lacks: "
                      "the .ptl is saved unoptimized", stacklevel=3)   # 2: torch.no_grad's wrapper
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                      # "Lite Interpreter is deprecated" (docs/on-device.md)
        return atomic_write(path, lambda tmp: scripted._save_for_lite_interpreter(str(tmp)))


# --- the command line ----------------------------------------------------------------------------------

def write_program(model, fmt, dtype, out, max_seq_len, share_blocks=True, cache_dir=CACHE_DIR):
    """Export model as a .pte (through the cache) or a .ptl and copy it to out (when given). Returns its path."""
    if fmt == "ptl":
        return export_ptl(model, out or "model.ptl", max_seq_len)
    path = cached_pte(model, dtype, max_seq_len, share_blocks, None, cache_dir)
    if out:
        return atomic_write(out, lambda tmp: shutil.copyfile(path, tmp))     # into a new folder, never half a copy
    return path


def write_model_files(model, tokenizer, fmt, dtype, out):
    """--format gguf (one file, its matrices in dtype) or hf (a directory): the model with its tokenizer, for
    llama.cpp or transformers. Returns what was written, as a line to print."""
    try:
        if fmt == "gguf":
            path = export_gguf(model, tokenizer, out, GGUF_TYPES[dtype])            # fp16 -> llama.cpp's F16
            vocab = "no vocabulary" if tokenizer is None else f"{tokenizer.spec['kind']} vocabulary"
            return f"{path} ({path.stat().st_size / 2**20:.1f} MB, {dtype}, {len(model.schedule)} layers, {vocab})"
        path = export_hf(model, out, tokenizer)
    except (ValueError, RuntimeError, OSError) as e:        # their format errors are ValueErrors; a missing package
        raise ExportError(f"--format {fmt}: {e}") from e
    return f"{path}: config.json, model.safetensors ({len(model.schedule)} layers)" + (
        "" if tokenizer is None else " and the tokenizer's files")


def main(argv=None):
    p = argparse.ArgumentParser(description=usage_description(__doc__), formatter_class=HelpFormatter)
    p.add_argument("--init_from", default="mobilellm-125m",
                   help="our checkpoint (an int8 one is dequantized), a GGUF file, an HF dir or repo id, or "
                        "preset[:field=value+...]")
    p.add_argument("--format", choices=FORMAT_DTYPES,
                   help="pte (ExecuTorch), ptl (lite interpreter), gguf (llama.cpp) or hf (transformers); by "
                        "default what --out's suffix names (.pte, .ptl, .gguf), else pte")
    p.add_argument("--dtype", default="fp32", type=program_dtype,
                   help="pte: fp32, w8a8 (int8 weights, per-token int8 activations) or 8da4w (int4 weights, "
                        "groups of 32); gguf: fp32, fp16, bf16 or q8_0 (llama.cpp's F32, F16, BF16, Q8_0); "
                        "ptl, hf: fp32")
    p.add_argument("--out", default="", help="where to write (pte: default, leave the program in --cache_dir; "
                                             "gguf, hf: needed)")
    p.add_argument("--max_seq_len", type=at_least(0), default=0,
                   help=f"static KV cache length in the program (0: the model's context, at most {MAX_SEQ_LEN})")
    p.add_argument("--lowering", default="shared", choices=LOWERINGS,
                   help="shared: identical block delegates shared (MobileLLM-LS); naive: ExecuTorch's own")
    p.add_argument("--cache_dir", default=str(CACHE_DIR),
                   help="where .pte programs are kept, one per weights and options")
    p.add_argument("--seed", type=int, default=0, help="for a preset's random weights")
    args = p.parse_args(argv)
    named = SUFFIX_FORMATS.get(Path(args.out).suffix)
    if args.format and named and named != args.format:
        p.error(f"--out {args.out} names a .{named} file, but --format is {args.format}")
    args.format = args.format or named or "pte"
    if args.out and Path(args.out).is_dir() and args.format != "hf":
        p.error(f"--out {args.out} is a directory: give the {args.format} file to write")
    if args.dtype not in FORMAT_DTYPES[args.format]:
        p.error(f"--format {args.format} takes --dtype {', '.join(FORMAT_DTYPES[args.format])}, not {args.dtype!r}")
    if args.format in ("gguf", "hf") and not args.out:
        p.error(f"--format {args.format} needs --out: the {'.gguf file' if args.format == 'gguf' else 'directory'}"
                " to write")
    try:
        if args.format == "pte":
            require_executorch()
        if args.out and args.format != "hf":
            require_writable(Path(args.out).parent, "--out's folder")
        model, tokenizer = load_source(args.init_from, args.seed)
        if args.format in ("gguf", "hf"):
            print(f"wrote {write_model_files(model, tokenizer, args.format, args.dtype, args.out)}")
            return
        path = write_program(model, args.format, args.dtype, args.out, args.max_seq_len, args.lowering == "shared",
                             args.cache_dir)
    except (ExportError, OSError) as e:                     # OSError: a file that cannot be written, a disk full
        sys.exit(f"export.py: {e}")
    except KeyboardInterrupt:
        print("export.py: interrupted (nothing half-written: every file is written whole or not at all)",
              file=sys.stderr)
        sys.exit(130)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB)")


if __name__ == "__main__":
    main()
