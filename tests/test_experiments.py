import json
import math

import numpy as np
import pytest
import torch

from experiments import ablations
from model import MobileLLM, ModelConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_dataset(folder, vocab_size, n_tokens, rng, zipf=False):
    """A prepared dataset as data/<name>/prepare.py writes it, with random tokens (Zipf-like when asked,
    so the top-k vocabulary of the embedding study has frequent and rare tokens)."""
    folder.mkdir(parents=True)
    for split, n in (("train", n_tokens), ("val", n_tokens // 4)):
        ids = rng.zipf(1.3, n) % vocab_size if zipf else rng.integers(0, vocab_size, n)
        ids.astype(np.uint16).tofile(folder / f"{split}.bin")
    (folder / "meta.json").write_text(json.dumps({"vocab_size": vocab_size, "tokenizer": {"kind": "char"}}))


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    """Every study's --quick, once, on synthetic data shaped like shakespeare_char and GPT-2 shakespeare.
    train.py's own loss.png (drawn at every eval, tested with train.py) is skipped: 56 plots would take
    a third of this file's time budget."""
    import train
    patch = pytest.MonkeyPatch()
    patch.setattr(train, "plot_losses", lambda history, path: None)
    root = tmp_path_factory.mktemp("ablations")
    rng = np.random.default_rng(0)
    write_dataset(root / "data" / "shakespeare_char", 65, 4000, rng)
    write_dataset(root / "data" / "shakespeare", 50257, 4000, rng, zipf=True)
    results = ablations.main(["--study", "all", "--quick", "--out_dir", str(root / "out"),
                              "--data_root", str(root / "data")])
    yield root / "out", {r["study"]: r for r in results}
    patch.undo()


def true_params(cfg):
    with torch.device("meta"):
        return MobileLLM(ModelConfig(**cfg)).num_params()


@pytest.mark.parametrize("study", ablations.STUDIES)
def test_quick_study_writes_json_and_png_for_every_variant_and_seed(quick_results, study):
    out, results = quick_results
    saved = json.loads((out / f"{study}.json").read_text())
    assert (out / f"{study}.png").read_bytes()[:8] == PNG_MAGIC
    names = [v["name"] for v in saved["variants"]]
    assert len(names) >= 2 and len(saved["seeds"]) >= 2
    assert sorted((r["variant"], r["seed"]) for r in saved["runs"]) == sorted(
        (n, s) for n in names for s in saved["seeds"])
    for run in saved["runs"]:
        assert run["records"][-1]["iter"] == saved["train"]["max_iters"]
        assert math.isfinite(run["final_val_loss"]) and run["final_val_loss"] == run["records"][-1]["val_loss"]
    assert [r["variant"] for r in saved["summary"]] == names
    assert saved == json.loads(json.dumps(results[study]))


@pytest.mark.parametrize("study", ablations.STUDIES)
def test_compared_models_have_the_parameter_counts_they_claim(quick_results, study):
    _, results = quick_results
    variants = results[study]["variants"]
    for v in variants:
        assert v["params"] == true_params(v["config"])
    equal = [v["params"] for v in variants if v["equal_params"]]
    assert len(equal) >= 2 and (max(equal) - min(equal)) / min(equal) <= 0.02


def test_each_study_varies_what_it_says(quick_results):
    _, r = quick_results
    cfg = {s: [v["config"] for v in r[s]["variants"]] for s in ablations.STUDIES}
    assert [c["ffn_type"] for c in cfg["swiglu"]] == ["swiglu", "relu", "gelu"]
    depth = sorted(cfg["depth"], key=lambda c: c["n_layers"])
    assert [c["dim"] for c in depth] == sorted((c["dim"] for c in depth), reverse=True)   # deeper = thinner
    untied, tied, deeper = r["embedding_sharing"]["variants"]
    assert not untied["config"]["tie_embeddings"] and deeper["config"]["tie_embeddings"]
    assert deeper["depth"] > untied["depth"] == tied["depth"] and tied["params"] < untied["params"]
    assert sorted({c["n_kv_heads"] for c in cfg["gqa"]}) == [1, cfg["gqa"][0]["n_heads"]]
    shares = r["layer_sharing"]["variants"]
    assert [v["config"]["share"] for v in shares] == ["none", "immediate", "repeat_all", "reverse"]
    assert [v["depth"] for v in shares] == [shares[0]["depth"]] + [2 * shares[0]["depth"]] * 3


def test_layer_sharing_times_decoding_of_shared_and_unshared_stacks(quick_results):
    _, results = quick_results
    latency = results["layer_sharing"]["latency"]
    base, shared, deeper = latency
    assert shared["params"] == base["params"] < deeper["params"]
    assert shared["depth"] == deeper["depth"] == 2 * base["depth"]
    assert all(r["ms_per_token"] > 0 for r in latency)


def test_a_finished_study_resumes_without_training_again(quick_results):
    out, results = quick_results
    again = ablations.run_study("swiglu", quick=True, out_dir=out, data_root=out.parent / "data")
    assert again["runs"] == results["swiglu"]["runs"]          # same records, elapsed times included


def test_unequal_budgets_are_refused():
    variants = [dict(name="a", params=1000, equal_params=True), dict(name="b", params=1030, equal_params=True),
                dict(name="ref", params=500, equal_params=False)]
    with pytest.raises(AssertionError, match="differ by 3.0%"):
        ablations.check_equal_params(variants)
    assert ablations.check_equal_params(variants[:1] + variants[2:] + [dict(params=1010, equal_params=True)]) == 0.01


def test_markdown_tables_list_every_model_and_decode_timing(quick_results):
    out, results = quick_results
    table = ablations.markdown(out)
    for study, result in results.items():
        for row in result["summary"]:
            assert f"| {study} | {row['variant']} | {row['params']:,} |" in table
    assert table.count("ms/token") == 1 and len(results["layer_sharing"]["latency"]) == 3
    assert all(f"| {r['model']} |" in table for r in results["layer_sharing"]["latency"])


def test_a_model_already_trained_by_another_study_is_reused_not_retrained(quick_results):
    out, results = quick_results
    # one GQA model (the base model's KV heads) is the base model the swiglu study trained already
    gqa = results["gqa"]
    reused = [r for r in gqa["runs"] if r.get("reused_from")]
    assert reused and all(r["reused_from"] in ablations.STUDIES and r["reused_from"] != "gqa" for r in reused)
    base_runs = {r["seed"]: r["records"] for r in results["swiglu"]["runs"] if r["variant"] == "SwiGLU"}
    for r in reused:
        assert r["records"] == base_runs[r["seed"]]


def test_cpu_lock_is_shared_while_training_exclusive_while_timing_and_fair_to_waiting_writers(tmp_path):
    import fcntl
    lock_path = tmp_path / "cpu.lock"

    def can_take(path, mode):
        with open(path, "a") as f:
            try:
                fcntl.flock(f, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            fcntl.flock(f, fcntl.LOCK_UN)
            return True

    with ablations.cpu_lock(lock_path, exclusive=False):
        assert can_take(lock_path, fcntl.LOCK_SH) and not can_take(lock_path, fcntl.LOCK_EX)
        assert can_take(tmp_path / "cpu.turnstile", fcntl.LOCK_EX)       # a shared holder only passed through
    with ablations.cpu_lock(lock_path, exclusive=True):
        assert not can_take(lock_path, fcntl.LOCK_SH)
        assert not can_take(tmp_path / "cpu.turnstile", fcntl.LOCK_EX)   # new shared jobs queue behind it
    assert can_take(lock_path, fcntl.LOCK_EX) and can_take(tmp_path / "cpu.turnstile", fcntl.LOCK_EX)


def test_decode_gemv_times_three_ways_to_run_the_same_products(capsys):
    from experiments import decode_gemv
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    results = decode_gemv.main(["--dtypes", "float32,float16", "--dim", "32", "--out_dim", "48",
                                "--mb", "0.02", "--rounds", "2"])          # 3 fp32 and 7 fp16 matrices
    assert set(results) == {"float32", "float16"}
    assert all(v > 0 for gbs in results.values() for v in gbs.values())
    n = round(0.02 * 2**20 / (32 * 48 * 4)) + round(0.02 * 2**20 / (32 * 48 * 2))
    assert torch._dynamo.utils.counters["inductor"]["decompose_mm"] == n   # only the decomposed variant
    assert capsys.readouterr().out.count("x |") == 2
