"""
On-device speed: export a MobileLLM for phones (ExecuTorch .pte with the XNNPACK delegate, or a
TorchScript lite-interpreter .ptl) and time it on this host or on an Android phone, as the paper's
Table 7 does on an iPhone (load, init, execution time of 125M, LS-125M and a 60-layer model).

Usage:
  python bench_mobile.py --preset mobilellm-125m --dtype fp32,int8            # export (cached) + host timing
  python bench_mobile.py --device host --compare mobilellm-125m,mobilellm-125m-ls,mobilellm-125m:n_layers=60 \
      --dtype fp32,int8 --eager fp32,bf16 --threads 2 --kernel-bound          # the README's table
  python bench_mobile.py --preset mobilellm-125m --dtype int8,8da4w --check-logits  # + how close to model.py
  python bench_mobile.py --ckpt out-shakespeare --dtype int8 --out model.pte   # our checkpoint -> .pte
  python bench_mobile.py --ckpt out-quant/ckpt.pt --dtype int8                 # an int8 checkpoint (see below)
  python bench_mobile.py --preset mobilellm-125m --format ptl --out model.ptl   # TorchScript lite interpreter
  python bench_mobile.py --device android --runner ./executor_runner [--serial S] --preset mobilellm-125m

Models: `--preset NAME[:field=value+...]` (random weights, seed --seed), `--ckpt DIR_OR_FILE` (ours; an int8
checkpoint from quantize.py is dequantized to its float-equivalent weights and re-quantized by ExecuTorch's
XNNPACK int8 flow, which has the same per-channel symmetric int8 weights). `--compare` takes presets.

How the program is built (the ideas, top to bottom):
  * ExportLLM: a thin forward over a MobileLLM's own modules (no weight is copied): KV cache laid out
    (B, T, H_kv, D), one buffer pair per block *application*, written by ExecuTorch's llama::update_cache and
    read by llama::custom_sdpa (portable index_copy_/SDPA kernels are slower than eager PyTorch). RMSNorm,
    RoPE and reshapes are written so that XNNPACK takes all of them (rotate-half as a DxD matmul, the
    mean of squares as a 4-D mean, views with one inferred dim): XNNPACK runs all between the cache ops.
  * Shared blocks (MobileLLM-LS): ExecuTorch copies a weight used by two delegates into each, and every
    delegate packs its weights at init, so an LS model packs (and streams from DRAM) every shared weight
    twice. We make the delegates the block applications' halves (BlockPartitioner), so both applications
    of a block lower to byte-identical delegates, then point both DelegateCalls at ONE delegate
    (share_identical_delegates): each shared weight is packed once and re-read while still in cache.
  * int8 = the paper's W8A8: XNNPACKQuantizer, dynamic per-token int8 activations, per-channel int8 weights.
    8da4w = the same activations with 4-bit weights in groups of 32 (torchao), half the bytes again.
    Both look tokens up in an int8 copy of the tied embedding (a scale per row): the lookup is not an
    XNNPACK op, so the table is stored apart from the head's packed weights, but in 1 byte, not 4.
  * --kernel-bound: what the speed of XNNPACK's own matrix-vector products allows. A chain of FFN-shaped
    products is lowered the same way (GemvChain) and timed reading new weights (cold, from DRAM) and
    re-applying one pair through one shared delegate (hot, from cache, as an LS block's second application).
"""
import argparse
import contextlib
import copy
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import atomic_write, load_checkpoint, load_model
from model import MobileLLM, config_from_dict, config_from_preset

EXPORT_VERSION = {"fp32": 1, "int8": 2, "8da4w": 2}   # bump a dtype's when its programs change (cache key)
CACHE_DIR = Path("out-mobile/cache")    # out*/ is git-ignored
DTYPES = ("fp32", "int8", "8da4w")
GROUP_SIZE = 32                         # 8da4w: one weight scale per 32 input channels (ExecuTorch's llama default)


class BenchError(Exception):
    """Bad input or a missing tool, with one message saying what to do."""


def require_executorch():
    try:
        import executorch.exir  # noqa: F401
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  registers torch.ops.llama.*
    except ImportError as e:
        raise BenchError(f"ExecuTorch is not installed ({e}): pip install -r requirements-extra.txt "
                         "(executorch==1.4.0 matches torch 2.13.0)") from e


# --- the model source ---------------------------------------------------------------------------------

def parse_model_spec(spec):
    """'mobilellm-125m:n_layers=60+share=none' -> (preset, overrides); values are ints where they parse.
    Fields are separated by '+' (or ',' outside --compare, whose list is comma-separated)."""
    name, _, rest = spec.partition(":")
    overrides = {}
    for item in filter(None, re.split(r"[+,]", rest)):
        key, eq, value = item.partition("=")
        if not eq:
            raise BenchError(f"bad override {item!r} in {spec!r}: use preset:field=value+field=value")
        overrides[key] = int(value) if value.lstrip("-").isdigit() else value
    return name, overrides


def preset_model(spec, seed=0):
    name, overrides = parse_model_spec(spec)
    try:
        config = config_from_preset(name, **overrides)
    except (ValueError, TypeError) as e:
        raise BenchError(f"--preset {spec!r}: {e}") from e
    torch.manual_seed(seed)
    return MobileLLM(config).eval()


