"""
The paper's design findings (MobileLLM §2.2-§2.3), re-run at a tiny, equal parameter budget on a CPU.

Every study trains the models it compares on the same data with train.py's train(), for >= 2 seeds,
and writes experiments/results/<study>.json (configs, parameter counts, every eval record, summary)
and experiments/results/<study>.png (validation loss curves and final loss per model, seed spread).

  python experiments/ablations.py --study swiglu              # one study: 6-8 runs of 300 iterations
  python experiments/ablations.py --study all                 # all five, one after the other
  python experiments/ablations.py --study all --quick         # all five, tiny models (for tests)
  python experiments/ablations.py --study layer_sharing --cpu_lock /tmp/nml-cpu.lock
  python experiments/ablations.py --markdown                  # docs/ablations.md's tables from the results

Studies (paper section: what is compared, at equal parameters unless said otherwise):
  swiglu             §2.2.1  SwiGLU FFN vs the plain 2-matrix ReLU and GELU MLPs (ffn_dim evened out)
  depth              §2.2.2  2, 4, 8, 16 layers: deep-and-thin vs wide-and-shallow (width evened out)
  embedding_sharing  §2.2.3  untied vs tied embeddings, and tied with the saved parameters re-invested
                             as extra layers (the tied model of the same depth is the smaller reference)
  gqa                §2.2.4  MHA (4 KV heads) vs GQA (2) vs MQA (1) (ffn_dim evened out)
  layer_sharing      §2.3    no sharing vs immediate, repeat_all and reverse block-wise sharing (same
                             weights, double depth), plus decode ms/token of shared blocks vs an unshared
                             stack of the same depth, at the study's size and at the paper's 125M size
A finished (variant, seed) run is kept in the JSON, so a killed study resumes where it stopped.
--cpu_lock PATH takes a shared flock on PATH while training and an exclusive one while timing decode.
Training uses one thread (--threads); decode timing uses every core.
"""
import argparse
import bisect
import fcntl
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # model.py and train.py live at the repo root
from checkpoint import atomic_write  # noqa: E402
from configurator import at_least  # noqa: E402
from measure import eager_decode_ms  # noqa: E402
from model import MobileLLM, ModelConfig, config_from_preset  # noqa: E402

STUDIES = ("swiglu", "depth", "embedding_sharing", "gqa", "layer_sharing")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
DATA_DIR = Path(__file__).resolve().parents[1] / "data"
PARAM_TOLERANCE = 0.02      # models said to have equal parameters differ by at most 2%

# The shared base model of every study: MobileLLM's shape (SwiGLU, GQA, tied embeddings) made tiny.
BASE = {
    "full": dict(dim=64, n_layers=6, n_heads=4, n_kv_heads=2, ffn_dim=176),
    "quick": dict(dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=44),
}
# Training settings (train.py's TrainConfig names). fp32: for these tiny matrices bf16 autocast is
# slower, not faster (see docs/ablations.md).
TRAIN = {
    "full": dict(max_iters=300, eval_interval=60, eval_iters=10, batch_size=16, block_size=64,
                 learning_rate=2e-3, warmup_iters=20, min_lr=2e-4, dtype="fp32", optimizer="adamw"),
    "quick": dict(max_iters=4, eval_interval=4, eval_iters=1, batch_size=2, block_size=16,
                  learning_rate=2e-3, warmup_iters=1, min_lr=2e-4, dtype="fp32", optimizer="adamw"),
}
ALL_THREADS = torch.get_num_threads()   # decode timing uses every core (it runs alone, under the exclusive lock)
SEEDS = (0, 1)                          # every study runs each variant with each seed, in both sizes
DATASETS = {"embedding_sharing": "shakespeare"}    # GPT-2 BPE; every other study is character level
DEFAULT_DATASET = "shakespeare_char"

# What the paper reports, quoted from the sources named in docs/ablations.md (nothing here is our measurement).
PAPER = {
    "swiglu": "SwiGLU is found beneficial for small models too (§2.2.1).",
    "depth": "For small models, going deeper matters more than going wider: deep-and-thin beats "
             "wide-and-shallow at the same parameter count (§2.2.2).",
    "embedding_sharing": "On the 30-layer 125M model, sharing input and output embeddings saves 16M "
                         "parameters (11.8%) for a 0.2-point drop in average accuracy, restored by "
                         "re-allocating the saved parameters to more layers (§2.2.3).",
    "gqa": "MobileLLM uses grouped-query attention: fewer key/value heads than query heads (§2.2.4).",
    "layer_sharing": "Immediate block-wise sharing adds depth at no extra weights (MobileLLM-LS: +0.7/+0.8 "
                     "points over 125M/350M) with only marginal latency overhead, because the repeated "
                     "block is still in cache (§2.3, Table 7).",
}


