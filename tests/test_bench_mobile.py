"""bench_mobile.py on a tiny layer-shared model: exported programs agree with eager PyTorch, the Android
path issues the right adb commands (a fake adb runs the runner locally), and errors are clear."""
import os
import stat
import sys
import warnings
from pathlib import Path

import pytest
import torch

import bench_mobile as bm

pytest.importorskip("executorch.exir")

TINY_LS = "mobilellm-micro-ls:n_layers=1+dim=32+n_heads=2+n_kv_heads=1+ffn_dim=64+vocab_size=64+block_size=64"
MAX_SEQ_LEN = 32


@pytest.fixture(scope="module")
def tiny():
    return bm.preset_model(TINY_LS, seed=0)


@pytest.fixture(scope="module")
def pte_fp32(tiny, tmp_path_factory):
    """One fp32 program (block-shared lowering) for every test that needs one: lowering takes seconds."""
    data, info = bm.export_pte(tiny, "fp32", MAX_SEQ_LEN, share_blocks=True)
    path = tmp_path_factory.mktemp("pte") / "tiny_fp32.pte"
    path.write_bytes(data)
    return path, info


def load_method(path):
    from executorch.runtime import Runtime
    return Runtime.get().load_program(Path(path)).load_method("forward")


def eager_steps(model, steps):
    """Last-token logits of model.py's own cached forward for each (tokens, input_pos) step."""
    model.setup_cache(1, MAX_SEQ_LEN)
    with torch.no_grad():
        out = [model(tokens, input_pos=pos)[0][:, -1] for tokens, pos in steps]
    model.clear_cache()
    return out


STEPS = [(torch.tensor([[3, 17, 42, 5, 9]]), torch.arange(5)), (torch.tensor([[11]]), torch.tensor([5])),
         (torch.tensor([[60]]), torch.tensor([6]))]


def test_pte_fp32_matches_eager_and_shares_block_delegates(tiny, pte_fp32):
    path, info = pte_fp32
    method = load_method(path)
    for (tokens, pos), ref in zip(STEPS, eager_steps(tiny, STEPS)):
        out = method.execute([tokens, pos])[0]
        assert out.shape == ref.shape
        assert (out - ref).abs().max().item() < 1e-4
    # one block applied twice: the two applications' front and back halves are separate lowerings of the
    # same computation; the shared program keeps one delegate per half
    assert info["delegates"] <= info["delegate_calls"] - 2
    V, C = tiny.tok_embeddings.weight.shape
    assert ("FLOAT", (V, C)) in program_constants(Path(path).read_bytes())   # fp32: the exact float table


def test_greedy_decode_through_exported_cache_equals_generate(tiny, pte_fp32):
    method = load_method(pte_fp32[0])
    prompt = torch.tensor([[1, 2, 3, 4]])
    expected = tiny.generate(prompt, 12, temperature=0)[0, 4:].tolist()
    logits = method.execute([prompt, torch.arange(4)])[0]
    tokens = []
    for pos in range(4, 16):
        tokens.append(int(logits.argmax(-1)))
        logits = method.execute([torch.tensor([[tokens[-1]]]), torch.tensor([pos])])[0]
    assert tokens == expected


def program_constants(data):
    """(dtype name, shape) of every tensor stored in the program itself (outside the delegates)."""
    from executorch.exir._serialize._program import deserialize_pte_binary
    values = deserialize_pte_binary(data).program.execution_plan[0].values
    return [(v.val.scalar_type.name, tuple(v.val.sizes)) for v in values
            if type(v.val).__name__ == "Tensor" and v.val.data_buffer_idx > 0]