def dequantized_model(path, ckpt=None):
    """An int8 checkpoint (quantize.py) as the float model its int8 weights stand for (w = q * scale),
    ready for ExecuTorch's own int8 flow. The tied embedding/head stays one tensor."""
    from quantize import Int8Embedding, Int8Linear, dequantize_per_channel, load_quantized
    qmodel, ckpt = load_quantized(path, ckpt=ckpt)
    model = MobileLLM(config_from_dict(ckpt["model_config"])).eval()
    float_state = {}
    for name, module in qmodel.named_modules():
        if isinstance(module, (Int8Linear, Int8Embedding)):
            float_state[f"{name}.weight"] = dequantize_per_channel(module.qweight, module.scale)
    state = {k: v for k, v in qmodel.state_dict().items() if not k.endswith((".qweight", ".scale"))}
    model.load_state_dict({**state, **float_state})
    return model


def load_source(args):
    """The float MobileLLM to export, from --ckpt (float or int8 checkpoint) or --preset."""
    if args.ckpt:
        ckpt = load_checkpoint(args.ckpt)
        if ckpt.get("quantization"):
            return dequantized_model(args.ckpt, ckpt)
        return load_model(args.ckpt, ckpt=ckpt)[0]
    return preset_model(args.preset, args.seed)


def tensor_bytes(tensor):
    return tensor.detach().contiguous().view(torch.uint8).numpy().tobytes()


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


def piece(name, on=True):
    """Label the nodes traced inside (BlockPartitioner cuts delegates there)."""
    import torch.fx.traceback as fx_traceback
    return fx_traceback.annotate({"piece": name}) if on else contextlib.nullcontext()


class ExportLLM(nn.Module):
    """forward(tokens (1, T), input_pos (T,) = start..start+T-1) -> logits of the last token (1, V), with a
    static KV cache inside. Holds the MobileLLM itself: its weights are exported as they are."""

    def __init__(self, model, max_seq_len, mark_pieces=False, int8_embedding=False):
        super().__init__()
        c = model.config
        if max_seq_len > c.block_size:
            raise BenchError(f"max_seq_len ({max_seq_len}) exceeds the model's block_size ({c.block_size})")
        self.model, self.max_seq_len, self.mark_pieces = model, max_seq_len, mark_pieces
        self.int8_embedding = int8_embedding
        if int8_embedding:              # quantize.py's int8 embedding: symmetric per row, as the int8 head
            from quantize import quantize_per_channel
            table, scale = quantize_per_channel(model.tok_embeddings.weight.detach())       # (V, C), (V,)
            self.register_buffer("embedding_int8", table, persistent=False)
            self.register_buffer("embedding_scale", scale[:, None], persistent=False)        # (V, 1)
        self.register_buffer("rotate_half", rotate_half_matrix(c.head_dim), persistent=False)
        shape = (1, max_seq_len, c.n_kv_heads, c.head_dim)                                  # (B, L, H_kv, D)
        for i in range(len(model.schedule)):
            self.register_buffer(f"k_cache_{i}", torch.zeros(shape), persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(shape), persistent=False)

    def embed(self, tokens):                                                        # (1, T) -> (1, T, C)
        if not self.int8_embedding:
            return self.model.tok_embeddings(tokens)
        return F.embedding(tokens, self.embedding_int8).float() * F.embedding(tokens, self.embedding_scale)

    def rope(self, x, cos, sin):                                       # x: (1, T, H, D); cos, sin: (T, 1, D)
        return x * cos + F.linear(x, self.rotate_half) * sin

    def forward(self, tokens, input_pos):
        m, c = self.model, self.model.config
        T = tokens.size(1)
        start = input_pos[0].item()
        torch._check_is_size(start)
        torch._check(start + T <= self.max_seq_len)
        cos, sin = m.rope_cos.narrow(0, start, T), m.rope_sin.narrow(0, start, T)          # (T, D/2)
        cos, sin = torch.cat([cos, cos], -1)[:, None, :], torch.cat([sin, sin], -1)[:, None, :]  # (T, 1, D)
        with piece("embed", self.mark_pieces):    # its own piece: block 0's front stays like a second one's
            x = self.embed(tokens)                                                          # (1, T, C)
        for i, b in enumerate(m.schedule):
            block, attn = m.layers[b], m.layers[b].attention
            k_cache, v_cache = getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}")
            with piece(f"front{i}", self.mark_pieces):
                h = rms_norm(block.attention_norm, x)
                q = self.rope(attn.wq(h).view(1, -1, c.n_heads, c.head_dim), cos, sin)     # (1, T, H, D)
                k = self.rope(attn.wk(h).view(1, -1, c.n_kv_heads, c.head_dim), cos, sin)  # (1, T, H_kv, D)
                v = attn.wv(h).view(1, -1, c.n_kv_heads, c.head_dim)                        # (1, T, H_kv, D)
            torch.ops.llama.update_cache(k, k_cache, start)
            torch.ops.llama.update_cache(v, v_cache, start)
            y = torch.ops.llama.custom_sdpa(q, k_cache, v_cache, start, None, 0, True)      # (1, T, H, D)
            with piece(f"back{i}", self.mark_pieces):
                x = x + attn.wo(y.view(1, -1, c.dim))
                x = x + block.feed_forward(rms_norm(block.ffn_norm, x))                     # (1, T, C)
        return m.output(rms_norm(m.norm, x[:, -1:, :])).view(1, -1)                         # (1, V)


