"""
Training throughput of train.py's step (forward, backward, gradient clipping, optimizer) on random tokens:
tokens/s and MFU, fp32 against bf16 autocast, measured side by side in one run.

  python bench_train.py                                  # train.py's default model and batch
  python bench_train.py config/bench_nanogpt_29m.py      # nanoGPT's 29.9M GPT size (6 x 384, ctx 256, batch 8)
  python bench_train.py --dim=256 --iters=20 --compile=True
  python bench_train.py --dtype=fp32 --compare="optimizer='adamw';optimizer='muon'" --rounds=5

--compare="a;b;..." times settings against each other instead (each a comma-separated list of key=value,
on top of the others), in alternating rounds, so that a busy machine slows all alike: tokens/s (median of
the rounds) and the ratio to the first. Each runs in the first --dtype unless it sets its own
(--compare="dtype=fp32;dtype=bf16").

Takes train.py's settings (config files, --key=value) plus vocab_size, iters, warmup, compare and rounds.
Those of the step count: the model's shape, batch, optimizer, dtype, compile and the fine-tuning options
(freeze_embedding, train_blocks, gradient_checkpointing); data, evals, schedule and out_dir do not (a config
file of train.py's may set them), and the weights are random (init_from is train.py's alone). --dtype takes
a list here (fp32,bf16), as bench_mobile.py's does. MFU is relative to the device's peak in
each dtype: the datasheet bf16 number on known GPUs, else a large matmul in that dtype measured here first.
dtype=auto (the default) times fp32, and bf16 too where the hardware has it: CPUs without AVX-512 BF16/AMX
emulate bf16 ~100x slower than fp32 (there, --dtype=fp32,bf16 --iters=1 --warmup=0 times it anyway).
"""
import statistics
import sys
import time
from dataclasses import dataclass, replace

import torch

from configurator import ConfigError, accept_old_flags, apply_settings, configure, exit_if_help, parse_value
from loader import autocast, dtype_name, native_bf16, resolve_device, resolve_dtype
from model import MobileLLM, ModelConfig
from mfu import flops_per_token, measure_peak_flops, synchronize
from optim import build_optimizer
from train import TrainConfig, check_config, model_config
from warm_start import freeze, frozen_blocks


OLD_FLAGS = {"--dtypes": "--dtype"}


@dataclass
class BenchConfig(TrainConfig):
    vocab_size: int = 65                 # train.py reads it from the dataset; here there is no dataset
    iters: int = 10                      # timed iterations per dtype
    warmup: int = 3                      # untimed iterations first (allocator, compile)
    dtype: str = "auto"                  # the dtypes to time, comma-separated; auto: fp32, and bf16 where native
    compare: str = ""                    # "key=value,...;key=value,...": settings timed against each other
    rounds: int = 5                      # --compare: alternating rounds of iters iterations per setting


def check_timed(cfg):
    """One clear error for settings the step cannot be timed with: a model to fine-tune (the weights here are
    random), a shape model.py refuses, more blocks to train than the model has."""
    if cfg.init_from != "scratch":
        raise ConfigError(f"init_from={cfg.init_from!r}: bench_train.py times random weights of the shape its "
                          "settings give (set the model's fields, e.g. a config file of that shape)")
    frozen_blocks(model_config(cfg, cfg.vocab_size), cfg)


def tokens_per_second(cfg, dtype, device, rebuild=None):
    """Training tokens/s of cfg's model (rebuild(model): a changed model to time instead). Returns
    (tokens/s, the model)."""
    torch.manual_seed(cfg.seed)
    model = MobileLLM(model_config(cfg, cfg.vocab_size)).to(device)
    model = rebuild(model) if rebuild else model
    freeze(model, cfg)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    optimizer = build_optimizer(model, cfg, device)
    step_model = torch.compile(model) if cfg.compile else model
    x = torch.randint(cfg.vocab_size, (cfg.batch_size, cfg.block_size), device=device)   # (B, T)
    for i in range(cfg.warmup + cfg.iters):
        if i == cfg.warmup:
            synchronize(device)
            t0 = time.perf_counter()
        for _ in range(cfg.gradient_accumulation_steps):
            with autocast(device, dtype):
                loss = step_model(x, x)[1]
            (loss / cfg.gradient_accumulation_steps).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    seconds = time.perf_counter() - t0
    return cfg.iters * cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size / seconds, model


