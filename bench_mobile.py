r"""
On-device speed: time the phone programs export.py makes (ExecuTorch .pte with the XNNPACK delegate) on
this host or on an Android phone, as the paper's Table 7 does on an iPhone (load, init, execution time of
125M, LS-125M and a 60-layer model), beside eager PyTorch and the bounds that memory and kernels set.

Usage:
  python bench_mobile.py --init_from mobilellm-125m --dtype fp32,w8a8         # export (cached) + host timing
  python bench_mobile.py --device host --compare mobilellm-125m,mobilellm-125m-ls,mobilellm-125m:n_layers=60 \
      --dtype fp32,w8a8 --eager fp32,bf16 --threads 2 --kernel_bound          # docs/on-device.md's table
  python bench_mobile.py --init_from mobilellm-125m --dtype w8a8,8da4w --check_logits  # + how close to model.py
  python bench_mobile.py --init_from out-shakespeare-char --dtype w8a8 --out model.pte   # our checkpoint, kept
  python bench_mobile.py --device android --runner ./executor_runner [--serial S] --init_from mobilellm-125m

Models: --init_from takes what export.py takes (a preset with overrides `NAME[:field=value+...]`, random
weights seeded by --seed; our checkpoints, int8 ones dequantized; HF dirs); --compare takes several.
Programs are exported once per weights and options into --cache_dir (export.cached_pte).

What is measured:
  * host rows: load, init (XNNPACK packs the weights), prefill and decode time of each program, each in a
    fresh process (its own peak memory), and the same for eager PyTorch (--eager).
  * DRAM bound: the decode speed this host's measured read bandwidth allows, given the bytes of weights a
    token reads from DRAM (a block re-applied right after itself through shared weights counted as read from
    cache). A bound for weights streamed from DRAM: a small model whose weights stay in the caches between
    tokens can beat it (marked *).
  * --kernel_bound: what XNNPACK's own matrix-vector products allow: the model's products alone, in its
    order, in delegates split and shared as the program's are, lowered the same way and timed
    (decode_bounds.kernel_seconds). The table adds what each block application costs beyond them.
  * --check_logits: how far each row's logits are from model.py's fp32 forward, token by token.
  * --data_dir: each row's loss (and perplexity) on real text, the first --eval_tokens of a prepared dataset's
    validation split, fed one token at a time in windows of --max_seq_len, beside model.py's fp32 loss on the
    same windows: what w8a8 and 8da4w programs cost in quality, as quantize.py --report measures eager W8A8.
"""
import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from android import android_rows, android_target
from checkpoint import atomic_write
from configurator import HelpFormatter, accept_old_flags, at_least, usage_description
from dataset import DataError, validation_tokens
from decode_bounds import kernel_seconds, weight_reads_per_token
from executorch_private import reset_threadpool
from export import (CACHE_DIR, LOWERINGS, MAX_SEQ_LEN, PROGRAM_DTYPES, ExportError, cached_pte, check_source,
                    load_source, program_dtype, program_seq_len, require_executorch, require_writable, write_program)
from loader import dtype_name, torch_dtype
from measure import cached_forward, in_fresh_process, memory_bandwidth_gbs, peak_rss_mb, rss_mb, time_generation


class BenchError(ExportError):
    """Bad input or a missing tool, with one message saying what to do."""


# --- timing on the host ------------------------------------------------------------------------------

def check_tokens(vocab_size, n, seed):
    """The random token sequence --check_logits feeds (also to llama.cpp, experiments/llama_cpp_reference.py)."""
    return torch.randint(vocab_size, (n,), generator=torch.Generator().manual_seed(seed))


def logits_per_position(step, tokens):
    """step(tokens (1, 1), input_pos (1,)) -> (1, V), fed tokens one at a time from position 0: (T, V)."""
    return torch.cat([step(tokens[i:i + 1][None], torch.tensor([i])) for i in range(len(tokens))])


