"""
int8 post-training quantization of a trained MobileLLM, the way the paper does it (§3.5, Fig. 7):
per-token min/max quantization of weights and activations to 8 bits (W8A8), with no retraining.

Usage:
  python quantize.py --init_from=out-shakespeare-char         # W8A8 checkpoint in out-shakespeare-char-w8a8/
  python quantize.py --init_from=out-x --mode=w8 --out_dir=out-x-int8   # weight-only int8 (float activations)
  python quantize.py --init_from=out-x --report               # ... and compare every variant (below)
  python quantize.py --init_from=out-x --report --eval_tokens=65536 --decode_tokens=64

It writes the int8 checkpoint (checkpoint.py's format plus "quantization": "w8a8" | "w8"). --init_from
takes what loader.py loads (our checkpoints, HF dirs, ...). `python sample.py --init_from=<int8 out_dir>`
samples from it; in Python, `model, ckpt = quantize.load_quantized(out_dir)`.
--report then prints, on the same validation tokens, loss and perplexity in fp32, bf16, W8A8 and
weight-only int8, the size on disk against fp32, and eager decoding speed.

The math (everything below is these few lines, applied to every Linear of the model):

  int8 holds the integers -128 .. 127. A float tensor x is stored as integers q and a float step `scale`:
      q = clamp(round(x / scale) + zero, -128, 127)          quantize
      x ~ (q - zero) * scale                                  dequantize; error <= scale / 2 inside [lo, hi]
  "min/max" means the range [lo, hi] that the 256 levels cover is simply the smallest and largest value.

  Weights W (out, in): symmetric, one scale per output channel (row), zero = 0:
      scale_w[n] = max(|W[n, :]|) / 127,  q_w = round(W / scale_w)       levels -127 .. 127
  Activations x (tokens, in): asymmetric, one scale and zero point per token (row), computed at run time:
      lo = min(x[t, :], 0), hi = max(x[t, :], 0)     (0 is kept in range so it is exactly representable)
      scale_x[t] = (hi - lo) / 255,  zero[t] = -128 - round(lo / scale_x[t])     lo -> -128, hi -> 127
  Then a Linear y = x W^T becomes one integer matmul plus a float rescale per output:
      y[t, n] = scale_x[t] * scale_w[n] * sum_k (q_x[t, k] - zero[t]) * q_w[n, k]
              = scale_x[t] * scale_w[n] * (acc[t, n] - zero[t] * wsum[n])
      acc = q_x @ q_w^T  (int8 x int8 -> int32, torch._int_mm),  wsum[n] = sum_k q_w[n, k]  (precomputed)
  Symmetric weights make the weight zero point vanish, so no cross terms; the per-token activation zero
  point costs one multiply-add per output. This is also how XNNPACK's dynamically quantized linear works
  (per-token asymmetric int8 activations x per-channel symmetric int8 weights), the kernel ExecuTorch uses
  on phones. The same formula evaluated in float on dequantized tensors is the "simulated" (fake-quant)
  path; it must give the same numbers as the integer path (tests/test_quantize.py checks it).

  Weight-only int8 ("w8") keeps activations in float: y = (x @ q_w^T) * scale_w, 1/4 of the weight bytes.

Embeddings and the tied LM head (§2.2.3): the token embedding and the output projection are ONE matrix
E (vocab, dim). It is quantized once, per row: a row of E is the embedding of one token *and* one output
channel of the LM head, so per-row scales are at the same time per-token (for the lookup) and
per-output-channel (for the head). The int8 embedding looks rows up and dequantizes them (a gather: there is
no matmul, so nothing to quantize on the activation side); the LM head is an Int8Linear holding the very
same int8 tensor and scales (the same Python objects, saved once), so the tie survives quantization. The
checkpoint is then ~1/4 of fp32 even when the embedding is most of the model (small models, GPT-2's 50k
vocabulary). An untied model gets two independent int8 matrices. RMSNorm weights (a few thousand numbers)
stay float.
"""
import argparse
import copy
import io
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import CKPT_NAME, CheckpointError, checkpoint_file, load_checkpoint, model_checkpoint, save_checkpoint
from configurator import HelpFormatter, at_least
from dataset import REPO_DIR, split_files
from loader import load_model_and_tokenizer, source_kind
from measure import eager_decode_ms
from model import MobileLLM, config_from_dict

