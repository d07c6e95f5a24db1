import copy
import importlib.util
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

from experiments import ablations
from model import Attention, FeedForward, MobileLLM, ModelConfig

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
    results = decode_gemv.main(["--dtype", "fp32,float16", "--dim", "32", "--out_dim", "48",
                                "--mb", "0.02", "--rounds", "2"])          # 3 fp32 and 7 fp16 matrices
    assert set(results) == {"fp32", "fp16"}                      # torch names are aliases
    assert all(v > 0 for gbs in results.values() for v in gbs.values())
    n = round(0.02 * 2**20 / (32 * 48 * 4)) + round(0.02 * 2**20 / (32 * 48 * 2))
    assert torch._dynamo.utils.counters["inductor"]["decompose_mm"] == n   # only the decomposed variant
    assert capsys.readouterr().out.count("x |") == 2


def test_xnnpack_cache_reuse_times_the_working_set_it_reports(capsys, monkeypatch, tmp_path):
    pytest.importorskip("executorch")
    from experiments import xnnpack_cache_reuse as reuse
    from model import config_from_preset
    from test_export import load_method
    config = config_from_preset("mobilellm-micro", dim=32, ffn_dim=64)
    pair = 2 * 32 * 64 * 4
    torch.manual_seed(0)
    chain = reuse.GemvChain(32, 64, 2, [0, 1, 0])                        # two pairs, the first re-applied
    x = torch.randn(1, 1, 32)
    with torch.no_grad():
        expected = chain(x)
    (tmp_path / "chain.pte").write_bytes(reuse.chain_pte(chain, 32, "fp32"))
    torch.testing.assert_close(load_method(tmp_path / "chain.pte").execute([x])[0], expected, rtol=1e-4, atol=1e-5)
    timed = []
    monkeypatch.setattr(reuse, "chain_pte", lambda chain, dim, dtype: timed.append(chain.schedule) or b"")
    monkeypatch.setattr(reuse, "program_seconds", lambda data, inputs, threads: 0.001)     # 1 ms a call
    gbs, working_set = reuse.chain_gbs(config, "fp32", threads=1, mb=6 * pair / 2**20, hot_pairs=2)
    assert timed == [[0, 1, 0, 1, 0, 1]]
    assert gbs == pytest.approx(6 * pair / 0.001 / 1e9) and working_set == pytest.approx(2 * pair / 2**20)
    monkeypatch.setattr(reuse, "chain_gbs", lambda config, dtype, threads, mb, hot_pairs: (1.0 + hot_pairs, 0.5))
    reuse.main(["--init_from=mobilellm-micro", "--hot_pairs=1,4"])
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()[2:]]
    assert [(r[0].strip(), float(r[2])) for r in rows] == [("none (cold)", 1.0), ("1 pair in turn", 2.0),
                                                           ("4 pairs in turn", 5.0)]


def llama_cpp_rope(x, positions, theta):
    """llama.cpp's LLaMA rotary embedding, written from its definition: neighbours (x[2i], x[2i+1]) are
    rotated by position * theta^(-2i/D). x: (T, H, D)."""
    D = x.size(-1)
    angles = positions[:, None].float() * theta ** (-torch.arange(0, D, 2).float() / D)      # (T, D/2)
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]                                  # (T, 1, D/2)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], -1).flatten(-2)


def test_llama_cpp_rope_on_reordered_weights_gives_our_attention_scores():
    from gguf_file import rope_pairs_adjacent
    from model import apply_rope, rope_tables
    torch.manual_seed(0)
    n_heads, n_kv, D, dim, T = 4, 2, 16, 32, 5
    wq, wk, h = torch.randn(n_heads * D, dim), torch.randn(n_kv * D, dim), torch.randn(T, dim)
    cos, sin = rope_tables(D, T, 10000.0)
    ours_q = apply_rope((h @ wq.T).view(1, T, n_heads, D).transpose(1, 2), cos, sin)[0]      # (H, T, D)
    ours_k = apply_rope((h @ wk.T).view(1, T, n_kv, D).transpose(1, 2), cos, sin)[0]
    theirs_q = llama_cpp_rope((h @ rope_pairs_adjacent(wq, n_heads).T).view(T, n_heads, D), torch.arange(T),
                              10000.0).transpose(0, 1)
    theirs_k = llama_cpp_rope((h @ rope_pairs_adjacent(wk, n_kv).T).view(T, n_kv, D), torch.arange(T),
                              10000.0).transpose(0, 1)
    group = n_heads // n_kv
    ours = ours_q @ ours_k.repeat_interleave(group, 0).transpose(1, 2)                       # (H, T, T)
    theirs = theirs_q @ theirs_k.repeat_interleave(group, 0).transpose(1, 2)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    unordered = llama_cpp_rope((h @ wq.T).view(T, n_heads, D), torch.arange(T), 10000.0).transpose(0, 1)
    assert not torch.allclose(unordered @ theirs_k.repeat_interleave(group, 0).transpose(1, 2), ours, atol=1e-2)


