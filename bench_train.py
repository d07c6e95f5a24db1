"""
Training throughput of train.py's step (forward, backward, gradient clipping, AdamW) on random tokens:
tokens/s and MFU, fp32 against bf16 autocast, measured side by side in one run.

  python bench_train.py                                  # train.py's default model and batch
  python bench_train.py config/bench_nanogpt_29m.py      # nanoGPT's 29.9M GPT size (6 x 384, ctx 256, batch 8)
  python bench_train.py --dim=256 --iters=20 --compile=True

Takes train.py's settings (config files, --key=value) plus vocab_size, iters, warmup and dtypes. MFU is
relative to the device's peak in each dtype: the datasheet bf16 number on known GPUs, else a large matmul in
that dtype measured here first. On CPUs without AVX-512 BF16/AMX, bf16 is emulated and very slow: use
--iters=1 --warmup=0 there (or --dtypes=fp32).
"""
import sys
import time
from dataclasses import dataclass

import torch

from configurator import ConfigError, configure
from loader import dtype_name
from model import MobileLLM
from train import (TrainConfig, autocast_context, build_optimizer, check_config, flops_per_token,
                   measure_peak_flops, model_config, resolve_device, synchronize)


@dataclass
class BenchConfig(TrainConfig):
    vocab_size: int = 65                 # train.py reads it from the dataset; here there is no dataset
    iters: int = 10                      # timed iterations per dtype
    warmup: int = 3                      # untimed iterations first (allocator, compile)
    dtypes: str = "fp32,bf16"


def tokens_per_second(cfg, dtype, device):
    torch.manual_seed(cfg.seed)
    model = MobileLLM(model_config(cfg, cfg.vocab_size)).to(device)
    optimizer = build_optimizer(model, cfg, device)
    step_model = torch.compile(model) if cfg.compile else model
    x = torch.randint(cfg.vocab_size, (cfg.batch_size, cfg.block_size), device=device)   # (B, T)
    for i in range(cfg.warmup + cfg.iters):
        if i == cfg.warmup:
            synchronize(device)
            t0 = time.perf_counter()
        for _ in range(cfg.gradient_accumulation_steps):
            with autocast_context(device, dtype):
                loss = step_model(x, x)[1]
            (loss / cfg.gradient_accumulation_steps).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    seconds = time.perf_counter() - t0
    return cfg.iters * cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size / seconds, model


def main(cfg):
    check_config(cfg)
    device = resolve_device(cfg.device)
    flops = flops_per_token(model_config(cfg, cfg.vocab_size), cfg.block_size)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}; batch {cfg.batch_size} "
          f"x {cfg.block_size} tokens x {cfg.gradient_accumulation_steps} micro-steps, compile={cfg.compile}")
    results = {}
    for dtype in map(dtype_name, cfg.dtypes.split(",")):
        peak = cfg.peak_flops or measure_peak_flops(device, dtype)
        tok_s, model = tokens_per_second(cfg, dtype, device)
        results[dtype] = tok_s
        print(f"{dtype:>9}: {tok_s:10,.0f} tokens/s  MFU {100 * tok_s * flops / peak:5.1f}% of {peak / 1e9:,.0f} "
              f"GFLOP/s ({model.num_params() / 1e6:.1f}M parameters, depth {model.config.depth})")
    if "fp32" in results and "bf16" in results:
        print(f"bf16 / fp32 speedup: {results['bf16'] / results['fp32']:.2f}x")
    return results


if __name__ == "__main__":
    try:
        main(configure(BenchConfig(), sys.argv[1:]))
    except ConfigError as e:
        sys.exit(f"error: {e}")
