"""
int8 post-training quantization of a trained MobileLLM, the way the paper does it (§3.5, Fig. 7):
min/max quantization to 8 bits of activations (per token) and weights (per output channel), W8A8, with no
retraining. The math and the int8 modules are in int8.py; this is the command that applies them and
measures the cost.

Usage:
  python quantize.py --init_from=out-shakespeare-char         # W8A8 checkpoint in out-shakespeare-char-w8a8/
  python quantize.py --init_from=out-x --mode=w8 --out_dir=out-x-int8   # weight-only int8 (float activations)
  python quantize.py --init_from=out-x --report               # ... and compare every variant (below)
  python quantize.py --init_from=out-x --report --eval_tokens=65536 --new_tokens=64

It writes the int8 checkpoint (checkpoint.py's format plus "quantization": "w8a8" | "w8"). --init_from
takes what loader.py loads (our checkpoints, HF dirs, GGUF files, ...). `python sample.py --init_from=<int8
out_dir>` samples from it; in Python, `model, ckpt = int8.load_quantized(out_dir)`.
--report then prints, on the same validation tokens, loss and perplexity in fp32, bf16, W8A8 and
weight-only int8, the size on disk against fp32, and eager decoding speed.
"""
import argparse
import copy
import io
import math
import sys
from pathlib import Path

import torch

from checkpoint import CKPT_NAME, CheckpointError, checkpoint_file, load_checkpoint, model_checkpoint, save_checkpoint
from configurator import HelpFormatter, accept_old_flags, at_least, usage_description
from dataset import DataError, validation_tokens
from int8 import MODES, TRAINING_RECORD, is_quantized, quantize_model, quantized_checkpoint, set_simulate
from loader import load_model_and_tokenizer, source_kind, without_tokenizer
from measure import eager_decode_ms


def load_float_source(init_from):
    """(float model, source dict: its tokenizer spec and, for our checkpoints, TRAINING_RECORD). The
    training record is read memory-mapped, so the weights are not read twice."""
    model, tokenizer = load_model_and_tokenizer(init_from)
    if is_quantized(model):
        raise CheckpointError(f"{init_from} is already quantized: give the float checkpoint it was made from")
    if tokenizer is None:
        raise CheckpointError(f"{without_tokenizer(init_from)}: give a trained model with its tokenizer")
    source = {"tokenizer": tokenizer.spec}
    if source_kind(init_from) == "checkpoint":
        ckpt = load_checkpoint(init_from, mmap=True)
        source.update({k: ckpt[k] for k in TRAINING_RECORD if k in ckpt})
    return model, source


# --- measuring: the same validation tokens through every variant ------------------------------------

@torch.inference_mode()
def evaluate(model, tokens, block_size, batch_size=8, desc="eval"):
    """Mean next-token cross-entropy over non-overlapping windows of block_size tokens."""
    from tqdm import tqdm
    n_windows = (len(tokens) - 1) // block_size
    if n_windows < 1:
        raise ValueError(f"need more than {block_size} validation tokens, got {len(tokens)}")
    x = tokens[: n_windows * block_size].view(n_windows, block_size)                 # (W, T)
    y = tokens[1: n_windows * block_size + 1].view(n_windows, block_size)            # (W, T)
    total = 0.0
    for i in tqdm(range(0, n_windows, batch_size), desc=desc, leave=False):
        _, loss = model(x[i: i + batch_size], y[i: i + batch_size])
        total += loss.item() * len(x[i: i + batch_size])
    return total / n_windows


