"""
What every data/<name>/prepare.py shares: getting the text (--input PATH, the tiny shakespeare copy
that ships in data/, or a download),
encoding it with a progress bar, and writing the files train.py reads:
  train.bin, val.bin   token ids as uint16, back to back (documents joined as in the text)
  meta.json            {"tokenizer": <spec from tokenizer.py>, "vocab_size": N}
Sharded datasets (fineweb_edu) write val_000000.bin, train_000001.bin, ... instead of val.bin and train.bin.
The tokenizer is GPT-2's BPE, or (--tokenizer=<model>) the tokenizer of a model to fine-tune with train.py;
such data needs an --out_dir of its own.
"""
import contextlib
import json
import sys
import urllib.request
from pathlib import Path

import numpy as np
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_SHAKESPEARE = REPO_ROOT / "data" / "tinyshakespeare.txt"   # karpathy/char-rnn's input.txt, public domain
sys.path.insert(0, str(REPO_ROOT))   # tokenizer.py and checkpoint.py live at the repo root
from checkpoint import atomic_write  # noqa: E402
from tokenizer import tiktoken_tokenizer  # noqa: E402

TOKENIZER_HELP = ("gpt2 (OpenAI's GPT-2 BPE), or a model whose tokenizer to use, anything train.py's --init_from "
                  "takes: our checkpoint, a Hugging Face dir or hub id, a .gguf file (needs --out_dir)")


@contextlib.contextmanager
def ctrl_c_is_one_line(script):
    """Ctrl-C ends a preparation with one line and exit code 130, not a traceback: an earlier dataset in the
    folder stays whole until the new one is encoded, and meta.json is written last (start_dataset)."""
    try:
        yield
    except KeyboardInterrupt:
        print(f"{script}: interrupted; nothing half-written (a folder without meta.json is not a dataset)",
              file=sys.stderr)
        sys.exit(130)


