"""
The training data of train.py: uint16 token files (train.bin and val.bin, or val_*.bin and train_*.bin shards)
with a meta.json, as data/<name>/prepare.py writes them, read through memmaps. Every batch is a pure function
of its generator's seed (seeded_generator), so a resumed or distributed run draws exactly the same batches.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from tokenizer import same_tokenizer

REPO_DIR = Path(__file__).resolve().parent
AUTO_PREPARED = ("shakespeare_char", "shakespeare")   # small enough to prepare on the fly when missing


class DataError(RuntimeError):
    """A dataset that is missing, not prepared, or too short for the run."""


def dataset_dir(cfg):
    return Path(cfg.data_dir) if cfg.data_dir else REPO_DIR / "data" / cfg.dataset


def split_files(data_dir, split):
    """train.bin, or the shards train_000000.bin, train_000001.bin, ... of a sharded dataset."""
    single = data_dir / f"{split}.bin"
    return [single] if single.is_file() else sorted(data_dir.glob(f"{split}_*.bin"))


def prepare_script(dataset):
    """data/<dataset>/prepare.py: it writes the dataset (there is one for each built-in dataset)."""
    return REPO_DIR / "data" / dataset / "prepare.py"


def prepare_if_missing(cfg):
    """Prepare a built-in small dataset that has no meta.json: never prepared, or stopped part-way."""
    data_dir = dataset_dir(cfg)
    if (data_dir / "meta.json").is_file() or cfg.data_dir or cfg.dataset not in AUTO_PREPARED:
        return
    script = prepare_script(cfg.dataset)
    if subprocess.run([sys.executable, str(script)]).returncode != 0:
        raise DataError(f"preparing dataset {cfg.dataset!r} failed (the line above says why); then run "
                        f"`python {script.relative_to(REPO_DIR)}` again, or set data_dir to a prepared folder")


def token_file(path):
    """A uint16 token file as a read-only array (a memmap; np.memmap cannot map an empty file)."""
    if Path(path).stat().st_size == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype=np.uint16, mode="r")


def prepare_hint(cfg, source=None):
    """How to prepare cfg's dataset: its own prepare.py, or for a model to start from (source) any text's
    prepare.py with that model's tokenizer, into the dataset's folder unless that holds a built-in dataset."""
    built_in = prepare_script(cfg.dataset).is_file()
    if source is None and cfg.data_dir:
        return f"write it with one of data/*/prepare.py --out_dir={cfg.data_dir}, or fix data_dir"
    if source is None and built_in:
        return f"run `python data/{cfg.dataset}/prepare.py` (see its --help) or set data_dir"
    if source is None:
        known = sorted(p.parent.name for p in (REPO_DIR / "data").glob("*/prepare.py"))
        return (f"there is no data/{cfg.dataset}/prepare.py: choose one of {', '.join(known)}, "
                "or set data_dir to a prepared folder")
    tokenize = f"tokenize the text with the model's tokenizer: `python data/shakespeare/prepare.py --tokenizer={source}"
    if cfg.data_dir or built_in:                      # never over a built-in dataset's own tokens
        return f"{tokenize} --out_dir=data/<name>` (or data/gutenberg/prepare.py), then train with --dataset=<name>"
    return f"{tokenize} --out_dir=data/{cfg.dataset}` (or data/gutenberg/prepare.py)"


def load_dataset(cfg, source=None):
    """(meta dict, {"train": [memmap, ...], "val": [...]}) with a clear error for anything missing."""
    data_dir = dataset_dir(cfg)
    hint = prepare_hint(cfg, source)
    name = f"data_dir {cfg.data_dir}" if cfg.data_dir else f"dataset {cfg.dataset!r}"
    meta_file = data_dir / "meta.json"
    if not meta_file.is_file():
        raise DataError(f"{name} is not prepared: no {meta_file}; {hint}")
    meta = json.loads(meta_file.read_text())
    splits = {}
    for split in ("train", "val"):
        files = split_files(data_dir, split)
        if not files:
            raise DataError(f"{name} has no {split}.bin (or {split}_*.bin shards) in {data_dir}; {hint}")
        splits[split] = [token_file(f) for f in files]
        short = [str(f) for f, m in zip(files, splits[split]) if len(m) <= cfg.block_size]
        if short:
            raise DataError(f"{', '.join(short)} holds no more than block_size={cfg.block_size} tokens")
    return meta, splits


def validation_tokens(train_config, vocab_size, n_tokens, data_dir="", tokenizer_spec=None):
    """The first n_tokens of the validation split the model trained with (train_config: the checkpoint's;
    data/<dataset>/val.bin or val_*.bin shards, uint16, as train.py reads them), or of data_dir, as a
    (n,) int64 tensor. The folder must be prepared (its meta.json written) and, when tokenizer_spec (the
    model's) is given, tokenized with that tokenizer."""
    train_config = train_config or {}
    if not (data_dir or train_config.get("data_dir") or train_config.get("dataset")):
        raise DataError("the checkpoint does not say which dataset it was trained on: pass --data_dir")
    data_dir = Path(data_dir or train_config.get("data_dir") or REPO_DIR / "data" / train_config["dataset"])
    files = split_files(data_dir, "val")
    if not files:
        raise DataError(f"no val.bin (or val_*.bin shards) in {data_dir}: prepare the dataset "
                        f"(python data/<dataset>/prepare.py) or pass --data_dir")
    meta_file = data_dir / "meta.json"
    if not meta_file.is_file():
        raise DataError(f"{data_dir} is not prepared: no meta.json (a preparation stopped part-way?); prepare it "
                        "again (python data/<dataset>/prepare.py)")
    meta = json.loads(meta_file.read_text())
    if tokenizer_spec is not None:
        if not same_tokenizer(meta["tokenizer"], tokenizer_spec):
            raise DataError(f"{data_dir} holds tokens of a {meta['tokenizer'].get('kind')} tokenizer (vocabulary "
                            f"{meta['vocab_size']}), not of the model's {tokenizer_spec.get('kind')} tokenizer: "
                            "score the model on data prepared with its tokenizer (prepare.py --tokenizer=<model>)")
    available = sum(f.stat().st_size for f in files) // 2
    if available < 2:
        raise DataError(f"{data_dir} holds {available} validation token(s): scoring needs at least 2")
    parts, have = [], 0
    for f in files:
        if have >= n_tokens:
            break
        part = token_file(f)[: n_tokens - have]
        parts.append(torch.from_numpy(part.astype(np.int64)))
        have += len(part)
    tokens = torch.cat(parts)
    if int(tokens.max()) >= vocab_size:
        raise DataError(f"{data_dir} holds token ids >= the model's vocab_size {vocab_size}: wrong dataset?")
    return tokens


def seeded_generator(*keys):
    """A torch.Generator seeded from integer keys, e.g. (seed, split, iteration, micro-batch index)."""
    state = np.random.SeedSequence(list(keys)).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def get_batch(shards, batch_size, block_size, generator, device):
    """x, y: (B, T) int64 random windows of the token files; y is x shifted by one token. The file is drawn
    with odds in proportion to the windows it holds (a short last shard is not drawn as often as a full one)."""
    windows = np.cumsum([len(s) - block_size for s in shards])
    pick = int(torch.randint(int(windows[-1]), (1,), generator=generator))
    shard = shards[int(np.searchsorted(windows, pick, side="right"))]
    starts = torch.randint(len(shard) - block_size, (batch_size,), generator=generator).tolist()
    x = torch.from_numpy(np.stack([shard[i:i + block_size] for i in starts]).astype(np.int64))
    y = torch.from_numpy(np.stack([shard[i + 1:i + 1 + block_size] for i in starts]).astype(np.int64))
    if torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x, y
