"""
Zero-shot common-sense evaluation: the paper's Table 3 (ARC-easy, ARC-challenge, BoolQ, PIQA, SIQA,
HellaSwag, OBQA, WinoGrande) for our checkpoints, int8 checkpoints and Meta's released weights.

Every task is multiple choice. Each choice is scored by the log-likelihood the model gives its text
(the continuation) after the question (the context); the highest wins. As lm-evaluation-harness defines them:
  acc       argmax of the summed log-likelihoods
  acc_norm  argmax of the log-likelihoods divided by each choice's length in characters (the choice text
            without its leading space; the harness's `completion_len`, equal to bytes for ASCII text)
The contexts, choices and splits are the harness's (v0.4 task configs), e.g. PIQA scores " {sol}" after
"Question: {goal}\\nAnswer:", and WinoGrande scores the same sentence ending after each option filled in
("partial scoring"). Scoring is batched and KV-free: one forward per right-padded batch (a causal model
never looks right, so padding changes no score). A context longer than the model's block_size is cut from
the left; the continuation is kept whole, unless it alone is longer than block_size (its last block_size
tokens are scored). Both cuts are counted and printed.

Usage:
  python eval.py --init_from=facebook/MobileLLM-125M --tasks=piqa,hellaswag,arc_easy   # downloads the data
  python eval.py --init_from=out-shakespeare-char --tasks=piqa --data=../shared/data/piqa/valid.jsonl --limit=200
  python eval.py --init_from=out-gutenberg --tasks=piqa,boolq --data=piqa=piqa.jsonl,boolq=boolq.jsonl --out=r.json
"""
import argparse
import json
import math
import os
import re
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import CheckpointError, atomic_write
from configurator import HelpFormatter, at_least, usage_description
from int8 import set_simulate
from loader import (DTYPES, autocast, dtype_name, load_model_and_tokenizer, require_source, resolve_device,
                    resolve_dtype, torch_dtype, without_tokenizer)


class EvalError(Exception):
    """Bad input to the evaluation: an unknown task, a missing or malformed data file, data we cannot fetch."""


@dataclass
class Example:
    contexts: list        # one per choice (WinoGrande varies the context; other tasks repeat one)
    continuations: list   # the text scored after each context
    label: int            # index of the right choice
    norm_lengths: list    # what acc_norm divides each log-likelihood by


# --- task adapters: one dataset record (the Hugging Face dataset's fields) -> Example -------------------

def multiple_choice(context, choices, label):
    """The harness's default layout: one context, each choice scored as " " + choice."""
    return Example([context] * len(choices), [" " + c for c in choices], int(label), [len(c) for c in choices])


def piqa(doc):
    return multiple_choice(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], doc["label"])