@pytest.mark.parametrize("dtype, tolerance", [("int8", 0.05), ("8da4w", 0.15)])
def test_pte_quantized_close_to_eager(tiny, dtype, tolerance):
    """W8A8 (per-channel int8 weights) and 8da4w (int4 weights in groups of 32), both with per-token int8
    activations: logits within 5% (int8) / 15% (int4) of their range, and the source model untouched.
    The embedding table outside the delegates is int8 (a float scale per row), not a float copy."""
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    data, info = bm.export_pte(tiny, dtype, MAX_SEQ_LEN)
    # one delegate per half (front, back) of each block application, + the int8 embedding's scaling and
    # the head; a shared block's two applications run the same two delegates
    assert info["delegate_calls"] == 2 * len(tiny.schedule) + 2
    assert info["delegates"] == 2 * tiny.config.n_layers + 2
    V, C = tiny.tok_embeddings.weight.shape
    constants = program_constants(data)
    assert ("CHAR", (V, C)) in constants and ("FLOAT", (V, 1)) in constants and ("FLOAT", (V, C)) not in constants
    assert tiny.output.weight is tiny.tok_embeddings.weight                     # still tied
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())
    from executorch.runtime import Runtime
    method = Runtime.get().load_program(data).load_method("forward")
    for (tokens, pos), ref in zip(STEPS, eager_steps(tiny, STEPS)):
        err = (method.execute([tokens, pos])[0] - ref).abs().max().item()
        assert 0 < err <= tolerance * ref.abs().max().item()      # quantized (not exact), yet close


def test_cached_pte_reuses_the_program(tiny, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(bm, "export_pte", lambda *a: calls.append(a) or (b"program", {"delegates": 1}))
    first = bm.cached_pte(tiny, "fp32", MAX_SEQ_LEN, cache_dir=tmp_path)
    again = bm.cached_pte(tiny, "fp32", MAX_SEQ_LEN, cache_dir=tmp_path)
    other = bm.cached_pte(tiny, "int8", MAX_SEQ_LEN, cache_dir=tmp_path)
    assert first == again != other and len(calls) == 2 and first.read_bytes() == b"program"


def test_ptl_loads_in_lite_interpreter_and_matches(tiny, tmp_path):
    from torch.jit.mobile import _load_for_lite_interpreter
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = bm.export_ptl(tiny, tmp_path / "tiny.ptl", MAX_SEQ_LEN)
    assert len([w for w in caught if "optimize_for_mobile" in str(w.message)]) <= 1
    lite = _load_for_lite_interpreter(str(path))
    for (tokens, pos), ref in zip(STEPS, eager_steps(tiny, STEPS)):
        assert (lite(tokens, pos) - ref).abs().max().item() < 1e-5


# --- Android, with a fake adb that runs everything on this machine ----------------------------------

FAKE_ADB = """#!{python}
import os, shutil, subprocess, sys
log, root = {log!r}, {root!r}
args = sys.argv[1:]
with open(log, "a") as f:
    f.write(" ".join(args) + "\\n")
if args[:1] == ["-s"]:
    args = args[2:]
local = lambda p: p.replace("/data/local/tmp", root)
if args[0] == "devices":
    print("List of devices attached")
    print({devices!r})
elif args[0] == "push":
    os.makedirs(os.path.dirname(local(args[2])), exist_ok=True)
    shutil.copy(args[1], local(args[2]))
elif args[0] == "shell":
    sys.exit(subprocess.run([local(a) for a in args[1:]]).returncode)
"""

FAKE_RUNNER = """#!{python}
import sys, time, torch
from executorch.runtime import Runtime
from executorch.extension.llm.custom_ops import custom_ops  # the llama:: kernels a real runner links in
opts = dict(a.lstrip("-").split("=", 1) for a in sys.argv[1:])
method = Runtime.get().load_program(opts["model_path"]).load_method("forward")
n = int(opts["num_executions"])
t0 = time.perf_counter()
for _ in range(n):
    method.execute([torch.ones(1, 1, dtype=torch.long), torch.ones(1, dtype=torch.long)])
print("I 00:00:01 executor_runner.cpp:180] Model executed successfully %d time(s) in %f ms." % (n, 1e3 * (time.perf_counter() - t0)))
"""


def write_script(path, text, **fmt):
    path.write_text(text.format(python=sys.executable, **fmt))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


@pytest.fixture
def fake_adb(tmp_path, monkeypatch):
    def make(devices="emulator-5554\tdevice"):
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir(exist_ok=True)
        log = tmp_path / "adb_calls.txt"
        write_script(bin_dir / "adb", FAKE_ADB, log=str(log), root=str(tmp_path / "device"), devices=devices)
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
        return log
    return make


def test_android_pushes_runs_parses_and_cleans_up(fake_adb, pte_fp32, tmp_path):
    log = fake_adb()
    runner = write_script(tmp_path / "executor_runner", FAKE_RUNNER)
    timings = bm.android_rows({"tiny-decode": pte_fp32[0]}, runner, "", runs=3, threads=1)
    assert set(timings) == {"tiny-decode"} and timings["tiny-decode"] > 0
    calls = log.read_text().splitlines()
    remote = bm.REMOTE_DIR
    assert calls[0] == "devices"
    assert f"-s emulator-5554 push {runner} {remote}/executor_runner" in calls
    assert f"-s emulator-5554 push {pte_fp32[0]} {remote}/tiny_fp32.pte" in calls
    assert (f"-s emulator-5554 shell {remote}/executor_runner --model_path={remote}/tiny_fp32.pte "
            "--num_executions=3 --cpu_threads=1") in calls
    assert calls[-1] == f"-s emulator-5554 shell rm -rf {remote}"
    assert not (tmp_path / "device" / "nanomobilellm").exists()


def test_parse_runner_ms():
    assert bm.parse_runner_ms("x\nModel executed successfully 4 time(s) in 10.0 ms.\n") == 2.5
    with pytest.raises(bm.BenchError, match="timing line"):
        bm.parse_runner_ms("Segmentation fault")


def test_android_errors(fake_adb, tmp_path, monkeypatch):
    runner = write_script(tmp_path / "executor_runner", FAKE_RUNNER)
    with pytest.raises(bm.BenchError, match="runner .* not found"):
        bm.android_rows({}, tmp_path / "missing_runner", "", 1, 1)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(bm.BenchError, match="adb is not on PATH"):
        bm.android_rows({}, runner, "", 1, 1)
    fake_adb(devices="")
    with pytest.raises(bm.BenchError, match="no Android device"):
        bm.android_rows({}, runner, "", 1, 1)
    fake_adb(devices="A\tdevice\nB\tdevice")
    with pytest.raises(bm.BenchError, match="choose one with --serial"):
        bm.android_rows({}, runner, "", 1, 1)
    with pytest.raises(bm.BenchError, match="'C' is not connected"):
        bm.android_rows({}, runner, "C", 1, 1)


def test_missing_executorch_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "executorch.exir", None)
    with pytest.raises(bm.BenchError, match="pip install -r requirements-extra.txt"):
        bm.require_executorch()


