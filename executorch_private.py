"""
Every use of ExecuTorch's private internals (and of torch.export's, for lowering), in one place. Checked
against executorch 1.4.0 (the version requirements-extra.txt pins, built for torch 2.13.0). ExecuTorch may
rename or reshape any of these in a release without notice; each function says what it reaches into, why
nothing public does the job, and what breaks if it changes. After upgrading ExecuTorch, run
tests/test_export.py and tests/test_bench_mobile.py: they exercise every function here.
"""
import contextlib
import copy
import os
import sys

import torch


def tensor_bytes(tensor):
    """A tensor's raw bytes: what XNNPACK keys its stored constants by (their sha256, see restamped), and what
    export.py's cache key and program_signature hash."""
    return tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def emitted_program(manager):
    """The emitted executorch.exir.schema.Program of an ExecutorchProgramManager, which xnnpack_lowering.py
    edits in place (share_identical_delegates). Reaches into: manager._emitter_output (there is no public access to
    the program before it is serialized). If it changes: AttributeError when exporting a shared lowering."""
    return manager._emitter_output.program


def reserialize(manager):
    """Serialize the manager's (edited) emitted program again, so manager.buffer returns the edited
    program. Reaches into: executorch.exir._serialize._serialize.serialize_for_executorch and the manager's
    _emitter_output, _data_serializer, _named_data, _pte_data, _tensor_data and _buffer fields (the
    manager serializes once, in its constructor). If it changes: an ImportError or AttributeError, or,
    silently, manager.buffer still holding the unedited program (tests/test_export.py then finds one
    delegate per call site instead of one per shared block)."""
    from executorch.exir import ExecutorchBackendConfig
    from executorch.exir._serialize._serialize import serialize_for_executorch
    manager._pte_data, manager._tensor_data = serialize_for_executorch(
        manager._emitter_output, ExecutorchBackendConfig(), manager._data_serializer, manager._named_data)
    manager._buffer = None


def reset_threadpool(threads):
    """Set the number of threads the Python runtime's CPU kernels (XNNPACK) use; the runtime has no
    public setting for it. Reaches into: executorch.extension.pybindings.portable_lib._unsafe_reset_threadpool.
    If it changes: an ImportError when timing on the host (bench_mobile.py). Its C++ logs "Resetting
    threadpool to N threads." at every call, which no Python setting silences: stderr (fd 2) goes to
    /dev/null for the call."""
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
    with native_logs_silenced():
        _unsafe_reset_threadpool(threads)


