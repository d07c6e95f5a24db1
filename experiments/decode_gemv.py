"""
How fast a one-token decode step's linears stream their weights on this CPU. Decoding one token makes
every linear a matrix-vector product that reads each weight once, so its speed is set by GB/s of weights.
Three ways to run the same chain of products, timed in alternation in one process:
  eager      F.linear, i.e. the BLAS matrix-vector kernel (what eager decoding runs)
  compiled   torch.compile of the chain, which still calls the BLAS kernel (an inductor extern call)
  decomposed torch.compile with inductor's decompose_mm_pass: each product becomes inductor's own fused
             multiply-and-sum loop (what sample.py --compile uses on CPU)

  python experiments/decode_gemv.py                         # 576 -> 1536 (a MobileLLM-125M FFN matrix)
  python experiments/decode_gemv.py --dtype fp16 --mb 128 --threads 1
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # sample.py lives at the repo root
from configurator import accept_old_flags, at_least  # noqa: E402
from loader import dtype_name, torch_dtype  # noqa: E402
from torch_private import MATRIX_VECTOR_LOOPS  # noqa: E402


class Chain(nn.Module):
    """x @ W_i.T for every weight (one vector, many matrices): the weights are read once per call."""

    def __init__(self, weights):
        super().__init__()
        self.weights = weights

    def forward(self, x):                                                   # x: (1, in)
        return [F.linear(x, w) for w in self.weights]                       # each (1, out)


def variants(weights):
    """name -> callable; one Chain per variant, so torch.compile keeps a compiled graph for each."""
    return {"eager": Chain(weights),
            "compiled": torch.compile(Chain(weights), dynamic=False),
            "decomposed": torch.compile(Chain(weights), dynamic=False, options=MATRIX_VECTOR_LOOPS)}


@torch.no_grad()
def stream_gbs(dtype, dim, out_dim, mb, rounds):
    """{variant: median GB/s of weights streamed}, the variants timed in alternation for `rounds` rounds."""
    n = max(1, round(mb * 2**20 / (dim * out_dim * dtype.itemsize)))
    weights = [torch.randn(out_dim, dim).to(dtype) for _ in range(n)]
    x = torch.randn(1, dim).to(dtype)
    runs = variants(weights)
    expected = Chain(weights)(x)
    for name, run in runs.items():                                          # compile, and check the result
        for got, want in zip(run(x), expected):
            torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)
    gbs = {name: [] for name in runs}
    total = n * dim * out_dim * dtype.itemsize
    for _ in range(rounds):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run(x)
            gbs[name].append(total / (time.perf_counter() - t0) / 1e9)
    return {name: statistics.median(v) for name, v in gbs.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="fp32,bf16,fp16", help="comma-separated: fp32, bf16, fp16")
    p.add_argument("--dim", type=at_least(1), default=576, help="input width (MobileLLM-125M: 576)")
    p.add_argument("--out_dim", type=at_least(1), default=1536, help="output width (MobileLLM-125M's ffn_dim: 1536)")
    p.add_argument("--mb", type=float, default=64, help="MB of weights per pass (above the L3 cache: read from DRAM)")
    p.add_argument("--rounds", type=at_least(1), default=7)
    p.add_argument("--threads", type=at_least(1), default=torch.get_num_threads())
    args = p.parse_args(accept_old_flags(argv, {"--dtypes": "--dtype"}))
    torch.set_num_threads(args.threads)
    print(f"{args.dim} -> {args.out_dim} matrix-vector products, {args.mb:g} MB of weights per pass, "
          f"{args.threads} threads, median of {args.rounds} alternating rounds (GB/s of weights)")
    print("| dtype | eager | compiled | decomposed | decomposed / eager |\n|---|---|---|---|---|")
    results = {}
    for name in map(dtype_name, args.dtype.split(",")):
        gbs = results[name] = stream_gbs(torch_dtype(name), args.dim, args.out_dim, args.mb, args.rounds)
        print(f"| {name} | {gbs['eager']:.1f} | {gbs['compiled']:.1f} | {gbs['decomposed']:.1f} | "
              f"{gbs['decomposed'] / gbs['eager']:.2f}x |", flush=True)
    return results


if __name__ == "__main__":
    main()
