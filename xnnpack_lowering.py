"""
XNNPACK lowering for export.py: how the pieces of a program (block halves, the head; the products of
decode_bounds.py's ProductStream) become XNNPACK delegates, one per piece, and how a module calling them is
emitted as one ExecuTorch program whose identical delegates are shared. export.py decides what the pieces
are; this file does the lowering, through ExecuTorch's public API except where executorch_private.py says
otherwise.

  * quantize_w8a8, quantize_8da4w: the two int8 schemes, by ExecuTorch's and torchao's own flows.
  * exported / lower_piece: torch.export (w8a8: quantized with ExecuTorch's XNNPACKQuantizer on the way),
    then one piece lowered to one delegate (one_delegate_partitioner).
  * lowered_alike: pieces that compute the same on other weights, lowered once: the others reuse that
    lowering with their own weights swapped in (stored_tensors says what XNNPACK stores of them).
  * emit_composed: the top-level program over lowered pieces; lower: the whole graph at once (the naive
    lowering).
  * share_identical_delegates: call sites of identical delegates point at one, so a shared block's weights
    are packed once.
"""
import hashlib
import time
import warnings

import torch
from tqdm import tqdm

from executorch_private import (cia_ops_collected_once, delegates_traced_by_shape, emitted_program,
                                native_logs_silenced, reserialize, restamped, tensor_bytes,
                                xnnpack_skip_idle_passes)

GROUP_SIZE = 32      # 8da4w: one weight scale per 32 input channels (ExecuTorch's llama default)


def one_delegate_partitioner():
    """XnnpackPartitioner that makes ONE delegate of a piece (a block half, the head, a ProductStream's
    products): XNNPACK's own partitions of it are merged (w8a8 alone would make 4 per block half: each
    dynamically quantized linear is grouped with its activation-quantization nodes, and the groups land
    in separate partitions)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from torch.fx.passes.infra.partitioner import Partition

    class OneDelegatePartitioner(XnnpackPartitioner):
        def generate_partitions(self, ep):
            nodes = [node for partition in super().generate_partitions(ep) for node in partition.nodes]
            for node in nodes:
                node.meta.pop("debug_handle", None)            # per-node ids: kept out of the delegate
            order = {node: i for i, node in enumerate(ep.graph_module.graph.nodes)}
            return [Partition(id=0, nodes=sorted(nodes, key=order.get))] if nodes else []

    return OneDelegatePartitioner()


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
            text = f"input {n_inputs} {getattr(val, 'shape', None)} {getattr(val, 'dtype', None)}"
            n_inputs += 1
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
        raise RuntimeError(f"{len(calls)} delegate calls in the graph but {len(plan.delegates)} delegates emitted")
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


def quantize_w8a8(module, example, dynamic_shapes):
    """The paper's W8A8 through ExecuTorch's own flow: per-channel symmetric int8 weights, dynamic
    per-token int8 activations (XNNPACKQuantizer + pt2e). Returns the quantized graph module."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer, get_symmetric_quantization_config)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True,
                                                                                is_dynamic=True))
    graph = torch.export.export(module, example, dynamic_shapes=dynamic_shapes, strict=False).module()
    graph = prepare_pt2e(graph, quantizer)
    with native_logs_silenced():                               # the KV cache op's C++ logs (executorch_private)
        graph(*example)                                        # dynamic quantization needs no calibration
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
              filter_fn=lambda m, _: isinstance(m, torch.nn.Linear) and m.in_features % GROUP_SIZE == 0)
    return unwrap_tensor_subclass(model)


