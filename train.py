"""
Train MobileLLM on a laptop CPU, one GPU, or many GPUs, with one script.

  python train.py                                   # default: deep-and-thin MobileLLM-LS on shakespeare_char
  python train.py --max_iters=500 --dtype=fp32
  python train.py --init_from=resume                # continue out_dir/ckpt.pt exactly, with the run's own settings
  python train.py --init_from=resume --max_iters=3000   # ... or with some changed (longer, here)
  python train.py config/finetune_shakespeare.py    # fine-tune a released model (SmolLM2-135M) on a CPU
  torchrun --nproc_per_node=8 train.py config/train_mobilellm_125m.py    # DDP: one process per GPU

Settings: the TrainConfig defaults below, then config files, then --key=value overrides (configurator.py; a
bool setting alone, --compile, is --compile=True).
In python: `from train import TrainConfig, train; log = train(TrainConfig(max_iters=100, quiet=True))`.

Fine-tuning (warm_start.py, with resuming): --init_from=<model source> starts from any model loader.py loads
(our checkpoint, a Hugging Face dir or hub id, a .gguf file; not an int8 checkpoint: fine-tune the float
model). The model's shape comes from the source: model settings you leave alone are taken from it, ones you
set that contradict it are an error. block_size may be set lower than the model's context: training then uses
shorter windows, and the saved model keeps the source's context (RoPE positions do not depend on it). The data
must be tokenized with the model's tokenizer (data/shakespeare/prepare.py --tokenizer=<source>); the tokenizer
is saved in ckpt.pt. --init_from=resume continues a fine-tune exactly, as any run. freeze_embedding,
train_blocks and gradient_checkpointing make a 135M model practical on a CPU.

Writes into out_dir: ckpt.pt (model, optimizer, iteration, config, RNG states, data position; written
atomically), log.jsonl (one JSON line per eval) and loss.png (when matplotlib is installed). Ctrl-C or SIGTERM
(kill, a scheduler) saves a checkpoint and stops; a NaN/inf loss stops the run and keeps the last good
checkpoint.
"""
import difflib
import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoint import (CKPT_NAME, CheckpointError, atomic_write, checkpoint_file, load_checkpoint, model_checkpoint,
                        save_checkpoint)