def val_windows(data_dir, n_tokens, window, vocab_size, tokenizer_spec=None):
    """The first n_tokens (+1) of data_dir's validation split as (W, window + 1) windows, each overlapping the
    next by one token: inputs w[:-1], targets w[1:] (quantize.evaluate's windows). tokenizer_spec: the model's
    (None for a preset's random weights), which the data must be tokenized with."""
    try:
        tokens = validation_tokens(None, vocab_size, n_tokens + 1, data_dir, tokenizer_spec)
    except DataError as e:
        raise BenchError(f"--data_dir: {e}") from e
    n_windows = (len(tokens) - 1) // window
    if n_windows < 1:
        raise BenchError(f"{data_dir} has {len(tokens)} validation tokens: --data_dir needs more than "
                         f"--max_seq_len ({window})")
    return tokens[: n_windows * window + 1].unfold(0, window + 1, window)


@torch.no_grad()
def windows_loss(step, windows):
    """Mean next-token cross-entropy of step (as logits_per_position takes it) over (W, T + 1) windows, each
    fed one token at a time from position 0 (the cache's old entries are past the new positions: unread)."""
    losses = [F.cross_entropy(logits_per_position(step, w[:-1]).float(), w[1:]).item()
              for w in tqdm(windows, desc="val windows", leave=False)]
    return sum(losses) / len(losses)


@torch.no_grad()
def logit_agreement(logits, reference):
    """(largest |logit difference|, fraction of positions where both pick the same next token); (T, V) each."""
    return ((logits.float() - reference).abs().max().item(),
            (logits.argmax(-1) == reference.argmax(-1)).float().mean().item())


def host_pte_row(path, prompt_len, new_tokens, runs, threads, vocab_size, tokens=None, windows=None):
    """Time one .pte in this process (call in a fresh process: init and peak memory are then its own).
    tokens: also return the program's logits for them (logits_per_position) under "logits"; windows: its
    loss on them (windows_loss) under "val_loss"."""
    require_executorch()
    from executorch.runtime import Runtime
    reset_threadpool(threads)
    runtime, base = Runtime.get(), rss_mb()
    t0 = time.perf_counter()
    program = runtime.load_program(Path(path))
    t1 = time.perf_counter()
    method = program.load_method("forward")                   # delegate init: XNNPACK packs the weights here
    t2 = time.perf_counter()

    def step(tok, pos):
        return method.execute([tok, pos])[0]

    prefill, decode = time_generation(step, prompt_len, new_tokens, runs, vocab_size)
    row = dict(load_ms=1e3 * (t1 - t0), init_ms=1e3 * (t2 - t1), prefill_ms=prefill, decode_ms=decode,
               mem_mb=peak_rss_mb() - base)
    return with_outputs(row, step, tokens, windows)


def with_outputs(row, step, tokens, windows):
    """row plus what --check_logits (tokens) and --data_dir (windows) ask of the program or model (step)."""
    if tokens is not None:
        row["logits"] = logits_per_position(step, tokens)
    if windows is not None:
        row["val_loss"] = windows_loss(step, windows)
    return row


def host_eager_row(source, seed, dtype, max_seq_len, prompt_len, new_tokens, runs, threads, tokens=None,
                   windows=None):
    """Time eager PyTorch on source (export.load_source) in dtype, like host_pte_row."""
    torch.set_num_threads(threads)
    base = rss_mb()
    t0 = time.perf_counter()
    model = load_source(source, seed)[0].to(torch_dtype(dtype))
    t1 = time.perf_counter()
    step = cached_forward(model, max_seq_len)
    prefill, decode = time_generation(step, prompt_len, new_tokens, runs, model.config.vocab_size)
    row = dict(load_ms=1e3 * (t1 - t0), init_ms=0.0, prefill_ms=prefill, decode_ms=decode,
               mem_mb=peak_rss_mb() - base)
    return with_outputs(row, step, tokens, windows)