def hellaswag_clean(text):
    """The harness's HellaSwag preprocessing: WikiHow's "[title]" becomes a sentence break, other [tags] go."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def hellaswag(doc):
    context = hellaswag_clean(f"{doc['activity_label']}: {doc['ctx_a']} {doc['ctx_b'].capitalize()}")
    return multiple_choice(context, [hellaswag_clean(e) for e in doc["endings"]], doc["label"])


def arc(doc):
    labels = doc["choices"]["label"]
    return multiple_choice(f"Question: {doc['question']}\nAnswer:", doc["choices"]["text"],
                           labels.index(doc["answerKey"]))


def boolq(doc):
    label = doc["label"] if "label" in doc else doc["answer"]   # super_glue's label (0/1) or google/boolq's answer
    return multiple_choice(f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", ["no", "yes"], int(label))


def siqa(doc):
    return multiple_choice(f"Q: {doc['context']} {doc['question']}\nA:",
                           [doc["answerA"], doc["answerB"], doc["answerC"]], int(doc["label"]) - 1)


def obqa(doc):
    labels = doc["choices"]["label"]
    return multiple_choice(doc["question_stem"], doc["choices"]["text"], labels.index(doc["answerKey"].strip()))


def winogrande(doc):
    """Partial scoring: the blank is filled with each option, and the same sentence ending is scored after it."""
    blank = doc["sentence"].index("_")
    contexts = [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]
    ending = " " + doc["sentence"][blank + 1:].strip()
    return Example(contexts, [ending, ending], {"1": 0, "2": 1}[str(doc["answer"])], [len(c) for c in contexts])


@dataclass
class Task:
    adapter: object
    dataset: str          # Hugging Face dataset id, config and split (the ones the harness evaluates)
    config: str
    split: str
    fields: str           # what a --data jsonl line must hold
    metrics: tuple = ("acc", "acc_norm")


TASKS = {   # in the paper's Table 3 column order
    "arc_easy": Task(arc, "allenai/ai2_arc", "ARC-Easy", "test", "question, choices {text, label}, answerKey"),
    "arc_challenge": Task(arc, "allenai/ai2_arc", "ARC-Challenge", "test",
                          "question, choices {text, label}, answerKey"),
    "boolq": Task(boolq, "google/boolq", "default", "validation", "passage, question, label (0/1) or answer (bool)",
                  ("acc",)),
    "piqa": Task(piqa, "baber/piqa", "default", "validation", "goal, sol1, sol2, label"),
    "siqa": Task(siqa, "allenai/social_i_qa", "default", "validation",
                 "context, question, answerA, answerB, answerC, label ('1'-'3')", ("acc",)),
    "hellaswag": Task(hellaswag, "Rowan/hellaswag", "default", "validation",
                      "activity_label, ctx_a, ctx_b, endings, label"),
    "obqa": Task(obqa, "allenai/openbookqa", "main", "test", "question_stem, choices {text, label}, answerKey"),
    "winogrande": Task(winogrande, "allenai/winogrande", "winogrande_xl", "validation",
                       "sentence (with one _), option1, option2, answer ('1'/'2')", ("acc",)),
}

# Zero-shot accuracy (%) the paper reports (Table 3; 600M-1.5B from Meta's MobileLLM README), same task order.
# The paper does not say whether each number is acc or acc_norm.
PAPER = {
    "mobilellm-125m": (43.9, 27.1, 60.2, 65.3, 42.4, 38.9, 39.5, 53.1),
    "mobilellm-ls-125m": (45.8, 28.7, 60.4, 65.7, 42.9, 39.5, 41.1, 52.1),
    "mobilellm-350m": (53.8, 33.5, 62.4, 68.6, 44.7, 49.6, 40.0, 57.6),
    "mobilellm-ls-350m": (54.4, 32.5, 62.8, 69.8, 44.1, 50.6, 45.8, 57.2),
    "mobilellm-600m": (58.1, 35.8, 61.0, 72.3, 44.9, 55.9, 47.9, 58.6),
    "mobilellm-1b": (63.0, 39.0, 66.7, 74.4, 45.0, 61.4, 46.8, 62.3),
    "mobilellm-1.5b": (67.5, 40.9, 65.7, 74.8, 46.4, 64.5, 50.5, 64.7),
}
ROWS_API = "https://datasets-server.huggingface.co/rows"
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nanomobilellm" / "eval"


def parse_tasks(text):
    names = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))    # a task named twice: once
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise EvalError(f"unknown task(s) {', '.join(unknown) or repr(text)}; choose from: {', '.join(TASKS)}")
    return names


def parse_data(text, tasks):
    """--data PATH (one task) or --data task=PATH,task=PATH -> {task: Path}."""
    if not text:
        return {}
    if "=" not in text:
        if len(tasks) != 1:
            raise EvalError(f"--data {text} names no task; with several tasks write --data task=PATH,task=PATH")
        return {tasks[0]: Path(text)}
    paths = dict(item.split("=", 1) for item in text.split(","))
    unknown = sorted(set(paths) - set(tasks))
    if unknown:
        raise EvalError(f"--data names task(s) not in --tasks: {', '.join(unknown)}")
    return {task: Path(path) for task, path in paths.items()}


# --- data: a local jsonl, or the public dataset fetched once and cached as jsonl ------------------------

def read_jsonl(path):
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"no data file at {path}")
    docs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                docs.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise EvalError(f"{path}, line {n}: not a JSON object ({e.msg}); the file must hold one per "
                                "line") from e
            if not isinstance(docs[-1], dict):
                raise EvalError(f"{path}, line {n}: not a JSON object; the file must hold one per line")
    return docs


def fetch_json(url, tries=3):
    """GET a JSON document, retrying twice (after 1 s, then 2 s) on network errors such as rate limits."""
    for attempt in range(tries):
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                return json.load(response)
        except OSError:
            if attempt == tries - 1:
                raise
            time.sleep(2 ** attempt)


def download(name):
    """All records of a task's split from the Hugging Face dataset viewer's rows API, 100 per request."""
    task, docs, total = TASKS[name], [], None
    with tqdm(desc=f"download {name}", unit="rows") as bar:
        while total is None or len(docs) < total:
            query = urllib.parse.urlencode(dict(dataset=task.dataset, config=task.config, split=task.split,
                                                offset=len(docs), length=100))
            try:
                page = fetch_json(f"{ROWS_API}?{query}")
                rows, total = page["rows"], page["num_rows_total"]
            except (OSError, ValueError, KeyError) as e:   # URLError/HTTPError/timeouts are OSErrors
                raise EvalError(f"could not download {name} ({task.dataset}, {task.split}) from {ROWS_API} "
                                f"({type(e).__name__}: {e}). Offline? Pass a local copy: --data {name}=PATH.jsonl "
                                f"(one JSON object per line with {task.fields})") from e
            if not rows:
                break
            docs += [r["row"] for r in rows]
            bar.total = total
            bar.update(len(rows))
    return docs


def load_docs(name, path=None):
    """A task's records: from path when given, else from the cache, else downloaded (and then cached)."""
    if path is not None:
        return read_jsonl(path)
    cached = CACHE_DIR / f"{name}.jsonl"
    if cached.is_file():
        return read_jsonl(cached)
    docs = download(name)
    text = "".join(json.dumps(d) + "\n" for d in docs)
    atomic_write(cached, lambda tmp: tmp.write_text(text, encoding="utf-8"))   # never half a cache file
    return docs


