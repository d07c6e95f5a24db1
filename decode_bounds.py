"""
What a decode step's speed is bounded by on this host, for bench_mobile.py's table:

  * the weights a token reads (weight_reads_per_token): every linear once per block application, the LM
    head included; a block applied right after itself through the same weights re-reads them, perhaps
    from cache. The host's read bandwidth (measure.memory_bandwidth_gbs) over the bytes that are not such
    re-reads is the DRAM bound, in tokens/s.
  * the kernel bound (kernel_seconds): a decode step's matrix-vector products and nothing else, as XNNPACK
    runs them on this host. The model's own products, in its order, in delegates split and shared as the
    program's are (ProductStream), are lowered like the models and timed: whatever the caches keep between
    a block's two applications, these products get too.
"""
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn

from executorch_private import reset_threadpool
from measure import in_fresh_process, seconds
from model import MobileLLM
from xnnpack_lowering import emit_composed, lowered_alike, quantize_8da4w

BYTES_PER_WEIGHT = {"fp32": 4, "bf16": 2, "w8a8": 1, "8da4w": 0.5}       # 8da4w: scales ignored


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


class FrontProducts(nn.Module):
    """A block's q, k and v products alone, one delegate as the program's front half (no norm, no RoPE)."""

    def __init__(self, block):
        super().__init__()
        self.wq, self.wk, self.wv = block.attention.wq, block.attention.wk, block.attention.wv

    def forward(self, x):                                                    # x: (1, 1, C)
        return self.wq(x), self.wk(x), self.wv(x)


class BackProducts(nn.Module):
    """A block's output projection and feed-forward products alone, one delegate as the program's back half
    (no norm, no activation function, no residual)."""

    def __init__(self, block):
        super().__init__()
        self.wo, ffn = block.attention.wo, block.feed_forward
        self.w1, self.w2, self.w3 = ffn.w1, ffn.w2, ffn.w3

    def forward(self, y):                                                    # y: (1, 1, H * D)
        h = self.wo(y)
        return self.w2(self.w1(h) * self.w3(h) if self.w3 is not None else self.w1(h))


class ProductStream(nn.Module):
    """A decode step's matrix-vector products and nothing else: for each block application in the model's
    order its front and back products, then the LM head. shared=False: every application has weights
    (and delegates) of its own, as in the naive lowering; else a block's applications share them."""

    def __init__(self, config, shared):
        super().__init__()
        if not shared:
            config = replace(config, n_layers=config.depth, share="none")
        model = MobileLLM(config)
        self.config, self.schedule = config, model.schedule
        self.fronts = nn.ModuleList(FrontProducts(block) for block in model.layers)
        self.backs = nn.ModuleList(BackProducts(block) for block in model.layers)
        self.head = model.output

    def forward(self, x):                                                    # x: (1, 1, C)
        for b in self.schedule:
            q, _, _ = self.fronts[b](x)                 # k and v: what the program's cache op would take
            x = self.backs[b](q)
        return self.head(x)                                                  # (1, 1, vocab_size)


def product_stream_pte(stream, dtype):
    """The ProductStream lowered like the models (8da4w: quantized first; one front, one back and the head
    lowered, every other block reusing them with its own weights), in place. Returns (program bytes, info
    dict)."""
    if dtype == "8da4w":
        stream = quantize_8da4w(stream)
    c = stream.config
    x, y = torch.zeros(1, 1, c.dim), torch.zeros(1, 1, c.n_heads * c.head_dim)
    with torch.no_grad():
        stream.fronts = nn.ModuleList(lowered_alike(list(stream.fronts), (x,), None, dtype, "lowering products")[0])
        stream.backs = nn.ModuleList(lowered_alike(list(stream.backs), (y,), None, dtype, "lowering products")[0])
        stream.head = lowered_alike([stream.head], (x,), None, dtype, "lowering products")[0][0]
        return emit_composed(stream, (x,), None)


def time_program(path, threads, inputs, runs=20):
    """Median seconds of one execution of a program's forward, after three warm-ups."""
    from executorch.runtime import Runtime
    reset_threadpool(threads)
    method = Runtime.get().load_program(Path(path)).load_method("forward")
    times = [seconds(lambda: method.execute(inputs)) for _ in range(runs + 3)]
    return statistics.median(times[3:])


def program_seconds(data, inputs, threads):
    """Seconds one execution of a program (bytes) takes on `inputs`, timed in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "program.pte"
        path.write_bytes(data)
        return in_fresh_process(time_program, str(path), threads, inputs)


def kernel_seconds(config, dtype, shared, threads, seed=0):
    """The kernel bound, in seconds per token: how long XNNPACK takes over this model's matrix-vector
    products alone (ProductStream), in a program shared as `shared` says."""
    torch.manual_seed(seed)
    data, _ = product_stream_pte(ProductStream(config, shared).eval(), dtype)
    return program_seconds(data, [torch.randn(1, 1, config.dim)], threads)