# --- lowering: XNNPACK partitions cut per block application, identical delegates shared -------------

def node_pieces(graph):
    """piece label of every node: its own annotation, else its first labelled user's (quantize/dequantize
    nodes and weights inherit from the linear that uses them), else ''."""
    pieces = {}
    for node in reversed(graph.nodes):
        own = (node.meta.get("custom") or {}).get("piece")
        inherited = next((pieces[u] for u in node.users if pieces.get(u)), "")
        pieces[node] = own or inherited
    return pieces


def block_partitioner(**kwargs):
    """XnnpackPartitioner whose delegates are the pieces: the front and the back of each block application,
    one delegate each. XNNPACK's own partitions are cut where a piece ends, and the partitions of one
    piece are merged (int8 alone would make 4 per block application: each dynamically quantized linear
    is grouped with its activation-quantization nodes, and the groups land in separate partitions)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from torch.fx.passes.infra.partitioner import Partition

    class BlockPartitioner(XnnpackPartitioner):
        def generate_partitions(self, ep):
            graph = ep.graph_module.graph
            pieces, groups = node_pieces(graph), {}
            order = {node: i for i, node in enumerate(graph.nodes)}
            for i, partition in enumerate(super().generate_partitions(ep)):
                for node in partition.nodes:
                    node.meta.pop("debug_handle", None)                   # per-node ids would differ
                    groups.setdefault(pieces[node] or i, []).append(node)  # per piece (unlabelled: as is)
            return [Partition(id=i, nodes=sorted(nodes, key=order.get))  # graph order: same in every copy
                    for i, nodes in enumerate(groups.values())]

    return BlockPartitioner(**kwargs)


def delegate_signature(lowered):
    """What a lowered XNNPACK module computes, independent of how it was serialized or ordered: a hash
    per output, built from its op and its arguments' hashes, down to the runtime inputs (by position) and
    the constants (by their data). Two call sites whose delegates have the same output hashes (in any
    order) can run the same delegate. Returns the list of output hashes, in output order."""
    ep = lowered.original_module
    sig = ep.graph_signature
    data = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
    values = {**ep.state_dict, **ep.constants}
    hashes, n_inputs = {}, 0
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in data:
            text = "const " + hashlib.sha256(tensor_bytes(values[data[node.name]])).hexdigest()
        elif node.op == "placeholder":
            text, n_inputs = f"input {n_inputs}", n_inputs + 1
        else:
            args = torch.fx.node.map_arg((node.args, node.kwargs), lambda a: hashes[a])
            text = f"{node.op} {node.target} {args}"
        hashes[node] = hashlib.sha256(text.encode()).hexdigest()
    outputs = next(n for n in ep.graph.nodes if n.op == "output").args[0]
    return [hashes[o] for o in outputs]


def share_identical_delegates(manager):
    """Make call sites of identical delegates share ONE delegate, then re-serialize. The emitter gives
    every call site its own delegate, which the runtime initializes (packs weights) separately, so an
    LS model would pack and stream each shared weight twice. ExecuTorch 1.4 has no public way to say this
    (the emitter only dedups identical blobs; the XNNPACK backend's weight cache, which shares packed weights
    between delegates, is a C++ backend option the Python runtime cannot set), so this edits the emitted
    program (manager._emitter_output, a private field: executorch is pinned to 1.4.0 and the tests check
    the result). Returns (delegates before, after)."""
    from executorch.exir import ExecutorchBackendConfig
    from executorch.exir._serialize._serialize import serialize_for_executorch
    from executorch.exir.schema import DelegateCall
    gm = manager.exported_program().graph_module
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and "call_delegate" in str(n.target)]
    program = manager._emitter_output.program
    plan = program.execution_plan[0]
    if len(calls) != len(plan.delegates):
        raise BenchError(f"{len(calls)} delegate calls in the graph but {len(plan.delegates)} delegates emitted")
    first, keep, remap, outputs = {}, [], {}, []
    for i, node in enumerate(calls):
        outputs.append(delegate_signature(getattr(gm, node.args[0].target)))
        key = tuple(sorted(outputs[i]))
        if key not in first:
            first[key] = (len(keep), i)
            keep.append(plan.delegates[i])
        remap[i] = first[key]
    for chain in plan.chains:
        for instruction in chain.instructions:
            call = instruction.instr_args
            if isinstance(call, DelegateCall):
                new_index, owner = remap[call.delegate_index]
                mine, theirs = outputs[call.delegate_index], outputs[owner]
                n_in = len(call.args) - len(mine)                       # args = inputs, then outputs
                by_hash = dict(zip(mine, call.args[n_in:]))             # the owner may order them differently
                call.args = call.args[:n_in] + [by_hash[h] for h in theirs]
                call.delegate_index = new_index
    blobs = {}                                          # drop the blobs no delegate uses any more
    for d in keep:
        d.processed.index = blobs.setdefault(d.processed.index, len(blobs))
    program.backend_delegate_data = [program.backend_delegate_data[i] for i in blobs]
    before, plan.delegates = len(plan.delegates), keep
    manager._pte_data, manager._tensor_data = serialize_for_executorch(
        manager._emitter_output, ExecutorchBackendConfig(), manager._data_serializer, manager._named_data)
    manager._buffer = None
    return before, len(keep)


def quantize_int8(module, example, dynamic_shapes):
    """The paper's W8A8 through ExecuTorch's own flow: per-channel symmetric int8 weights, dynamic
    per-token int8 activations (XNNPACKQuantizer + pt2e). Returns the quantized graph module."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer, get_symmetric_quantization_config)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True,
                                                                                is_dynamic=True))
    graph = torch.export.export(module, example, dynamic_shapes=dynamic_shapes, strict=False).module()
    graph = prepare_pt2e(graph, quantizer)
    graph(*example)                                            # dynamic quantization needs no calibration
    return convert_pt2e(graph)


