"""
Every use of torch's private operators (and of an inductor pass's name), in one place. Checked against torch
2.13.0 (the version requirements.txt pins). torch may rename, reshape or drop any of these in a release
without notice; each function says what it reaches into, why nothing public does the job, and what breaks if
it changes. After upgrading torch, run tests/test_torch_private.py: it checks each function against a public
computation (MATRIX_VECTOR_LOOPS: tests/test_sample.py's compiled decode step).
(ExecuTorch's internals, and torch.export's for lowering, are in executorch_private.py.)
"""
import torch
import torch.nn.functional as F


def int_mm(a, b):
    """Exact (M, K) int8 @ (K, N) int8 -> (M, N) int32: the integer product of W8A8 (int8.w8a8_linear).
    Reaches into: torch._int_mm, torch's only int8 x int8 -> int32 matmul (torch.matmul of int8 tensors
    returns int8, which overflows). On CPU it takes any shape; on CUDA it wants M > 16 and K, N multiples
    of 8, so there the operands are zero-padded (zeros add nothing). If it changes: AttributeError or a
    shape error in every W8A8 forward."""
    if a.is_cuda:
        M, K, N = a.size(0), a.size(1), b.size(1)
        a = F.pad(a, (0, -K % 8, 0, max(17 - M, 0)))
        b = F.pad(b, (0, -N % 8, 0, -K % 8))
        return torch._int_mm(a, b)[:M, :N]
    return torch._int_mm(a, b)


def weight_int8_mm(x, qweight, scale):
    """(M, K) float @ (N, K) int8 weights, times scale (N,) per output -> (M, N) float32 on the CPU: weight-only
    int8 (int8.w8_linear) without a float copy of the weights. Reaches into: torch.ops.aten._weight_int8pack_mm,
    the fused CPU kernel torch's own int8 weight-only quantization uses. If it changes: a RuntimeError or
    AttributeError in every CPU w8 forward (int8.w8_linear can fall back to its CUDA branch, F.linear on
    qweight.float())."""
    return torch.ops.aten._weight_int8pack_mm(x.float().contiguous(), qweight, scale.float())


def cpu_has_native_bf16():
    """AVX-512 BF16 or AMX: without them the CPU converts bf16 in software, slower than fp32 (docs/training.md),
    and dtype=auto keeps fp32. Reaches into: torch.cpu._is_avx512_bf16_supported and _is_amx_tile_supported,
    the cpuinfo checks torch makes for its own kernels; the public torch.backends.cpu.get_cpu_capability()
    names the vector ISA, not bf16 support, and oneDNN's own check (torch.ops.mkldnn._is_mkldnn_bf16_supported)
    says yes to any AVX-512 CPU (BW, VL, DQ), bf16 instructions or not. If they change: AttributeError when
    dtype=auto resolves on a CPU."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


# torch.compile options for a decode step on the CPU (sample.compile_decode_step, experiments/decode_gemv.py):
# one token makes every linear a matrix-vector product, and inductor's decompose_mm_pass writes it as its own
# fused multiply-and-sum loop, which streams the weights faster than the BLAS call (docs/decoding.md). Reaches
# into: the name of a pass in torch/_inductor/fx_passes/decompose_mem_bound_mm.py, a private module with no
# public switch. If it is renamed: torch.compile raises InductorError (KeyError) at the first compiled decode
# step, and tests/test_sample.py's compiled-decode test fails (it counts the decomposed products).
MATRIX_VECTOR_LOOPS = {"post_grad_fusion_options": {"decompose_mm_pass": {}}}