from configurator import ConfigError, apply_settings, configure_and_report, exit_if_help
from dataset import DataError, get_batch, load_dataset, prepare_if_missing, seeded_generator
from loader import autocast, dtype_name, resolve_device, resolve_dtype
from mfu import flops_per_token, measure_peak_flops, synchronize
from model import MobileLLM, ModelConfig
from optim import build_optimizer, lr_at
from warm_start import (adopt_model_settings, changed_settings, check_data_tokenizer, freeze, frozen_blocks,
                        load_source_model, resume_state, resumed_settings, rng_state)


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out-shakespeare-char"  # where ckpt.pt, log.jsonl and loss.png go
    dataset: str = "shakespeare_char"  # data/<dataset>/ as its prepare.py writes it (shakespeare: on first use)
    data_dir: str = ""                  # folder with train.bin, val.bin, meta.json; "" = data/<dataset>
    init_from: str = "scratch"          # "scratch", "resume" (from out_dir/ckpt.pt), or a model source to fine-tune:
                                        # our checkpoint, an HF dir or hub id, a .gguf file (see loader.py)
    eval_interval: int = 500            # iterations between evals (each costs ~13 training steps at the default)
    eval_iters: int = 20                # batches per split in each eval (the same ones every eval)
    log_interval: int = 10              # iterations between progress-bar updates of loss, tokens/s, MFU
    always_save_checkpoint: bool = False  # False: save only when val loss improves (and on Ctrl-C/SIGTERM)
    quiet: bool = False                 # no progress bar, no printing (for many runs in one process)
    # model: the ModelConfig fields (vocab_size comes from the dataset's meta.json; decoding-only fields
    # such as meta_ls_cache keep their ModelConfig defaults). Resuming or fine-tuning takes them from the model
    n_layers: int = 3
    dim: int = 128
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 384
    ffn_type: str = "swiglu"
    share: str = "immediate"            # MobileLLM-LS: each block applied twice in a row
    share_repeats: int = 2
    tie_embeddings: bool = True
    block_size: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    # optimization: AdamW (or Muon for the blocks' matrices), linear warmup, then decay to min_lr, gradient clipping
    max_iters: int = 1500               # the quick default: 3-10 minutes on 2 CPU cores (docs/quickstart.md)
    batch_size: int = 16                # sequences per micro-step per process
    gradient_accumulation_steps: int = 1  # micro-steps per iteration, summed over all processes
    optimizer: str = "muon"             # "muon": Muon (optim.py) for the 2-D matrices inside the blocks, AdamW for
                                        # embeddings and norms (the quick default: docs/quickstart.md); "adamw"
                                        # for every parameter (the paper's configs, fine-tuning)
    learning_rate: float = 3e-3         # peak AdamW learning rate
    muon_lr: float = 0.02               # peak Muon learning rate (optimizer="muon"), on the same schedule
    min_lr: float = 0.0                 # where the decay ends: 0 for the quick default (docs/quickstart.md), 10%
                                        # of learning_rate in the paper's configs; Muon's floor is the same
                                        # fraction of muon_lr
    warmup_iters: int = 100             # linear warmup from 0 to the peak learning rates
    lr_schedule: str = "cosine"         # after warmup: "cosine" decay to min_lr, or "wsd" (warmup-stable-decay):
                                        # the peak until the last cooldown_frac of lr_decay_iters, then linear
    cooldown_frac: float = 0.2          # "wsd": the fraction of lr_decay_iters spent decaying to min_lr
    lr_decay_iters: Optional[int] = None  # None: max_iters
    weight_decay: float = 0.1           # decoupled, on the 2-D matrices only (AdamW and Muon alike)
    beta1: float = 0.9                  # AdamW's betas and eps
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0              # 0 disables clipping
    # fine-tuning on a CPU: frozen parameters get no gradient, no optimizer state, and are saved unchanged
    freeze_embedding: bool = False      # keep the token embedding and LM head fixed (one tied tensor: 28M of
                                        # SmolLM2-135M's 135M parameters)
    train_blocks: int = 0               # train only the last N unique blocks (and the final norm); 0: all blocks
    gradient_checkpointing: bool = False  # recompute each block application in backward instead of storing its
                                        # activations: less memory for ~1/3 more compute, same loss and gradients
    # system
    device: str = "auto"                # "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:1", ...
    dtype: str = "auto"                 # "bf16" (autocast, fp32 master weights), "fp32", or "auto": bf16
                                        # where the hardware has it and it pays (CUDA; CPUs with AVX-512
                                        # BF16/AMX for dim >= loader.CPU_BF16_MIN_DIM)
    compile: bool = False               # torch.compile the model (the uncompiled one is what gets saved)
    seed: int = 1337                    # the init, and every batch (a function of seed and iteration)
    peak_flops: float = 0.0             # for MFU; 0: the GPU's datasheet bf16 peak, or measured on CPU


class TrainError(RuntimeError):
    """A run that cannot go on: its loss or gradient became NaN/inf (settings, data and checkpoints that do not
    fit raise ConfigError, DataError and CheckpointError before the first step)."""


# ----------------------------------------------------------------------------------------------------
# settings