def quantize_8da4w(model):
    """8-bit dynamic per-token activations, 4-bit weights in groups of GROUP_SIZE input channels (torchao's
    Int8DynamicActivationIntxWeightConfig, which XNNPACK runs as a 4-bit GEMM), in place. Linears whose
    input width is not a multiple of GROUP_SIZE stay fp32."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup
    from torchao.utils import unwrap_tensor_subclass
    quantize_(model, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                           weight_granularity=PerGroup(GROUP_SIZE)),
              filter_fn=lambda m, _: isinstance(m, nn.Linear) and m.in_features % GROUP_SIZE == 0)
    return unwrap_tensor_subclass(model)


def untied_copy(model):
    """A copy whose LM head has its own weight: 8da4w makes the head int4 while the embedding table
    stays float (the source model stays tied and untouched)."""
    model = copy.deepcopy(model)
    model.output.weight = nn.Parameter(model.output.weight.detach().clone())
    return model


@torch.no_grad()
def export_pte(model, dtype="fp32", max_seq_len=256, share_blocks=True, static_len=None):
    """Lower a MobileLLM to an ExecuTorch program (bytes) with the XNNPACK delegate and a static KV cache.
    share_blocks: cut delegates per block application and share identical ones (see the top); False is
    the naive lowering. static_len: a fixed token count instead of a dynamic 1..max_seq_len-1 (for runners
    that fill the inputs themselves). Returns (bytes, info dict)."""
    require_executorch()
    if dtype not in DTYPES:
        raise BenchError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if dtype == "8da4w":
        model = quantize_8da4w(untied_copy(model))
    module = ExportLLM(model, max_seq_len, mark_pieces=share_blocks, int8_embedding=dtype != "fp32").eval()
    T = static_len or 2
    example = (torch.zeros(1, T, dtype=torch.long), torch.arange(T))
    seq = torch.export.Dim("seq", min=1, max=max_seq_len - 1)
    return lower(module, example, None if static_len else ({1: seq}, {0: seq}), dtype, share_blocks)


@torch.no_grad()
def lower(module, example, dynamic_shapes, dtype, share_blocks):
    """torch.export `module` (int8: quantized on the way), lower it to XNNPACK (share_blocks: delegates cut
    at its pieces, identical ones shared) and emit the program. Returns (bytes, info dict)."""
    import torch.fx.traceback as fx_traceback
    from executorch.exir import to_edge_transform_and_lower
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fx_traceback.preserve_node_meta():                # keeps the piece labels on the nodes
            if dtype == "int8":
                module = quantize_int8(module, example, dynamic_shapes)
            ep = torch.export.export(module, example, dynamic_shapes=dynamic_shapes, strict=False)
        partitioner = block_partitioner() if share_blocks else None
        if partitioner is None:
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
            partitioner = XnnpackPartitioner()
        manager = to_edge_transform_and_lower(ep, partitioner=[partitioner]).to_executorch()
    delegates = len(manager._emitter_output.program.execution_plan[0].delegates)
    shared = share_identical_delegates(manager)[1] if share_blocks else delegates
    info = dict(delegate_calls=delegates, delegates=shared, export_s=round(time.perf_counter() - t0, 1))
    return manager.buffer, info


def cached_pte(model, dtype, max_seq_len, share_blocks=True, static_len=None, cache_dir=CACHE_DIR):
    """export_pte, cached on disk by (config + weights, dtype, options, EXPORT_VERSION): LS-125M int8
    takes minutes to lower. Returns the .pte path."""
    key = hashlib.sha256(json.dumps([source_hash(model), dtype, max_seq_len, share_blocks, static_len,
                                     EXPORT_VERSION[dtype], torch.__version__]).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"{key}.pte"
    if not path.is_file():
        tqdm.write(f"exporting {dtype}, {len(model.schedule)} block applications, to {path} (once; on a 2-core CPU "
                   f"a 125M model takes 5-15 min, LS-125M 30-50 min)")
        data, info = export_pte(model, dtype, max_seq_len, share_blocks, static_len)
        atomic_write(path, lambda tmp: tmp.write_bytes(data))     # a killed export never leaves half a program
        path.with_suffix(".json").write_text(json.dumps(info))
    return path


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
def export_ptl(model, path, max_seq_len=256):
    """TorchScript for PyTorch Mobile's lite interpreter. TorchScript is deprecated; this is the legacy
    path (ExecuTorch replaces it). optimize_for_mobile needs a torch built with XNNPACK for TorchScript."""
    from torch.utils.mobile_optimizer import optimize_for_mobile
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
                      "the .ptl is saved unoptimized", stacklevel=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                      # "Lite Interpreter is deprecated" (see README)
        scripted._save_for_lite_interpreter(str(path))
    return Path(path)


# --- timing on the host ------------------------------------------------------------------------------

def proc_status_mb(field):
    """A memory line of /proc/self/status in MB: VmRSS (resident now) or VmHWM (peak resident). Not
    getrusage's ru_maxrss for the peak: Linux carries that across fork + exec, so a spawned child would
    report its parent's peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(f"{field}:")) / 1024