# --- models at an equal parameter budget ------------------------------------------------------

def count_params(cfg):
    """Parameters of MobileLLM(cfg), built on the meta device (no memory, no time)."""
    with torch.device("meta"):
        return MobileLLM(ModelConfig(**cfg)).num_params()


def with_ffn_for(cfg, target):
    """cfg with the ffn_dim whose parameter count is closest to target (parameters are linear in ffn_dim)."""
    p1, p2 = count_params({**cfg, "ffn_dim": 1}), count_params({**cfg, "ffn_dim": 2})
    return {**cfg, "ffn_dim": max(1, round(1 + (target - p1) / (p2 - p1)))}


def width_for(cfg, n_layers, target):
    """The (dim, ffn_dim) of an n_layers model with target parameters whose FFN ratio is closest to cfg's:
    widths step by 2 * n_heads so head dims stay even; ffn_dim absorbs the rest of the budget."""
    ratio, step = cfg["ffn_dim"] / cfg["dim"], 2 * cfg["n_heads"]
    dims = list(range(step, 4 * cfg["dim"] + 1, step))

    def shaped(d):
        return {**cfg, "n_layers": n_layers, "dim": d, "ffn_dim": max(1, round(ratio * d))}

    # at cfg's FFN ratio parameters grow with width: bisect for the two widths around target
    i = bisect.bisect_left(dims, target, key=lambda d: count_params(shaped(d)))
    candidates = [with_ffn_for(shaped(d), target) for d in dims[max(0, i - 1):i + 1]]
    return min(candidates, key=lambda c: abs(math.log(c["ffn_dim"] / c["dim"] / ratio)))


def variant(name, cfg, equal_params=True):
    """One compared model (every ModelConfig field spelled out); equal_params=False marks a reference
    outside the study's equal budget."""
    return dict(name=name, config=asdict(ModelConfig(**cfg)), equal_params=equal_params)


def study_variants(study, base):
    """The models a study compares. base already holds vocab_size and block_size."""
    target = count_params(base)
    if study == "swiglu":
        return [variant("SwiGLU", base)] + [variant(f"{label} MLP", with_ffn_for({**base, "ffn_type": act}, target))
                                             for act, label in (("relu", "ReLU"), ("gelu", "GELU"))]
    if study == "depth":
        depths = [1, 2, 4] if base["dim"] < 32 else [2, 4, 8, 16]
        return [variant(f"{n} layer{'s' * (n > 1)}", width_for(base, n, target)) for n in depths]
    if study == "embedding_sharing":
        untied = {**base, "tie_embeddings": False}
        saved = count_params(untied) - target
        per_layer = count_params({**base, "n_layers": base["n_layers"] + 1}) - target
        extra = round(saved / per_layer)
        deeper = with_ffn_for({**base, "n_layers": base["n_layers"] + extra}, count_params(untied))
        return [variant(f"untied, {base['n_layers']} layers", untied),
                variant(f"tied, {base['n_layers']} layers", base, equal_params=False),
                variant(f"tied, {deeper['n_layers']} layers (saved params -> depth)", deeper)]
    if study == "gqa":
        heads = base["n_heads"]
        kv_counts = [k for k in range(heads, 0, -1) if heads % k == 0]
        label = {heads: "MHA", 1: "MQA"}
        return [variant(f"{label.get(k, 'GQA')} ({k} KV heads)", with_ffn_for({**base, "n_kv_heads": k}, target))
                for k in kv_counts]
    if study == "layer_sharing":
        return [variant("no sharing", base)] + [
            variant(f"{share} x2", {**base, "share": share, "share_repeats": 2})
            for share in ("immediate", "repeat_all", "reverse")]
    raise ValueError(f"unknown study {study!r}; choose from: {', '.join(STUDIES)} or all")


