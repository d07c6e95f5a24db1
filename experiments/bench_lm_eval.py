r"""
PIQA through eval.py and lm-evaluation-harness on the same model and examples, compared example by example,
with the throughput (examples/s) of each: lm-eval's own `hf` backend (transformers) and ours (`nanomobilellm`,
lm_eval_adapter.py). For all three runners the model must be a Hugging Face dir or repo id, the one format both
load (`python export.py --init_from=model.gguf --format=hf --out=out-hf` writes one); lm-eval's hf backend needs
accelerate.

  python experiments/bench_lm_eval.py --init_from=out-hf --data=../shared/data/piqa/valid.jsonl
  python experiments/bench_lm_eval.py --init_from=out-w8a8 --data=../shared/data/piqa/valid.jsonl \
      --runners=eval.py,nanomobilellm --simulate_int8

Every runner scores the first --limit examples (default: all) at the same batch size, device and autocast dtype;
the time is the whole evaluation (building and tokenizing requests, scoring, metrics) after the model is loaded.
Beside acc and acc_norm, each row counts the examples whose acc (acc_norm) outcome differs from eval.py's.
"""
import argparse
import sys
import time
from pathlib import Path

import lm_eval
import yaml
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # eval.py and the adapter live at the repo root
import eval as ev  # noqa: E402
import lm_eval_adapter  # noqa: E402
from checkpoint import CheckpointError  # noqa: E402
from configurator import at_least  # noqa: E402
from loader import DTYPES, dtype_name, load_model_and_tokenizer, resolve_device, torch_dtype  # noqa: E402
from int8 import set_simulate  # noqa: E402

PIQA_TASK = Path(__file__).resolve().parents[1] / "lm_eval_tasks" / "piqa_local.yaml"


def piqa_task(data):
    """lm_eval_tasks/piqa_local.yaml reading data (a task config as a dict, which simple_evaluate takes)."""
    config = yaml.safe_load(PIQA_TASK.read_text())
    config["dataset_kwargs"]["data_files"]["validation"] = str(Path(data).resolve())
    return config


def time_eval_py(args):
    """-> (seconds, acc, acc_norm, [(acc, acc_norm) of each example])"""
    model, tokenizer = load_model_and_tokenizer(args.init_from, device=args.device)
    examples = ev.build_examples("piqa", ev.read_jsonl(args.data)[:args.limit], args.data)
    set_simulate(model, args.simulate_int8)
    outcomes = []
    t0 = time.perf_counter()
    dtype = torch_dtype(args.dtype)
    r = ev.evaluate(model, tokenizer, "piqa", examples, args.batch_size, args.device, dtype, outcomes)
    if r["skipped"]:
        sys.exit(f"eval.py skipped {r['skipped']} examples its tokenizer cannot encode: no example-by-example "
                 "comparison")
    return time.perf_counter() - t0, r["acc"], r["acc_norm"], outcomes


def time_lm_eval(lm, args):
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=[piqa_task(args.data)], limit=args.limit, log_samples=True,
                                  task_manager=TaskManager(include_defaults=False))
    seconds = time.perf_counter() - t0
    r = out["results"]["piqa_local"]
    samples = sorted(out["samples"]["piqa_local"], key=lambda s: s["doc_id"])
    return seconds, r["acc,none"], r["acc_norm,none"], [(int(s["acc"]), int(s["acc_norm"])) for s in samples]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--init_from", required=True, help="a Hugging Face model dir or repo id (or, without the "
                                                           "hf runner, anything loader.py loads)")
    parser.add_argument("--data", required=True, help="PIQA validation jsonl (goal, sol1, sol2, label)")
    parser.add_argument("--limit", type=at_least(1), default=None, help="the first N examples (default: all)")
    parser.add_argument("--batch_size", type=at_least(1), default=16)
    parser.add_argument("--device", default="auto", help="auto: CUDA where there is one, else cpu")
    parser.add_argument("--dtype", default="fp32", type=dtype_name, choices=DTYPES, help="autocast dtype")
    parser.add_argument("--simulate_int8", action="store_true",
                        help="as eval.py --simulate_int8 (eval.py, nanomobilellm)")
    parser.add_argument("--runners", default="eval.py,nanomobilellm,hf",
                        help="eval.py (always first), nanomobilellm, hf")
    args = parser.parse_args()
    args.device = resolve_device(args.device)
    autocast = None if args.dtype == "fp32" else str(torch_dtype(args.dtype)).removeprefix("torch.")
    runs = {
        "eval.py": lambda: time_eval_py(args),
        "nanomobilellm": lambda: time_lm_eval(lm_eval_adapter.NanoMobileLLM(
            args.init_from, args.device, args.dtype, args.batch_size, args.simulate_int8), args),
        "hf": lambda: time_lm_eval(HFLM(pretrained=args.init_from, device=args.device, dtype="float32",
                                        mixed_precision_dtype=autocast, batch_size=args.batch_size), args),
    }
    names = ["eval.py"] + [r for r in args.runners.split(",") if r and r != "eval.py"]
    if unknown := [r for r in names if r not in runs]:
        sys.exit(f"unknown runner(s) {', '.join(unknown)}: choose from {', '.join(runs)}")
    print(f"| runner | n | seconds | examples/s | acc | acc_norm | acc (acc_norm) outcomes unlike eval.py's |   "
          f"({args.init_from}, {args.device}, {args.dtype}, batch {args.batch_size})\n|---|---|---|---|---|---|---|")
    reference = None
    for name in names:
        seconds, acc, acc_norm, outcomes = runs[name]()
        reference = reference or outcomes
        if len(outcomes) != len(reference):
            sys.exit(f"{name} scored {len(outcomes)} examples, eval.py {len(reference)}")
        differ = [sum(a[k] != b[k] for a, b in zip(outcomes, reference)) for k in (0, 1)]
        label = name if name == "eval.py" else f"lm-eval --model {name}"
        print(f"| {label} | {len(outcomes)} | {seconds:.1f} | {len(outcomes) / seconds:.2f} | {acc:.4f} | "
              f"{acc_norm:.4f} | {differ[0]} ({differ[1]}) |", flush=True)


if __name__ == "__main__":
    try:
        main()
    except (ev.EvalError, CheckpointError, ValueError, OSError) as e:       # bad data, a model that does not load
        sys.exit(f"bench_lm_eval.py: {e}")