def xnnpack_int8_weight(w):
    """The int8 weight and per-channel scale ExecuTorch's W8A8 flow makes of w (N, K): pt2e's min/max
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
    """What XNNPACK may store of a module's tensors, by name: each parameter and buffer as it is; in w8a8
    each matrix as the W8A8 flow quantizes it (its int8 values and its scales); in 8da4w each int4 matrix
    packed and each matrix of group scales in bf16."""
    tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    for name, t in list(tensors.items()):
        if dtype == "w8a8" and t.dim() == 2 and t.is_floating_point():
            tensors[f"{name}.int8"], tensors[f"{name}.scale"] = xnnpack_int8_weight(t)
        elif dtype == "8da4w" and t.dim() == 2 and t.dtype == torch.int8 and t.size(1) % 2 == 0:
            tensors[f"{name}.int4"] = packed_int4(t)
        elif dtype == "8da4w" and t.dim() == 2 and t.is_floating_point():
            tensors[f"{name}.bf16"] = t.to(torch.bfloat16)
    return tensors


def exported(module, example, dynamic_shapes, dtype):
    """torch.export `module`, w8a8: quantized on the way."""
    if dtype == "w8a8":
        module = quantize_w8a8(module, example, dynamic_shapes)
    return torch.export.export(module, example, dynamic_shapes=dynamic_shapes, strict=False)


def lower_piece(module, example, dynamic_shapes, dtype):
    """One piece lowered to XNNPACK as ONE delegate. Returns the lowered module, to call in place of
    `module`."""
    from executorch.exir import to_edge_transform_and_lower
    ep = exported(module, example, dynamic_shapes, dtype)
    return to_edge_transform_and_lower(ep, partitioner=[one_delegate_partitioner()]).exported_program().module()


def lowered_alike(pieces, example, dynamic_shapes, dtype, desc):
    """Pieces that compute the same on other weights (e.g. the front halves of all blocks), each lowered
    to one delegate, `example` (with `dynamic_shapes`) being an input of any of them. Only the first is
    lowered: each other piece gets its delegate with its own weights swapped in (executorch_private's
    restamped), wherever XNNPACK stores the weights as stored_tensors makes them (else it is lowered too).
    Returns (lowered modules, how many were lowered)."""
    first, lowered, count = None, [], 0
    with warnings.catch_warnings(), xnnpack_skip_idle_passes(), cia_ops_collected_once():
        warnings.simplefilter("ignore")
        for module in tqdm(pieces, desc=desc, leave=False):
            tensors = stored_tensors(module, dtype)
            done = first and restamped(*first, tensors)
            if not done:
                done, count = lower_piece(module, example, dynamic_shapes, dtype), count + 1
                first = first or (done, tensors)
            lowered.append(done)
    return lowered, count


def emit_composed(module, example, dynamic_shapes):
    """torch.export a module whose pieces are lowered already (an ExportLLM, a ProductStream), emit it, and let
    call sites of identical delegates share one. Returns (bytes, info dict)."""
    from executorch.exir import to_edge
    marks = [time.perf_counter()]                                       # where export time goes (docs/on-device.md)
    with warnings.catch_warnings(), delegates_traced_by_shape(module):
        warnings.simplefilter("ignore")
        ep = torch.export.export(module, example, dynamic_shapes=dynamic_shapes, strict=False)
        marks.append(time.perf_counter())
        edge = to_edge(ep)
        marks.append(time.perf_counter())
        manager = edge.to_executorch()
        marks.append(time.perf_counter())
    delegates = len(emitted_program(manager).execution_plan[0].delegates)
    shared = share_identical_delegates(manager)[1]                      # before reading manager.buffer
    data = manager.buffer
    marks.append(time.perf_counter())
    phases = ("torch_export_s", "to_edge_s", "to_executorch_s", "share_and_serialize_s")
    seconds = {name: round(end - start, 1) for name, start, end in zip(phases, marks, marks[1:])}
    return data, dict(delegate_calls=delegates, delegates=shared, **seconds)


@torch.no_grad()
def lower(module, example, dynamic_shapes, dtype):
    """torch.export `module` (w8a8: quantized on the way), lower the whole graph to XNNPACK as ExecuTorch's
    own partitioner cuts it and emit the program: the naive lowering. Returns (bytes, info dict)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = exported(module, example, dynamic_shapes, dtype)
        with xnnpack_skip_idle_passes(), cia_ops_collected_once():      # the same program, sooner
            manager = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch()
    delegates = len(emitted_program(manager).execution_plan[0].delegates)
    return manager.buffer, dict(delegate_calls=delegates, delegates=delegates)