def rss_mb():
    return proc_status_mb("VmRSS")


def peak_rss_mb():
    return proc_status_mb("VmHWM")


def time_generation(step, prompt_len, new_tokens, runs, vocab_size):
    """step(tokens, input_pos) -> logits. Warm-up once, then `runs` times: prefill prompt_len tokens and
    decode new_tokens greedily. Returns (median prefill ms, median decode ms per token)."""
    prompt = torch.randint(0, vocab_size, (1, prompt_len))
    prefill_ms, decode_ms = [], []
    for run in range(runs + 1):
        t0 = time.perf_counter()
        logits = step(prompt, torch.arange(prompt_len))
        t1 = time.perf_counter()
        for pos in range(prompt_len, prompt_len + new_tokens):
            logits = step(logits.argmax(-1, keepdim=True), torch.tensor([pos]))
        t2 = time.perf_counter()
        if run:                                                   # run 0 is the warm-up
            prefill_ms.append(1e3 * (t1 - t0))
            decode_ms.append(1e3 * (t2 - t1) / new_tokens)
    return statistics.median(prefill_ms), statistics.median(decode_ms)


def check_tokens(vocab_size, n, seed):
    """The random token sequence --check-logits feeds (also to llama.cpp, experiments/llama_cpp_reference.py)."""
    return torch.randint(vocab_size, (n,), generator=torch.Generator().manual_seed(seed))


def logits_per_position(step, tokens):
    """step(tokens (1, 1), input_pos (1,)) -> (1, V), fed tokens one at a time from position 0: (T, V)."""
    return torch.cat([step(tokens[i:i + 1][None], torch.tensor([i])) for i in range(len(tokens))])


@torch.no_grad()
def logit_agreement(logits, reference):
    """(largest |logit difference|, fraction of positions where both pick the same next token); (T, V) each."""
    return ((logits.float() - reference).abs().max().item(),
            (logits.argmax(-1) == reference.argmax(-1)).float().mean().item())


def host_pte_row(path, prompt_len, new_tokens, runs, threads, vocab_size, tokens=None):
    """Time one .pte in this process (call in a fresh process: init and peak memory are then its own).
    tokens: also return the program's logits for them (logits_per_position) under "logits"."""
    require_executorch()
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
    from executorch.runtime import Runtime
    _unsafe_reset_threadpool(threads)
    runtime, base = Runtime.get(), rss_mb()
    t0 = time.perf_counter()
    program = runtime.load_program(Path(path))
    t1 = time.perf_counter()
    method = program.load_method("forward")                   # delegate init: XNNPACK packs the weights here
    t2 = time.perf_counter()

    def step(tok, pos):
        return method.execute([tok, pos])[0]

    prefill, decode = time_generation(step, prompt_len, new_tokens, runs, vocab_size)
    row = dict(load_ms=1e3 * (t1 - t0), init_ms=1e3 * (t2 - t1), prefill_ms=prefill, decode_ms=decode,
               mem_mb=peak_rss_mb() - base)
    return row if tokens is None else dict(row, logits=logits_per_position(step, tokens))


def host_eager_row(spec, seed, ckpt, dtype, max_seq_len, prompt_len, new_tokens, runs, threads, tokens=None):
    torch.set_num_threads(threads)
    base = rss_mb()
    t0 = time.perf_counter()
    model = load_source(argparse.Namespace(ckpt=ckpt, preset=spec, seed=seed))
    model = model.to(torch.bfloat16 if dtype == "bf16" else torch.float32)
    t1 = time.perf_counter()
    model.setup_cache(1, max_seq_len)

    @torch.no_grad()
    def step(tokens, input_pos):
        return model(tokens, input_pos=input_pos)[0][:, -1]

    prefill, decode = time_generation(step, prompt_len, new_tokens, runs, model.config.vocab_size)
    row = dict(load_ms=1e3 * (t1 - t0), init_ms=0.0, prefill_ms=prefill, decode_ms=decode,
               mem_mb=peak_rss_mb() - base)
    return row if tokens is None else dict(row, logits=logits_per_position(step, tokens))