MODES = ("w8a8", "w8")
QMIN, QMAX = -128, 127
MIN_SCALE = 1e-12        # an all-zero row still gets a positive scale (its integers are then all zero-point)


# --- the quantization math -------------------------------------------------------------------------

def quantize_per_channel(w):
    """Symmetric min/max int8 per output channel. w (N, K) float -> q (N, K) int8 in [-127, 127], scale (N,)."""
    scale = (w.float().abs().amax(dim=1) / 127).clamp_min(MIN_SCALE)                  # (N,)
    q = torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)        # (N, K)
    return q, scale


def dequantize_per_channel(q, scale):
    return q.float() * scale[:, None]                                                   # (N, K)


def quantize_per_token(x):
    """Asymmetric min/max int8 per token (row). x (M, K) float -> q (M, K) int8, scale (M,), zero (M,) int32."""
    x = x.float()
    lo = x.amin(dim=1).clamp(max=0)                                                     # (M,)
    hi = x.amax(dim=1).clamp(min=0)                                                     # (M,)
    scale = ((hi - lo) / (QMAX - QMIN)).clamp_min(MIN_SCALE)                            # (M,)
    zero = QMIN - torch.round(lo / scale)                                               # (M,) in [-128, 127]
    q = (torch.round(x / scale[:, None]) + zero[:, None]).clamp(QMIN, QMAX).to(torch.int8)
    return q, scale, zero.to(torch.int32)


def dequantize_per_token(q, scale, zero):
    return (q.int() - zero[:, None]).float() * scale[:, None]                           # (M, K)


def int_mm(a, b):
    """Exact (M, K) int8 @ (K, N) int8 -> (M, N) int32. torch._int_mm takes any shape on CPU; on CUDA it
    wants M > 16 and K, N multiples of 8, so there the operands are zero-padded (zeros add nothing)."""
    if a.is_cuda:
        M, K, N = a.size(0), a.size(1), b.size(1)
        a = F.pad(a, (0, -K % 8, 0, max(17 - M, 0)))
        b = F.pad(b, (0, -N % 8, 0, -K % 8))
        return torch._int_mm(a, b)[:M, :N]
    return torch._int_mm(a, b)


def w8a8_linear(x, qweight, scale, weight_sum):
    """The real int8 path. x (M, K) float; qweight (N, K) int8; scale (N,); weight_sum (N,) int32 -> (M, N)."""
    q_x, scale_x, zero_x = quantize_per_token(x)
    acc = int_mm(q_x, qweight.t())                                                      # (M, N) int32
    acc = acc - zero_x[:, None] * weight_sum[None, :]                                   # remove the zero point
    return acc.float() * scale_x[:, None] * scale.float()[None, :]


def w8a8_linear_simulated(x, qweight, scale):
    """The fake-quant path: the same rounding, the matmul in float on dequantized tensors."""
    return F.linear(dequantize_per_token(*quantize_per_token(x)), dequantize_per_channel(qweight, scale))


def w8_linear(x, qweight, scale):
    """Weight-only int8: float activations times int8 weights, rescaled per output channel."""
    if x.device.type == "cpu":          # a fused CPU kernel that reads the int8 weights directly
        return torch.ops.aten._weight_int8pack_mm(x.float().contiguous(), qweight, scale.float())
    return F.linear(x.float(), qweight.float()) * scale.float()


def w8_linear_simulated(x, qweight, scale):
    return F.linear(x.float(), dequantize_per_channel(qweight, scale))


# --- the modules that replace nn.Linear and nn.Embedding ----------------------------------------------

