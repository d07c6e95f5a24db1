"""
How much faster XNNPACK's matrix-vector products run on weights that are still in cache, as a function of
how many weights are re-read: the second application of a shared (MobileLLM-LS) block only gains if a
whole block's weights survive the first application in this CPU's caches.

A chain of SwiGLU-shaped products (the model's dim -> ffn_dim -> dim) reads --mb MB of weights per call:
new weights for every product (cold), or k pairs re-applied in turn through shared delegates (a working
set of k pairs). At fp32 one 125M block's linears are two pairs (13.5 MB). Weights re-read over and over
are not a block read once and re-read right after, as an LS block is: `bench_mobile.py --kernel_bound`
times that case, the model's own products (decode_bounds.kernel_seconds).

  python experiments/xnnpack_cache_reuse.py --init_from=mobilellm-125m --dtype=fp32 --hot_pairs=1,2,4
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the scripts live at the repo root
from configurator import at_least  # noqa: E402
from decode_bounds import BYTES_PER_WEIGHT, program_seconds  # noqa: E402
from export import PROGRAM_DTYPES  # noqa: E402
from loader import preset_config  # noqa: E402
from xnnpack_lowering import emit_composed, lowered_alike, quantize_8da4w  # noqa: E402


class GemvPair(nn.Module):
    """One up/down pair of matrix-vector products shaped like the model's SwiGLU (dim -> ffn_dim -> dim)."""

    def __init__(self, dim, ffn_dim):
        super().__init__()
        self.up = nn.Linear(dim, ffn_dim, bias=False)
        self.down = nn.Linear(ffn_dim, dim, bias=False)

    def forward(self, x):                                                    # x: (1, 1, dim)
        return self.down(self.up(x))


class GemvChain(nn.Module):
    """Pairs applied in the order `schedule` gives, each pair one delegate: a pair that comes back is re-read
    through the same delegate."""

    def __init__(self, dim, ffn_dim, pairs, schedule):
        super().__init__()
        self.schedule = list(schedule)
        self.pairs = nn.ModuleList(GemvPair(dim, ffn_dim) for _ in range(pairs))

    def forward(self, x):                                                    # x: (1, 1, dim)
        for i in self.schedule:
            x = self.pairs[i](x)
        return x


def chain_pte(chain, dim, dtype):
    """The chain lowered like the models: one pair lowered, the others reusing it with their weights."""
    if dtype == "8da4w":
        chain = quantize_8da4w(chain)
    x = torch.zeros(1, 1, dim)
    with torch.no_grad():
        chain.pairs = nn.ModuleList(lowered_alike(list(chain.pairs), (x,), None, dtype, "lowering products")[0])
        return emit_composed(chain, (x,), None)[0]


def chain_gbs(config, dtype, threads, mb, hot_pairs):
    """GB/s of weights a chain of FFN-shaped pairs streams, reading `mb` MB of weights per call: new weights for
    every product (hot_pairs=0) or `hot_pairs` pairs re-applied in turn. Returns (GB/s, MB of weights
    re-read: the working set)."""
    pair_bytes = 2 * config.dim * config.ffn_dim * BYTES_PER_WEIGHT[dtype]
    n = max(2, round(mb * 2**20 / pair_bytes))
    pairs = hot_pairs or n
    torch.manual_seed(0)
    chain = GemvChain(config.dim, config.ffn_dim, pairs, [i % pairs for i in range(n)]).eval()
    seconds = program_seconds(chain_pte(chain, config.dim, dtype), [torch.randn(1, 1, config.dim)], threads)
    return n * pair_bytes / seconds / 1e9, pairs * pair_bytes / 2**20


def positive_float(text):
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--init_from", default="mobilellm-125m", help="preset[:field=value+...] whose FFN shape to use")
    p.add_argument("--dtype", default="fp32", choices=PROGRAM_DTYPES)
    p.add_argument("--hot_pairs", default="1,2,4", help="working sets to time, in pairs of FFN matrices")
    p.add_argument("--mb", type=positive_float, default=64, help="MB of weights read per call")
    p.add_argument("--threads", type=at_least(1), default=2)
    args = p.parse_args(argv)
    try:
        config = preset_config(args.init_from)
    except ValueError as e:
        p.error(f"--init_from {args.init_from!r}: {e}")
    print("| weights re-read | working set MB | GB/s of weights |\n|---|---|---|")
    for hot_pairs in [0] + [int(k) for k in args.hot_pairs.split(",")]:
        gbs, working_set = chain_gbs(config, args.dtype, args.threads, args.mb, hot_pairs)
        label = f"{hot_pairs} pair{'s' * (hot_pairs > 1)} in turn" if hot_pairs else "none (cold)"
        print(f"| {label} | {working_set:.2f} | {gbs:.1f} |", flush=True)


if __name__ == "__main__":
    main()