def parse_variants(spec, cfg, flag="--compare"):
    """Settings to run against each other, "a;b;..." with each a comma-separated list of key=value (as
    --compare takes them): [(label, cfg with that variant applied), ...]."""
    variants = []
    for label in spec.split(";"):
        pairs = [item.split("=", 1) for item in label.split(",")]
        if any(len(pair) != 2 for pair in pairs):
            raise ConfigError(f"{flag} variant {label!r} is not a comma-separated list of key=value")
        settings = {key.strip(): parse_value(value) for key, value in pairs}
        variant = apply_settings(cfg, settings, f"{flag} variant {label!r}")
        try:
            check_config(variant)
        except ConfigError as e:
            raise ConfigError(f"{flag} variant {label!r}: {e}") from e
        variants.append((label, variant))
    return variants


def timed_dtypes(cfg, device):
    """The dtypes --dtype names, each checked as train.py would; "auto": fp32, and bf16 where the device has
    it natively."""
    if cfg.dtype != "auto":
        dtypes = [dtype_name(d) for d in cfg.dtype.split(",")]
        for dtype in dtypes:
            check_config(replace(cfg, dtype=dtype))
        return dtypes
    native = native_bf16(device)
    if not native:
        print("bf16 is emulated on this CPU (~100x slower than fp32): timing fp32 only (--dtype=fp32,bf16 times both)")
    return ["fp32", "bf16"] if native else ["fp32"]


def compare(cfg, device):
    """tokens/s of each --compare variant (in its own dtype: the first of --dtype unless it sets one), timed in
    alternating rounds. Returns {label: median tokens/s}."""
    variants = parse_variants(cfg.compare, cfg)
    for label, variant in variants:
        try:
            check_timed(variant)
        except ConfigError as e:
            raise ConfigError(f"--compare variant {label!r}: {e}") from e
    rates = {label: [] for label, _ in variants}
    for _ in range(cfg.rounds):
        for label, variant in variants:
            dtype = resolve_dtype(variant.dtype, device, variant.dim)
            rates[label].append(tokens_per_second(variant, dtype, device)[0])
    medians = {label: statistics.median(r) for label, r in rates.items()}
    first = next(iter(medians.values()))
    for label, rate in medians.items():
        spread = f"{min(rates[label]):,.0f}-{max(rates[label]):,.0f}"
        print(f"{label}: {rate:10,.0f} tokens/s (rounds {spread})  {rate / first:.3f}x the first")
    return medians


def main(cfg):
    device = resolve_device(cfg.device)
    dtypes = timed_dtypes(cfg, device)
    cfg = replace(cfg, dtype=dtypes[0])              # train.py's checks and --compare's variants take one dtype
    check_config(cfg)
    for name, least in (("iters", 1), ("rounds", 1), ("warmup", 0), ("vocab_size", 1)):
        if getattr(cfg, name) < least:
            raise ConfigError(f"{name} must be at least {least}, got {getattr(cfg, name)}")
    check_timed(cfg)
    config = model_config(cfg, cfg.vocab_size)
    flops = flops_per_token(config, cfg.block_size, frozen_blocks(config, cfg), cfg.freeze_embedding)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}; batch {cfg.batch_size} "
          f"x {cfg.block_size} tokens x {cfg.gradient_accumulation_steps} micro-steps, compile={cfg.compile}")
    if cfg.compare:
        return compare(cfg, device)
    results = {}
    for dtype in dtypes:
        peak = cfg.peak_flops or measure_peak_flops(device, dtype)
        tok_s, model = tokens_per_second(cfg, dtype, device)
        results[dtype] = tok_s
        print(f"{dtype:>9}: {tok_s:10,.0f} tokens/s  MFU {100 * tok_s * flops / peak:5.1f}% of {peak / 1e9:,.0f} "
              f"GFLOP/s ({model.num_params() / 1e6:.1f}M parameters, depth {model.config.depth})")
    if "fp32" in results and "bf16" in results:
        print(f"bf16 / fp32 speedup: {results['bf16'] / results['fp32']:.2f}x")
    return results


if __name__ == "__main__":
    exit_if_help(sys.argv[1:], __doc__, BenchConfig(), more_comments=(ModelConfig,))
    try:
        main(configure(BenchConfig(), accept_old_flags(sys.argv[1:], OLD_FLAGS)))
    except ConfigError as e:
        sys.exit(f"error: {e}")