class Int8Linear(nn.Module):
    """A bias-free Linear with int8 weights. mode "w8a8": activations quantized per token at run time and an
    int8 x int8 -> int32 matmul; "w8": float activations. simulate=True runs the fake-quant float path."""

    def __init__(self, qweight, scale, mode="w8a8", simulate=False):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode, self.simulate = mode, simulate
        self.in_features, self.out_features = qweight.size(1), qweight.size(0)
        self.register_buffer("qweight", qweight)                                        # (N, K) int8
        self.register_buffer("scale", scale)                                            # (N,) float32
        self.register_buffer("weight_sum", None, persistent=False)                       # (N,) int32
        self.refresh_weight_sum()

    def refresh_weight_sum(self):
        """sum_k q_w[n, k], the zero-point correction (derived from qweight, so not saved)."""
        self.weight_sum = self.qweight.sum(dim=1, dtype=torch.int32)

    @classmethod
    def from_linear(cls, linear, mode="w8a8"):
        if linear.bias is not None:
            raise ValueError("Int8Linear has no bias (MobileLLM's Linears have none)")
        return cls(*quantize_per_channel(linear.weight.detach()), mode=mode)

    def forward(self, x):
        x2 = x.reshape(-1, self.in_features)                                            # (M, K), M = B*T
        if self.mode == "w8a8":
            y = (w8a8_linear_simulated(x2, self.qweight, self.scale) if self.simulate
                 else w8a8_linear(x2, self.qweight, self.scale, self.weight_sum))
        else:
            y = (w8_linear_simulated if self.simulate else w8_linear)(x2, self.qweight, self.scale)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)                 # (B, T, N)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}" + \
               (", simulate=True" if self.simulate else "")


class Int8Embedding(nn.Module):
    """Token embedding stored as int8 rows with one scale per row (= per token): lookup, then dequantize."""

    def __init__(self, qweight, scale):
        super().__init__()
        self.register_buffer("qweight", qweight)                                        # (V, C) int8
        self.register_buffer("scale", scale)                                            # (V,) float32

    def forward(self, idx):
        return self.qweight[idx].float() * self.scale[idx].unsqueeze(-1)                # (B, T, C)


def is_quantized(model):
    return any(isinstance(m, (Int8Linear, Int8Embedding)) for m in model.modules())


