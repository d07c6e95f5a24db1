"""
Training settings compared at equal wall time: each variant's iterations/s is measured first (bench_train's
timed step on random tokens), its schedule is then sized to fill the budget, and it trains to its end on
the real data. What a quick start on a CPU should be judged by: a wider model or a larger batch takes
fewer steps in the same minutes.

  python experiments/equal_time.py --minutes=4 --compare="batch_size=16;batch_size=32;n_layers=6,share='none'"

Takes train.py's settings (config files, --key=value) as the base of every variant; --compare="a;b;..."
as bench_train.py takes it. Warmup is 1/15 of each run (at least 30 iterations); the only eval is at the
end. Prints one row per variant: iterations, wall seconds (start-up and the eval included), train and
val loss; writes <out_dir>/equal_time.json after each variant.
"""
import json
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the scripts live at the repo root
from bench_train import parse_variants, tokens_per_second  # noqa: E402
from checkpoint import atomic_write  # noqa: E402
from configurator import ConfigError, configure, exit_if_help  # noqa: E402
from model import ModelConfig  # noqa: E402
from loader import resolve_device, resolve_dtype  # noqa: E402
from train import TrainConfig, train  # noqa: E402


@dataclass
class EqualTimeConfig(TrainConfig):
    minutes: float = 4.0                 # training time of each variant (the measured speed sizes its schedule)
    compare: str = ""                    # "key=value,...;key=value,...": the variants
    vocab_size: int = 65                 # for the speed probe on random tokens (shakespeare_char's)
    iters: int = 20                      # timed iterations of the speed probe
    warmup: int = 5                      # untimed iterations before them
    out_dir: str = "out-equal-time"


def sized_run(variant, iterations_per_s, minutes, out_dir):
    """The variant's TrainConfig with a schedule of as many iterations as fill `minutes` at its speed."""
    iters = max(1, int(minutes * 60 * iterations_per_s))
    settings = {f.name: getattr(variant, f.name) for f in fields(TrainConfig)}
    return replace(TrainConfig(**settings), max_iters=iters, warmup_iters=min(iters - 1, max(30, iters // 15)),
                   eval_interval=iters, quiet=True, out_dir=str(out_dir))


def main(cfg):
    if not cfg.compare:
        raise ConfigError("--compare is empty: give the variants to compare, e.g. --compare=\"batch_size=16;batch_size=32\"")
    device = resolve_device(cfg.device)
    variants = parse_variants(cfg.compare, cfg)
    tokens_per_second(cfg, resolve_dtype(cfg.dtype, device, cfg.dim), device)     # untimed: warms the process up
    iterations_per_s = [tokens_per_second(v, resolve_dtype(v.dtype, device, v.dim), device)[0]
                        / (v.batch_size * v.block_size * v.gradient_accumulation_steps) for _, v in variants]
    rows = []
    print("| settings | iterations | wall s | train loss | val loss |\n|---|---|---|---|---|")
    for i, ((label, variant), speed) in enumerate(zip(variants, iterations_per_s)):
        run = sized_run(variant, speed, cfg.minutes, Path(cfg.out_dir) / f"variant{i}")
        t0 = time.perf_counter()
        last = train(run)[-1]
        r = dict(settings=label, iterations=run.max_iters, wall_s=round(time.perf_counter() - t0, 1),
                 train_loss=last["train_loss"], val_loss=last["val_loss"])
        rows.append(r)
        print(f"| {label} | {r['iterations']} | {r['wall_s']} | {r['train_loss']:.3f} | {r['val_loss']:.3f} |", flush=True)
        report = json.dumps(dict(minutes=cfg.minutes, rows=rows), indent=1)      # after each variant, so that
        atomic_write(Path(cfg.out_dir) / "equal_time.json", lambda tmp: tmp.write_text(report))  # a stopped run keeps them
    return rows


if __name__ == "__main__":
    exit_if_help(sys.argv[1:], __doc__, EqualTimeConfig(), more_comments=(ModelConfig,))
    try:
        main(configure(EqualTimeConfig(), sys.argv[1:]))
    except ConfigError as e:
        sys.exit(f"error: {e}")