def build_examples(name, docs, path="the downloaded data"):
    task, examples = TASKS[name], []
    for n, doc in enumerate(docs, 1):
        try:
            examples.append(task.adapter(doc))
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            raise EvalError(f"{path}, record {n}: not a {name} record ({type(e).__name__}: {e}); "
                            f"{name} needs {task.fields}") from e
    return examples


# --- scoring --------------------------------------------------------------------------------------------

def encode_pair(tokenizer, context, continuation):
    """Token ids (context, continuation) split as the harness does: trailing spaces of the context move to
    the continuation, the pair is encoded whole and cut where the context's own encoding ends (so a BPE
    merge across the boundary is encoded as in running text). The tokenizer's BOS, if any, starts the context;
    an empty context without one is the end-of-text token, as in the harness."""
    stripped = context.rstrip(" ")
    context, continuation = stripped, context[len(stripped):] + continuation
    whole, ctx = tokenizer.encode(context + continuation), tokenizer.encode(context)
    start = tokenizer.bos_id if tokenizer.bos_id is not None else (None if ctx else tokenizer.eos_id)
    if start is None and not ctx:
        raise ValueError("an empty context, and the tokenizer has no BOS or EOS token to stand for it")
    return ([start] if start is not None else []) + ctx, whole[len(ctx):]


def window(ctx, cont, block_size):
    """(model input, continuation targets): the last block_size + 1 tokens, so a long context is cut from the
    left and the continuation kept whole. A continuation longer than block_size keeps its last block_size
    tokens (the only ones a window can score); the caller counts those."""
    tokens = (ctx + cont)[-(block_size + 1):]
    return tokens[:-1], cont[-block_size:]


@torch.no_grad()
def score(model, requests, batch_size=16, device="cpu", dtype=torch.float32, desc="score", greedy=False):
    """Log-likelihood of each continuation given its context. requests: [(ctx_ids, cont_ids)], where ctx_ids
    holds at least one token. Returns a list of floats in the order of requests; with greedy=True, a list of
    (log-likelihood, is_greedy) pairs, is_greedy telling whether greedy decoding would produce the (scored)
    continuation, as lm-evaluation-harness's loglikelihood returns them."""
    windows = [window(ctx, cont, model.config.block_size) for ctx, cont in requests]
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))   # similar lengths share a batch
    scores = [0.0] * len(requests)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        batch = order[start:start + batch_size]
        x = torch.zeros(len(batch), len(windows[batch[0]][0]), dtype=torch.long)   # (B, T), right-padded
        for row, i in enumerate(batch):
            x[row, :len(windows[i][0])] = torch.tensor(windows[i][0])
        with autocast(device, dtype):
            logits = model(x.to(device))[0]                                       # (B, T, V)
        sums, hits = [], []
        for row, i in enumerate(batch):
            inp, cont = windows[i]
            predicting = logits[row, len(inp) - len(cont):len(inp)].float()      # (len(cont), V)
            targets = torch.tensor(cont, device=predicting.device)
            sums.append(F.log_softmax(predicting, dim=-1).gather(1, targets[:, None]).sum())
            hits.append((predicting.argmax(dim=-1) == targets).all())
        for i, value, hit in zip(batch, torch.stack(sums).tolist(), torch.stack(hits).tolist()):   # one sync
            scores[i] = (value, hit) if greedy else value
    return scores


