"""
A run that does not start from scratch (train.py's init_from): out_dir's own checkpoint, resumed with the
run's own settings, optimizer, RNG states and eval log, or a trained model to fine-tune, whose shape and
tokenizer the run then takes. Also the fine-tuning options that fix parameters (freeze_embedding,
train_blocks).

Errors are ConfigError (a setting that does not fit the checkpoint or model) or DataError (data tokenized
with another tokenizer), each naming what to do instead.
"""
import json
import math
from dataclasses import fields, replace
from pathlib import Path

import torch

from checkpoint import CheckpointError, checkpoint_file, load_model
from configurator import ConfigError
from dataset import DataError, dataset_dir, prepare_hint
from loader import load_model_and_tokenizer, native_bf16
from model import ModelConfig
from int8 import is_quantized
from tokenizer import same_tokenizer


def model_fields(cfg):
    """The ModelConfig fields that the settings cfg (a TrainConfig) has: the model's shape."""
    return tuple(f.name for f in fields(ModelConfig) if hasattr(cfg, f.name))


def changed_settings(cfg):
    """The fields of cfg that differ from its class's defaults: what a Python caller chose (the command line
    knows exactly what was set: configurator.configure_and_report)."""
    defaults = type(cfg)()
    return {f.name for f in fields(cfg) if getattr(cfg, f.name) != getattr(defaults, f.name)}


RUN_LOCAL = ("init_from", "out_dir", "device", "quiet")   # where and how this process runs, not the run
RUN_STATE = ("optimizer", "iter_num", "rng")              # what a checkpoint needs to be resumed exactly


def resumed_settings(cfg, set_keys, ckpt, device, say):
    """cfg for resuming ckpt: the run's own settings (its saved train_config), with what this command set
    (set_keys) on top, each change from the run reported. So `--init_from=resume` alone continues a run
    exactly as it was configured, whatever config file or flags started it."""
    if ckpt.get("quantization"):
        raise ConfigError(f"{cfg.out_dir} holds an int8 ({ckpt['quantization']}) checkpoint, whose weights cannot "
                          "be trained: resume the float run it was quantized from")
    missing = [k for k in RUN_STATE if k not in ckpt]
    if missing:
        raise ConfigError(f"{cfg.out_dir} holds a model, not a training run (no {', '.join(missing)} to resume): "
                          f"fine-tune from it instead, with --init_from={cfg.out_dir} and another out_dir")
    settings = {f.name for f in fields(cfg)} - set(RUN_LOCAL)
    saved = {k: v for k, v in ckpt.get("train_config", {}).items() if k in settings}
    changed = [f"{k} {saved[k]!r} -> {getattr(cfg, k)!r}" for k in sorted(set_keys)
               if k in saved and saved[k] != getattr(cfg, k)]
    cfg = replace(cfg, **{k: v for k, v in saved.items() if k not in set_keys})
    if changed:
        stretched = any(c.startswith("max_iters ") for c in changed) and cfg.lr_decay_iters is None
        say(f"resuming with settings changed from the run's: {', '.join(changed)}" + (
            " (the learning-rate schedule follows max_iters: it is laid over the new length from here on)"
            if stretched else ""))
    if cfg.dtype == "bf16" and "dtype" not in set_keys and not native_bf16(device):
        say("the run trained in bf16, which this device emulates far slower than fp32: --dtype=fp32 continues "
            "in fp32")
    return cfg


def load_source_model(cfg, ckpt):
    """(float model, tokenizer spec) to train on from: out_dir's checkpoint (ckpt, for resume) or init_from."""
    if ckpt is not None:
        return load_model(cfg.out_dir, ckpt=ckpt)[0], ckpt["tokenizer"]
    if checkpoint_file(cfg.init_from).resolve() == checkpoint_file(cfg.out_dir).resolve():
        raise ConfigError(f"init_from={cfg.init_from!r} is out_dir's own checkpoint: continue it with "
                          "--init_from=resume, or fine-tune into another out_dir")
    try:
        model, tokenizer = load_model_and_tokenizer(cfg.init_from)
    except (CheckpointError, ValueError, RuntimeError, OSError) as e:
        raise ConfigError(f"init_from={cfg.init_from!r} is not 'scratch', 'resume' or a model that loads: {e}") from e
    if is_quantized(model):
        raise ConfigError(f"init_from={cfg.init_from!r} is an int8 checkpoint, whose weights cannot be trained: "
                          "fine-tune the float model it was quantized from")
    if tokenizer is None:
        raise ConfigError(f"init_from={cfg.init_from!r} comes without a tokenizer: no data can be matched to it")
    return model, tokenizer.spec