def test_cli_rejects_bad_input(capsys):
    with pytest.raises(SystemExit, match="--dtype 'fp16'"):
        bm.main(["--preset", TINY_LS, "--dtype", "fp16", "--device", "none"])
    with pytest.raises(SystemExit, match="must fit in --max-seq-len"):
        bm.main(["--preset", TINY_LS, "--prompt-len", "300"])
    with pytest.raises(SystemExit, match="unknown preset"):
        bm.main(["--preset", "mobilellm-9t", "--device", "none"])
    with pytest.raises(SystemExit, match="use it with --device host"):
        bm.main(["--preset", TINY_LS, "--device", "none", "--kernel-bound"])
    for wrong in (["--device", "none"], ["--format", "ptl"]):
        with pytest.raises(SystemExit, match="--check-logits runs the .pte programs on this host"):
            bm.main(["--preset", TINY_LS, "--check-logits"] + wrong)


def test_host_table_end_to_end(pte_fp32, tmp_path, capsys, monkeypatch):
    path, info = pte_fp32                                          # the same program main() would export
    monkeypatch.setattr(bm, "export_pte", lambda *args: (path.read_bytes(), info))
    monkeypatch.setattr(bm, "in_fresh_process", lambda fn, *args: fn(*args))   # spawning is tested above
    bm.main(["--preset", TINY_LS, "--dtype", "fp32", "--eager", "fp32", "--device", "host", "--threads", "1",
             "--prompt-len", "4", "--new-tokens", "2", "--runs", "1", "--max-seq-len", str(MAX_SEQ_LEN),
             "--cache-dir", str(tmp_path), "--kernel-bound", "--kernel-mb", "0.1", "--check-logits"])
    out = capsys.readouterr().out
    assert "XNNPACK fp32 matrix-vector products stream" in out
    head, _, pte_row, eager_row = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("|")]
    assert [c.strip() for c in head][-5:] == ["DRAM bound tok/s", "kernel bound tok/s", "mem MB",
                                              "max abs logit error", "same next token"]
    assert "ExecuTorch fp32 (shared)" in pte_row[1] and "eager PyTorch fp32" in eager_row[1]
    assert float(pte_row[-4]) > 0 and eager_row[-4].strip() == "-"       # kernel bound: ExecuTorch rows only
    assert all(float(row[6]) > 0 for row in (pte_row, eager_row))       # decode ms/token
    for row in (pte_row, eager_row):                                    # both compute model.py's logits
        assert float(row[-2]) < 1e-4 and row[-1].strip() == "100%"


