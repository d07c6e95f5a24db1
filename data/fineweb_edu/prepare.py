"""
FineWeb-Edu: the real pretraining path for GPU users. Streams HuggingFaceFW/fineweb-edu (sample-10BT,
~10B GPT-2 tokens), tokenizes documents in parallel processes and writes 100M-token shards: the first shard
is val_000000.bin, the rest train_000001.bin, train_000002.bin, ... (train.py reads shards as one split).

  pip install datasets && python data/fineweb_edu/prepare.py              # ~20 GB of shards
  python data/fineweb_edu/prepare.py --max_tokens=500_000_000             # a smaller slice
  python data/fineweb_edu/prepare.py --input docs.jsonl notes.txt         # local documents instead
Every document starts with GPT-2's <|endoftext|> token. Local inputs: .jsonl files give one document per
line (its "text" field); other files give one document per blank-line separated paragraph.
"""
import argparse
import itertools
import json
import os
import signal
import socket
import sys
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# prepare_common puts the repo on the path too
from prepare_common import (ctrl_c_is_one_line, read_text, source_tokenizer, start_dataset,  # noqa: E402
                            write_meta, write_tokens)
from configurator import at_least  # noqa: E402
from tokenizer import tiktoken_tokenizer  # noqa: E402

REMOTE = ("HuggingFaceFW/fineweb-edu", "sample-10BT")
_tokenizer = None   # one per worker process (tiktoken's encoder does not pickle)


def _init_worker():
    global _tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)        # Ctrl-C is the main process's to handle (one line)
    _tokenizer = tiktoken_tokenizer("gpt2")


def tokenize_document(text):
    """<|endoftext|> followed by the document's tokens, as uint16."""
    return np.array([_tokenizer.eos_id] + _tokenizer.encode(text), dtype=np.uint16)


def stream_remote():
    """The documents of FineWeb-Edu as they stream in; what is missing (the datasets package, the network)
    is said at once."""
    try:
        from datasets import load_dataset
    except ImportError as e:
        raise SystemExit("streaming FineWeb-Edu needs the datasets package: pip install datasets "
                         "(or pass local documents with --input PATH ...)") from e
    try:                        # offline, the Hub's client would retry for minutes before saying so
        socket.getaddrinfo("huggingface.co", 443)
    except OSError as e:
        raise SystemExit(f"cannot reach huggingface.co ({e}). Offline? Pass local documents with --input PATH ...")

    def documents():
        try:
            for row in load_dataset(REMOTE[0], name=REMOTE[1], split="train", streaming=True):
                yield row["text"]
        except OSError as e:
            raise SystemExit(f"could not stream {REMOTE[0]} ({REMOTE[1]}) from the Hugging Face Hub ({e}). "
                             "Offline? Pass local documents with --input PATH ...") from e
    return documents()


def local_documents(paths):
    """The documents of local files, one file read at a time; a missing file is said at once."""
    for path in paths:
        if not Path(path).is_file():
            raise SystemExit(f"--input {path}: no such file")
    return local_file_documents(paths)


def local_file_documents(paths):
    for path in paths:
        if str(path).endswith(".jsonl"):
            for number, line in enumerate(read_text(path).splitlines(), 1):
                if line.strip():
                    yield jsonl_text(line, path, number)
        else:
            yield from (doc for doc in read_text(path).split("\n\n") if doc.strip())


def jsonl_text(line, path, number):
    """The "text" field of one .jsonl line; one clear line where it is not JSON or has no text."""
    try:
        text = json.loads(line)["text"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise SystemExit(f"--input {path}, line {number}: not a JSON object with a \"text\" field "
                         f"({type(e).__name__}: {e})") from e
    if not isinstance(text, str):
        raise SystemExit(f"--input {path}, line {number}: its \"text\" is a {type(text).__name__}, not a string")
    return text


def batches(items, n):
    """Lists of n items (the last shorter), read from `items` in the calling thread."""
    items = iter(items)
    while batch := list(itertools.islice(items, n)):
        yield batch


def only_a_validation_shard(what, tokens, shard_tokens):
    """The error for tokens that fill no more than the first shard, which is the validation split."""
    return SystemExit(f"{what} no more than the first shard, which validates (--shard_tokens={shard_tokens:,}): "
                      f"nothing left to train on, nothing kept. Lower --shard_tokens (e.g. "
                      f"--shard_tokens={max(1, tokens // 10):_})")


def tokenize_and_shard(documents, out_dir, shard_tokens=100_000_000, workers=None, max_tokens=None):
    """Tokenize documents in a process pool and write fixed-size uint16 shards into out_dir; the first
    shard is val, the rest train. A document that overflows a shard continues in the next one.
    Returns the shard paths."""
    if max_tokens is not None and max_tokens <= shard_tokens:
        raise only_a_validation_shard(f"--max_tokens={max_tokens:,} fills", max_tokens, shard_tokens)
    tokenizer = source_tokenizer("gpt2")    # here first: a worker that fails to load it is restarted forever
    out_dir = Path(out_dir)
    buffer, filled, paths, total = np.empty(shard_tokens, dtype=np.uint16), 0, [], 0
    bar = tqdm(total=shard_tokens, unit="tok", desc="shard 0")

    def flush(n):
        if not paths:               # the documents stream: only now is an earlier preparation replaced
            start_dataset(out_dir)
        path = out_dir / f"{'val' if not paths else 'train'}_{len(paths):06d}.bin"
        write_tokens(buffer[:n], path)
        paths.append(path)
        bar.reset()
        bar.set_description(f"shard {len(paths)}")

    with Pool(workers or max(1, (os.cpu_count() or 2) - 1), initializer=_init_worker) as pool:
        # the documents are read here, not by pool.imap: it reads them in a thread of its own, where an
        # error (a missing file, no network) would be lost and the pool would wait forever
        for tokens in (t for batch in batches(documents, 4096) for t in pool.imap(tokenize_document, batch, 16)):
            if max_tokens is not None:
                tokens = tokens[:max_tokens - total]
            total += len(tokens)
            while len(tokens):
                take = min(shard_tokens - filled, len(tokens))
                buffer[filled:filled + take] = tokens[:take]
                filled, tokens = filled + take, tokens[take:]
                bar.update(take)
                if filled == shard_tokens:
                    flush(filled)
                    filled = 0
            if max_tokens is not None and total >= max_tokens:
                break
    if filled:
        flush(filled)
    bar.close()
    if not paths:
        raise SystemExit("the documents hold no text: nothing written")
    if len(paths) == 1:         # the validation shard alone: not a dataset train.py can use
        paths[0].unlink()
        raise only_a_validation_shard(f"the documents hold {total:,} tokens,", total, shard_tokens)
    write_meta(out_dir, tokenizer)
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", help="local .jsonl or text files instead of streaming")
    parser.add_argument("--shard_tokens", type=at_least(1), default=100_000_000)
    parser.add_argument("--max_tokens", type=at_least(1), default=None, help="stop after this many tokens")
    parser.add_argument("--workers", type=at_least(1), default=None, help="tokenizer processes (default: cores - 1)")
    parser.add_argument("--out_dir", default=str(Path(__file__).parent), help="where to write the shards")
    args = parser.parse_args()
    docs = local_documents(args.input) if args.input else stream_remote()
    with ctrl_c_is_one_line("data/fineweb_edu/prepare.py"):
        shards = tokenize_and_shard(docs, args.out_dir, args.shard_tokens, args.workers, args.max_tokens)
    print(f"wrote {len(shards)} shards to {args.out_dir}")
