"""
What a decode step's speed is bounded by on this host, for bench_mobile.py's table:

  * the weights a token reads (weight_reads_per_token): every linear once per block application, the LM
    head included; a block applied right after itself through the same weights re-reads them from cache.
    The host's read bandwidth (measure.memory_bandwidth_gbs) over the bytes read from DRAM is the DRAM
    bound, in tokens/s.
  * how fast XNNPACK's own matrix-vector products stream weights (gemv_gbs): a chain of SwiGLU-shaped
    products (GemvChain) lowered like the models, timed reading new weights (cold) and re-applying one pair
    through one shared delegate (hot, as the second application of an LS block). The cold and hot bytes at
    these speeds give the kernel bound.
"""
import statistics
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from executorch_private import reset_threadpool
from export import quantize_8da4w
from measure import in_fresh_process, seconds
from model import MobileLLM
from xnnpack_lowering import emit_composed, lowered_alike

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


class GemvPair(nn.Module):
    """One up/down pair of matrix-vector products shaped like a decode step's SwiGLU (dim -> ffn_dim -> dim)."""

    def __init__(self, dim, ffn_dim):
        super().__init__()
        self.up = nn.Linear(dim, ffn_dim, bias=False)
        self.down = nn.Linear(ffn_dim, dim, bias=False)

    def forward(self, x):                                                    # x: (1, 1, dim)
        return self.down(self.up(x))


class GemvChain(nn.Module):
    """n pairs of products applied in turn, each pair one delegate. pairs=n: every product reads new weights
    (from DRAM, when n pairs are far larger than the caches); pairs=1: one pair re-applied n times through
    ONE shared delegate, as the second application of an LS block is (from cache)."""

    def __init__(self, dim, ffn_dim, n, pairs):
        super().__init__()
        self.n = n
        self.pairs = nn.ModuleList(GemvPair(dim, ffn_dim) for _ in range(pairs))

    def forward(self, x):                                                    # x: (1, 1, dim)
        for i in range(self.n):
            x = self.pairs[i % len(self.pairs)](x)
        return x


def gemv_chain_pte(config, dtype, mb, hot_pairs=0, seed=0):
    """A GemvChain with `mb` MB of weights read per call, lowered like the models (one pair lowered, the
    others reusing it with their weights). hot_pairs=k: k pairs re-applied in turn (a working set of k
    pairs); 0: new weights for every product. Returns (program bytes, info dict, bytes of weights read
    per call)."""
    pair_bytes = 2 * config.dim * config.ffn_dim * BYTES_PER_WEIGHT[dtype]
    n = max(2, round(mb * 2**20 / pair_bytes))
    torch.manual_seed(seed)
    chain = GemvChain(config.dim, config.ffn_dim, n, hot_pairs or n).eval()
    if dtype == "8da4w":
        chain = quantize_8da4w(chain)
    x = torch.randn(1, 1, config.dim)
    with torch.no_grad():
        chain.pairs = nn.ModuleList(lowered_alike(list(chain.pairs), (x,), None, dtype, "lowering products")[0])
        data, info = emit_composed(chain, (x,), None)
    return data, info, n * pair_bytes


def time_program(path, threads, inputs, runs=20):
    """Median seconds of one execution of a program's forward, after three warm-ups."""
    from executorch.runtime import Runtime
    reset_threadpool(threads)
    method = Runtime.get().load_program(Path(path)).load_method("forward")
    times = [seconds(lambda: method.execute(inputs)) for _ in range(runs + 3)]
    return statistics.median(times[3:])


def chain_gbs(config, dtype, threads, mb=64, hot_pairs=0):
    """GB/s of weights one GemvChain (gemv_chain_pte) streams, timed in a fresh process, and the MB of weights
    it re-reads (its working set: every product's weights when cold)."""
    data, info, nbytes = gemv_chain_pte(config, dtype, mb, hot_pairs)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gemv.pte"
        path.write_bytes(data)
        seconds = in_fresh_process(time_program, str(path), threads, [torch.randn(1, 1, config.dim)])
    return nbytes / seconds / 1e9, nbytes * info["delegates"] / info["delegate_calls"] / 2**20


def gemv_gbs(config, dtype, threads, mb=64):
    """What XNNPACK's matrix-vector products (this dtype, this model's FFN shape) stream on this host, as
    (cold, hot) GB/s of weights: cold = new weights each time (`mb` MB of them per call), hot = one pair
    re-applied from cache. A kernel that is bandwidth-bound runs far faster hot than cold."""
    return tuple(chain_gbs(config, dtype, threads, mb, hot_pairs)[0] for hot_pairs in (0, 1))
