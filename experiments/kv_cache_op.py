"""
One ExecuTorch op per block application for the KV cache, or three? export.py's programs write k and v into
the cache and attend over it with llama::sdpa_with_kv_cache; the alternative is two llama::update_cache
calls and a llama::custom_sdpa (ExecuTorch's llama example, too, writes the cache apart from custom_sdpa
unless given --use_sdpa_with_kv_cache). Both run the same kernels. This exports each
model both ways, then prints each program's export time, its decode time (alternating rounds, each run in a
fresh process) and how far its logits are from the one-op program's.

  python experiments/kv_cache_op.py --init_from=mobilellm-125m,mobilellm-125m-ls --dtype=fp32 --rounds=3

Every op the top-level program holds is traced again by each of ExecuTorch's passes (docs/on-device.md), so
the one-op program exports sooner, and an LS model, with twice the block applications, gains about twice as
much in to_edge and to_executorch.
"""
import argparse
import contextlib
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the scripts live at the repo root
import export  # noqa: E402
from bench_mobile import check_tokens, host_pte_row  # noqa: E402
from configurator import at_least  # noqa: E402
from loader import preset_config, preset_model  # noqa: E402
from measure import in_fresh_process  # noqa: E402

VARIANTS = ("sdpa_with_kv_cache", "update_cache x2 + custom_sdpa")


def update_then_attend(self, i, q, k, v, start):
    """ExportLLM.attention as three ops: k and v written by update_cache, then custom_sdpa over the cache."""
    k_cache, v_cache = getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}")
    torch.ops.llama.update_cache(k, k_cache, start)
    torch.ops.llama.update_cache(v, v_cache, start)
    return torch.ops.llama.custom_sdpa(q, k_cache, v_cache, start, None, 0, True)


@contextlib.contextmanager
def cache_ops(variant):
    """export.ExportLLM with the variant's cache ops, inside the block."""
    one_op = export.ExportLLM.attention
    if variant == VARIANTS[1]:
        export.ExportLLM.attention = update_then_attend
    try:
        yield
    finally:
        export.ExportLLM.attention = one_op


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--init_from", default="mobilellm-125m,mobilellm-125m-ls", help="presets[:field=value+...]")
    p.add_argument("--dtype", default="fp32", choices=export.PROGRAM_DTYPES)
    p.add_argument("--rounds", type=at_least(1), default=3, help="alternating timing rounds")
    p.add_argument("--runs", type=at_least(1), default=5, help="generations timed per round (median)")
    p.add_argument("--prompt_len", type=at_least(1), default=64)
    p.add_argument("--new_tokens", type=at_least(1), default=32)
    p.add_argument("--threads", type=at_least(1), default=2)
    args = p.parse_args(argv)
    for spec in args.init_from.split(","):
        try:
            preset_config(spec)
        except ValueError as e:
            p.error(f"--init_from {spec!r}: {e}")
    export.require_executorch()
    programs, tokens = {}, {}
    with tempfile.TemporaryDirectory(prefix="kv_cache_op-") as tmp:
        for spec in args.init_from.split(","):
            model = preset_model(spec)
            tokens[spec] = check_tokens(model.config.vocab_size, 32, 0)
            for variant in VARIANTS:
                with cache_ops(variant):
                    data, info = export.export_pte(model, args.dtype)
                path = Path(tmp) / f"{len(programs)}.pte"
                path.write_bytes(data)
                programs[spec, variant] = dict(path=path, info=info, vocab=model.config.vocab_size, decode=[])
        for r in range(args.rounds):
            for (spec, variant), program in programs.items():
                row = in_fresh_process(host_pte_row, program["path"], args.prompt_len, args.new_tokens, args.runs,
                                       args.threads, program["vocab"], tokens[spec] if r == 0 else None)
                program["decode"].append(row["decode_ms"])
                if r == 0:
                    program["logits"] = row["logits"]
    print("| model | cache op | export s | to_edge s | to_executorch s | decode ms/tok (median of rounds) | "
          "max abs logit diff from one op |\n|---|---|---|---|---|---|---|")
    for (spec, variant), program in programs.items():
        info, diff = program["info"], (program["logits"] - programs[spec, VARIANTS[0]]["logits"]).abs().max()
        print(f"| {spec} | {variant} | {info['export_s']} | {info['to_edge_s']} | {info['to_executorch_s']} | "
              f"{statistics.median(program['decode']):.2f} | {diff.item():.3g} |", flush=True)
    return programs


if __name__ == "__main__":
    main()