def adopt_model_settings(cfg, set_keys, config, source):
    """cfg with the model's settings (config) in its model fields. A field the user set (set_keys) must agree
    with the model, except block_size, which may be lower: training then uses shorter windows."""
    conflicts = [f"{k}={getattr(cfg, k)!r} (the model has {k}={getattr(config, k)!r})" for k in model_fields(cfg)
                 if k in set_keys and k != "block_size" and getattr(cfg, k) != getattr(config, k)]
    if "block_size" in set_keys and cfg.block_size > config.block_size:
        conflicts.append(f"block_size={cfg.block_size} (the model's context is {config.block_size})")
    if conflicts:
        raise ConfigError(f"your settings contradict the model {source}: {'; '.join(conflicts)}. Leave them out "
                          "to take the model's")
    return replace(cfg, **{k: getattr(config, k) for k in model_fields(cfg) if k not in set_keys})


def check_data_tokenizer(cfg, meta, tokenizer_spec, config, source):
    """The data must be token ids of the model's own tokenizer."""
    if not same_tokenizer(meta["tokenizer"], tokenizer_spec):
        raise DataError(f"{dataset_dir(cfg)} holds tokens of a {meta['tokenizer'].get('kind')} tokenizer "
                        f"(vocabulary {meta['vocab_size']}), not of the {tokenizer_spec.get('kind')} tokenizer of "
                        f"the model {source} (vocabulary {config.vocab_size}); {prepare_hint(cfg, source)}")


def frozen_blocks(config, cfg):
    """The unique blocks cfg keeps fixed: those before the last train_blocks (none when train_blocks is 0)."""
    if cfg.train_blocks > config.n_layers:
        raise ConfigError(f"train_blocks={cfg.train_blocks} but the model has {config.n_layers} unique blocks")
    return range(config.n_layers - cfg.train_blocks if cfg.train_blocks else 0)


def freeze(model, cfg):
    """requires_grad False for what cfg keeps fixed: the token embedding and LM head (freeze_embedding),
    the unique blocks before the last train_blocks."""
    frozen = [model.tok_embeddings, model.output] if cfg.freeze_embedding else []
    frozen += [model.layers[b] for b in frozen_blocks(model.config, cfg)]
    for module in frozen:
        module.requires_grad_(False)


def rng_state(device):
    """The RNG states a checkpoint keeps, so that a resumed run draws what the stopped one would have."""
    state = {"torch": torch.get_rng_state()}
    if torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state, device):
    """The saved states (CPU tensors: train.py reads a checkpoint onto the CPU); of a run saved on more GPUs
    than this machine has, the first GPUs' (torch.cuda.set_rng_state_all would index past the last)."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


def read_log(out_dir, say):
    """The eval records in out_dir/log.jsonl, without any line that is not one (a run killed while writing it,
    an editor's blank line), which is said."""
    log_file = Path(out_dir) / "log.jsonl"
    records, bad = [], 0
    for line in log_file.read_text().splitlines() if log_file.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and {"iter", "train_loss", "val_loss"} <= set(record):
            records.append(record)
        else:
            bad += 1
    if bad:
        say(f"{log_file}: left out {bad} line(s) that are not eval records (a run killed while writing one?)")
    return records


def resume_state(ckpt, out_dir, optimizer, device, say):
    """Load out_dir's checkpoint (ckpt; the model was built from it) into the optimizer, restore RNG states.
    Returns (iter_num, best val loss, elapsed seconds so far, eval history from log.jsonl)."""
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError) as e:
        raise ConfigError(f"resume: the checkpoint's optimizer state does not fit the parameters trained now "
                          f"(set freeze_embedding and train_blocks as the run did, and the same optimizer): {e}") from e
    restore_rng_state(ckpt["rng"], device)
    history = read_log(out_dir, say)
    history = [r for r in history if r["iter"] <= ckpt["iter_num"]]   # a run killed outright may have logged more
    best = min([ckpt.get("best_val_loss", math.inf)] + [r["val_loss"] for r in history])   # an eval after a save
    return ckpt["iter_num"], best, ckpt.get("elapsed_s", 0.0), history