def test_llama_cpp_gguf_has_one_llama_layer_per_block_application(tmp_path):
    import gguf
    from experiments import llama_cpp_reference as ref
    torch.manual_seed(0)
    model = MobileLLM(ModelConfig(vocab_size=300, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                                  block_size=64, share="immediate")).eval()
    ref.export_gguf(model, None, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    fields = {name: f.contents() for name, f in reader.fields.items()}
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == 4   # b0 b0 b1 b1
    assert fields["llama.attention.head_count_kv"] == 2 and fields["llama.vocab_size"] == 300
    assert fields["tokenizer.ggml.model"] == "no_vocab"                 # llama.cpp makes 300 dummy tokens
    tensors = {t.name: np.asarray(t.data).reshape(list(reversed(t.shape.tolist()))) for t in reader.tensors}
    assert len(tensors) == 2 + 9 * 4 and "output.weight" not in tensors                  # tied: stored once
    np.testing.assert_array_equal(tensors["blk.3.ffn_down.weight"], model.layers[1].feed_forward.w2.weight.detach().numpy())
    np.testing.assert_array_equal(tensors["blk.2.attn_k.weight"], tensors["blk.3.attn_k.weight"])
    np.testing.assert_array_equal(tensors["token_embd.weight"], model.tok_embeddings.weight.detach().numpy())


def test_llama_cpp_reference_reads_llama_bench_json_and_names_a_missing_build(tmp_path, capsys):
    from experiments import llama_cpp_reference as ref
    sample = [{"n_prompt": 64, "n_gen": 0, "n_depth": 0, "avg_ts": 812.5},
              {"n_prompt": 0, "n_gen": 32, "n_depth": 64, "avg_ts": 151.25}]
    assert ref.parse_bench_json(json.dumps(sample)) == {"prefill": 812.5, "decode": 151.25}
    with pytest.raises(ref.BenchError, match="llama-quantize not found"):
        ref.llama_tool(tmp_path, "llama-quantize")
    for flag in ("--llama_cpp", "--llama-cpp"):                       # the old spelling still works
        with pytest.raises(SystemExit):
            ref.main([flag, str(tmp_path), "--quant", "Q9"])
        assert "unknown ['Q9']" in capsys.readouterr().err


def test_check_logits_says_what_it_needs_without_llama_cpp_bindings(tmp_path, monkeypatch):
    from experiments import llama_cpp_reference as ref
    monkeypatch.setitem(sys.modules, "llama_cpp", None)                # import llama_cpp now fails
    with pytest.raises(ref.BenchError, match="llama-cpp-python"):
        ref.llama_cpp_logits(tmp_path, tmp_path / "m.gguf", [5, 6], threads=1)


@pytest.mark.parametrize("share", ["none", "immediate"])
def test_llama_cpp_computes_our_logits_from_the_gguf(tmp_path, share):
    """Runs where llama-cpp-python's bindings import (LLAMA_CPP_BIN: a build/bin holding libllama.so)."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python's bindings are not installed")
    from experiments import llama_cpp_reference as ref
    torch.manual_seed(0)
    model = MobileLLM(ModelConfig(vocab_size=65, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176,
                                  block_size=64, share=share)).eval()               # a char-level vocabulary
    ref.export_gguf(model, None, tmp_path / "m.gguf")
    tokens = torch.randint(65, (24,), generator=torch.Generator().manual_seed(1)).tolist()
    theirs = ref.llama_cpp_logits(os.environ.get("LLAMA_CPP_BIN", tmp_path), tmp_path / "m.gguf", tokens, 1)
    with torch.no_grad():
        ours = model(torch.tensor([tokens]))[0][0]                                       # (T, V)
        swapped = copy.deepcopy(model)                                 # the check sees a wrong block order
        swapped.layers[0], swapped.layers[1] = swapped.layers[1], swapped.layers[0]
        wrong = swapped(torch.tensor([tokens]))[0][0]
    diff, same = ref.logit_agreement(theirs, ours)
    assert theirs.shape == (24, 65) and diff < 1e-3 and same == 1.0
    assert ref.logit_agreement(theirs, wrong)[0] > 1e-2


def test_llama_cpp_reference_times_a_released_gguf_itself_beside_the_files_made_from_it(tmp_path, monkeypatch,
                                                                                           capsys):
    from experiments import llama_cpp_reference as ref
    from tokenizer import char_tokenizer
    torch.manual_seed(0)
    tokenizer = char_tokenizer("abcdefgh")
    model = MobileLLM(ModelConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=1, n_heads=4, n_kv_heads=2,
                                  ffn_dim=48, block_size=64))
    released = tmp_path / "released-Q8_0.gguf"
    ref.export_gguf(model, tokenizer, released, tensor_type="Q8_0")
    for quant in ("F32", "Q4_0"):                                   # what llama-quantize would write
        (tmp_path / f"{quant}.gguf").write_bytes(b"0")
    timed = []
    monkeypatch.setattr(ref, "gguf_files", lambda model, quants, *a: {q: tmp_path / f"{q}.gguf" for q in quants})
    monkeypatch.setattr(ref, "bench", lambda bin_dir, path, *a: timed.append(path) or {"prefill": 1.0, "decode": 2.0})
    ref.main(["--llama_cpp", str(tmp_path), "--init_from", str(released), "--quant", "F32,Q4_0"])
    assert timed == [released, tmp_path / "F32.gguf", tmp_path / "Q4_0.gguf"]
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"| {released}")]
    assert [row.split("|")[2].strip() for row in rows] == ["the file itself", "F32", "Q4_0"]


def test_equal_time_sizes_each_schedule_to_the_budget(tmp_path, capsys, monkeypatch):
    """Each variant gets the iterations its measured speed fits into --minutes; the real training it then
    runs is train.train's (tested in test_train), so here it is replaced by a recorder."""
    from experiments import equal_time
    speeds = {16: 2048.0, 32: 2048.0}                   # tokens/s: batch 32 takes twice as long per iteration
    monkeypatch.setattr(equal_time, "tokens_per_second", lambda cfg, dtype, device: (speeds[cfg.batch_size], None))
    runs, saved = [], tmp_path / "equal_time.json"
    monkeypatch.setattr(equal_time, "train", lambda cfg: runs.append(
        (cfg, len(json.loads(saved.read_text())["rows"]) if saved.exists() else 0)) or [
        {"train_loss": 1.0 + cfg.batch_size / 100, "val_loss": 2.0 + cfg.batch_size / 100}])
    cfg = equal_time.configure(equal_time.EqualTimeConfig(), [
        "--minutes=1", "--block_size=128", "--dim=64", f"--out_dir={tmp_path}",
        "--compare=batch_size=16;batch_size=32"])
    rows = equal_time.main(cfg)
    assert [done for _, done in runs] == [0, 1]                         # the first variant saved before the second
    runs = [r for r, _ in runs]
    assert [r.max_iters for r in runs] == [60, 30]                       # 60 s x 1 and 0.5 iterations/s
    assert [r.warmup_iters for r in runs] == [30, 29] and all(r.eval_interval == r.max_iters for r in runs)
    assert all(type(r) is equal_time.TrainConfig and r.dim == 64 and r.quiet for r in runs)
    assert [r["val_loss"] for r in rows] == [2.16, 2.32]
    assert "| batch_size=32 | 30 |" in capsys.readouterr().out
    assert json.loads((tmp_path / "equal_time.json").read_text())["rows"] == rows
    with pytest.raises(equal_time.ConfigError, match="--compare is empty"):
        equal_time.main(equal_time.EqualTimeConfig())


def test_fused_projections_compute_the_same_with_fewer_matrices_and_are_timed(capsys):
    from experiments import fused_projections
    from train import TrainConfig, model_config
    torch.manual_seed(0)
    model = MobileLLM(model_config(TrainConfig(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=96), 65))
    fused = fused_projections.fused_projections(copy.deepcopy(model))
    x = torch.randint(65, (2, 16))
    torch.testing.assert_close(fused(x, x)[1], model(x, x)[1])             # same loss, two applications each
    matrices = lambda m: sorted(tuple(p.shape) for p in m.layers.parameters() if p.dim() == 2)
    assert len(matrices(model)) == 2 * 7 and len(matrices(fused)) == 2 * 4   # (q;k;v), wo, (w1;w3), w2
    assert (64 + 2 * 32, 64) in matrices(fused) and (2 * 96, 64) in matrices(fused)
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in model.parameters())
    cfg = fused_projections.configure(fused_projections.BenchConfig(dtype="fp32"), [
        "--n_layers=1", "--dim=32", "--ffn_dim=64", "--block_size=16", "--batch_size=2", "--iters=1",
        "--warmup=0", "--rounds=1"])
    medians = fused_projections.main(cfg)
    assert set(medians) == {"separate", "fused"} and all(v > 0 for v in medians.values())
    assert "same logits fused and separate" in capsys.readouterr().out