def argmax(values):
    return max(range(len(values)), key=values.__getitem__)   # the first of equal maxima, as np.argmax


def stderr(p, n):
    """Standard error of a mean of n 0/1 outcomes (the harness's sample-stddev / sqrt(n))."""
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")


def evaluate(model, tokenizer, name, examples, batch_size=16, device="cpu", dtype=torch.float32, outcomes=None):
    """Score a task's examples; returns its metrics. Examples the tokenizer cannot encode (a char-level vocabulary
    lacks digits, say) are skipped and counted. outcomes: a list to append each scored example's
    (acc, acc_norm) to, 1 or 0 (to compare runners example by example)."""
    requests, kept, skipped = [], [], 0
    for ex in examples:
        try:
            pairs = [encode_pair(tokenizer, c, k) for c, k in zip(ex.contexts, ex.continuations)]
        except ValueError:
            skipped += 1
            continue
        requests += pairs
        kept.append(ex)
    if not kept:
        raise EvalError(f"{name}: the tokenizer cannot encode any of the {len(examples)} examples")
    block = model.config.block_size
    t0 = time.perf_counter()
    lls = score(model, requests, batch_size, device, dtype, desc=name)
    seconds = time.perf_counter() - t0
    scored, i = [], 0                                  # (acc, acc_norm) of each kept example, 1 or 0
    for ex in kept:
        ll = lls[i:i + len(ex.continuations)]
        i += len(ex.continuations)
        scored.append((int(argmax(ll) == ex.label),
                       int(argmax([v / max(length, 1) for v, length in zip(ll, ex.norm_lengths)]) == ex.label)))
    if outcomes is not None:
        outcomes.extend(scored)
    correct, correct_norm = map(sum, zip(*scored))
    n = len(kept)
    result = dict(n=n, skipped=skipped, acc=correct / n, acc_stderr=stderr(correct / n, n))
    if "acc_norm" in TASKS[name].metrics:
        result.update(acc_norm=correct_norm / n, acc_norm_stderr=stderr(correct_norm / n, n))
    tokens = sum(len(window(c, k, block)[0]) for c, k in requests)
    result.update(truncated_contexts=sum(len(c) + len(k) > block + 1 for c, k in requests),
                  truncated_continuations=sum(len(k) > block for _, k in requests),
                  seconds=seconds, examples_per_s=n / seconds, tokens_per_s=tokens / seconds)
    return result


# --- report ---------------------------------------------------------------------------------------------

def paper_row(init_from):
    """(name, {task: accuracy}) the paper reports for the model init_from names (facebook/MobileLLM-125M,
    facebook/MobileLLM-350M-layer-share, ...), else (None, None)."""
    match = re.search(r"mobilellm-(ls-)?(125m|350m|600m|1\.5b|1b)(-layer-share)?", Path(str(init_from)).name.lower())
    if not match:
        return None, None
    key = f"mobilellm-{'ls-' if match.group(1) or match.group(3) else ''}{match.group(2)}"
    return (key, dict(zip(TASKS, PAPER[key]))) if key in PAPER else (None, None)


def markdown_table(results, paper_name=None, paper=None):
    head = "| task | n | acc (%) | acc_norm (%) |" + (f" paper: {paper_name} (%) |" if paper else "")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in results.items():
        norm = f"{100 * r['acc_norm']:.1f} ± {100 * r['acc_norm_stderr']:.1f}" if "acc_norm" in r else "-"
        row = f"| {name} | {r['n']} | {100 * r['acc']:.1f} ± {100 * r['acc_stderr']:.1f} | {norm} |"
        rows.append(row + (f" {paper[name]:.1f} |" if paper else ""))
    return "\n".join(rows)