def serialized_bytes(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.tell()


VARIANTS = ("fp32", "bf16", "w8a8", "w8", "w8a8-fake", "w8-fake")   # -fake: the rounding, float matmuls (set_simulate)


def variant(model, name):
    """One of VARIANTS, made from the float model (left as it is)."""
    if name == "fp32":
        return model
    if name == "bf16":
        return copy.deepcopy(model).to(torch.bfloat16)
    qmodel = quantize_model(copy.deepcopy(model), name.removesuffix("-fake"))
    return set_simulate(qmodel, name.endswith("-fake"))


def sizes_on_disk(models, source):
    """Bytes of each variant's checkpoint (for fp32 and bf16: the weights alone)."""
    def size(name, m):
        if name in ("fp32", "bf16"):
            return serialized_bytes(model_checkpoint(m, source["tokenizer"]))
        return serialized_bytes(quantized_checkpoint(m, source, name.removesuffix("-fake")))
    return {name: size(name, m) for name, m in models.items()}


def report(model, source, args):
    """Loss, perplexity, size and decoding speed of fp32 (the reference, always first) and the --variants
    (bf16, W8A8, weight-only int8, and both in fake-quant), on the same validation tokens, as one markdown table."""
    models = {name: variant(model, name) for name in dict.fromkeys(("fp32", *args.variants.split(",")))}
    sizes, losses, speeds = sizes_on_disk(models, source), {}, {}
    if args.eval_tokens:
        tokens = validation_tokens(source.get("train_config"), model.config.vocab_size, args.eval_tokens + 1,
                                   args.data_dir, source["tokenizer"])
        block_size = min(args.block_size or min(model.config.block_size, 512), len(tokens) - 1)
        print(f"scoring {(len(tokens) - 1) // block_size * block_size} validation tokens in windows of {block_size}")
        losses = {name: evaluate(m, tokens, block_size, args.batch_size, desc=name) for name, m in models.items()}
    if args.new_tokens:
        n = min(args.new_tokens, model.config.block_size - 2)
        speeds = {name: 1e3 / eager_decode_ms(m, 1, n) for name, m in models.items()}
    c = model.config
    shape = f"{c.n_layers} layers" if c.depth == c.n_layers else f"{c.n_layers} blocks in {c.depth} applications"
    print(f"\n{shape} x dim {c.dim}, {model.num_params():,} parameters, {torch.get_num_threads()} "
          f"threads, torch {torch.__version__}")
    print("| variant | val loss | perplexity | loss vs fp32 | size on disk | vs fp32 | decode tokens/s |")
    print("|---|---|---|---|---|---|---|")
    for name in models:
        loss = losses.get(name)
        loss_cells = ([f"{loss:.4f}", f"{math.exp(loss):.2f}", f"{100 * (loss / losses['fp32'] - 1):+.3f}%"]
                      if loss is not None else ["-"] * 3)
        cells = [name, *loss_cells, f"{sizes[name] / 2**20:.2f} MiB", f"{sizes[name] / sizes['fp32']:.3f}x",
                 f"{speeds[name]:.1f}" if name in speeds else "-"]
        print("| " + " | ".join(cells) + " |")
    print("(fp32 and bf16 sizes: the model weights alone, as load_model needs them; training checkpoints also hold "
          "the optimizer)")


def int8_path(init_from, out_dir, mode):
    """Where the int8 checkpoint goes: out_dir, else a folder beside our source (out-x -> out-x-w8a8, runs/m.pt
    -> runs/m-w8a8), or for a GGUF file or a hub id, whose folders are not ours, out-<name>-<mode> here."""
    if out_dir:
        return Path(out_dir) / CKPT_NAME
    source = Path(init_from)
    source = source.parent if source.name == CKPT_NAME else source
    source = source if source.name else source.resolve()                   # "." names the folder it is
    if source.suffix == ".gguf" or not source.exists():
        return Path(f"out-{source.stem if source.suffix == '.gguf' else source.name}-{mode}") / CKPT_NAME
    return source.with_name(f"{source.stem if source.is_file() else source.name}-{mode}") / CKPT_NAME


def variant_names(text):
    names = [n for n in text.split(",") if n]
    if unknown := [n for n in names if n not in VARIANTS]:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")
    return ",".join(names)


def main(argv=None):
    parser = argparse.ArgumentParser(description=usage_description(__doc__),
                                     formatter_class=HelpFormatter)
    parser.add_argument("--init_from", default="", help="the float model: our checkpoint (out_dir or ckpt.pt), "
                                                        "a GGUF file, an HF dir or repo id")
    parser.add_argument("ckpt_dir", nargs="?", default="", help=argparse.SUPPRESS)   # the old spelling of --init_from
    parser.add_argument("--out_dir", default="", help="where to write the int8 ckpt.pt (default: <init_from>-<mode>; "
                                                       "for a .gguf or a hub id, out-<name>-<mode> here)")
    parser.add_argument("--mode", default="w8a8", choices=MODES,
                        help="w8a8: int8 weights and per-token int8 activations; w8: int8 weights only")
    parser.add_argument("--report", action="store_true", help="then compare the --variants (by default every one)")
    parser.add_argument("--variants", default=",".join(VARIANTS), type=variant_names,
                        help=f"--report: which of {', '.join(VARIANTS)} (fp32 always). On CPUs without AVX-512, bf16 "
                             "is emulated and the int8 kernels are slow on long inputs: the -fake variants give the "
                             "same losses (float error aside), scored at fp32 speed")
    parser.add_argument("--eval_tokens", type=at_least(0), default=32768,
                        help="--report: validation tokens to score (0: skip)")
    parser.add_argument("--block_size", type=at_least(0), default=0,
                        help="--report: evaluation window (default: the model's, <= 512)")
    parser.add_argument("--batch_size", type=at_least(1), default=8, help="--report: windows per forward")
    parser.add_argument("--data_dir", default="", help="--report: folder with val.bin (default: the training data)")
    parser.add_argument("--new_tokens", type=at_least(0), default=32,
                        help="--report: tokens decoded one at a time and timed, per variant (0: skip)")
    parser.add_argument("--threads", type=at_least(0), default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(accept_old_flags(argv, {"--decode_tokens": "--new_tokens"}))
    init_from = args.init_from or args.ckpt_dir
    if not init_from:
        parser.error("give the float model to quantize: --init_from=<out_dir>")
    if args.threads:
        torch.set_num_threads(args.threads)

    try:
        model, source = load_float_source(init_from)
    except (ValueError, RuntimeError, OSError) as e:        # a file of another kind, a bad tokenizer, hub errors
        raise CheckpointError(f"cannot load {init_from}: {e}") from e
    int8_file = int8_path(init_from, args.out_dir, args.mode)
    if int8_file.resolve() == checkpoint_file(init_from).resolve():
        raise SystemExit("--out_dir would overwrite the float checkpoint: choose another folder")
    if int8_file.parent.exists() and not int8_file.parent.is_dir():
        raise SystemExit(f"--out_dir {int8_file.parent} is a file: give a folder")
    if args.report and args.eval_tokens:                # a missing dataset is said before anything is written
        validation_tokens(source.get("train_config"), model.config.vocab_size, 1, args.data_dir, source["tokenizer"])
    qmodel = quantize_model(copy.deepcopy(model) if args.report else model, args.mode)
    save_checkpoint(quantized_checkpoint(qmodel, source, args.mode), int8_file)
    print(f"wrote {int8_file} ({args.mode})")
    if args.report:
        report(model, source, args)


if __name__ == "__main__":
    try:
        main()
    except (CheckpointError, DataError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print("interrupted (an int8 checkpoint is only ever written whole)", file=sys.stderr)
        sys.exit(130)