def test_residual_dropout_drops_each_branch_only_while_training_and_restores_the_model(tmp_path, capsys):
    from experiments import residual_dropout
    torch.manual_seed(0)
    model = MobileLLM(ModelConfig(vocab_size=65, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                                  block_size=16))
    x = torch.randint(65, (2, 16))
    plain_train, plain_eval = model.train()(x, x)[1], model.eval()(x, x)[1]
    forwards = (Attention.forward, FeedForward.forward)
    with residual_dropout.residual_dropout(0.5):
        assert model.eval()(x, x)[1] == plain_eval                      # no dropout at eval
        assert model.train()(x, x)[1] != plain_train
    with residual_dropout.residual_dropout(0.0):
        assert model.train()(x, x)[1] == plain_train                    # rate 0: train.py's forward
    assert (Attention.forward, FeedForward.forward) == forwards                 # put back
    write_dataset(tmp_path / "data", 65, 4000, np.random.default_rng(0))
    cfg = residual_dropout.configure(residual_dropout.DropoutConfig(), [
        f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path / 'out'}", "--dim=32", "--n_layers=1",
        "--block_size=16", "--batch_size=2", "--max_iters=4", "--eval_interval=2", "--eval_iters=1",
        "--warmup_iters=1", "--dropout=0.2"])
    records = residual_dropout.main(cfg)
    assert [r["iter"] for r in records] == [0, 2, 4] and (tmp_path / "out" / "ckpt.pt").is_file()
    assert capsys.readouterr().out.endswith(f"residual dropout 0.2: val loss {records[1]['val_loss']:.3f} / "
                                            f"{records[2]['val_loss']:.3f} at iterations 2 / 4\n")
    with pytest.raises(residual_dropout.ConfigError, match="dropout must be in"):
        residual_dropout.main(residual_dropout.DropoutConfig(dropout=1.0))