@torch.no_grad()
def quantize_model(model, mode="w8a8"):
    """Swap every Linear and the embedding of a float MobileLLM for int8 modules, in place; returns it.
    A tied embedding/LM head stays tied: one int8 matrix and one scale vector serve both (see the top)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(model, MobileLLM):
        raise TypeError(f"quantize_model expects a MobileLLM, got {type(model).__name__}")
    if is_quantized(model):
        raise ValueError("this model is already quantized")
    tied = model.output.weight is model.tok_embeddings.weight
    q, scale = quantize_per_channel(model.tok_embeddings.weight)                        # per row = per token
    model.tok_embeddings = Int8Embedding(q, scale)
    model.output = Int8Linear(q, scale, mode) if tied else Int8Linear.from_linear(model.output, mode)
    for name, module in list(model.layers.named_modules()):
        if isinstance(module, nn.Linear):
            parent, _, child = name.rpartition(".")
            setattr(model.layers.get_submodule(parent), child, Int8Linear.from_linear(module, mode))
    return model


def set_simulate(model, simulate):
    """Switch every Int8Linear between the real integer path and the fake-quant float path."""
    for m in model.modules():
        if isinstance(m, Int8Linear):
            m.simulate = simulate
    return model


def load_quantized(path, device="cpu", ckpt=None):
    """Rebuild an int8 MobileLLM from a checkpoint written by quantize.py (ckpt: its dict, when already
    loaded from path). Returns (model in eval mode, ckpt)."""
    ckpt = ckpt or load_checkpoint(path)
    mode = ckpt.get("quantization")
    if mode not in MODES:
        raise CheckpointError(f"{checkpoint_file(path)} is not an int8 checkpoint (quantization={mode!r}): "
                              "load it with checkpoint.load_model, or make one with `python quantize.py`")
    try:
        model = quantize_model(MobileLLM(config_from_dict(ckpt["model_config"])), mode)
        model.load_state_dict(ckpt["model"])      # copies in place: the tied head and embedding stay one tensor
        for module in model.modules():
            if isinstance(module, Int8Linear):
                module.refresh_weight_sum()
    except (ValueError, RuntimeError) as e:
        raise CheckpointError(f"{checkpoint_file(path)} does not match the model: {e}") from e
    return model.to(device).eval(), ckpt


TRAINING_RECORD = ("train_config", "iter_num", "best_val_loss")    # kept in the int8 checkpoint


def quantized_checkpoint(model, ckpt, mode):
    """Our checkpoint format plus "quantization"; ckpt: the source's, or just its "tokenizer" (spec).
    Training state (optimizer, data position) is dropped."""
    extra = {k: ckpt[k] for k in TRAINING_RECORD if k in ckpt}
    return model_checkpoint(model, ckpt["tokenizer"], quantization=mode, **extra)


def load_float_source(init_from):
    """(float model, source dict: its tokenizer spec and, for our checkpoints, TRAINING_RECORD). The
    training record is read memory-mapped, so the weights are not read twice."""
    model, tokenizer = load_model_and_tokenizer(init_from)
    if is_quantized(model):
        raise CheckpointError(f"{init_from} is already quantized: give the float checkpoint it was made from")
    if tokenizer is None:
        raise CheckpointError(f"{init_from} is a preset (random weights, no tokenizer): give a trained model")
    source = {"tokenizer": tokenizer.spec}
    if source_kind(init_from) == "checkpoint":
        ckpt = load_checkpoint(init_from, mmap=True)
        source.update({k: ckpt[k] for k in TRAINING_RECORD if k in ckpt})
    return model, source


# --- measuring: the same validation tokens through every variant ------------------------------------

def validation_tokens(train_config, vocab_size, n_tokens, data_dir=""):
    """The first n_tokens of the validation split the model trained with (train_config: the checkpoint's;
    data/<dataset>/val.bin or val_*.bin shards, uint16, as train.py reads them), or of data_dir, as a
    (n,) int64 tensor."""
    train_config = train_config or {}
    if not data_dir:
        data_dir = train_config.get("data_dir") or (REPO_DIR / "data" / train_config["dataset"]
                                                    if train_config.get("dataset") else "")
    if not data_dir:
        raise CheckpointError("the checkpoint does not say which dataset it was trained on: pass --data_dir")
    data_dir = Path(data_dir)
    files = split_files(data_dir, "val")
    if not files:
        raise CheckpointError(f"no val.bin (or val_*.bin shards) in {data_dir}: prepare the dataset "
                              f"(python data/<dataset>/prepare.py) or pass --data_dir")
    parts, have = [], 0
    for f in files:
        if have >= n_tokens:
            break
        part = np.memmap(f, dtype=np.uint16, mode="r")[: n_tokens - have]
        parts.append(torch.from_numpy(part.astype(np.int64)))
        have += len(part)
    tokens = torch.cat(parts)
    if int(tokens.max()) >= vocab_size:
        raise CheckpointError(f"{data_dir} holds token ids >= the model's vocab_size {vocab_size}: wrong dataset?")
    return tokens


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


def variants(model, names=VARIANTS):
    """The variants the report compares (fp32, the reference, always first), made from the float model (left
    as it is)."""
    make = {"fp32": lambda: model, "bf16": lambda: copy.deepcopy(model).to(torch.bfloat16),
            "w8a8": lambda: quantize_model(copy.deepcopy(model), "w8a8"),
            "w8": lambda: quantize_model(copy.deepcopy(model), "w8"),
            "w8a8-fake": lambda: set_simulate(quantize_model(copy.deepcopy(model), "w8a8"), True),
            "w8-fake": lambda: set_simulate(quantize_model(copy.deepcopy(model), "w8"), True)}
    return {name: make[name]() for name in dict.fromkeys(("fp32", *names))}


def sizes_on_disk(models, source):
    """Bytes of each variant's checkpoint (for fp32 and bf16: the weights alone)."""
    def size(name, m):
        if name in ("fp32", "bf16"):
            return serialized_bytes(model_checkpoint(m, source["tokenizer"]))
        return serialized_bytes(quantized_checkpoint(m, source, name.removesuffix("-fake")))
    return {name: size(name, m) for name, m in models.items()}