def describe(cfg):
    """Parameter counts (total; without the input and output embeddings) and depth of a config."""
    c = ModelConfig(**cfg)
    with torch.device("meta"):
        m = MobileLLM(c)
        n, n_body = m.num_params(), m.num_params(exclude_embedding=True)
    return dict(params=n, non_embedding_params=n_body if c.tie_embeddings else n_body - c.vocab_size * c.dim,
                depth=c.depth, unique_layers=c.n_layers)


def check_equal_params(variants):
    """The equal-budget models of a study must differ by at most PARAM_TOLERANCE."""
    counts = [v["params"] for v in variants if v["equal_params"]]
    spread = (max(counts) - min(counts)) / min(counts)
    if spread > PARAM_TOLERANCE:
        raise AssertionError(f"equal-budget models differ by {spread:.1%} in parameters: {counts}")
    return spread


# --- data -----------------------------------------------------------------------------------

def dataset_meta(data_dir):
    meta_file = Path(data_dir) / "meta.json"
    if not meta_file.is_file():
        raise SystemExit(f"{meta_file} is missing: run `python data/{Path(data_dir).name}/prepare.py` first "
                         "(offline: with --input PATH)")
    return json.loads(meta_file.read_text())


def top_k_dataset(src, vocab, out_dir):
    """The dataset in folder src re-tokenized to its vocab - 1 most frequent training tokens plus one
    shared "other" id, written as out_dir/{train,val}.bin + meta.json. With the full 50k GPT-2 vocabulary
    a dim-64 model is 92% embedding; trimmed to 2048, tying saves 24% of the untied model (the paper:
    11.8% of its 125M model), so re-investing the saved parameters means a few layers, not sixty."""
    src = Path(src)
    train_ids = np.fromfile(src / "train.bin", dtype=np.uint16)
    counts = np.bincount(train_ids, minlength=dataset_meta(src)["vocab_size"])
    keep = np.argsort(-counts, kind="stable")[:vocab - 1]
    new_id = np.full(len(counts), vocab - 1, dtype=np.uint16)                # everything else -> "other"
    new_id[keep] = np.arange(vocab - 1, dtype=np.uint16)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        new_id[np.fromfile(src / f"{split}.bin", dtype=np.uint16)].tofile(out_dir / f"{split}.bin")
    covered = counts[keep].sum() / counts.sum()
    meta = {"vocab_size": vocab, "tokenizer": {"kind": "top_k", "source": src.name, "kept_ids": keep.tolist()},
            "train_coverage": float(covered)}
    (out_dir / "meta.json").write_text(json.dumps(meta))
    return meta


# --- training ---------------------------------------------------------------------------------

@contextmanager
def cpu_lock(path, exclusive):
    """flock on path (shared while training, exclusive while timing), fair to exclusive jobs through the
    turnstile file beside it (path with suffix .turnstile): an exclusive job holds the turnstile while it
    waits and runs, a shared one only passes through, so it queues behind a waiting exclusive job instead
    of starving it. A no-op without a path."""
    if path is None:
        yield
        return
    with open(Path(path).with_suffix(".turnstile"), "a") as turnstile, open(path, "a") as lock:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        if not exclusive:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            fcntl.flock(turnstile, fcntl.LOCK_UN)


def train_one(cfg, seed, settings, data_dir):
    """Train one model with train.py; returns its eval records (iter, train_loss, val_loss, ...)."""
    from train import TrainConfig, train
    trainable = {f.name for f in fields(TrainConfig)}
    model_fields = {k: v for k, v in asdict(ModelConfig(**cfg)).items() if k in trainable}   # vocab: meta.json
    with tempfile.TemporaryDirectory(prefix="ablation-") as out_dir:
        return train(TrainConfig(**{**model_fields, **settings}, data_dir=str(data_dir), out_dir=out_dir,
                                 seed=seed, quiet=True))


def summarize(runs, variants):
    """Final validation loss per variant over seeds: mean, std, min, max."""
    rows = []
    for v in variants:
        finals = [r["final_val_loss"] for r in runs if r["variant"] == v["name"]]
        if finals:
            rows.append(dict(variant=v["name"], params=v["params"], depth=v["depth"], seeds=len(finals),
                             mean=statistics.mean(finals), std=statistics.stdev(finals) if len(finals) > 1 else 0.0,
                             min=min(finals), max=max(finals)))
    return rows


# --- decode latency (layer sharing, the paper's Table 7) ---------------------------------------