def check_config(cfg):
    """Type-check every field (as the command line does) and the values that must agree with each other."""
    apply_settings(type(cfg)(), asdict(cfg), type(cfg).__name__)
    choices = {"dtype": ("auto", "fp32", "bf16"), "optimizer": ("adamw", "muon"), "lr_schedule": ("cosine", "wsd")}
    for name, allowed in choices.items():
        value = getattr(cfg, name)
        if (dtype_name(value) if name == "dtype" else value) not in allowed:
            raise ConfigError(f"{name} must be one of {allowed}, got {value!r}")
    for name in ("eval_iters", "eval_interval", "log_interval", "batch_size", "gradient_accumulation_steps"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be positive, got {getattr(cfg, name)}")
    for name in ("max_iters", "warmup_iters", "train_blocks", "learning_rate", "muon_lr", "min_lr", "weight_decay",
                 "eps", "grad_clip", "peak_flops"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.learning_rate == 0:                  # the schedule's peak, which Muon's lr is scaled by
        raise ConfigError("learning_rate must be > 0 (it is the schedule's peak)")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be in [0, 1), got {getattr(cfg, name)}")
    if cfg.lr_decay_iters is not None and cfg.lr_decay_iters < 1:
        raise ConfigError(f"lr_decay_iters must be positive (or None: max_iters), got {cfg.lr_decay_iters}")
    if not 0 < cfg.cooldown_frac <= 1:
        raise ConfigError(f"cooldown_frac must be in (0, 1], got {cfg.cooldown_frac}")
    if not cfg.out_dir.strip():
        raise ConfigError("out_dir is empty: name the folder for ckpt.pt and log.jsonl")
    close = difflib.get_close_matches(cfg.init_from, ("scratch", "resume"), n=1, cutoff=0.7)
    if close and cfg.init_from != close[0] and not Path(cfg.init_from).exists():
        raise ConfigError(f"init_from={cfg.init_from!r}: did you mean {close[0]!r}?")


def model_config(cfg, vocab_size):
    settings = {f.name: getattr(cfg, f.name) for f in fields(ModelConfig) if hasattr(cfg, f.name)}
    settings["vocab_size"] = vocab_size
    try:
        return ModelConfig(**settings)
    except ValueError as e:
        raise ConfigError(f"bad model settings: {e}") from e


# ----------------------------------------------------------------------------------------------------
# data (dataset.py): every batch is a pure function of (seed, stream, step, index)

TRAIN_STREAM, EVAL_STREAM = 0, 1                    # the streams of seeded_generator's keys


# ----------------------------------------------------------------------------------------------------
# distributed


def setup_distributed(device):
    """Join torchrun's process group when launched by torchrun. Returns (rank, world, device, owned)."""
    if "RANK" not in os.environ:
        return 0, 1, device, False
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.device(device).type == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size(), device, owned


def all_reduce_sum(tensor, world):
    if world > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


# ----------------------------------------------------------------------------------------------------
# evaluation, logging, checkpoints


@torch.no_grad()
def estimate_loss(model, splits, cfg, device, rank, world, stop=None):
    """Mean loss over eval_iters fixed batches per split (the same batches at every eval), split
    between the processes; None when a stop (a StopRequest) is requested mid-way, on any process."""
    model.eval()
    out = {}
    for split_id, split in enumerate(("train", "val")):
        losses = torch.zeros(cfg.eval_iters, device=device)
        for first in range(0, cfg.eval_iters, world):      # a round: a batch per process, all agreeing to go on
            asked = torch.tensor(float(stop is not None and stop.requested), device=device)
            if all_reduce_sum(asked, world).item() > 0:
                model.train()
                return None
            k = first + rank
            if k >= cfg.eval_iters:
                continue
            g = seeded_generator(cfg.seed, EVAL_STREAM, split_id, k)
            x, y = get_batch(splits[split], cfg.batch_size, cfg.block_size, g, device)
            with autocast(device, cfg.dtype):
                losses[k] = model(x, y)[1]
        out[split] = all_reduce_sum(losses, world).mean().item()
    model.train()
    return out


def plot_losses(history, path):
    """loss.png: train and val loss per eval, when matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("train_loss", "val_loss"):
        ax.plot([r["iter"] for r in history], [r[key] for r in history], label=key.replace("_", " "))
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))   # never half an image
    plt.close(fig)


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM (kill, a cluster's scheduler, torchrun shutting down) sets a flag: the loop
    saves and stops after the current step. A second signal kills."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, quiet=False):
        self.requested, self.quiet = False, quiet
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self.handle) for sig in self.SIGNALS}
        return self

    def handle(self, signum, frame):
        self.requested = True
        self.__exit__()
        if not self.quiet:          # an eval or a long step may run on for a while: say that it was heard
            os.write(2, b"\nstopping after this step, with a checkpoint; an eval in progress is cut short (press "
                        b"Ctrl-C again to stop at once, saving nothing)\n")   # os.write: tqdm writes to stderr too

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def train_step(train_model, model, optimizer, shards, cfg, lr, iter_num, rank, world, device, stop):
    """One optimizer step over gradient_accumulation_steps micro-batches split between the processes
    (DDP syncs gradients only on each process's last micro-step). Returns (mean loss over all processes,
    whether any process was asked to stop (a StopRequest)); a non-finite loss or gradient skips the update
    and returns nan."""
    local_accum = cfg.gradient_accumulation_steps // world
    loss_sum = torch.zeros((), device=device)
    for micro in range(local_accum):
        g = seeded_generator(cfg.seed, TRAIN_STREAM, iter_num, rank * local_accum + micro)
        x, y = get_batch(shards, cfg.batch_size, cfg.block_size, g, device)                 # (B, T) each
        last = micro == local_accum - 1
        with train_model.no_sync() if world > 1 and not last else nullcontext():
            with autocast(device, cfg.dtype):
                loss = train_model(x, y)[1]
            (loss / local_accum).backward()
        loss_sum += loss.detach()
    # one all-reduce carries the mean loss and whether any process was asked to stop
    stats = all_reduce_sum(torch.stack([loss_sum / local_accum, torch.tensor(float(stop.requested),
                                                                             device=device)]), world)
    train_loss, stop_requested = stats[0].item() / world, stats[1].item() > 0
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf).item()
    if math.isfinite(train_loss) and math.isfinite(grad_norm):
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        optimizer.step()
    else:
        train_loss = math.nan
    optimizer.zero_grad(set_to_none=True)
    # one process: also a Ctrl-C that came after the all-reduce (DDP processes must agree, so they wait a step)
    return train_loss, stop_requested or (world == 1 and stop.requested)


# ----------------------------------------------------------------------------------------------------
# the training loop


def train(cfg: TrainConfig, set_keys=None) -> list:
    """Train as cfg says; returns this run's eval records (also appended to out_dir/log.jsonl). set_keys:
    the fields the user set, which must agree with a model trained from (None: those that differ from the
    defaults)."""
    check_config(cfg)
    rank, world, device, owned_group = setup_distributed(resolve_device(cfg.device))
    try:
        with StopRequest(quiet=cfg.quiet or rank != 0) as stop:
            return run(cfg, changed_settings(cfg) if set_keys is None else set_keys, rank, world, device, stop)
    finally:
        if owned_group:
            dist.destroy_process_group()


def evaluate(model, splits, cfg, device, rank, world, iter_num, lr, tokens, elapsed_s, stop=None):
    """One eval record: train and val loss on the fixed eval batches; a non-finite loss stops the run. None
    when a stop was requested mid-eval (all processes of a DDP run stop it together)."""
    losses = estimate_loss(model, splits, cfg, device, rank, world, stop)
    if losses is None:
        return None
    if not all(map(math.isfinite, losses.values())):
        raise TrainError(f"non-finite eval loss {losses} at iteration {iter_num}; stopped, keeping the "
                         f"last good checkpoint in {cfg.out_dir}")
    return {"iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"], "lr": lr,
            "tokens": tokens, "elapsed_s": round(elapsed_s, 3)}


def write_log(history, out_dir):
    """out_dir/log.jsonl holding these eval records alone (none for a new run), and their loss curve."""
    atomic_write(out_dir / "log.jsonl", lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in history)))
    if history:
        plot_losses(history, out_dir / "loss.png")


def append_log(record, history, out_dir):
    """One JSON line in out_dir/log.jsonl, and the loss curve redrawn."""
    history.append(record)
    with open(out_dir / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    plot_losses(history, out_dir / "loss.png")


def start_model(cfg, set_keys, device, ckpt=None):
    """The model a run starts from: new (scratch), out_dir's checkpoint (ckpt, for resume) or init_from's
    weights. Returns (model, tokenizer spec, cfg with the model's settings, data splits)."""
    if cfg.init_from == "scratch":
        meta, splits = load_dataset(cfg)
        model, tokenizer_spec = MobileLLM(model_config(cfg, meta["vocab_size"])), meta["tokenizer"]
    else:
        model, tokenizer_spec = load_source_model(cfg, ckpt)
        source = cfg.out_dir if ckpt else cfg.init_from
        # a resumed run keeps its own settings (a fine-tune's shorter block_size): they count as set
        kept = set(ckpt.get("train_config", {})) if ckpt else set()
        cfg = adopt_model_settings(cfg, set(set_keys) | kept, model.config, source)
        meta, splits = load_dataset(cfg, source)
        check_data_tokenizer(cfg, meta, tokenizer_spec, model.config, source)
    model.to(device).train()
    freeze(model, cfg)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    return model, tokenizer_spec, cfg, splits


def run(cfg, set_keys, rank, world, device, stop):
    master = rank == 0
    say = print if master and not cfg.quiet else (lambda *a, **k: None)
    if cfg.init_from == "resume" and not checkpoint_file(cfg.out_dir).is_file():
        raise ConfigError(f"init_from=resume continues the run in out_dir, and {cfg.out_dir} holds no {CKPT_NAME}: "
                          "pass the run's folder as --out_dir")
    # onto the CPU: its RNG states must be CPU tensors (torch.set_rng_state refuses CUDA ones), and the model and
    # optimizer copy their tensors to the device (no second copy of the run held on the GPU)
    ckpt = load_checkpoint(cfg.out_dir, map_location="cpu") if cfg.init_from == "resume" else None
    if ckpt is not None:
        cfg = resumed_settings(cfg, set_keys, ckpt, device, say)
        check_config(cfg)
    if master:                                      # the built-in default dataset, the first time (a resumed
        prepare_if_missing(cfg)                     # run's own: its settings are known only here)
    if world > 1:
        dist.barrier()
    if cfg.gradient_accumulation_steps % world:
        fits = world * -(-cfg.gradient_accumulation_steps // world)
        raise ConfigError(f"gradient_accumulation_steps ({cfg.gradient_accumulation_steps}) must be divisible "
                          f"by the number of processes ({world}), which share its micro-steps: e.g. "
                          f"--gradient_accumulation_steps={fits}")
    out_dir = Path(cfg.out_dir)
    torch.manual_seed(cfg.seed)
    model, tokenizer_spec, cfg, splits = start_model(cfg, set_keys, device, ckpt)
    config = model.config
    cfg = replace(cfg, dtype=resolve_dtype(cfg.dtype, device, config.dim))
    optimizer = build_optimizer(model, cfg, device)
    iter_num, best_val_loss, elapsed_before, history, evaluated = 0, math.inf, 0.0, [], False
    if ckpt is not None:
        iter_num, best_val_loss, elapsed_before, history = resume_state(ckpt, out_dir, optimizer, device, say)
        evaluated = any(r["iter"] == iter_num for r in history)   # a run stopped at an eval's iteration did not eval
        say(f"resuming from {out_dir / CKPT_NAME} at iteration {iter_num}" + (
            f": the run already reached max_iters={cfg.max_iters} (raise it to train further)"
            if iter_num >= cfg.max_iters and evaluated else ""))
    elif cfg.init_from != "scratch":
        say(f"fine-tuning {cfg.init_from}")
    start_iter = iter_num
    eval_model = torch.compile(model) if cfg.compile else model         # evaluated without DDP
    device_ids = [device] if device.startswith("cuda") else None
    # the model's only buffers are RoPE's tables, the same on every process: no broadcast before each forward
    train_model = DDP(eval_model, device_ids=device_ids, broadcast_buffers=False) if world > 1 else eval_model

    tokens_per_iter = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
    flops_per_iter = tokens_per_iter * flops_per_token(config, cfg.block_size, frozen_blocks(config, cfg),
                                                       cfg.freeze_embedding)
    peak_flops = cfg.peak_flops or (measure_peak_flops(device, cfg.dtype) if master and not cfg.quiet else 0.0)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(f"{model.num_params():,} parameters, {trained:,} trained ({config.n_layers} blocks applied {config.depth} "
        f"times, dim {config.dim}); {tokens_per_iter:,} tokens/iter on {world} x {device}, {cfg.dtype}")
    least_s = flops_per_iter / (world * peak_flops) if peak_flops else 0.0
    if least_s > 10:                                                    # a GPU recipe on a CPU, say
        say(f"each iteration is {flops_per_iter / 1e12:.1f} TFLOP: at least {least_s:,.0f} s at this device's "
            f"peak FLOP/s, and each eval {2 * cfg.eval_iters} forward batches")
    # a new run in the folder of an earlier one leaves its checkpoint and log as they are until its first save
    earlier_run_kept = master and cfg.init_from != "resume" and (out_dir / CKPT_NAME).is_file()
    if earlier_run_kept:
        say(f"{out_dir / CKPT_NAME} is an earlier run's, which this run replaces at its first save, a Ctrl-C's "
            "after its first step included (to continue that run instead: --init_from=resume)")
    elif master:
        write_log(history, out_dir)

    t_start = time.perf_counter()

    def elapsed():
        return elapsed_before + time.perf_counter() - t_start

    def save(reason):
        nonlocal earlier_run_kept
        if not master:
            return
        extra = dict(optimizer=optimizer.state_dict(), iter_num=iter_num, train_config=asdict(cfg),
                     rng=rng_state(device), best_val_loss=best_val_loss, elapsed_s=elapsed(),
                     data_state={"sampler": "seeded_random", "seed": cfg.seed, "iter_num": iter_num,
                                 "tokens_seen": iter_num * tokens_per_iter})
        save_checkpoint(model_checkpoint(model, tokenizer_spec, **extra), out_dir)
        if earlier_run_kept:                                        # this run's log replaces the earlier run's
            write_log(history, out_dir)
            earlier_run_kept = False
        if not cfg.quiet:
            bar.write(f"saved {out_dir / CKPT_NAME} at iteration {iter_num} ({reason})")    # not onto the bar's line

    def stop_here():
        bar.close()
        if earlier_run_kept and iter_num == start_iter:
            raise KeyboardInterrupt(f"stopped before this run's first step: nothing saved, and {out_dir} still "
                                    "holds the earlier run")
        save("interrupted")
        launcher = "python" if world == 1 else f"torchrun --standalone --nproc_per_node={world}"
        raise KeyboardInterrupt(f"stopped at iteration {iter_num}; to resume: {launcher} train.py "
                                f"--init_from=resume --out_dir={out_dir}")

    records = []
    bar = tqdm(total=cfg.max_iters, initial=iter_num, disable=not master or cfg.quiet, unit="it",
               dynamic_ncols=True)
    window_t, window_iters = time.perf_counter(), 0
    while True:
        lr = lr_at(cfg, iter_num)
        at_eval = iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters
        if at_eval and not (iter_num == start_iter and evaluated):
            bar.set_description_str("evaluating")
            record = evaluate(eval_model, splits, cfg, device, rank, world, iter_num, lr,
                              iter_num * tokens_per_iter, elapsed(), stop)
            bar.set_description_str("")
            if record is None:                  # stopped mid-eval: the resumed run evaluates this iteration
                stop_here()
            records.append(record)
            if earlier_run_kept:
                history.append(record)                              # written at this run's first save
            elif master:
                append_log(record, history, out_dir)
            if not cfg.quiet and master:
                bar.write(f"iter {iter_num}: train loss {record['train_loss']:.4f}, val loss {record['val_loss']:.4f}")
            improved = record["val_loss"] < best_val_loss
            best_val_loss = min(best_val_loss, record["val_loss"])
            if iter_num > start_iter and (improved or cfg.always_save_checkpoint):
                save("val loss improved" if improved else "always_save_checkpoint")
            window_t, window_iters = time.perf_counter(), 0
        if iter_num >= cfg.max_iters:
            break

        if iter_num == start_iter and cfg.compile:
            bar.set_description_str("compiling")
        train_loss, stop_requested = train_step(train_model, model, optimizer, splits["train"], cfg, lr, iter_num,
                                                rank, world, device, stop)
        bar.set_description_str("")
        if not math.isfinite(train_loss):
            raise TrainError(f"the loss or its gradient became nan/inf at iteration {iter_num}: stopped; the last "
                             f"good checkpoint in {out_dir} is kept. Try a lower learning_rate or more warmup_iters")
        iter_num += 1
        window_iters += 1
        bar.update(1)
        if window_iters == cfg.log_interval or iter_num == cfg.max_iters:       # a full window (it restarts at evals)
            synchronize(device)
            seconds = time.perf_counter() - window_t
            postfix = {"loss": f"{train_loss:.4f}", "tok/s": f"{window_iters * tokens_per_iter / seconds:,.0f}"}
            if peak_flops:
                postfix["MFU"] = f"{100 * window_iters * flops_per_iter / seconds / (world * peak_flops):.1f}%"
            bar.set_postfix(postfix)
            window_t, window_iters = time.perf_counter(), 0
        if stop_requested:
            stop_here()
    bar.close()
    if earlier_run_kept:
        say(f"nothing saved: no eval improved on this run's first, and {out_dir} still holds the earlier run")
    elif master and (out_dir / CKPT_NAME).is_file():
        say(f"sample from it: python sample.py --init_from={out_dir}")
    return records


if __name__ == "__main__":
    exit_if_help(sys.argv[1:], __doc__, TrainConfig(), more_comments=(ModelConfig,))
    first_process = os.environ.get("RANK", "0") == "0"      # under torchrun, one process says why it stopped
    try:
        train(*configure_and_report(TrainConfig(), sys.argv[1:]))
    except (ConfigError, TrainError, DataError, CheckpointError) as e:
        sys.exit(f"error: {e}" if first_process else 1)
    except KeyboardInterrupt as e:              # saved and stopped: exit as sample.py and eval.py do on Ctrl-C
        if first_process:
            print(f"interrupted: {str(e) or 'stopped at once, without saving'}", file=sys.stderr)
        sys.exit(130)
