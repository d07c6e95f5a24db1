"""
Fine-tuning options side by side on a real model, at equal wall time: what freezing the embedding, training only
the last blocks and gradient checkpointing cost (seconds per step, memory) and what they give (val loss after the
same minutes of training).

  python experiments/finetune_options.py config/finetune_shakespeare.py
  python experiments/finetune_options.py config/finetune_shakespeare.py --minutes=2 --variants="train_blocks=0;train_blocks=15"

Takes train.py's settings (config files, --key=value) plus minutes and variants: "a;b;...", each a comma-separated
list of key=value on top of the others, as bench_train.py's --compare (the default set is written for
config/finetune_shakespeare.py's 30-block model). Each variant runs in a fresh process, one after the other: it
loads the model, scores val loss on the config's fixed eval batches, trains for --minutes (loading and evals not
counted) with the config's warmup and then a constant learning rate (the same schedule whatever a variant's step
count), and scores val loss again. Peak resident memory is read from Linux's /proc: the peak while loading, then
(the count reset) the peak while training. bf16 is a variant like any other (--variants="dtype=fp32;dtype=bf16"),
worth timing only where the CPU has AVX-512 BF16 or AMX: elsewhere it is emulated, far slower than fp32.
"""
import math
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # train.py and bench_train.py live at the repo root
from bench_train import parse_variants  # noqa: E402
from configurator import ConfigError, configure_and_report, exit_if_help  # noqa: E402
from experiments.quickstart_vs_nanogpt import machine  # noqa: E402
from dataset import DataError  # noqa: E402
from model import ModelConfig  # noqa: E402
from optim import build_optimizer  # noqa: E402
from loader import resolve_device, resolve_dtype  # noqa: E402
from measure import in_fresh_process, peak_rss_mb  # noqa: E402
from train import TrainConfig, TrainError, check_config, estimate_loss, start_model, train_step  # noqa: E402

DEFAULT_VARIANTS = ("freeze_embedding=False,train_blocks=0;"
                    "freeze_embedding=True,train_blocks=0;"
                    "freeze_embedding=True,train_blocks=15;"
                    "freeze_embedding=True,train_blocks=15,gradient_checkpointing=True")


@dataclass
class OptionsConfig(TrainConfig):
    minutes: float = 5.0                 # training time per variant, loading and evals not counted
    variants: str = DEFAULT_VARIANTS


def peak_rss_gib(reset=False):
    """This process's peak resident memory so far (measure.peak_rss_mb) in GiB, then (reset) start Linux's
    count afresh."""
    peak = peak_rss_mb() / 1024
    if reset:
        Path("/proc/self/clear_refs").write_text("5")
    return peak


def run_variant(cfg, set_keys, seconds):
    """Load, score, train for seconds, score again (in a process of its own). Returns the variant's numbers."""
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    model, _, cfg, splits = start_model(cfg, set_keys, device)
    cfg = replace(cfg, dtype=resolve_dtype(cfg.dtype, device, model.config.dim))
    optimizer = build_optimizer(model, cfg, device)
    peak_loading = peak_rss_gib(reset=True)
    val_before = estimate_loss(model, splits, cfg, device, 0, 1)["val"]
    no_stop = SimpleNamespace(requested=False)
    step_seconds = []
    while sum(step_seconds) < seconds:
        it = len(step_seconds)
        lr = cfg.learning_rate * min(1.0, (it + 1) / (cfg.warmup_iters + 1))
        t0 = time.perf_counter()
        loss, _ = train_step(model, model, optimizer, splits["train"], cfg, lr, it, 0, 1, device, no_stop)
        step_seconds.append(time.perf_counter() - t0)
        if not math.isfinite(loss):
            raise TrainError(f"the loss became nan/inf at step {it}")
    return {"dtype": cfg.dtype, "trained": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "s_per_step": statistics.median(step_seconds), "steps": len(step_seconds),
            "train_s": sum(step_seconds), "val_before": val_before,
            "val_after": estimate_loss(model, splits, cfg, device, 0, 1)["val"],
            "peak_loading_gib": peak_loading, "peak_training_gib": peak_rss_gib()}


def main(cfg, set_keys):
    check_config(cfg)
    variants = parse_variants(cfg.variants, cfg, "--variants")
    print(f"{machine()}; {cfg.batch_size} x {cfg.block_size} tokens per step, {cfg.minutes:g} minutes of training each")
    print("| variant | dtype | trained parameters | s/step | steps | val loss before | val loss after | "
          "peak GiB loading | peak GiB training |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = {}
    for label, variant in variants:
        variant_keys = {item.split("=", 1)[0].strip() for item in label.split(",")}
        r = in_fresh_process(run_variant, variant, set_keys | variant_keys, 60 * cfg.minutes)   # its own peak
        results[label] = r
        print(f"| {label} | {r['dtype']} | {r['trained'] / 1e6:.1f}M | {r['s_per_step']:.2f} | {r['steps']} | "
              f"{r['val_before']:.3f} | {r['val_after']:.3f} | {r['peak_loading_gib']:.2f} | "
              f"{r['peak_training_gib']:.2f} |", flush=True)
    return results


if __name__ == "__main__":
    exit_if_help(sys.argv[1:], __doc__, OptionsConfig(), more_comments=(ModelConfig,))
    try:
        main(*configure_and_report(OptionsConfig(), sys.argv[1:]))
    except (ConfigError, TrainError, DataError) as e:
        sys.exit(f"error: {e}")