def report(model, source, args):
    """Loss, perplexity, size and decoding speed of fp32 and the --variants (bf16, W8A8, weight-only int8,
    fake-quant W8A8), on the same validation tokens, as one markdown table."""
    models = variants(model, args.variants.split(","))
    sizes, losses, speeds = sizes_on_disk(models, source), {}, {}
    if args.eval_tokens:
        tokens = validation_tokens(source.get("train_config"), model.config.vocab_size, args.eval_tokens + 1,
                                   args.data_dir)
        block_size = min(args.block_size or min(model.config.block_size, 512), len(tokens) - 1)
        print(f"scoring {(len(tokens) - 1) // block_size * block_size} validation tokens in windows of {block_size}")
        losses = {name: evaluate(m, tokens, block_size, args.batch_size, desc=name) for name, m in models.items()}
    if args.decode_tokens:
        n = min(args.decode_tokens, model.config.block_size - 2)
        speeds = {name: 1e3 / eager_decode_ms(m, 1, n) for name, m in models.items()}
    c = model.config
    shape = f"{c.n_layers} layers" if c.depth == c.n_layers else f"{c.n_layers} blocks in {c.depth} applications"
    print(f"\n{shape} x dim {c.dim}, {model.num_params():,} parameters, {torch.get_num_threads()} "
          f"threads, torch {torch.__version__}")
    print("| variant | val loss | perplexity | loss vs fp32 | size on disk | vs fp32 | decode tokens/s |")
    print("|---|---|---|---|---|---|---|")
    for name in models:
        loss = losses.get(name)
        cells = [name, f"{loss:.4f}" if loss is not None else "-", f"{math.exp(loss):.2f}" if loss is not None else "-",
                 f"{100 * (loss / losses['fp32'] - 1):+.3f}%" if loss is not None else "-",
                 f"{sizes[name] / 2**20:.2f} MiB", f"{sizes[name] / sizes['fp32']:.3f}x",
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--init_from", default="", help="the float model: our checkpoint (out_dir or ckpt.pt), "
                                                        "an HF dir or repo id")
    parser.add_argument("ckpt_dir", nargs="?", default="", help=argparse.SUPPRESS)   # the old spelling of --init_from
    parser.add_argument("--out_dir", default="", help="where to write the int8 ckpt.pt (default: <init_from>-<mode>; "
                                                       "for a .gguf or a hub id, out-<name>-<mode> here)")
    parser.add_argument("--mode", default="w8a8", choices=MODES,
                        help="w8a8: int8 weights and per-token int8 activations; w8: int8 weights only")
    parser.add_argument("--report", action="store_true", help="then compare every variant (fp32, bf16, w8a8, w8)")
    parser.add_argument("--variants", default=",".join(VARIANTS), type=variant_names,
                        help=f"--report: which of {', '.join(VARIANTS)} (fp32 always). On CPUs without AVX-512, bf16 "
                             "is emulated and the int8 kernels are slow on long inputs: the -fake variants give the "
                             "same losses (float error aside) at fp32 speed")
    parser.add_argument("--eval_tokens", type=at_least(0), default=32768,
                        help="--report: validation tokens to score (0: skip)")
    parser.add_argument("--block_size", type=at_least(0), default=0,
                        help="--report: evaluation window (default: the model's, <= 512)")
    parser.add_argument("--batch_size", type=at_least(1), default=8, help="--report: windows per forward")
    parser.add_argument("--data_dir", default="", help="--report: folder with val.bin (default: the training data)")
    parser.add_argument("--decode_tokens", type=at_least(0), default=32,
                        help="--report: tokens to time per variant (0: skip)")
    parser.add_argument("--threads", type=at_least(0), default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    init_from = args.init_from or args.ckpt_dir
    if not init_from:
        parser.error("give the float model to quantize: --init_from=<out_dir>")
    if args.threads:
        torch.set_num_threads(args.threads)

    model, source = load_float_source(init_from)
    int8_file = int8_path(init_from, args.out_dir, args.mode)
    if int8_file.resolve() == checkpoint_file(init_from).resolve():
        raise SystemExit("--out_dir would overwrite the float checkpoint: choose another folder")
    qmodel = quantize_model(copy.deepcopy(model) if args.report else model, args.mode)
    save_checkpoint(quantized_checkpoint(qmodel, source, args.mode), int8_file)
    print(f"wrote {int8_file} ({args.mode})")
    if args.report:
        report(model, source, args)


if __name__ == "__main__":
    try:
        main()
    except CheckpointError as e:
        sys.exit(f"error: {e}")
