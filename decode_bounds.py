"""
What a decode step's speed is bounded by on this host, for bench_mobile.py's table:

  * the weights a token reads (weight_reads_per_token): every linear once per block application, the LM
    head included; a block applied right after itself through the same weights re-reads them, perhaps
    from cache. The host's read bandwidth (measure.memory_bandwidth_gbs) over the bytes that are not such
    re-reads is the DRAM bound, in tokens/s.
  * the kernel bound (kernel_seconds): a decode step's matrix-vector products and nothing else, as XNNPACK
    runs them on this host. A chain of products holding each block's weights, in the model's order and
    shared as the program shares them (product_stream), is lowered like the models and timed: whatever the
    caches keep between a block's two applications, the chain gets too.
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


def linear_weights(module):
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def weight_reads_per_token(config, dtype, shared):
    """(cold, hot) bytes of weights a decode step reads: every Linear once per block application, LM head
    included. A block applied right after itself through the same weights (`shared`: eager PyTorch, or
    the shared lowering) re-reads them, which may come from cache: hot. Everything else is cold."""
    with torch.device("meta"):
        model = MobileLLM(config)
    cold, hot = linear_weights(model.output), 0
    for i, b in enumerate(model.schedule):
        if shared and i > 0 and model.schedule[i - 1] == b:
            hot += linear_weights(model.layers[b])
        else:
            cold += linear_weights(model.layers[b])
    return cold * BYTES_PER_WEIGHT[dtype], hot * BYTES_PER_WEIGHT[dtype]


class GemvPair(nn.Module):
    """One up/down pair of matrix-vector products (dim -> hidden -> dim), shaped like a decode step's SwiGLU."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):                                                    # x: (1, 1, dim)
        return self.down(self.up(x))


class GemvChain(nn.Module):
    """Pairs of products (`hiddens`: each pair's hidden width) applied in the order `schedule` gives, each
    pair one delegate: a pair that comes back is re-read through the same delegate, as a shared block is."""

    def __init__(self, dim, hiddens, schedule):
        super().__init__()
        self.dim, self.hiddens, self.schedule = dim, list(hiddens), list(schedule)
        self.pairs = nn.ModuleList(GemvPair(dim, hidden) for hidden in hiddens)

    def forward(self, x):                                                    # x: (1, 1, dim)
        for i in self.schedule:
            x = self.pairs[i](x)
        return x


def product_stream(config, shared):
    """The GemvChain of one decode step's matrix-vector products: per block application one pair holding as
    many weights as a block's linears, in the model's order (`shared`: the same pair wherever the program
    applies a block through the same delegates, else a pair of its own), then a pair holding the LM head's."""
    with torch.device("meta"):
        model = MobileLLM(config)
    schedule = list(model.schedule) if shared else list(range(len(model.schedule)))
    blocks = max(schedule) + 1
    block_hidden = round(linear_weights(model.layers[0]) / (2 * config.dim))
    head_hidden = round(linear_weights(model.output) / (2 * config.dim))
    return GemvChain(config.dim, [block_hidden] * blocks + [head_hidden], schedule + [blocks])


def chain_pte(chain, dtype):
    """A GemvChain lowered like the models (8da4w: quantized first): of the pairs of one shape, one is
    lowered and the others reuse it with their weights. Returns (program bytes, info dict)."""
    if dtype == "8da4w":
        chain = quantize_8da4w(chain)
    x = torch.zeros(1, 1, chain.dim)
    pairs = list(chain.pairs)
    with torch.no_grad():
        for hidden in dict.fromkeys(chain.hiddens):
            alike = [i for i, h in enumerate(chain.hiddens) if h == hidden]
            lowered = lowered_alike([pairs[i] for i in alike], (x,), None, dtype, "lowering products")[0]
            for i, piece in zip(alike, lowered):
                pairs[i] = piece
        chain.pairs = nn.ModuleList(pairs)
        return emit_composed(chain, (x,), None)


def time_program(path, threads, inputs, runs=20):
    """Median seconds of one execution of a program's forward, after three warm-ups."""
    from executorch.runtime import Runtime
    reset_threadpool(threads)
    method = Runtime.get().load_program(Path(path)).load_method("forward")
    times = [seconds(lambda: method.execute(inputs)) for _ in range(runs + 3)]
    return statistics.median(times[3:])


def chain_seconds(chain, dtype, threads):
    """Seconds one execution of the lowered chain takes, timed in a fresh process. Returns (seconds, info
    dict of the program: delegate_calls, delegates)."""
    data, info = chain_pte(chain, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "chain.pte"
        path.write_bytes(data)
        return in_fresh_process(time_program, str(path), threads, [torch.randn(1, 1, chain.dim)]), info


def kernel_seconds(config, dtype, shared, threads, seed=0):
    """The kernel bound, in seconds per token: how long XNNPACK takes over this model's matrix-vector
    products alone (product_stream), in a program shared as `shared` says."""
    torch.manual_seed(seed)
    return chain_seconds(product_stream(config, shared).eval(), dtype, threads)[0]