def decode_ms_per_token(cfg, n_tokens, repeats, prompt_len=8):
    """Greedy one-token decode steps through the KV cache, batch 1, fp32: median of repeats, in ms/token
    (measure.eager_decode_ms). Weights are random: speed does not depend on their values."""
    torch.manual_seed(0)
    return eager_decode_ms(MobileLLM(ModelConfig(**cfg)).eval(), prompt_len, n_tokens, repeats)


def latency_models(base, quick):
    """(size label, [(name, config)]): the unshared model, its immediate-shared twin (same weights, double
    depth) and the unshared stack of that double depth (same compute, double weights); at the study's
    size and, in full mode, at the paper's 125M size."""
    sizes = [("study size", base)]
    if not quick:
        sizes.append(("MobileLLM-125M size", {**asdict(config_from_preset("mobilellm-125m")), "block_size": 256}))
    out = []
    for label, cfg in sizes:
        n = cfg["n_layers"]
        shared = {**cfg, "share": "immediate", "share_repeats": 2}
        out.append((label, [(f"{n} layers", {**cfg, "share": "none"}),
                            (f"{n} layers, immediate x2 (depth {2 * n})", shared),
                            (f"{2 * n} layers", {**cfg, "share": "none", "n_layers": 2 * n})]))
    return out


def measure_latency(base, quick):
    n_tokens, repeats = (4, 1) if quick else (32, 3)
    training_threads = torch.get_num_threads()
    torch.set_num_threads(ALL_THREADS)
    rows = []
    for label, models in latency_models(base, quick):
        for name, cfg in tqdm(models, desc=f"decode timing ({label})"):
            ms = decode_ms_per_token(cfg, n_tokens, repeats)
            info = describe(cfg)
            rows.append(dict(size=label, model=name, ms_per_token=ms, params=info["params"], depth=info["depth"],
                             weight_mb_fp32=info["params"] * 4 / 1e6, threads=torch.get_num_threads()))
    torch.set_num_threads(training_threads)
    return rows


# --- results: JSON and plot --------------------------------------------------------------------