def check_out(out):
    """--out, checked before any work: a file that can be written, whose folder is made when it is."""
    if out.is_dir():
        raise EvalError(f"--out {out} is a folder: give the .json file to write")
    existing = next(p for p in out.resolve().parents if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise EvalError(f"--out {out}: cannot make its folder ({existing} is " +
                        ("a file)" if not existing.is_dir() else "not writable)"))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=usage_description(__doc__), formatter_class=HelpFormatter)
    parser.add_argument("--init_from", required=True, help="our checkpoint (dir or file), an int8 checkpoint, "
                        "a GGUF file, or a Hugging Face repo id / local HF dir")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from: {', '.join(TASKS)}")
    parser.add_argument("--data", default=None, help="local jsonl: PATH (one task) or task=PATH,task=PATH; "
                        "without it the data is downloaded once and cached in " + str(CACHE_DIR))
    parser.add_argument("--limit", type=at_least(1), default=None, help="score only the first N examples of each task")
    parser.add_argument("--batch_size", type=at_least(1), default=16,
                        help="sequences (context + one choice) per forward")
    parser.add_argument("--device", default="auto", help="auto: CUDA where there is one, else cpu")
    parser.add_argument("--dtype", default="auto", type=dtype_name, choices=(*DTYPES, "auto"),
                        help="autocast dtype of the forward (log-probs are always summed in fp32); auto: bf16 where "
                             "the hardware has it and it pays, else fp32 (loader.resolve_dtype)")
    parser.add_argument("--simulate_int8", action="store_true",
                        help="an int8 checkpoint's W8A8 products in float on the int8 values (int8.py's fake-quant "
                             "path: the same rounding, scores equal up to float error), for CPUs whose int8 matmul "
                             "is slow (docs/quantization.md)")
    parser.add_argument("--out", default="out-eval/results.json", help="where the JSON results go")
    args = parser.parse_args(argv)
    try:
        tasks = parse_tasks(args.tasks)
        paths = parse_data(args.data, tasks)
        args.device = resolve_device(args.device)
        require_source(args.init_from)
        out = check_out(Path(args.out))         # checked now, not after the first task's scoring
        examples = {}
        for name in tasks:       # read every task's data before the model, so a bad file fails fast
            docs = load_docs(name, paths.get(name))[:args.limit]
            examples[name] = build_examples(name, docs, paths.get(name, "the downloaded data"))
    except (EvalError, CheckpointError, ValueError) as e:      # ValueError: ConfigError, a preset model.py refuses
        sys.exit(f"eval.py: {e}")
    try:
        model, tokenizer = load_model_and_tokenizer(args.init_from, device=args.device)
    except (CheckpointError, ValueError, RuntimeError, OSError) as e:   # hf.py and hub downloads raise the last 3
        sys.exit(f"eval.py: cannot load {args.init_from}: {e}")
    if tokenizer is None:
        sys.exit(f"eval.py: {without_tokenizer(args.init_from)}: give a trained model with its tokenizer")
    if args.simulate_int8:
        set_simulate(model, True)
    args.dtype = resolve_dtype(args.dtype, args.device, model.config.dim)
    dtype = torch_dtype(args.dtype)
    paper_name, paper = paper_row(args.init_from)
    results = {}
    for name in tasks:        # each task's line and the JSON report as it finishes: a stopped run keeps those done
        try:
            r = evaluate(model, tokenizer, name, examples[name], args.batch_size, args.device, dtype)
        except KeyboardInterrupt:
            print(f"\neval.py: stopped during {name}; " + (f"{', '.join(results)} in {out}" if results else
                                                           "no task had finished, nothing written"), file=sys.stderr)
            sys.exit(130)
        results[name] = r
        print(f"{name}: {r['n']} examples ({r['skipped']} skipped: not encodable) in {r['seconds']:.1f} s, "
              f"{r['examples_per_s']:.2f} examples/s, {r['tokens_per_s']:.0f} tokens/s; "
              f"{r['truncated_contexts']} contexts and {r['truncated_continuations']} choices cut to block_size "
              "(counted per choice)")
        report = dict(init_from=str(args.init_from), device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                      limit=args.limit, simulate_int8=args.simulate_int8, torch=torch.__version__, results=results,
                      paper={paper_name: paper} if paper else None)
        atomic_write(out, lambda tmp: tmp.write_text(json.dumps(report, indent=2) + "\n"))
    print(markdown_table(results, paper_name, paper))
    print(f"results written to {out}")
    return results


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:                   # Ctrl-C before or between the tasks: no traceback
        print("\neval.py: stopped (the tasks that finished, if any, are in the --out report)", file=sys.stderr)
        sys.exit(130)
