"""
How much faster XNNPACK's matrix-vector products run on weights that are still in cache, as a function of
how many weights are re-read: the second application of a shared (MobileLLM-LS) block only gains if a
whole block's weights survive the first application in this CPU's caches.

A chain of SwiGLU-shaped products (the model's dim -> ffn_dim -> dim) reads --mb MB of weights per call:
new weights for every product (cold), or k pairs re-applied in turn through shared delegates (a working
set of k pairs). At fp32 one 125M block's linears are two pairs (13.5 MB).

  python experiments/xnnpack_cache_reuse.py --init_from=mobilellm-125m --dtype=fp32 --hot_pairs=1,2,4
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the scripts live at the repo root
from configurator import at_least  # noqa: E402
from decode_bounds import chain_gbs  # noqa: E402
from export import PROGRAM_DTYPES, parse_model_spec  # noqa: E402
from model import config_from_preset  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--init_from", default="mobilellm-125m", help="preset[:field=value+...] whose FFN shape to use")
    p.add_argument("--dtype", default="fp32", choices=PROGRAM_DTYPES)
    p.add_argument("--hot_pairs", default="1,2,4", help="working sets to time, in pairs of FFN matrices")
    p.add_argument("--mb", type=float, default=64, help="MB of weights read per call")
    p.add_argument("--threads", type=at_least(1), default=2)
    args = p.parse_args(argv)
    name, overrides = parse_model_spec(args.init_from)
    config = config_from_preset(name, **overrides)
    print("| weights re-read | working set MB | GB/s of weights |\n|---|---|---|")
    for hot_pairs in [0] + [int(k) for k in args.hot_pairs.split(",")]:
        gbs, working_set = chain_gbs(config, args.dtype, args.threads, args.mb, hot_pairs)
        label = f"{hot_pairs} pair{'s' * (hot_pairs > 1)} in turn" if hot_pairs else "none (cold)"
        print(f"| {label} | {working_set:.2f} | {gbs:.1f} |", flush=True)


if __name__ == "__main__":
    main()
