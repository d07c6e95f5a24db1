"""Each of torch's private operators that torch_private.py reaches into, against a public computation of the
same thing: after a torch upgrade, a failure here names the operator that changed."""
import platform
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from torch_private import cpu_has_native_bf16, int_mm, weight_int8_mm


def test_int_mm_is_the_exact_integer_matmul():
    torch.manual_seed(0)
    a = torch.randint(-128, 128, (3, 20), dtype=torch.int8)
    b = torch.randint(-128, 128, (20, 7), dtype=torch.int8)
    assert int_mm(a, b).dtype == torch.int32
    assert torch.equal(int_mm(a, b), (a.long() @ b.long()).int())


def test_weight_int8_mm_is_the_float_product_with_the_int8_weights_rescaled():
    torch.manual_seed(0)
    x = torch.randn(5, 32)
    q = torch.randint(-127, 128, (24, 32), dtype=torch.int8)
    scale = torch.rand(24) / 100
    torch.testing.assert_close(weight_int8_mm(x, q, scale), F.linear(x, q.float()) * scale, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(platform.machine() != "x86_64" or not Path("/proc/cpuinfo").exists(), reason="x86 Linux flags")
def test_cpu_bf16_check_agrees_with_the_cpu_flags():
    flags = set(Path("/proc/cpuinfo").read_text().split())
    assert cpu_has_native_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})
