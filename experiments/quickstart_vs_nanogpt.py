"""
Our quick start (`python train.py`) against nanoGPT's CPU quick start, for the same wall time on the same
machine, one after the other: validation loss against wall-clock time, start-up and evals included.

  python experiments/quickstart_vs_nanogpt.py --nanogpt /path/to/nanoGPT                # 10 minutes each
  python experiments/quickstart_vs_nanogpt.py --nanogpt ../nanoGPT --minutes 3 --max_iters=600

Any other --key=value goes to our train.py (its out_dir is <out_dir>/ours). nanoGPT runs its README's CPU
command with max_iters = lr_decay_iters = --nanogpt_iters. Each run is stopped at the time limit if it has not finished.
Both datasets are prepared before the clocks start (nanoGPT's from a copy of --input instead of its download).
Prints a table of each run's latest val loss at every minute, writes <out_dir>/quickstart_vs_nanogpt.json
(commands, machine, every eval with its time) and .png (val loss against wall time; needs matplotlib).
"""
import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))                                  # configurator.py lives at the repo root
from configurator import at_least  # noqa: E402
EVAL_LINE = re.compile(r"(?:iter|step) (\d+): train loss ([\d.]+|nan|inf), val loss ([\d.]+|nan|inf)")
NANOGPT_CPU_ARGS = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
                    "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
                    "--n_embd=128", "--dropout=0.0"]


def parse_eval(line):
    """(iteration, train loss, val loss) from an eval line of either train.py ("iter N: ..." from ours,
    "step N: ..." from nanoGPT's), else None."""
    match = EVAL_LINE.search(line)
    return None if match is None else (int(match[1]), float(match[2]), float(match[3]))


def run_timed(command, cwd, seconds, log_file):
    """Run command for at most seconds, its output copied to log_file. Returns its evals as
    [{"t": seconds since start, "iter", "train_loss", "val_loss"}] and whether it finished in time."""
    curve = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    with open(log_file, "w") as log, subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                                       stderr=subprocess.STDOUT, text=True) as proc:
        timer = threading.Timer(seconds, proc.terminate)     # stop it at the time limit
        timer.start()
        for line in proc.stdout:
            log.write(line)
            parsed = parse_eval(line)
            if parsed is not None:
                t = round(time.monotonic() - start, 2)
                curve.append(dict(zip(("t", "iter", "train_loss", "val_loss"), (t, *parsed))))
        proc.wait()
        timer.cancel()
    finished = proc.returncode == 0 and time.monotonic() - start < seconds
    return curve, finished


def loss_at(curve, t):
    """The val loss of the latest eval at or before t seconds (None before the first)."""
    done = [point["val_loss"] for point in curve if point["t"] <= t]
    return done[-1] if done else None


def table(curves, minutes):
    """Markdown: per minute, each run's latest val loss; then each run's last eval (time, iteration)."""
    names = list(curves)
    fmt = lambda v: "-" if v is None else f"{v:.4f}"    # noqa: E731
    lines = ["| wall time | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for minute in range(1, minutes + 1):
        lines.append(f"| {minute} min | " + " | ".join(fmt(loss_at(curves[n], 60 * minute)) for n in names) + " |")
    last = [curves[n][-1] if curves[n] else None for n in names]
    lines.append("| last eval | " + " | ".join(
        "-" if p is None else f"{p['val_loss']:.4f} (iter {p['iter']}, {p['t']:.0f} s)" for p in last) + " |")
    return "\n".join(lines)


def plot(curves, path):
    """Val loss against wall time for each run, when matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, curve in curves.items():
        ax.plot([p["t"] / 60 for p in curve], [p["val_loss"] for p in curve], marker="o", label=name)
    ax.set_xlabel("wall time (minutes, start-up and evals included)")
    ax.set_ylabel("val loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def machine():
    """What the comparison ran on: the CPU and the flags that decide its speed (AVX2, AVX-512, and AVX-512 BF16
    or AMX, where dtype=auto may pick bf16: loader.resolve_dtype; nanoGPT's CPU quick start is fp32)."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    field = lambda name: next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith(name)), "")
    flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in field("flags").split()]
    return {"cpu": field("model name") or platform.processor(), "cpu_flags": flags, "cores": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "load_avg": os.getloadavg()}


def prepare(nanogpt, input_file):
    """Both shakespeare_char datasets, outside the timed runs."""
    ours = REPO / "data" / "shakespeare_char"
    if not (ours / "train.bin").is_file():
        extra = ["--input", str(input_file)] if input_file else []
        subprocess.run([sys.executable, str(ours / "prepare.py"), *extra], check=True)
    theirs = nanogpt / "data" / "shakespeare_char"
    if not (theirs / "train.bin").is_file():
        if input_file and not (theirs / "input.txt").is_file():
            shutil.copy(input_file, theirs / "input.txt")
        subprocess.run([sys.executable, "prepare.py"], cwd=theirs, check=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)     # a train.py key is never taken for one of these
    parser.add_argument("--nanogpt", type=Path, required=True, help="a checkout of karpathy/nanoGPT")
    parser.add_argument("--minutes", type=at_least(1), default=10, help="wall time of each run")
    parser.add_argument("--nanogpt_iters", type=at_least(1), default=6300, help="nanoGPT's max_iters = lr_decay_iters")
    parser.add_argument("--input", type=Path, default=REPO / "data" / "tinyshakespeare.txt",
                        help="the text both train on (default: the tiny shakespeare that ships in data/)")
    parser.add_argument("--out_dir", type=Path, default=REPO / "out-quickstart-vs-nanogpt")
    args, ours_args = parser.parse_known_args(argv)
    if not (args.nanogpt / "train.py").is_file():
        parser.error(f"--nanogpt {args.nanogpt}: no nanoGPT checkout there (no train.py); "
                     "git clone https://github.com/karpathy/nanoGPT")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    prepare(args.nanogpt.resolve(), args.input)
    commands = {
        "nanoMobileLLM": ([sys.executable, "train.py", f"--out_dir={args.out_dir / 'ours'}", *ours_args], REPO),
        "nanoGPT": ([sys.executable, "train.py", *NANOGPT_CPU_ARGS, f"--max_iters={args.nanogpt_iters}",
                     f"--lr_decay_iters={args.nanogpt_iters}", f"--out_dir={args.out_dir / 'nanogpt'}"],
                    args.nanogpt.resolve()),
    }
    curves, finished = {}, {}
    for name, (command, cwd) in commands.items():
        print(f"{name}: {' '.join(command)} (in {cwd}) for up to {args.minutes} min", flush=True)
        curves[name], finished[name] = run_timed(command, cwd, 60 * args.minutes, args.out_dir / f"{name}.log")
    result = {"minutes": args.minutes, "machine": machine(), "finished_in_time": finished,
              "commands": {n: {"argv": c, "cwd": str(d)} for n, (c, d) in commands.items()}, "curves": curves}
    (args.out_dir / "quickstart_vs_nanogpt.json").write_text(json.dumps(result, indent=1))
    plot(curves, args.out_dir / "quickstart_vs_nanogpt.png")
    print(table(curves, args.minutes))
    return result


if __name__ == "__main__":
    main()
