"""
Make a phone program from a MobileLLM: an ExecuTorch .pte with the XNNPACK delegate (fp32, the paper's
int8 W8A8, or 8da4w) or a TorchScript lite-interpreter .ptl. bench_mobile.py times what this makes.

  python export.py --init_from out-shakespeare-char --dtype int8 --out model.pte   # our checkpoint -> .pte
  python export.py --init_from out-quant --dtype int8 --out model.pte              # an int8 checkpoint (below)
  python export.py --init_from mobilellm-125m-ls:n_layers=2 --dtype 8da4w           # a preset, random weights
  python export.py --init_from facebook/MobileLLM-125M --format ptl --out model.ptl # lite interpreter

In Python: `path = export.cached_pte(model, "int8", max_seq_len=256)` (exported once per weights and
options, kept in out-mobile/cache/), or `data, info = export.export_pte(model, "int8")` for the bytes.
--init_from takes what loader.py loads, or a preset with overrides, `NAME[:field=value+...]` (random
weights, seed --seed). An int8 checkpoint from quantize.py is dequantized to its float-equivalent weights
and re-quantized by ExecuTorch's XNNPACK int8 flow, which makes the same per-channel symmetric int8 weights.

How the program is built (the ideas, top to bottom):
  * ExportLLM: a thin forward over a MobileLLM's own modules (no weight is copied): KV cache laid out
    (B, T, H_kv, D), one buffer pair per block *application*, written by ExecuTorch's llama::update_cache and
    read by llama::custom_sdpa (the portable index_copy_/SDPA kernels are slow). RMSNorm, RoPE and reshapes
    are written so that XNNPACK takes all of them (rotate-half as a DxD matmul, the mean of squares as a
    4-D mean, views with one inferred dim): XNNPACK runs all between the cache ops.
  * Lowering, piece by piece: each block application is two XNNPACK delegates (FrontHalf: norm, q/k/v,
    RoPE; BackHalf: output projection, SwiGLU), with the KV-cache ops between them, plus the head. Each
    piece is lowered on its own, and only block 0's: every other block computes the same on other
    weights, so it gets block 0's delegates with its own weights swapped in (restamped, through
    executorch_private.py). A 125M model is three lowerings, not thirty blocks' worth of whole-graph passes.
  * Shared blocks (MobileLLM-LS): both applications of a block call its one pair of lowered halves, and
    the emitted program points both DelegateCalls at ONE delegate (share_identical_delegates): each shared
    weight is packed once at init and re-read while still in cache (ExecuTorch would pack and stream it
    twice). LS-125M lowers no more than 125M does.
  * int8 = the paper's W8A8: XNNPACKQuantizer, dynamic per-token int8 activations, per-channel int8 weights.
    8da4w = the same activations with 4-bit weights in groups of 32 (torchao), half the bytes again.
    Both look tokens up in an int8 copy of the tied embedding (a scale per row): the lookup is not an
    XNNPACK op, so the table is stored apart from the head's packed weights, but in 1 byte, not 4.
"""
import argparse
import copy
import hashlib
import json
import re
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
from executorch_private import (cia_ops_collected_once, delegates_traced_by_shape, emitted_program, reserialize,
                                restamped, xnnpack_preprocess_once, xnnpack_skip_idle_passes)
from loader import dtype_name, load_model_and_tokenizer
from model import PRESETS, MobileLLM, config_from_preset

EXPORT_VERSION = {"fp32": 3, "int8": 4, "8da4w": 4}   # bump a dtype's when its programs change (cache key)
CACHE_DIR = Path("out-mobile/cache")    # out*/ is git-ignored
PROGRAM_DTYPES = ("fp32", "int8", "8da4w")
GROUP_SIZE = 32                         # 8da4w: one weight scale per 32 input channels (ExecuTorch's llama default)


class ExportError(Exception):
    """Bad input or a missing tool, with one message saying what to do."""