def write_json(obj, path):
    """Atomic: a killed run leaves the previous file, never half of one."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1)))


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    latency = result.get("latency")
    fig, axes = plt.subplots(1, 3 if latency else 2, figsize=(15 if latency else 10, 4))
    curves, finals = axes[0], axes[1]
    for i, row in enumerate(result["summary"]):
        runs = [r for r in result["runs"] if r["variant"] == row["variant"]]
        iters = [rec["iter"] for rec in runs[0]["records"]]
        losses = np.array([[rec["val_loss"] for rec in r["records"]] for r in runs])      # (seeds, evals)
        color = f"C{i}"
        curves.plot(iters, losses.mean(0), color=color, label=f"{row['variant']} ({row['params'] / 1e3:.0f}k)")
        curves.fill_between(iters, losses.min(0), losses.max(0), color=color, alpha=0.2)
        finals.bar(i, row["mean"], color=color, alpha=0.6)
        finals.plot([i] * len(runs), [r["final_val_loss"] for r in runs], "k.")
    curves.set(xlabel="iteration", ylabel="validation loss", title="val loss (mean, band = seed min..max)")
    curves.set_ylim(top=min(curves.get_ylim()[1], 1.5 * max(r["max"] for r in result["summary"])))
    curves.legend(fontsize=7)
    low = min(r["min"] for r in result["summary"])
    high = max(r["max"] for r in result["summary"])
    finals.set_ylim(low - 0.6 * (high - low + 1e-3), high + 0.4 * (high - low + 1e-3))
    finals.set_xticks(range(len(result["summary"])), [r["variant"] for r in result["summary"]],
                      rotation=20, ha="right", fontsize=7)
    finals.set(ylabel="final validation loss", title="final val loss (bar = mean, dots = seeds)")
    if latency:
        ax = axes[2]
        sizes = list(dict.fromkeys(r["size"] for r in latency))
        for s, size in enumerate(sizes):
            rows = [r for r in latency if r["size"] == size]
            for j, r in enumerate(rows):
                x = s * (len(rows) + 1) + j
                ratio = r["ms_per_token"] / rows[0]["ms_per_token"]
                ax.bar(x, ratio, color=f"C{j}", label=r["model"] if s == 0 else None)
                ax.text(x, ratio, f"{r['ms_per_token']:.2f} ms", ha="center", va="bottom", fontsize=7)
        ax.set_xticks([s * 4 + 1 for s in range(len(sizes))], sizes, fontsize=8)
        ax.set(ylabel="decode time / unshared model", title="decode ms/token (batch 1, fp32, host CPU)")
        ax.legend(fontsize=7, labels=["L layers", "L layers, immediate x2", "2L layers"])
    fig.suptitle(f"{result['study']}: {result['dataset']}, {result['train']['max_iters']} iters, "
                 f"{len(result['seeds'])} seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# --- one study, start to end ---------------------------------------------------------------------

def study_data(study, size, data_root, scratch):
    """(dataset label, data folder, vocab_size, notes) of what a study trains on; derived data goes to scratch."""
    dataset = DATASETS.get(study, DEFAULT_DATASET)
    src = Path(data_root) / dataset
    if study != "embedding_sharing":
        return dataset, src, dataset_meta(src)["vocab_size"], {}
    vocab = 512 if size == "quick" else 2048
    meta = top_k_dataset(src, vocab, Path(scratch) / f"{dataset}_top{vocab}")
    notes = {"vocabulary": f"the {vocab - 1} most frequent GPT-2 tokens of the training split + 1 'other' "
                           f"token ({meta['train_coverage']:.1%} of training tokens kept as themselves)"}
    return f"{dataset}_top{vocab}", Path(scratch) / f"{dataset}_top{vocab}", vocab, notes


def config_key(cfg):
    """A model config with every ModelConfig default filled in, as a string: equal keys, equal models."""
    return json.dumps(asdict(ModelConfig(**cfg)), sort_keys=True)


def same_study(old, new):
    """Resume only runs of the very same study: data, training settings, model names and configs."""
    def models(result):
        return [(v["name"], config_key(v["config"])) for v in result["variants"]]
    return all(old.get(k) == new[k] for k in ("dataset", "train")) and models(old) == models(new)


def finished_elsewhere(out_dir, result):
    """{(normalized config, seed): run} of the other studies in out_dir that trained on the same data with
    the same settings: a model they already trained (e.g. the base model, in several studies) is not
    trained twice."""
    found = {}
    for path in Path(out_dir).glob("*.json"):
        other = json.loads(path.read_text())
        if other.get("study") == result["study"] or any(other.get(k) != result[k] for k in ("dataset", "train")):
            continue
        configs = {v["name"]: config_key(v["config"]) for v in other["variants"]}
        for run in other["runs"]:
            found.setdefault((configs[run["variant"]], run["seed"]), {**run, "reused_from": other["study"]})
    return found


def run_study(study, quick=False, out_dir=None, cpu_lock_path=None, max_iters=None, data_root=DATA_DIR,
              plot_only=False):
    size = "quick" if quick else "full"
    out_dir = Path(out_dir or (Path(tempfile.gettempdir()) / "nanomobilellm-ablations-quick" if quick else RESULTS_DIR))
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {**TRAIN[size], **({"max_iters": max_iters} if max_iters else {})}
    settings["lr_decay_iters"] = settings["max_iters"]
    with tempfile.TemporaryDirectory(prefix="ablation-data-") as scratch:
        dataset, data_dir, vocab_size, notes = study_data(study, size, data_root, scratch)
        base = {**BASE[size], "vocab_size": vocab_size, "block_size": settings["block_size"]}
        variants = [{**v, **describe(v["config"])} for v in study_variants(study, base)]
        result = dict(study=study, paper=PAPER[study], dataset=dataset, **notes, train=settings,
                      seeds=list(SEEDS), machine=f"{platform.machine()}, {os.cpu_count()} cores, "
                      f"torch {torch.__version__}", variants=variants,
                      equal_param_spread=check_equal_params(variants), runs=[])
        json_path = out_dir / f"{study}.json"
        if json_path.is_file() and same_study(json.loads(json_path.read_text()), result):
            result["runs"] = [r for r in json.loads(json_path.read_text())["runs"] if r["seed"] in result["seeds"]]
        done = {(r["variant"], r["seed"]) for r in result["runs"]}
        todo = [] if plot_only else [(v, s) for v in variants for s in result["seeds"] if (v["name"], s) not in done]
        elsewhere = finished_elsewhere(out_dir, result) if todo else {}
        for v, seed in tqdm(todo, desc=f"{study}: training runs", disable=quick):
            key = (config_key(v["config"]), seed)
            if key in elsewhere:
                result["runs"].append({**elsewhere[key], "variant": v["name"]})
                continue
            t0 = time.time()
            with cpu_lock(cpu_lock_path, exclusive=False):
                records = train_one(v["config"], seed, settings, data_dir)
            result["runs"].append(dict(variant=v["name"], seed=seed, final_val_loss=records[-1]["val_loss"],
                                       wall_s=round(time.time() - t0, 1), records=records))
            write_json(result, json_path)
    if not result["runs"]:
        raise SystemExit(f"{json_path} has no finished runs to summarize (run the study without --plot_only)")
    if study == "layer_sharing" and not plot_only:
        with cpu_lock(cpu_lock_path, exclusive=True):
            result["latency"] = measure_latency(base, quick)
        # timings are only worth reporting when nothing else ran: --cpu_lock, or the whole command under flock -x
        result["timing_lock"] = "exclusive (--cpu_lock)" if cpu_lock_path else "none taken by this script"
    result["summary"] = summarize(result["runs"], variants)
    write_json(result, json_path)
    plot(result, out_dir / f"{study}.png")
    return result


def print_summary(result):
    print(f"\n{result['study']} ({result['dataset']}, equal-budget parameter spread "
          f"{result['equal_param_spread']:.2%}):")
    for r in result["summary"]:
        print(f"  {r['variant']:<45} {r['params']:>9,} params  depth {r['depth']:>2}  "
              f"val loss {r['mean']:.4f} ± {r['std']:.4f} (min {r['min']:.4f}, max {r['max']:.4f}, "
              f"{r['seeds']} seeds)")
    for r in result.get("latency", []):
        print(f"  decode [{r['size']}] {r['model']:<40} {r['ms_per_token']:8.2f} ms/token")


def markdown(out_dir):
    """docs/ablations.md's tables, from the results already in out_dir."""
    lines = ["| study | model | params | depth | final val loss, mean ± std (min..max) over seeds |",
             "|---|---|---|---|---|"]
    latency = []
    for study in STUDIES:
        path = Path(out_dir) / f"{study}.json"
        if not path.is_file():
            continue
        result = json.loads(path.read_text())
        summary = result.get("summary") or summarize(result["runs"], result["variants"])
        for r in summary:
            lines.append(f"| {study} | {r['variant']} | {r['params']:,} | {r['depth']} | {r['mean']:.3f} ± "
                         f"{r['std']:.3f} ({r['min']:.3f}..{r['max']:.3f}, {r['seeds']} seeds) |")
        latency += result.get("latency", [])
    if latency:
        lines += ["", "| size | model | weights (fp32) | decode ms/token | vs the unshared model |",
                  "|---|---|---|---|---|"]
        for r in latency:
            first = next(x for x in latency if x["size"] == r["size"])
            lines.append(f"| {r['size']} | {r['model']} | {r['weight_mb_fp32']:.1f} MB | {r['ms_per_token']:.2f} | "
                         f"{r['ms_per_token'] / first['ms_per_token']:.2f}x |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", choices=STUDIES + ("all",), help="which study to run")
    parser.add_argument("--markdown", action="store_true",
                        help="print docs/ablations.md's tables from --out_dir's results")
    parser.add_argument("--plot_only", action="store_true", help="no training or timing: summary and plot of the "
                                                                 "runs already in the JSON (e.g. of a stopped study)")
    parser.add_argument("--quick", action="store_true", help="tiny models, a few iterations (for tests)")
    parser.add_argument("--out_dir", help="where <study>.json/.png go (default experiments/results; "
                                          "--quick: a temporary folder)")
    parser.add_argument("--cpu_lock", help="flock file: shared while training, exclusive while timing")
    parser.add_argument("--max_iters", type=at_least(1), help="override the study's training length")
    parser.add_argument("--data_root", default=str(DATA_DIR), help="folder holding the prepared datasets")
    parser.add_argument("--threads", type=at_least(1), default=1, help="torch threads while training (default 1: one per "
                        "tiny run; docs/ablations.md says why)")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown(args.out_dir or RESULTS_DIR))
        return []
    if not args.study:
        parser.error("give --study NAME (or all), or --markdown")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    results = []
    try:
        for study in STUDIES if args.study == "all" else (args.study,):
            results.append(run_study(study, args.quick, args.out_dir, args.cpu_lock, args.max_iters, args.data_root,
                                     args.plot_only))
            print_summary(results[-1])
    finally:
        torch.set_num_threads(previous_threads)
    return results


if __name__ == "__main__":
    main()