def in_fresh_process(fn, *args):
    """Run fn(*args) in a new process (spawned, so nothing is shared) and return its result."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def memory_bandwidth_gbs(threads, mb=512, reps=5):
    """Read bandwidth of this host: best of `reps` sums over a buffer far larger than the caches."""
    torch.set_num_threads(threads)
    x = torch.ones(mb * 2**20 // 4)
    x.sum()
    best = min(_timed(x.sum) for _ in range(reps))
    return x.numel() * 4 / best / 1e9


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


BYTES_PER_WEIGHT = {"fp32": 4, "bf16": 2, "int8": 1, "8da4w": 0.5}       # 8da4w: scales ignored


def weight_reads_per_token(config, dtype, shared):
    """(cold, hot) bytes of weights a decode step reads: every Linear once per block application, LM head
    included. A block applied right after itself through the same weights (`shared`: eager PyTorch, or
    the shared lowering) re-reads them while they are still in cache: hot. Everything else is cold."""
    with torch.device("meta"):
        model = MobileLLM(config)

    def linear_bytes(module):
        weights = sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))
        return weights * BYTES_PER_WEIGHT[dtype]

    cold, hot = linear_bytes(model.output), 0
    for i, b in enumerate(model.schedule):
        if shared and i > 0 and model.schedule[i - 1] == b:
            hot += linear_bytes(model.layers[b])
        else:
            cold += linear_bytes(model.layers[b])
    return cold, hot


class GemvChain(nn.Module):
    """n matrix-vector products shaped like a decode step's SwiGLU (dim -> ffn_dim -> dim), each up/down
    pair its own piece. pairs=n: every product reads new weights (from DRAM, when n pairs are far larger
    than the caches); pairs=1: one pair re-applied n times through ONE shared delegate, as the second
    application of an LS block is (from cache)."""

    def __init__(self, dim, ffn_dim, n, pairs):
        super().__init__()
        self.n = n
        self.up = nn.ModuleList(nn.Linear(dim, ffn_dim, bias=False) for _ in range(pairs))
        self.down = nn.ModuleList(nn.Linear(ffn_dim, dim, bias=False) for _ in range(pairs))

    def forward(self, x):                                                    # x: (1, 1, dim)
        for i in range(self.n):
            with piece(f"apply{i}"):
                x = self.down[i % len(self.up)](self.up[i % len(self.up)](x))
        return x


def gemv_chain_pte(config, dtype, mb, hot, seed=0):
    """A GemvChain with `mb` MB of weights read per call, lowered like the models. Returns (program bytes,
    info dict, bytes of weights read per call)."""
    pair_bytes = 2 * config.dim * config.ffn_dim * BYTES_PER_WEIGHT[dtype]
    n = max(2, round(mb * 2**20 / pair_bytes))
    torch.manual_seed(seed)
    chain = GemvChain(config.dim, config.ffn_dim, n, 1 if hot else n).eval()
    if dtype == "8da4w":
        chain = quantize_8da4w(chain)
    data, info = lower(chain, (torch.randn(1, 1, config.dim),), None, dtype, share_blocks=True)
    return data, info, n * pair_bytes


def time_program(path, threads, inputs, runs=20):
    """Median seconds of one execution of a program's forward, after three warm-ups."""
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
    from executorch.runtime import Runtime
    _unsafe_reset_threadpool(threads)
    method = Runtime.get().load_program(Path(path)).load_method("forward")
    times = [_timed(lambda: method.execute(inputs)) for _ in range(runs + 3)]
    return statistics.median(times[3:])


def gemv_gbs(config, dtype, threads, mb=64):
    """What XNNPACK's matrix-vector products (this dtype, this model's FFN shape) stream on this host, as
    (cold, hot) GB/s of weights: cold = new weights each time (`mb` MB of them per call), hot = one pair
    re-applied from cache. A kernel that is bandwidth-bound runs far faster hot than cold."""
    rates = []
    for hot in (False, True):
        data, _, nbytes = gemv_chain_pte(config, dtype, mb, hot)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "gemv.pte"
            path.write_bytes(data)
            seconds = in_fresh_process(time_program, str(path), threads, [torch.randn(1, 1, config.dim)])
        rates.append(nbytes / seconds / 1e9)
    return tuple(rates)


# --- timing on an Android phone ----------------------------------------------------------------------

REMOTE_DIR = "/data/local/tmp/nanomobilellm"
RUNNER_LINE = re.compile(r"Model executed successfully (\d+) time\(s\) in ([0-9.]+) ms")


def adb(serial, *args, check=True):
    cmd = ["adb", *(["-s", serial] if serial else []), *args]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if check and result.returncode:
        raise BenchError(f"`{' '.join(cmd)}` failed ({result.returncode}): {result.stderr.strip()[-300:]}")
    return result.stdout


def android_device(serial):
    """The serial to use; one clear error when adb or a device is missing."""
    if shutil.which("adb") is None:
        raise BenchError("adb is not on PATH: install Android platform-tools "
                         "(https://developer.android.com/tools/releases/platform-tools)")
    lines = adb(None, "devices").splitlines()[1:]
    devices = [line.split()[0] for line in lines if line.strip().endswith("device")]
    if not devices:
        raise BenchError("no Android device: connect one with USB debugging on (`adb devices` lists none)")
    if serial and serial not in devices:
        raise BenchError(f"device {serial!r} is not connected; `adb devices` lists: {', '.join(devices)}")
    if not serial and len(devices) > 1:
        raise BenchError(f"several devices connected ({', '.join(devices)}): choose one with --serial")
    return serial or devices[0]


def parse_runner_ms(output):
    """executor_runner's 'Model executed successfully N time(s) in X ms.' -> ms per execution."""
    match = RUNNER_LINE.search(output)
    if not match:
        raise BenchError(f"could not find the runner's timing line in its output:\n{output[-500:]}")
    return float(match.group(2)) / int(match.group(1))


