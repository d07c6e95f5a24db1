"""
Model FLOPs utilization for train.py and bench_train.py: the training FLOPs of a token, and the peak FLOP/s
to divide by (a GPU's datasheet number, or a matmul measured on this device).
"""
import re
import time

import torch

from loader import torch_dtype
from model import block_schedule


def flops_per_token(config, seq_len, frozen_blocks=(), frozen_embedding=False):
    """Training FLOPs per token, nanoGPT/PaLM style: each weight use costs 2 forward, 2 for the gradient of
    its input and 2 for its own gradient. A shared block costs compute every time it is applied, so it counts
    once per application. Fine-tuning: frozen weights (the unique blocks frozen_blocks, the embedding and head)
    skip their own gradient, and no backward at all runs below the first trainable weight."""
    c = config
    attn = c.dim * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads)
    block = attn + c.dim * c.ffn_dim * (3 if c.ffn_type == "swiglu" else 2)   # weights used per application
    scores = 4 * c.dim * seq_len                       # attention scores and values, forward
    flops, below = 0, not frozen_embedding             # below: a trainable weight under this point
    for b in block_schedule(c):
        trains = b not in frozen_blocks
        flops += 2 * block + scores
        if below or trains:
            flops += 2 * block + 2 * scores + (2 * block if trains else 0)
        below = below or trains
    head = c.vocab_size * c.dim                        # the output head (the embedding lookup costs none)
    return flops + 2 * head + (2 * head if below else 0) + (0 if frozen_embedding else 2 * head)


# dense bf16 FLOP/s of the datasheets, by model name as a whole word of torch.cuda.get_device_name (so that L4 is
# not L40S, A10 not A10G, A100 not RTX A1000), the more specific variant first
GPU_BF16_PEAK = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200 NVL": 835e12, "H200": 989e12,
                 "GH200": 989e12, "A100": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12, "A10": 125e12,
                 "4090": 165e12}


def datasheet_peak(name):
    """The dense bf16 peak of a GPU torch.cuda.get_device_name calls name, or None for one not listed."""
    for key, flops in GPU_BF16_PEAK.items():
        if re.search(rf"(?<!\w){re.escape(key)}(?!\w)", name):
            return flops
    return None


def measure_peak_flops(device, dtype, n=None, reps=8, min_seconds=0.25):
    """Peak FLOP/s for MFU: the datasheet bf16 number on known GPUs, else a large matmul in dtype measured
    here: the fastest of reps timings (the best this device does in the dtype the run trains in; on a shared
    machine the mean of the timings undercounts it, and MFU then passes 100%), timed for at least min_seconds
    so that another process's burst does not cover them all. n x n: 1024 on a CPU, 8192 on a GPU (a smaller
    product is mostly kernel launch there, and MFU would be overstated)."""
    gpu = torch.device(device).type == "cuda"
    if gpu and (flops := datasheet_peak(torch.cuda.get_device_name(device))):
        return flops
    n = n or (8192 if gpu else 1024)
    a = torch.randn(n, n, device=device, dtype=torch_dtype(dtype))
    b = torch.randn(n, n, device=device, dtype=torch_dtype(dtype))
    for _ in range(2):
        a @ b
    seconds = []
    while len(seconds) < reps or sum(seconds) < min_seconds:
        synchronize(device)
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        seconds.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(seconds)


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