# --- the table and the command line ------------------------------------------------------------------

def tok_s(rate):
    """A bound in tokens/s, to three figures below 100."""
    return f"{rate:.1f}" if rate < 100 else f"{rate:.0f}"


def format_table(rows, prompt_len, bandwidth, kernel_column, logits_columns=False, val_column=False):
    """kernel_column: add the kernel bound and the decode time beyond it per block application (rows without
    one, eager PyTorch, show '-'). logits_columns: add each row's logit_error and same_token (--check_logits).
    val_column: its val_loss (--data_dir)."""
    head = ("| model | runtime | file MB | load ms | init ms | prefill {P} tok ms | decode ms/tok | tok/s "
            "| DRAM bound tok/s |{K} mem MB |{L}{V}").format(
        P=prompt_len, K=" kernel bound tok/s | beyond it, ms per block application |" if kernel_column else "",
        L=" max abs logit error | same next token |" if logits_columns else "",
        V=" val loss (perplexity) |" if val_column else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        file_mb = f"{r['file_mb']:.0f}" if "file_mb" in r else "-"
        kernel = " - | - |" if kernel_column else ""
        if kernel_column and "kernel_tok_s" in r:
            kernel = f" {tok_s(r['kernel_tok_s'])} | {r['beyond_kernel_ms']:.3f} |"
        logits = f" {r['logit_error']:.2g} | {r['same_token']:.0%} |" if logits_columns else ""
        val = f" {r['val_loss']:.4f} ({math.exp(r['val_loss']):.2f}) |" if val_column else ""
        dram_bound = bandwidth * 1e9 / r["dram_bytes"]
        beaten = "*" if 1e3 / r["decode_ms"] > dram_bound else ""     # its weights stayed in the caches
        lines.append(f"| {r['model']} | {r['runtime']} | {file_mb} | "
                     f"{r['load_ms']:.0f} | {r['init_ms']:.0f} | {r['prefill_ms']:.1f} | {r['decode_ms']:.2f} | "
                     f"{1e3 / r['decode_ms']:.1f} | {tok_s(dram_bound)}{beaten} |{kernel} "
                     f"{r['mem_mb']:.0f} |{logits}{val}")
    return "\n".join(lines)


OLD_FLAGS = {"--prompt-len": "--prompt_len", "--new-tokens": "--new_tokens", "--max-seq-len": "--max_seq_len",
             "--kernel-bound": "--kernel_bound", "--check-logits": "--check_logits",
             "--cache-dir": "--cache_dir", "--ckpt": "--init_from", "--preset": "--init_from",
             "--val_data": "--data_dir", "--val_tokens": "--eval_tokens"}


def main(argv=None):
    p = argparse.ArgumentParser(description=usage_description(__doc__), formatter_class=HelpFormatter)
    p.add_argument("--init_from", default="mobilellm-125m",
                   help="preset[:field=value+...] (random weights), our checkpoint (an int8 one is dequantized), "
                        "a GGUF file, or an HF dir or repo id")
    p.add_argument("--compare", default="", help="comma-separated --init_from values, timed in one run (overrides it)")
    p.add_argument("--dtype", default="",
                   help="fp32, w8a8 (int8 weights, per-token int8 activations) and/or 8da4w (int4 weights, "
                        "groups of 32); default fp32,w8a8 (a .ptl: fp32, its only dtype)")
    p.add_argument("--lowering", default="shared", help="shared (identical block delegates shared) and/or naive")
    p.add_argument("--eager", default="", help="also time eager PyTorch in these dtypes, e.g. fp32,bf16")
    p.add_argument("--format", default="pte", choices=("pte", "ptl"), help="ptl: only export (see export.py)")
    p.add_argument("--out", default="", help="copy the exported program here")
    p.add_argument("--device", default="host", choices=("host", "android", "none"),
                   help="where to time the programs (none: only export them)")
    p.add_argument("--serial", default="", help="adb serial (--device android)")
    p.add_argument("--runner", default="", help="executor_runner built for the phone (--device android)")
    p.add_argument("--threads", type=at_least(1), default=os.cpu_count(), help="CPU threads")
    p.add_argument("--prompt_len", type=at_least(1), default=64, help="tokens of the timed prefill")
    p.add_argument("--new_tokens", type=at_least(1), default=32, help="tokens decoded one at a time after it")
    p.add_argument("--runs", type=at_least(1), default=5, help="timed runs after one warm-up; medians are reported")
    p.add_argument("--max_seq_len", type=at_least(0), default=0,
                   help=f"static KV cache length in the program (0: the model's context, at most {MAX_SEQ_LEN})")
    p.add_argument("--kernel_bound", action="store_true",
                   help="also time XNNPACK's matrix-vector products alone on each program's weights, in its "
                        "order and sharing, and add the decode speed they allow as a column")
    p.add_argument("--check_logits", action="store_true",
                   help="also feed --prompt_len random tokens one at a time and compare each row's logits with "
                        "model.py's fp32 forward (largest difference, how often the next token is the same)")
    p.add_argument("--data_dir", default="",
                   help="a prepared dataset folder (val.bin, in the model's tokenizer): also score each row's loss "
                        "on its first --eval_tokens tokens, in windows of --max_seq_len fed one token at a time")
    p.add_argument("--eval_tokens", type=at_least(1), default=4096, help="--data_dir: validation tokens scored")
    p.add_argument("--cache_dir", default=str(CACHE_DIR), help="where exported programs are kept (export.cached_pte)")
    p.add_argument("--seed", type=int, default=0, help="for a preset's random weights, and the --check_logits tokens")
    args = p.parse_args(accept_old_flags(argv, OLD_FLAGS))
    try:
        run(args)
    except (ExportError, OSError) as e:                     # OSError: a file that cannot be written, a disk full
        sys.exit(f"bench_mobile.py: {e}")
    except KeyboardInterrupt:
        print("bench_mobile.py: interrupted (the programs exported so far stay in --cache_dir)", file=sys.stderr)
        sys.exit(130)


def with_logit_agreement(row, reference):
    """The row with its "logits" (if any) replaced by logit_error and same_token against reference."""
    if "logits" not in row:
        return row
    error, same = logit_agreement(row.pop("logits"), reference)
    return dict(row, logit_error=error, same_token=same)


def checked_source(args, source):
    """(model, its programs' KV cache length: export.program_seq_len, its tokenizer's spec or None), checked
    against the tokens to time."""
    model, tokenizer = load_source(source, args.seed)
    seq_len = program_seq_len(model, args.max_seq_len)
    if args.prompt_len + args.new_tokens > seq_len:
        raise BenchError(f"--prompt_len + --new_tokens ({args.prompt_len + args.new_tokens}) must fit in "
                         f"--max_seq_len ({seq_len})")
    return model, seq_len, tokenizer.spec if tokenizer is not None else None


def check_args(args):
    """(the sources, the dtypes) to export; one clear error for options that do not go together or do not exist,
    before any model is loaded or exported."""
    sources = [s for s in args.compare.split(",") if s] if args.compare else [args.init_from]
    for source in sources:
        check_source(source)
    args.dtype = args.dtype or ("fp32" if args.format == "ptl" else "fp32,w8a8")
    dtypes = [program_dtype(d) for d in args.dtype.split(",") if d]
    for d in dtypes:
        if d not in PROGRAM_DTYPES:
            raise BenchError(f"--dtype {d!r}: choose from {', '.join(PROGRAM_DTYPES)}")
    if args.format == "ptl" and dtypes != ["fp32"]:
        raise BenchError(f"--format ptl is fp32 only (TorchScript lite), not --dtype {args.dtype}: "
                         "--format pte for int8 programs")
    for lowering in [x for x in args.lowering.split(",") if x]:
        if lowering not in LOWERINGS:
            raise BenchError(f"--lowering {lowering!r}: choose shared and/or naive")
    for d in [dtype_name(d) for d in args.eager.split(",") if d]:
        if d not in ("fp32", "bf16"):
            raise BenchError(f"--eager {d!r}: choose fp32 and/or bf16")
    if args.kernel_bound and args.device != "host":
        raise BenchError("--kernel_bound times XNNPACK's kernels on this host: use it with --device host")
    for flag, on in (("--check_logits", args.check_logits), ("--data_dir", args.data_dir)):
        if on and (args.device != "host" or args.format != "pte"):
            raise BenchError(f"{flag} runs the .pte programs on this host: use it with --device host --format pte")
    if args.format == "ptl" and len(sources) > 1:
        raise BenchError("--format ptl exports one model: give one --init_from, not --compare")
    several = len(dtypes) > 1 or "," in args.lowering.strip(",") or args.device == "android"
    if args.out and (len(sources) > 1 or (args.format == "pte" and several)):
        raise BenchError(f"--out {args.out} is one program: give one --init_from, one --dtype (now {args.dtype}) and "
                         "one --lowering, and --device host or none")
    if args.out and Path(args.out).suffix != f".{args.format}":
        raise BenchError(f"--out {args.out}: a --format {args.format} program is a .{args.format} file")
    if args.out:
        require_writable(Path(args.out).parent, "--out's folder")
    return sources, dtypes


def model_names(sources):
    """The table's name of each source, one per source: its file or folder name (a ckpt.pt its folder's), or
    the whole --init_from value where two would share a name (two runs' ckpt.pt)."""
    names = [Path(s).parent.name if Path(s).name == "ckpt.pt" else Path(s).name for s in sources]
    return [s if names.count(n) > 1 else n for s, n in zip(sources, names)]


def pte_row(args, model, name, dtype, lowering, path, tokens, windows):
    """One host row for a .pte: timed in a fresh process, with its DRAM (and kernel) bound."""
    config, shared = model.config, lowering == "shared"
    row = in_fresh_process(host_pte_row, str(path), args.prompt_len, args.new_tokens, args.runs, args.threads,
                           config.vocab_size, tokens, windows)
    label = f"ExecuTorch {dtype}" + (f" ({lowering})" if config.share != "none" else "")
    row = dict(row, model=name, runtime=label, file_mb=path.stat().st_size / 2**20,
               dram_bytes=weight_reads_per_token(config, dtype, shared)[0])
    if args.kernel_bound:
        products_s = kernel_seconds(config, dtype, shared, args.threads)
        # what a decode step spends beyond its products (attention, cache writes, norms, RoPE, activation
        # quantization, delegate calls), per block application
        row.update(kernel_tok_s=1 / products_s, beyond_kernel_ms=(row["decode_ms"] - 1e3 * products_s) / config.depth)
    return row


def eager_rows(args, model, seq_len, source, name, tokens, windows):
    rows = []
    for dtype in [dtype_name(d) for d in args.eager.split(",") if d]:
        row = in_fresh_process(host_eager_row, source, args.seed, dtype, seq_len, args.prompt_len,
                               args.new_tokens, args.runs, args.threads, tokens, windows)
        rows.append(dict(row, model=name, runtime=f"eager PyTorch {dtype}",
                         dram_bytes=weight_reads_per_token(model.config, dtype, shared=True)[0]))
    return rows


def run(args):
    sources, dtypes = check_args(args)
    if args.format == "ptl":
        model, seq_len, _ = checked_source(args, sources[0])
        out = write_program(model, "ptl", "fp32", args.out, seq_len)
        print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MB)")
        return
    require_executorch()
    if args.device == "android":
        android_target(args.runner, args.serial)        # before any export: fail in seconds, not after minutes
    rows, programs = [], {}
    for source, name in tqdm(list(zip(sources, model_names(sources))), desc="export", disable=len(sources) < 2):
        model, seq_len, tokenizer_spec = checked_source(args, source)
        tokens = check_tokens(model.config.vocab_size, args.prompt_len, args.seed) if args.check_logits else None
        with torch.no_grad():
            reference = model.eval()(tokens[None])[0][0] if args.check_logits else None       # (T, V)
        windows = val_windows(args.data_dir, args.eval_tokens, seq_len, model.config.vocab_size,
                              tokenizer_spec) if args.data_dir else None
        if windows is not None:
            with torch.no_grad():
                loss = sum(model(w[None, :-1], w[None, 1:])[1].item() for w in windows) / len(windows)
            print(f"{name}: model.py fp32 val loss {loss:.4f} (perplexity {math.exp(loss):.2f}) on "
                  f"{windows[:, 1:].numel()} tokens of {args.data_dir} in windows of {seq_len}")
        lowerings = [x for x in args.lowering.split(",") if x] if model.config.share != "none" else ["shared"]
        for dtype in dtypes:
            for lowering in lowerings:
                if args.device == "android":
                    for label, T in (("decode", 1), ("prefill", args.prompt_len)):
                        programs[(name, dtype, lowering, label)] = cached_pte(
                            model, dtype, seq_len, lowering == "shared", T, args.cache_dir)
                    continue
                path = cached_pte(model, dtype, seq_len, lowering == "shared", None, args.cache_dir)
                info = json.loads(path.with_suffix(".json").read_text())
                print(f"{name} {dtype} {lowering}: {path} ({path.stat().st_size / 2**20:.1f} MB, "
                      f"{info['delegate_calls']} delegate calls -> {info['delegates']} delegates)")
                if args.out:
                    print(f"wrote {atomic_write(args.out, lambda tmp: shutil.copyfile(path, tmp))}")
                if args.device == "host":
                    row = pte_row(args, model, name, dtype, lowering, path, tokens, windows)
                    rows.append(with_logit_agreement(row, reference))
        if args.device == "host":
            rows += [with_logit_agreement(row, reference)
                     for row in eager_rows(args, model, seq_len, source, name, tokens, windows)]
    if args.device == "android":
        print_android_table(programs, args)
    elif rows:
        print_host_table(rows, args)