def android_rows(programs, runner, serial, runs, threads):
    """Push the runner and each program ({label: path}), time `runs` executions of each, clean up.
    Returns {label: ms per execution}."""
    runner = Path(runner or "")
    if not runner.is_file():
        raise BenchError(f"runner {str(runner)!r} not found: build ExecuTorch's executor_runner for arm64 "
                         "with XNNPACK and pass it with --runner (README: On-device speed)")
    serial = android_device(serial)
    remote_runner = f"{REMOTE_DIR}/{runner.name}"
    results = {}
    try:
        adb(serial, "shell", "mkdir", "-p", REMOTE_DIR)
        adb(serial, "push", str(runner), remote_runner)
        adb(serial, "shell", "chmod", "+x", remote_runner)
        for label, path in programs.items():
            remote = f"{REMOTE_DIR}/{Path(path).name}"
            adb(serial, "push", str(path), remote)
            out = adb(serial, "shell", remote_runner, f"--model_path={remote}", f"--num_executions={runs}",
                      f"--cpu_threads={threads}")
            results[label] = parse_runner_ms(out)
            adb(serial, "shell", "rm", "-f", remote)
    finally:
        adb(serial, "shell", "rm", "-rf", REMOTE_DIR, check=False)
    return results


# --- the table and the command line ------------------------------------------------------------------