def download(url, dest):
    """Fetch url into dest (atomically, with a progress bar); one clear message when it fails."""
    def fetch(tmp):
        with urllib.request.urlopen(url, timeout=30) as response, open(tmp, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {Path(dest).name}") as bar:
                while chunk := response.read(1 << 16):
                    f.write(chunk)
                    bar.update(len(chunk))

    try:
        return atomic_write(dest, fetch)
    except OSError as e:   # URLError, timeouts and HTTP errors are all OSErrors
        raise SystemExit(f"could not download {url} ({e}). Offline? Get the file elsewhere and pass it "
                         f"with --input PATH") from e


def read_text(path):
    """The UTF-8 text of --input path; one clear line where it is missing, a folder, not text or empty."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"--input {path}: " + ("a folder, not a text file" if path.is_dir() else "no such file"))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SystemExit(f"--input {path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    if not text.strip():
        raise SystemExit(f"--input {path}: the file holds no text")
    return text


def shakespeare_text(input_path=None):
    """The text of --input PATH if given, else tiny shakespeare as it ships in data/ (no download)."""
    return read_text(input_path or TINY_SHAKESPEARE)


def source_tokenizer(source):
    """The tokenizer named by --tokenizer: "gpt2" (tiktoken), else the tokenizer of the model at source,
    loaded with loader.py (the whole model: a few seconds for a 135M one)."""
    if source == "gpt2":
        try:
            return tiktoken_tokenizer("gpt2")
        except RuntimeError as e:
            raise SystemExit(str(e)) from e
    from checkpoint import CheckpointError
    from loader import load_model_and_tokenizer
    try:
        tokenizer = load_model_and_tokenizer(source)[1]
    except (CheckpointError, ValueError, RuntimeError, OSError) as e:
        raise SystemExit(f"--tokenizer={source}: could not load that model ({e})") from e
    if tokenizer is None:
        raise SystemExit(f"--tokenizer={source}: that model comes without a tokenizer")
    return tokenizer


def output_dir(out_dir, tokenizer, default_dir, default_tokenizers=("gpt2",)):
    """--out_dir, else the dataset's own folder; a model's tokenizer needs an --out_dir of its own, so that
    its data never overwrites the default data (e.g. --out_dir=data/shakespeare_smollm2)."""
    if out_dir:
        return Path(out_dir)
    if tokenizer not in default_tokenizers:
        raise SystemExit(f"--tokenizer={tokenizer} needs --out_dir (a folder of its own, e.g. data/<text>_<model>; "
                         f"then train with --dataset=<text>_<model>), so that {default_dir} keeps its default data")
    return Path(default_dir)


def encode(tokenizer, text, desc, chunk_chars=1 << 20):
    """Token ids of text as uint16, encoded in ~1 MB pieces cut at newlines so tqdm can show progress."""
    if tokenizer.vocab_size > 1 << 16:
        raise SystemExit(f"the tokenizer has {tokenizer.vocab_size:,} tokens: its ids do not fit in the uint16 token "
                         "files train.py reads (at most 65,536 tokens)")
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n", start + chunk_chars)
        end = len(text) if end < 0 else end + 1
        pieces.append(text[start:end])
        start = end
    ids = [uint16_ids(tokenizer.encode(piece)) for piece in tqdm(pieces, desc=desc, unit="MB")]
    return np.concatenate(ids) if ids else np.zeros(0, dtype=np.uint16)


def uint16_ids(ids):
    """ids as uint16, refusing (not wrapping, as older NumPy does) any id over 65,535."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) and ids.max() > 0xFFFF:
        raise SystemExit(f"token id {ids.max():,} does not fit in the uint16 token files train.py reads")
    return ids.astype(np.uint16)


def start_dataset(out_dir):
    """Empty out_dir of an earlier preparation before writing a new one: meta.json first, so that a folder
    whose preparation is killed reads as not prepared (train.py needs meta.json, written last), then the
    token files (an earlier run's extra shards would otherwise be read with the new ones). Returns out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "meta.json").unlink(missing_ok=True)
    for split in ("train", "val"):
        for old in [out_dir / f"{split}.bin", *out_dir.glob(f"{split}_[0-9]*.bin")]:
            old.unlink(missing_ok=True)
    return out_dir


def write_tokens(ids, path):
    """uint16 token ids to path, atomically (a kill mid-write leaves no half file)."""
    atomic_write(path, lambda tmp: np.asarray(ids, dtype=np.uint16).tofile(tmp))


def write_meta(out_dir, tokenizer):
    """meta.json, the last file of a preparation: its presence says the token files are whole."""
    meta = {"tokenizer": tokenizer.spec, "vocab_size": tokenizer.vocab_size}
    atomic_write(Path(out_dir) / "meta.json", lambda tmp: tmp.write_text(json.dumps(meta)))


def write_dataset(out_dir, tokenizer, train_text, val_text):
    """Encode both splits, then write train.bin, val.bin and (last) meta.json into out_dir: an earlier
    preparation there stays whole until the encoding, the slow part, is done."""
    encoded = {split: encode(tokenizer, text, desc=f"encoding {split}")
               for split, text in (("train", train_text), ("val", val_text))}
    if not all(len(ids) for ids in encoded.values()):
        raise SystemExit(f"the text is too short: {len(encoded['train']):,} train and {len(encoded['val']):,} val "
                         "tokens (both splits need tokens); nothing written")
    out_dir = start_dataset(out_dir)
    for split, ids in encoded.items():
        write_tokens(ids, out_dir / f"{split}.bin")
        print(f"{split}: {len(ids):,} tokens -> {out_dir / f'{split}.bin'}")
    write_meta(out_dir, tokenizer)


def split_text(text, val_fraction=0.1):
    """nanoGPT's split: the first 90% of the text trains, the last 10% validates."""
    n = int(len(text) * (1 - val_fraction))
    return text[:n], text[n:]