def test_logit_agreement_measures_the_difference_and_the_chosen_tokens():
    reference = torch.tensor([[0.0, 1.0, 0.5], [2.0, 0.0, 0.0]])
    error, same = bm.logit_agreement(torch.tensor([[0.0, 0.25, 0.5], [2.0, 0.0, 0.1]]), reference)
    assert error == pytest.approx(0.75) and same == 0.5                  # row 0 now picks token 2
    tokens = bm.check_tokens(50, 6, seed=3)
    assert torch.equal(tokens, bm.check_tokens(50, 6, seed=3)) and not torch.equal(tokens, bm.check_tokens(50, 6, 4))


def test_int8_checkpoint_gives_its_float_equivalent_weights(tmp_path):
    from checkpoint import model_checkpoint, save_checkpoint
    from quantize import quantize_model
    float_model = bm.preset_model(TINY_LS, seed=1)
    qmodel = quantize_model(bm.preset_model(TINY_LS, seed=1), "w8a8")
    save_checkpoint(model_checkpoint(qmodel, {"kind": "char"}, quantization="w8a8"), tmp_path / "ckpt.pt")
    model = bm.load_source(bm.argparse.Namespace(ckpt=str(tmp_path), preset="", seed=0))
    assert model.output.weight is model.tok_embeddings.weight                  # still tied, not untied
    w, ref = model.layers[0].feed_forward.w1.weight, float_model.layers[0].feed_forward.w1.weight
    assert 0 < (w - ref).abs().max() <= ref.abs().amax(dim=1).max() / 127      # int8 rounding, no more


def test_peak_memory_of_a_fresh_process_is_its_own():
    """The host table's memory column: a spawned child must not report its parent's peak (getrusage
    would, on Linux: ru_maxrss survives fork + exec)."""
    ballast = torch.ones(256 * 2**20 // 4)                   # 256 MB touched in this (parent) process
    child_peak = bm.in_fresh_process(bm.peak_rss_mb)
    assert bm.peak_rss_mb() - child_peak > 128, (bm.peak_rss_mb(), child_peak)
    del ballast


def test_weight_reads_count_each_block_application_and_which_are_cached():
    """125M: 30 blocks of 576x(9+3+3+9)x64 attention and 3 x 576x1536 SwiGLU weights, plus the 32000x576 head."""
    from model import config_from_preset
    block = 576 * 64 * 24 + 3 * 576 * 1536
    per_token = 30 * block + 32000 * 576
    assert bm.weight_reads_per_token(config_from_preset("mobilellm-125m"), "int8", True) == (per_token, 0)
    assert bm.weight_reads_per_token(config_from_preset("mobilellm-125m"), "8da4w", True) == (per_token / 2, 0)
    ls = config_from_preset("mobilellm-125m-ls")
    assert bm.weight_reads_per_token(ls, "fp32", shared=True) == (4 * per_token, 4 * 30 * block)
    assert bm.weight_reads_per_token(ls, "fp32", shared=False) == (4 * (per_token + 30 * block), 0)
    repeat_all = config_from_preset("mobilellm-125m-ls", share="repeat_all")      # re-applied after all others
    assert bm.weight_reads_per_token(repeat_all, "int8", shared=True) == (per_token + 30 * block, 0)


@pytest.mark.parametrize("hot", [False, True])
def test_gemv_chain_computes_its_products_and_the_hot_one_shares_one_delegate(tiny, hot, tmp_path):
    config = tiny.config
    data, info, nbytes = bm.gemv_chain_pte(config, "fp32", mb=0.1, hot=hot)
    n = info["delegate_calls"]
    assert n >= 2 and nbytes == n * 2 * config.dim * config.ffn_dim * 4
    assert info["delegates"] == (1 if hot else n)                # the hot chain re-reads ONE packed pair
    torch.manual_seed(0)
    chain = bm.GemvChain(config.dim, config.ffn_dim, n, 1 if hot else n).eval()
    path = tmp_path / "chain.pte"
    path.write_bytes(data)
    x = torch.randn(1, 1, config.dim)
    torch.testing.assert_close(load_method(path).execute([x])[0], chain(x), rtol=1e-4, atol=1e-5)