def print_android_table(programs, args):
    timings = android_rows({"-".join(k): v for k, v in programs.items()}, args.runner, args.serial,
                           args.runs, args.threads)
    print("| model | runtime | prefill %d tok ms | decode ms/tok | tok/s |\n|---|---|---|---|---|" % args.prompt_len)
    for name, dtype, lowering in dict.fromkeys(k[:3] for k in programs):
        decode = timings["-".join((name, dtype, lowering, "decode"))]
        prefill = timings["-".join((name, dtype, lowering, "prefill"))]
        print(f"| {name} | ExecuTorch {dtype} ({lowering}) | {prefill:.1f} | {decode:.2f} | {1e3 / decode:.1f} |")


def print_host_table(rows, args):
    bandwidth = memory_bandwidth_gbs(args.threads)
    print(f"\n{args.threads} threads, torch {torch.__version__}, median of {args.runs} runs after a warm-up; "
          f"DRAM bound = measured read bandwidth {bandwidth:.1f} GB/s / bytes of weights read per token "
          f"from DRAM (a block re-applied through the same weights is assumed to hit the cache); * a row faster "
          f"than it: its weights stay in the caches between tokens")
    if args.kernel_bound:
        print("kernel bound = XNNPACK's matrix-vector products alone on the program's weights, in its order "
              "and sharing (decode_bounds.kernel_seconds)")
    print()
    print(format_table(rows, args.prompt_len, bandwidth, args.kernel_bound, args.check_logits, bool(args.data_dir)))


if __name__ == "__main__":
    main()