def require_executorch():
    try:
        import executorch.exir  # noqa: F401
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  registers torch.ops.llama.*
    except ImportError as e:
        raise ExportError(f"ExecuTorch is not installed ({e}): pip install -r requirements-extra.txt "
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
            raise ExportError(f"bad override {item!r} in {spec!r}: use preset:field=value+field=value")
        overrides[key] = int(value) if value.lstrip("-").isdigit() else value
    return name, overrides


def preset_model(spec, seed=0):
    name, overrides = parse_model_spec(spec)
    try:
        config = config_from_preset(name, **overrides)
    except (ValueError, TypeError) as e:
        raise ExportError(f"--init_from {spec!r}: {e}") from e
    torch.manual_seed(seed)
    return MobileLLM(config).eval()


def dequantized(qmodel):
    """An int8 model (quantize.py) as the float model its int8 weights stand for (w = q * scale), ready
    for ExecuTorch's own int8 flow, which makes the same per-channel symmetric int8 weights again. The
    tied embedding/head stays one tensor."""
    from quantize import Int8Embedding, Int8Linear, dequantize_per_channel
    model = MobileLLM(qmodel.config).eval()
    float_state = {}
    for name, module in qmodel.named_modules():
        if isinstance(module, (Int8Linear, Int8Embedding)):
            float_state[f"{name}.weight"] = dequantize_per_channel(module.qweight, module.scale)
    state = {k: v for k, v in qmodel.state_dict().items() if not k.endswith((".qweight", ".scale"))}
    model.load_state_dict({**state, **float_state})
    return model


def load_source(init_from, seed=0):
    """The float MobileLLM to export: a preset with overrides (random weights, seeded), or anything
    loader.load_model_and_tokenizer reads (our checkpoints, HF dirs, ...); an int8 model is dequantized."""
    from quantize import is_quantized
    name = init_from.partition(":")[0]
    if not Path(init_from).exists() and (name in PRESETS or ":" in init_from):
        return preset_model(init_from, seed)
    try:
        model = load_model_and_tokenizer(init_from)[0]
    except (CheckpointError, ValueError, RuntimeError) as e:
        raise ExportError(f"--init_from {init_from!r}: {e}") from e
    return dequantized(model) if is_quantized(model) else model


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


def piece(name):
    """Label the nodes traced inside (BlockPartitioner cuts delegates there)."""
    import torch.fx.traceback as fx_traceback
    return fx_traceback.annotate({"piece": name})


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
        with piece("front"):
            h = rms_norm(self.block.attention_norm, x)
            q = self.rope(attn.wq(h).view(1, -1, c.n_heads, c.head_dim), cos, sin)         # (1, T, H, D)
            k = self.rope(attn.wk(h).view(1, -1, c.n_kv_heads, c.head_dim), cos, sin)      # (1, T, H_kv, D)
            v = attn.wv(h).view(1, -1, c.n_kv_heads, c.head_dim)                            # (1, T, H_kv, D)
        return q, k, v


class BackHalf(nn.Module):
    """The second half, one XNNPACK delegate: output projection, SwiGLU, residuals.
    (x (1, T, C), y (1, T, H, D) the attention's output) -> x (1, T, C)."""

    def __init__(self, block, config):
        super().__init__()
        self.block, self.config = block, config

    def forward(self, x, y):
        with piece("back"):
            x = x + self.block.attention.wo(y.view(1, -1, self.config.dim))
            return x + self.block.feed_forward(rms_norm(self.block.ffn_norm, x))


class Head(nn.Module):
    """Final norm and LM head, one XNNPACK delegate: x (1, 1, C) -> logits (1, V)."""

    def __init__(self, model):
        super().__init__()
        self.norm, self.output = model.norm, model.output

    def forward(self, x):
        with piece("head"):
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
        if int8_embedding:              # quantize.py's int8 embedding: symmetric per row, as the int8 head
            from quantize import quantize_per_channel
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
        torch._check_is_size(start)
        torch._check(start + T <= self.max_seq_len)
        cos, sin = m.rope_cos.narrow(0, start, T), m.rope_sin.narrow(0, start, T)          # (T, D/2)
        cos, sin = torch.cat([cos, cos], -1)[:, None, :], torch.cat([sin, sin], -1)[:, None, :]  # (T, 1, D)
        x = self.embed(tokens)                                                              # (1, T, C)
        for i, (front, back) in enumerate(zip(self.fronts, self.backs)):
            k_cache, v_cache = getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}")
            q, k, v = front(x, cos, sin)
            torch.ops.llama.update_cache(k, k_cache, start)
            torch.ops.llama.update_cache(v, v_cache, start)
            y = torch.ops.llama.custom_sdpa(q, k_cache, v_cache, start, None, 0, True)      # (1, T, H, D)
            x = back(x, y)                                                                  # (1, T, C)
        return self.head(x[:, -1:, :])                                                      # (1, V)


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
    """XnnpackPartitioner whose delegates are the pieces (a block half, the head, a pair of bench_mobile's
    GemvChain), one delegate each. XNNPACK's own partitions are cut where a piece ends, and the partitions of
    one piece are merged (int8 alone would make 4 per block application: each dynamically quantized linear
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


def program_signature(ep):
    """What a (partition's) exported program computes, independent of node names: a hash per output, built
    from its op and its arguments' hashes, down to the runtime inputs (by position, shape and dtype) and the
    constants (by their data). Two call sites whose delegates have the same output hashes (in any order) can
    run the same delegate. Returns the list of output hashes, in output order."""
    sig = ep.graph_signature
    data = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
    values = {**ep.state_dict, **ep.constants}
    hashes, n_inputs = {}, 0
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in data:
            text = "const " + hashlib.sha256(tensor_bytes(values[data[node.name]])).hexdigest()
        elif node.op == "placeholder":
            val = node.meta.get("val")
            text, n_inputs = f"input {n_inputs} {getattr(val, 'shape', None)} {getattr(val, 'dtype', None)}", n_inputs + 1
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
    program through executorch_private.py. Returns (delegates before, after)."""
    from executorch.exir.schema import DelegateCall
    gm = manager.exported_program().graph_module
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and "call_delegate" in str(n.target)]
    program = emitted_program(manager)
    plan = program.execution_plan[0]
    if len(calls) != len(plan.delegates):
        raise ExportError(f"{len(calls)} delegate calls in the graph but {len(plan.delegates)} delegates emitted")
    first, keep, remap, outputs = {}, [], {}, []
    for i, node in enumerate(calls):
        outputs.append(program_signature(getattr(gm, node.args[0].target).original_module))
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
    reserialize(manager)
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
    share_blocks: each unique block's halves lowered once and shared by its applications (see the top);
    False is the naive lowering of the whole graph. static_len: a fixed token count instead of a dynamic
    1..max_seq_len-1 (for runners that fill the inputs themselves). Returns (bytes, info dict)."""
    require_executorch()
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
        data, info = lower(module, example, dynamic_shapes, dtype, share_blocks=False)
    else:
        halves, head, pieces_lowered = lowered_pieces(model, dtype, T, seq)
        module = ExportLLM(model, max_seq_len, dtype != "fp32", halves, head)
        data, info = emit_composed(module, example, dynamic_shapes)
        info["pieces_lowered"] = pieces_lowered
    return data, dict(info, export_s=round(time.perf_counter() - t0, 1))


def xnnpack_int8_weight(w):
    """The int8 weight and per-channel scale ExecuTorch's int8 flow makes of w (N, K): pt2e's min/max
    observer (symmetric, eps 2**-12, as XNNPACKQuantizer sets it), then quantize_per_channel, op for op."""
    zero = torch.zeros(w.size(0))
    amax = torch.max(-torch.min(w.amin(1), zero), torch.max(w.amax(1), zero))                # (N,)
    scale = torch.max(amax / (254 / 2), torch.tensor(2.0**-12))                                # (N,)
    return torch.clamp(torch.round(w * (1.0 / scale[:, None])), -127, 127).to(torch.int8), scale


def packed_int4(q):
    """int4 values (N, K) held in int8, as XNNPACK stores them: offset by 8, two per byte, the even column
    in the low nibble. Returns (N, K/2) uint8."""
    u = (q.to(torch.uint8) + 8).reshape(-1)
    return (u[1::2] << 4 | u[0::2]).view(q.size(0), -1)


def stored_tensors(module, dtype):
    """What XNNPACK may store of a module's tensors, by name: each parameter and buffer as it is; in int8
    each matrix as the int8 flow quantizes it (its int8 values and its scales); in 8da4w each int4 matrix
    packed and each matrix of group scales in bf16."""
    tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    for name, t in list(tensors.items()):
        if dtype == "int8" and t.dim() == 2 and t.is_floating_point():
            tensors[f"{name}.int8"], tensors[f"{name}.scale"] = xnnpack_int8_weight(t)
        elif dtype == "8da4w" and t.dim() == 2 and t.dtype == torch.int8 and t.size(1) % 2 == 0:
            tensors[f"{name}.int4"] = packed_int4(t)
        elif dtype == "8da4w" and t.dim() == 2 and t.is_floating_point():
            tensors[f"{name}.bf16"] = t.to(torch.bfloat16)
    return tensors


def exported(module, example, dynamic_shapes, dtype):
    """torch.export `module`, int8: quantized on the way, with the piece labels kept on the nodes."""
    import torch.fx.traceback as fx_traceback
    with fx_traceback.preserve_node_meta():
        if dtype == "int8":
            module = quantize_int8(module, example, dynamic_shapes)
        return torch.export.export(module, example, dynamic_shapes=dynamic_shapes, strict=False)


def lower_piece(module, example, dynamic_shapes, dtype):
    """One half (or the head) lowered to XNNPACK as ONE delegate. Returns the lowered module, to call in
    place of `module`."""
    from executorch.exir import to_edge_transform_and_lower
    ep = exported(module, example, dynamic_shapes, dtype)
    return to_edge_transform_and_lower(ep, partitioner=[block_partitioner()]).exported_program().module()


def lowered_pieces(model, dtype, T, seq):
    """Each unique block's front and back halves and the head, lowered to XNNPACK one delegate each, for
    ExportLLM(halves=, head=). All blocks compute the same on other weights, so only the first block is
    lowered: every other block gets its delegates with its own weights swapped in (restamped), wherever
    XNNPACK stores the weights as stored_tensors makes them (else the block is lowered too). An LS model's repeated applications call the same lowered halves. T, seq: the
    example token count and its dynamic dimension (None: static). Returns (halves per application, head,
    number of pieces lowered)."""
    c = model.config
    dims = lambda *ds: None if seq is None else tuple({d: seq} for d in ds)
    x, y = torch.randn(1, T, c.dim), torch.randn(1, T, c.n_heads, c.head_dim)
    cos, sin = torch.randn(T, 1, c.head_dim), torch.randn(T, 1, c.head_dim)    # distinct: export merges one input passed twice
    examples = {FrontHalf: ((x, cos, sin), dims(1, 0, 0)), BackHalf: ((x, y), dims(1, 1))}
    first, blocks, lowered = {}, [], 1
    with warnings.catch_warnings(), xnnpack_skip_idle_passes(), cia_ops_collected_once():
        warnings.simplefilter("ignore")
        for block in tqdm(model.layers, desc=f"lowering {dtype} blocks", leave=False):
            halves = []
            for half_type in (FrontHalf, BackHalf):
                half = half_type(block, c).eval()
                tensors = stored_tensors(half, dtype)
                done = first.get(half_type) and restamped(*first[half_type], tensors)
                if not done:
                    done, lowered = lower_piece(half, *examples[half_type], dtype), lowered + 1
                    first.setdefault(half_type, (done, tensors))
                halves.append(done)
            blocks.append(tuple(halves))
        head = lower_piece(Head(model).eval(), (torch.randn(1, 1, c.dim),), None, dtype)
    return [blocks[b] for b in model.schedule], head, lowered


def emit_composed(module, example, dynamic_shapes):
    """torch.export an ExportLLM whose halves and head are lowered already, emit it, and let call sites
    of identical delegates share one. Returns (bytes, info dict)."""
    from executorch.exir import to_edge
    with warnings.catch_warnings(), delegates_traced_by_shape(module):
        warnings.simplefilter("ignore")
        ep = torch.export.export(module, example, dynamic_shapes=dynamic_shapes, strict=False)
        manager = to_edge(ep).to_executorch()
    delegates = len(emitted_program(manager).execution_plan[0].delegates)
    shared = share_identical_delegates(manager)[1]                      # before reading manager.buffer
    return manager.buffer, dict(delegate_calls=delegates, delegates=shared)


@torch.no_grad()
def lower(module, example, dynamic_shapes, dtype, share_blocks):
    """torch.export `module` (int8: quantized on the way), lower the whole graph to XNNPACK (share_blocks:
    delegates cut at its pieces, identical ones shared) and emit the program. Returns (bytes, info dict)."""
    from executorch.exir import to_edge_transform_and_lower
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = exported(module, example, dynamic_shapes, dtype)
        with xnnpack_skip_idle_passes(), cia_ops_collected_once():      # the same program, sooner
            if share_blocks:   # each distinct piece is lowered once, however often the graph repeats it
                with xnnpack_preprocess_once(lambda program: tuple(program_signature(program))):
                    manager = to_edge_transform_and_lower(ep, partitioner=[block_partitioner()]).to_executorch()
            else:
                from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
                manager = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch()
    delegates = len(emitted_program(manager).execution_plan[0].delegates)
    shared = share_identical_delegates(manager)[1] if share_blocks else delegates
    return manager.buffer, dict(delegate_calls=delegates, delegates=shared)


def cached_pte(model, dtype, max_seq_len, share_blocks=True, static_len=None, cache_dir=CACHE_DIR):
    """export_pte, cached on disk by (config + weights, dtype, options, EXPORT_VERSION): LS-125M int8
    takes minutes to lower. Returns the .pte path."""
    key = hashlib.sha256(json.dumps([source_hash(model), dtype, max_seq_len, share_blocks, static_len,
                                     EXPORT_VERSION[dtype], torch.__version__]).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"{key}.pte"
    if not path.is_file():
        tqdm.write(f"exporting {dtype}, {len(model.schedule)} block applications, to {path} (once; a 125M "
                   f"model takes minutes, see docs/on-device.md)")
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


# --- the command line ----------------------------------------------------------------------------------

def write_program(model, fmt, dtype, out, max_seq_len, share_blocks=True, cache_dir=CACHE_DIR):
    """Export model as a .pte (through the cache) or a .ptl and copy it to out (when given). Returns its path."""
    if fmt == "ptl":
        return export_ptl(model, out or "model.ptl", max_seq_len)
    path = cached_pte(model, dtype, max_seq_len, share_blocks, None, cache_dir)
    if out:
        shutil.copyfile(path, out)
        return Path(out)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init_from", default="mobilellm-125m",
                   help="our checkpoint (an int8 one is dequantized), an HF dir or repo id, or preset[:field=value+...]")
    p.add_argument("--dtype", default="fp32", type=dtype_name, choices=PROGRAM_DTYPES,
                   help="fp32, int8 (W8A8: dynamic per-token activations) or 8da4w (int4 weights, groups of 32)")
    p.add_argument("--format", default="pte", choices=("pte", "ptl"), help="ExecuTorch or lite interpreter (fp32)")
    p.add_argument("--out", default="", help="copy the program here (default: leave it in --cache_dir)")
    p.add_argument("--max_seq_len", type=int, default=256, help="static KV cache length in the program")
    p.add_argument("--lowering", default="shared", choices=("shared", "naive"),
                   help="shared: identical block delegates shared (MobileLLM-LS); naive: ExecuTorch's own")
    p.add_argument("--cache_dir", default=str(CACHE_DIR))
    p.add_argument("--seed", type=int, default=0, help="for a preset's random weights")
    args = p.parse_args(argv)
    try:
        if args.format == "pte":
            require_executorch()
        model = load_source(args.init_from, args.seed)
        path = write_program(model, args.format, args.dtype, args.out, args.max_seq_len, args.lowering == "shared",
                             args.cache_dir)
    except ExportError as e:
        sys.exit(f"export.py: {e}")
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB)")


if __name__ == "__main__":
    main()
