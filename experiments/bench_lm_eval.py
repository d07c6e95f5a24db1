"""
PIQA throughput (examples/s) of eval.py against lm-evaluation-harness on the same model and examples: lm-eval's
own `hf` backend (transformers) and ours (`nanomobilellm`, lm_eval_adapter.py). The model must be a Hugging Face
dir or repo id, the one format both load (ours through hf.py); lm-eval's hf backend needs `pip install accelerate`.

  python experiments/bench_lm_eval.py --init_from=facebook/MobileLLM-125M --data=../shared/data/piqa/valid.jsonl --limit=200

Every runner scores the first --limit examples at the same batch size, device and autocast dtype; the time is the
whole evaluation (building and tokenizing requests, scoring, metrics) after the model is loaded. acc and acc_norm
are printed beside it: the three should agree (up to float noise on near ties).
"""
import argparse
import sys
import time
from pathlib import Path

import lm_eval
import torch
import yaml
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # eval.py and the adapter live at the repo root
import eval as ev  # noqa: E402
import lm_eval_adapter  # noqa: E402
from loader import DTYPES, dtype_name, load_model_and_tokenizer, torch_dtype  # noqa: E402

PIQA_TASK = Path(__file__).resolve().parents[1] / "lm_eval_tasks" / "piqa_local.yaml"


def piqa_task(data):
    """lm_eval_tasks/piqa_local.yaml reading data (a task config as a dict, which simple_evaluate takes)."""
    config = yaml.safe_load(PIQA_TASK.read_text())
    config["dataset_kwargs"]["data_files"]["validation"] = str(Path(data).resolve())
    return config


def time_eval_py(args):
    model, tokenizer = load_model_and_tokenizer(args.init_from, device=args.device)
    examples = ev.build_examples("piqa", ev.read_jsonl(args.data)[:args.limit], args.data)
    t0 = time.perf_counter()
    r = ev.evaluate(model, tokenizer, "piqa", examples, args.batch_size, args.device, torch_dtype(args.dtype))
    return r["n"], time.perf_counter() - t0, r["acc"], r["acc_norm"]


def time_lm_eval(lm, args):
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=[piqa_task(args.data)], limit=args.limit,
                                  task_manager=TaskManager(include_defaults=False))
    seconds = time.perf_counter() - t0
    r = out["results"]["piqa_local"]
    return out["n-samples"]["piqa_local"]["effective"], seconds, r["acc,none"], r["acc_norm,none"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--init_from", required=True, help="a Hugging Face model dir or repo id")
    parser.add_argument("--data", required=True, help="PIQA validation jsonl (goal, sol1, sol2, label)")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", type=dtype_name, choices=DTYPES, help="autocast dtype")
    args = parser.parse_args()
    autocast = None if args.dtype == "fp32" else str(torch_dtype(args.dtype)).removeprefix("torch.")
    runs = {
        "eval.py": lambda: time_eval_py(args),
        "lm-eval nanomobilellm": lambda: time_lm_eval(lm_eval_adapter.NanoMobileLLM(
            args.init_from, args.device, args.dtype, args.batch_size), args),
        "lm-eval hf": lambda: time_lm_eval(HFLM(pretrained=args.init_from, device=args.device, dtype="float32",
                                                mixed_precision_dtype=autocast, batch_size=args.batch_size), args),
    }
    print(f"| runner | n | seconds | examples/s | acc | acc_norm |   ({args.init_from}, {args.device}, "
          f"{args.dtype}, batch {args.batch_size})\n|---|---|---|---|---|---|")
    for name, run in runs.items():
        n, seconds, acc, acc_norm = run()
        print(f"| {name} | {n} | {seconds:.1f} | {n / seconds:.2f} | {acc:.3f} | {acc_norm:.3f} |", flush=True)


if __name__ == "__main__":
    main()