def format_table(rows, prompt_len, bandwidth, kernel_column, logits_columns=False):
    """kernel_column: add the kernel bound (rows without one, eager PyTorch, show '-'). logits_columns: add
    each row's logit_error and same_token (--check-logits)."""
    head = ("| model | runtime | file MB | load ms | init ms | prefill {P} tok ms | decode ms/tok | tok/s "
            "| DRAM bound tok/s |{K} mem MB |{L}").format(
        P=prompt_len, K=" kernel bound tok/s |" if kernel_column else "",
        L=" max abs logit error | same next token |" if logits_columns else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        file_mb = f"{r['file_mb']:.0f}" if "file_mb" in r else "-"
        kernel = (f" {r['kernel_tok_s']:.0f} |" if "kernel_tok_s" in r else " - |") if kernel_column else ""
        logits = f" {r['logit_error']:.2g} | {r['same_token']:.0%} |" if logits_columns else ""
        lines.append(f"| {r['model']} | {r['runtime']} | {file_mb} | "
                     f"{r['load_ms']:.0f} | {r['init_ms']:.0f} | {r['prefill_ms']:.1f} | {r['decode_ms']:.2f} | "
                     f"{1e3 / r['decode_ms']:.1f} | {bandwidth * 1e9 / r['dram_bytes']:.0f} |{kernel} "
                     f"{r['mem_mb']:.0f} |{logits}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mobilellm-125m", help="preset[:field=value+...] with random weights")
    p.add_argument("--ckpt", default="", help="our checkpoint (dir or file); int8 checkpoints are dequantized")
    p.add_argument("--compare", default="", help="comma-separated presets, timed in one run (overrides --preset)")
    p.add_argument("--dtype", default="fp32,int8",
                   help="fp32, int8 (W8A8: dynamic per-token activations) and/or 8da4w (int4 weights, groups of 32)")
    p.add_argument("--lowering", default="shared", help="shared (identical block delegates shared) and/or naive")
    p.add_argument("--eager", default="", help="also time eager PyTorch in these dtypes, e.g. fp32,bf16")
    p.add_argument("--format", default="pte", choices=("pte", "ptl"))
    p.add_argument("--out", default="", help="copy the exported program here")
    p.add_argument("--device", default="host", choices=("host", "android", "none"))
    p.add_argument("--serial", default="", help="adb serial (--device android)")
    p.add_argument("--runner", default="", help="executor_runner built for the phone (--device android)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=5, help="timed runs after one warm-up; medians are reported")
    p.add_argument("--max-seq-len", type=int, default=256, help="static KV cache length in the program")
    p.add_argument("--kernel-bound", action="store_true",
                   help="also measure what XNNPACK's matrix-vector kernels stream (cold and from cache) and add "
                        "the decode speed they allow as a column")
    p.add_argument("--kernel-mb", type=float, default=64, help="MB of weights per call in that measurement "
                                                               "(far above the last-level cache)")
    p.add_argument("--check-logits", action="store_true",
                   help="also feed --prompt-len random tokens one at a time and compare each row's logits with "
                        "model.py's fp32 forward (largest difference, how often the next token is the same)")
    p.add_argument("--cache-dir", default=str(CACHE_DIR))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        run(args)
    except BenchError as e:
        sys.exit(f"bench_mobile.py: {e}")


def with_logit_agreement(row, reference):
    """The row with its "logits" (if any) replaced by logit_error and same_token against reference."""
    if "logits" not in row:
        return row
    error, same = logit_agreement(row.pop("logits"), reference)
    return dict(row, logit_error=error, same_token=same)


def checked_source(args, spec):
    model = load_source(argparse.Namespace(ckpt=args.ckpt, preset=spec, seed=args.seed))
    if args.max_seq_len > model.config.block_size:
        raise BenchError(f"--max-seq-len ({args.max_seq_len}) exceeds the model's block_size "
                         f"({model.config.block_size}): lower it")
    return model


def run(args):
    if args.prompt_len + args.new_tokens > args.max_seq_len:
        raise BenchError(f"--prompt-len + --new-tokens ({args.prompt_len + args.new_tokens}) must fit in "
                         f"--max-seq-len ({args.max_seq_len})")
    dtypes = [d for d in args.dtype.split(",") if d]
    for d in dtypes:
        if d not in DTYPES:
            raise BenchError(f"--dtype {d!r}: choose from {', '.join(DTYPES)}")
    specs = [s for s in args.compare.split(",") if s] if args.compare else [args.preset]
    if args.ckpt and args.compare:
        raise BenchError("--compare takes presets; give --ckpt alone")
    if args.kernel_bound and args.device != "host":
        raise BenchError("--kernel-bound times XNNPACK's kernels on this host: use it with --device host")
    if args.check_logits and (args.device != "host" or args.format != "pte"):
        raise BenchError("--check-logits runs the .pte programs on this host: use it with --device host --format pte")
    if args.format == "ptl":
        model = checked_source(args, args.preset)
        out = export_ptl(model, args.out or "model.ptl", args.max_seq_len)
        print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MB)")
        return
    require_executorch()
    rows, programs, kernel_gbs = [], {}, {}
    for spec in tqdm(specs, desc="export", disable=len(specs) < 2):
        model = checked_source(args, spec)
        name = Path(args.ckpt).name if args.ckpt else spec
        tokens = check_tokens(model.config.vocab_size, args.prompt_len, args.seed) if args.check_logits else None
        with torch.no_grad():
            reference = model.eval()(tokens[None])[0][0] if args.check_logits else None       # (T, V)
        lowerings = [x for x in args.lowering.split(",") if x] if model.config.share != "none" else ["shared"]
        for dtype in dtypes:
            for lowering in lowerings:
                if args.device == "android":
                    for label, T in (("decode", 1), ("prefill", args.prompt_len)):
                        programs[(name, dtype, lowering, label)] = cached_pte(
                            model, dtype, args.max_seq_len, lowering == "shared", T, args.cache_dir)
                    continue
                path = cached_pte(model, dtype, args.max_seq_len, lowering == "shared", None, args.cache_dir)
                info = json.loads(path.with_suffix(".json").read_text())
                print(f"{name} {dtype} {lowering}: {path} ({path.stat().st_size / 2**20:.1f} MB, "
                      f"{info['delegate_calls']} delegate calls -> {info['delegates']} delegates)")
                if args.out and len(specs) == 1 and len(dtypes) == 1:
                    shutil.copyfile(path, args.out)
                    print(f"wrote {args.out}")
                if args.device == "host":
                    row = in_fresh_process(host_pte_row, str(path), args.prompt_len, args.new_tokens, args.runs,
                                           args.threads, model.config.vocab_size, tokens)
                    label = f"ExecuTorch {dtype}" + (f" ({lowering})" if model.config.share != "none" else "")
                    cold, hot = weight_reads_per_token(model.config, dtype, lowering == "shared")
                    row = dict(row, model=name, runtime=label, file_mb=path.stat().st_size / 2**20, dram_bytes=cold)
                    if args.kernel_bound:
                        shape = (dtype, model.config.dim, model.config.ffn_dim)
                        if shape not in kernel_gbs:
                            kernel_gbs[shape] = gemv_gbs(model.config, dtype, args.threads, args.kernel_mb)
                            print(f"XNNPACK {dtype} matrix-vector products stream {kernel_gbs[shape][0]:.1f} GB/s "
                                  f"of new weights and {kernel_gbs[shape][1]:.1f} GB/s of weights in cache")
                        row["kernel_tok_s"] = 1e9 / (cold / kernel_gbs[shape][0] + hot / kernel_gbs[shape][1])
                    rows.append(with_logit_agreement(row, reference))
        for dtype in [d for d in args.eager.split(",") if d]:
            if args.device != "host":
                break
            if dtype not in ("fp32", "bf16"):
                raise BenchError(f"--eager {dtype!r}: choose fp32 and/or bf16")
            row = in_fresh_process(host_eager_row, spec, args.seed, args.ckpt, dtype, args.max_seq_len,
                                   args.prompt_len, args.new_tokens, args.runs, args.threads, tokens)
            rows.append(with_logit_agreement(dict(row, model=name, runtime=f"eager PyTorch {dtype}",
                             dram_bytes=weight_reads_per_token(model.config, dtype, shared=True)[0]), reference))
    if args.device == "android":
        timings = android_rows({"-".join(k): v for k, v in programs.items()}, args.runner, args.serial,
                               args.runs, args.threads)
        print("| model | runtime | prefill %d tok ms | decode ms/tok | tok/s |\n|---|---|---|---|---|" % args.prompt_len)
        for name, dtype, lowering in dict.fromkeys(k[:3] for k in programs):
            decode = timings["-".join((name, dtype, lowering, "decode"))]
            prefill = timings["-".join((name, dtype, lowering, "prefill"))]
            print(f"| {name} | ExecuTorch {dtype} ({lowering}) | {prefill:.1f} | {decode:.2f} | {1e3 / decode:.1f} |")
    elif rows:
        bandwidth = memory_bandwidth_gbs(args.threads)
        print(f"\n{args.threads} threads, torch {torch.__version__}, median of {args.runs} runs after a warm-up; "
              f"DRAM bound = measured read bandwidth {bandwidth:.1f} GB/s / bytes of weights read per token "
              f"from DRAM (a block re-applied through the same weights is assumed to hit the cache)")
        if args.kernel_bound:
            print("kernel bound = 1 / (cold bytes / cold GB/s + cached bytes / cached GB/s) per token")
        print()
        print(format_table(rows, args.prompt_len, bandwidth, args.kernel_bound, args.check_logits))


if __name__ == "__main__":
    main()
