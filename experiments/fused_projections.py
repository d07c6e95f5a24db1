"""
Would one matrix for q/k/v and one for w1/w3 make train.py's step faster? Times the training step
(bench_train's: forward, backward, clipping, optimizer, on random tokens) of the model as model.py builds it
and of the same model with each block's projections fused, in alternating rounds so that a busy machine
slows both alike, and prints tokens/s and the ratio.

  python experiments/fused_projections.py                      # train.py's default model
  python experiments/fused_projections.py --dim=256 --rounds=5

Takes train.py's settings plus bench_train's (iters, warmup, dtype: the first of its list is timed, rounds). Fusing is
not a free change: Muon then orthogonalizes one (q;k;v) matrix instead of three, so training differs, and
every reader of the separate matrices (checkpoints, Hugging Face and GGUF import, quantize.py, export.py)
would change. This measures only the speed it could buy.
"""
import copy
import statistics
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the scripts live at the repo root
from bench_train import BenchConfig, tokens_per_second  # noqa: E402
from configurator import ConfigError, configure, exit_if_help  # noqa: E402
from model import ModelConfig  # noqa: E402
from loader import dtype_name, resolve_device  # noqa: E402
from train import check_config  # noqa: E402


class FusedPart(nn.Module):
    """One of the projections a fused matrix computes together: the first part computes all of them for its
    input, the others return their slice of that (`outputs`: a dict the parts share). Attention calls wq, wk,
    wv in that order, and SwiGLU w1 before w3, on the same input, so model.py's forwards run unchanged."""

    def __init__(self, fused, sizes, index, outputs):
        super().__init__()
        self.sizes, self.index, self.outputs = sizes, index, outputs
        if index == 0:
            self.fused = fused                              # registered once: one parameter for all parts

    def forward(self, x):                                   # (B, T, C) -> (B, T, sizes[index])
        if self.index == 0:
            self.outputs["parts"] = self.fused(x).split(self.sizes, -1)
        return self.outputs["parts"][self.index]


def fuse(module, names):
    """Replace module's nn.Linear `names` (same input) by FusedParts of one nn.Linear of their stacked rows."""
    linears = [getattr(module, name) for name in names]
    sizes = [linear.out_features for linear in linears]
    fused = nn.Linear(linears[0].in_features, sum(sizes), bias=False)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([linear.weight for linear in linears]))
    outputs = {}
    for i, name in enumerate(names):
        setattr(module, name, FusedPart(fused, sizes, i, outputs))


def fused_projections(model):
    """model with q/k/v fused and w1/w3 fused in every unique block (same outputs)."""
    for block in model.layers:
        fuse(block.attention, ("wq", "wk", "wv"))
        fuse(block.feed_forward, ("w1", "w3"))
    return model


def main(cfg):
    check_config(cfg)
    if cfg.rounds < 1 or cfg.iters < 1:
        raise ConfigError(f"rounds and iters must be at least 1, got {cfg.rounds} and {cfg.iters}")
    device, dtype = resolve_device(cfg.device), dtype_name(cfg.dtype.split(",")[0])
    x = torch.randint(cfg.vocab_size, (2, cfg.block_size), device=device)
    torch.manual_seed(0)
    separate = tokens_per_second(cfg, dtype, device)[1]
    fused = fused_projections(copy.deepcopy(separate))
    if not torch.allclose(separate(x)[0], fused(x)[0], atol=1e-5):
        raise RuntimeError("the fused model's logits differ from the model's")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {dtype}, dim {cfg.dim}, batch "
          f"{cfg.batch_size} x {cfg.block_size}, {cfg.optimizer}: same logits fused and separate")
    rates = {"separate": [], "fused": []}
    for _ in range(cfg.rounds):
        rates["separate"].append(tokens_per_second(cfg, dtype, device)[0])
        rates["fused"].append(tokens_per_second(cfg, dtype, device, rebuild=fused_projections)[0])
    medians = {name: statistics.median(r) for name, r in rates.items()}
    for name, r in rates.items():
        print(f"{name:>9}: {medians[name]:10,.0f} tokens/s (rounds {min(r):,.0f}-{max(r):,.0f})  "
              f"{medians[name] / medians['separate']:.3f}x")
    return medians


if __name__ == "__main__":
    defaults = BenchConfig(dtype="fp32", iters=20, warmup=3)
    exit_if_help(sys.argv[1:], __doc__, defaults, more_comments=(ModelConfig,))
    try:
        main(configure(defaults, sys.argv[1:]))
    except ConfigError as e:
        sys.exit(f"error: {e}")