def test_kv_cache_op_variants_hold_their_ops_and_give_the_same_logits(capsys, monkeypatch):
    pytest.importorskip("executorch")
    import export
    from executorch_private import deserialized_program
    from experiments import kv_cache_op
    ops, export_pte = [], export.export_pte

    def export_and_list_ops(*args):
        data, info = export_pte(*args)
        ops.append({op.name for op in deserialized_program(data).execution_plan[0].operators})
        return data, info

    monkeypatch.setattr(export, "export_pte", export_and_list_ops)
    monkeypatch.setattr(kv_cache_op, "in_fresh_process", lambda fn, *args: fn(*args))   # no spawn: faster
    programs = kv_cache_op.main(["--init_from=mobilellm-micro:n_layers=2+vocab_size=64", "--rounds=1", "--runs=1",
                                 "--prompt_len=4", "--new_tokens=2", "--threads=1"])
    assert "llama::sdpa_with_kv_cache" in ops[0] - ops[1]
    assert {"llama::update_cache", "llama::custom_sdpa"} <= ops[1] - ops[0]
    logits = [program["logits"] for program in programs.values()]
    assert len(logits) == 2 and logits[0].shape == (32, 64) and torch.equal(logits[0], logits[1])
    assert capsys.readouterr().out.count("| mobilellm-micro") == 2
