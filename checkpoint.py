"""
Checkpoints: written atomically, loaded safely, turned back into a model.

A checkpoint is one torch file (`<out_dir>/ckpt.pt`) holding a dict:
  model          the model's state_dict (from the uncompiled, unwrapped model: no `_orig_mod.`/`module.`)
  model_config   dataclasses.asdict(ModelConfig)
  tokenizer      the tokenizer spec (see tokenizer.py), so sampling decodes with what training used
  ... plus whatever the writer adds (train.py: optimizer, iter_num, RNG states, data position;
      quantize.py: quantization = "w8a8" or "w8" and its int8 tensors).
"""
import glob
import os
import re
from dataclasses import asdict
from pathlib import Path

import torch

from model import MobileLLM, config_from_dict

CKPT_NAME = "ckpt.pt"


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable or not one of ours."""


def checkpoint_file(path):
    """Accept a checkpoint file or the directory holding ckpt.pt."""
    path = Path(path)
    return path / CKPT_NAME if path.is_dir() else path


def atomic_write(path, write):
    """Make the file at path with write(tmp_path), all or nothing: write fills a temporary file beside
    path, which is flushed to disk and then renamed over path. An error mid-write leaves the previous file
    (or none), never half of one, and no temporary file; a process killed outright (SIGKILL, power) leaves
    its temporary file, which the next write of the same path removes. Returns path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_writers_files(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def remove_dead_writers_files(path):
    """Delete the temporary files of path (".NAME.tmpPID") left by writers that no longer run on this machine:
    a checkpoint's can be as large as the checkpoint."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.tmp*"):
        pid = tmp.name.rpartition(".tmp")[2]
        if pid.isdigit() and len(pid) < 10 and not process_exists(int(pid)):
            tmp.unlink(missing_ok=True)


def process_exists(pid):
    try:
        os.kill(pid, 0)                 # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:             # it exists, as another user's
        return True
    return True


def save_checkpoint(obj, path):
    """Write atomically: a crash mid-write leaves the previous file intact, never half a checkpoint."""
    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    return atomic_write(checkpoint_file(path), write)


def unreadable(path, error):
    """One line on why torch.load failed: torch's own messages run to a dozen lines of advice."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return f"{path} is a GGUF file, not a torch checkpoint: name it .gguf and it loads as one"
    if magic != b"PK\x03\x04":                                # torch.save writes a zip archive
        return f"{path} is not a readable checkpoint: not a file torch.save writes"
    refused = re.search(r"WeightsUnpickler error: ([^\n]*?)(?: Please use|$)", str(error), re.MULTILINE)
    if refused:
        return (f"{path} is not a readable checkpoint: it holds more than tensors and plain values, which a safe "
                f"load (weights_only=True) refuses ({refused.group(1).strip()})")
    first_sentence = (str(error).strip().splitlines() or [""])[0].split(". ")[0]
    return f"{path} is not a readable checkpoint, truncated or damaged ({type(error).__name__}: {first_sentence})"


def load_checkpoint(path, map_location="cpu", mmap=False):
    """Load with weights_only=True (no arbitrary code from pickles); one clear error when it fails.
    mmap=True maps the tensors from the file instead of reading them (for reading the other keys)."""
    path = checkpoint_file(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path} (give a {CKPT_NAME} file or the out_dir holding one)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises many types for truncated or foreign files
        raise CheckpointError(unreadable(path, e)) from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise CheckpointError(f"{path} is not a nanoMobileLLM checkpoint (it has no 'model' and 'model_config')")
    return ckpt


def unwrap(model):
    """The plain MobileLLM inside DDP (.module) and torch.compile (._orig_mod) wrappers, so saved keys
    never carry their prefixes."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def model_checkpoint(model, tokenizer_spec, **extra):
    """The minimal checkpoint dict for a model (writers add their own keys through extra)."""
    plain = unwrap(model)
    return dict(model=plain.state_dict(), model_config=asdict(plain.config), tokenizer=tokenizer_spec, **extra)


def load_weights(model, state, path):
    """model.load_state_dict(state), copied in place; where the file's weights do not fit the model its
    model_config builds, one CheckpointError saying how, with the first example of each kind."""
    expected = model.state_dict()
    shape = lambda tensor: tuple(getattr(tensor, "shape", ("not a tensor",)))
    shapes = [k for k in expected if k in state and shape(state[k]) != shape(expected[k])]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    problems = [f"{len(shapes)} of another shape (e.g. {shapes[0]}: {shape(state[shapes[0]])} in the file, "
                f"{shape(expected[shapes[0]])} in the model)"] if shapes else []
    problems += [f"{len(missing)} missing (e.g. {missing[0]})"] if missing else []
    problems += [f"{len(unexpected)} not the model's (e.g. {unexpected[0]})"] if unexpected else []
    if problems:
        raise CheckpointError(f"{checkpoint_file(path)}: its weights do not fit the model its model_config describes: "
                              f"{len(expected)} tensors expected, {'; '.join(problems)}")
    model.load_state_dict(state)


def load_model(path, device="cpu", ckpt=None):
    """Rebuild a float MobileLLM from one of our checkpoints (ckpt: its dict, when already loaded from
    path). Returns (model in eval mode, checkpoint)."""
    ckpt = ckpt or load_checkpoint(path)
    if ckpt.get("quantization"):
        raise CheckpointError(f"{checkpoint_file(path)} is an int8 ({ckpt['quantization']}) checkpoint: "
                              "load it with int8.load_quantized")
    try:
        model = MobileLLM(config_from_dict(ckpt["model_config"]))
    except ValueError as e:
        raise CheckpointError(f"{checkpoint_file(path)}: its model_config does not make a model: {e}") from e
    load_weights(model, ckpt["model"], path)
    return model.to(device).eval(), ckpt
