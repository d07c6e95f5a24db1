"""
Every use of ExecuTorch's private internals (and of torch.export's, for lowering), in one place. Checked
against executorch 1.4.0 (the version requirements-extra.txt pins, built for torch 2.13.0). ExecuTorch may
rename or reshape any of these in a release without notice; each function says what it reaches into, why
nothing public does the job, and what breaks if it changes. After upgrading ExecuTorch, run
tests/test_export.py and tests/test_bench_mobile.py: they exercise every function here.
"""
import contextlib


def emitted_program(manager):
    """The emitted executorch.exir.schema.Program of an ExecutorchProgramManager, which export.py edits in
    place (share_identical_delegates). Reaches into: manager._emitter_output (there is no public access to
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
    If it changes: an ImportError when timing on the host (bench_mobile.py)."""
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
    _unsafe_reset_threadpool(threads)


def deserialized_program(data):
    """The executorch.exir.schema.Program inside .pte bytes (to inspect what a program stores). Reaches
    into: executorch.exir._serialize._program.deserialize_pte_binary. If it changes: an ImportError in
    the tests that inspect programs."""
    from executorch.exir._serialize._program import deserialize_pte_binary
    return deserialize_pte_binary(data).program


@contextlib.contextmanager
def xnnpack_preprocess_once(signature):
    """Inside the block, XNNPACK preprocesses (runs its graph passes on and serializes) each distinct partition
    once: a partition whose signature(exported program) was seen before gets the earlier result, the same
    blob and named weights. Preprocessing is most of a lowering's time, and a layer-shared model's two
    applications of a block give identical partitions (export.py's block_partitioner). ExecuTorch has no
    public way to say this. Reaches into: XnnpackBackend.preprocess, which BackendDetails.preprocess_multimethod
    calls once per partition as cls.preprocess(program, compile_specs). If that changes: no error and no
    speed-up (the patched function is simply not called)."""
    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend
    original, results = XnnpackBackend.preprocess, {}

    def preprocess(program, compile_specs):
        key = (signature(program), tuple((spec.key, bytes(spec.value)) for spec in compile_specs))
        if key not in results:
            results[key] = original(program, compile_specs)
        return results[key]

    XnnpackBackend.preprocess = staticmethod(preprocess)
    try:
        yield
    finally:
        XnnpackBackend.preprocess = staticmethod(original)


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