@contextlib.contextmanager
def native_logs_silenced():
    """stderr (fd 2) to /dev/null while ExecuTorch's C++ runs in this process: its log lines (the threadpool
    reset above; "No temp allocator provided" twice per llama::sdpa_with_kv_cache call and cpuinfo's
    probes when a w8a8 graph is run eagerly to be quantized) are no setting's to silence. Python
    exceptions pass through, and are printed after stderr is back."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def deserialized_program(data):
    """The executorch.exir.schema.Program inside .pte bytes (to inspect what a program stores). Reaches
    into: executorch.exir._serialize._program.deserialize_pte_binary. If it changes: an ImportError in
    the tests that inspect programs."""
    from executorch.exir._serialize._program import deserialize_pte_binary
    return deserialize_pte_binary(data).program


# XNNPACK's passes that rewrite only these ops (by name in the edge op's target): a partition without any
# of them comes out of the pass unchanged. Each pass re-traces the whole partition with fake tensors
# (~0.08 s for a 125M block half on the 2-core host), and the upsample and SDPA passes first trace their
# patterns (~5 s once per process), so a lowering of 60 partitions spends ~35 s in passes that do nothing.
XNNPACK_PASS_OPS = {
    "ConvertToUpsampleBilinear2d": ("index",),       # a decomposed upsample_bilinear2d
    "ConvertToSDPAPass": ("softmax",),               # a decomposed scaled_dot_product_attention
    "FuseBatchNormPass": ("batch_norm",),
    "DecomposeBatchNorm": ("batch_norm",),
    "Conv1dUnsqueezePass": ("convolution",),
    "PReLUReshapePass": ("prelu",),
}


@contextlib.contextmanager
def xnnpack_skip_idle_passes():
    """Inside the block, XNNPACK's preprocessing skips each pass of XNNPACK_PASS_OPS whose ops the partition
    does not hold (the program is byte-for-byte the same: docs/on-device.md, "Where export time goes").
    ExecuTorch runs all 17 passes on every partition and has no public way to choose them. Reaches into:
    XNNPACKPassManager.transform and its .passes list (executorch.backends.xnnpack._passes). If that
    changes: no error and no speed-up, or (a pass renamed) that pass simply runs."""
    from executorch.backends.xnnpack._passes import XNNPACKPassManager
    original = XNNPACKPassManager.transform

    def idle(pass_, ops):
        names = XNNPACK_PASS_OPS.get(pass_.__name__)
        return names is not None and not any(name in op for name in names for op in ops)

    def transform(self):
        graph = self.exported_program.graph
        ops = {node.target.__name__ for node in graph.nodes if node.op == "call_function"}    # "aten.mm.default"
        self.passes = [p for p in self.passes if not idle(p, ops)]
        return original(self)

    XNNPACKPassManager.transform = transform
    try:
        yield
    finally:
        XNNPACKPassManager.transform = original


@contextlib.contextmanager
def cia_ops_collected_once():
    """Inside the block, torch.export lists the CompositeImplicitAutograd operators once instead of at each
    of the 9 run_decompositions of to_edge_transform_and_lower (17 listings, ~0.1 s each: every registered
    operator is walked). No operator is registered while a program is lowered. Reaches into:
    torch._export.utils._collect_all_valid_cia_ops, imported by name into torch.export.exported_program and
    torch.export.decomp_utils (checked against torch 2.13.0). If that changes: an AttributeError here."""
    import functools
    import torch.export.decomp_utils as decomp_utils
    import torch.export.exported_program as exported_program
    modules = (exported_program, decomp_utils)
    original = exported_program._collect_all_valid_cia_ops
    once = functools.lru_cache(maxsize=1)(original)
    for module in modules:
        module._collect_all_valid_cia_ops = once
    try:
        yield
    finally:
        for module in modules:
            module._collect_all_valid_cia_ops = original


def restamped(piece, tensors, new_tensors):
    """`piece` (a module holding ONE lowered XNNPACK delegate, ExportedProgram.module() of a lowering of a
    module whose tensors are `tensors`, by name) for a module computing the same with `new_tensors` (same
    names, same shapes): the delegate with each stored tensor swapped, without lowering again. XNNPACK
    stores a delegate's constant tensors as named data keyed by the sha256 of their bytes (a "scale_" prefix
    for scales) and its serialized graph refers to them by key, so the swap renames the keys in the graph's
    bytes and stores the new tensors under them. Returns None where that does not hold: a stored buffer
    that is none of `tensors` byte for byte (8da4w's repacked int4 weights), or one that is two of them
    which then differ. Reaches into: XNNPACK's serialization (keys = sha256 hex of the data) and
    LoweredBackendModule's constructor and fields (executorch.exir.lowered_backend_module). If that
    changes: None for every block (each is lowered again: slower, the same program; tests/test_export.py
    checks that blocks are restamped), or, were the keys still found but meant otherwise, a program whose
    logits differ from eager PyTorch (tests/test_export.py checks them)."""
    import hashlib
    import re
    from executorch.exir._serialize._named_data_store import NamedDataStoreOutput
    from executorch.exir._serialize.data_serializer import DataEntry
    from executorch.exir.lowered_backend_module import LoweredBackendModule
    from torch.export import ExportedProgram

    digest = {name: hashlib.sha256(tensor_bytes(t)).hexdigest() for name, t in tensors.items()}
    new_digest = {name: hashlib.sha256(tensor_bytes(t)).hexdigest() for name, t in new_tensors.items()}
    swap = {}                                                  # old digest -> (new digest, new tensor)
    for name, d in digest.items():
        if swap.setdefault(d, (new_digest[name], new_tensors[name]))[0] != new_digest[name]:
            swap[d] = None                                     # two tensors, one key: ambiguous
    delegates = [(n, m) for n, m in piece.named_children() if isinstance(m, LoweredBackendModule)]
    if len(delegates) != 1:
        return None
    name, lowered = delegates[0]
    store = lowered.named_data_store_output
    if store is None or store.external_data:
        return None
    buffers, pte_data, renames = [], {}, {}
    for key, entry in store.pte_data.items():
        old = swap.get(key[-64:])
        if old is None:
            return None
        renames[key[-64:].encode()] = old[0].encode()
        pte_data[key[:-64] + old[0]] = DataEntry(len(buffers), entry.alignment, entry.tensor_layout)
        buffers.append(tensor_bytes(old[1]))
    pattern = re.compile(b"|".join(re.escape(k) for k in renames))
    processed = pattern.sub(lambda m: renames[m.group()], lowered.processed_bytes)
    program = lowered.original_module
    by_digest = lambda t: swap.get(hashlib.sha256(tensor_bytes(t)).hexdigest()) or (None, t)
    new_program = ExportedProgram(
        root=program.graph_module, graph=program.graph, graph_signature=program.graph_signature,
        state_dict={k: by_digest(v)[1] for k, v in program.state_dict.items()},
        range_constraints=program.range_constraints, module_call_graph=program.module_call_graph,
        constants={k: by_digest(v)[1] for k, v in program.constants.items()}, verifiers=[program.verifier])
    new_lowered = LoweredBackendModule(new_program, lowered.backend_id, processed, lowered.compile_specs,
                                       NamedDataStoreOutput(buffers, pte_data, {}))
    out = copy.deepcopy(piece, memo={id(lowered): new_lowered})             # all but the delegate copied
    for key, value in out.state_dict().items():               # tensors the delegate takes as inputs (norms)
        if key in new_tensors:
            value.copy_(new_tensors[key])
    return out


def output_shapes_function(program):
    """A function of a lowered program's inputs returning empty tensors shaped and typed as its outputs (each
    output size either fixed or one of the inputs' sizes), or None where an output's size is anything else."""
    import torch.utils._pytree as pytree
    signature = program.graph_signature
    inputs = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in signature.user_inputs]
    where = {}                                             # symbolic size -> (input index, dimension)
    for i, node in enumerate(inputs):
        for d, size in enumerate(node.meta["val"].shape):
            if isinstance(size, torch.SymInt):
                where.setdefault(str(size), (i, d))
    specs = []
    for out in next(n for n in program.graph.nodes if n.op == "output").args[0]:
        val = out.meta["val"]
        sizes = [where.get(str(s)) if isinstance(s, torch.SymInt) else int(s) for s in val.shape]
        if None in sizes:
            return None
        specs.append((sizes, val.dtype))

    def outputs(*args):
        size = lambda s: args[s[0]].size(s[1]) if isinstance(s, tuple) else s
        flat = [torch.empty([size(s) for s in sizes], dtype=dtype) for sizes, dtype in specs]
        return pytree.tree_unflatten(flat, program.call_spec.out_spec)
    return outputs


@contextlib.contextmanager
def delegates_traced_by_shape(module):
    """Inside the block, tracing a call of one of `module`'s lowered delegates makes empty tensors of its
    outputs' shapes instead of running the delegate's original program on fake tensors. torch.export and
    every ExecuTorch pass over a program that calls lowered modules trace each call, by building the
    original program's module and running it whole (~0.07 s for a 125M block half; each call site of a
    125M program is traced ~13 times), while only the outputs' shapes and dtypes reach the program (the
    emitted program is byte-for-byte the same: checked with cmp on LS-125M fp32). Reaches into: the
    executorch_call_delegate higher-order op (torch._higher_order_ops.executorch_call_delegate, torch
    2.13.0), whose implementations call lowered_module.original_module.module()(*args). If that changes:
    no error and no speed-up."""
    from executorch.exir.lowered_backend_module import LoweredBackendModule
    patched = []
    for child in {id(m): m for m in module.modules() if isinstance(m, LoweredBackendModule)}.values():
        outputs = output_shapes_function(child.original_module)
        if outputs is not None:
            child.original_module.module = lambda outputs=outputs: outputs
            patched.append(child.original_module)
    try:
        yield
    finally:
        for program in patched:
            del program.module
