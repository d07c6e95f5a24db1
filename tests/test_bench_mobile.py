"""bench_mobile.py: the host table times programs and eager PyTorch, a phone run checks adb, device and
runner before any export (the adb commands themselves: test_android.py), and errors are clear. Its bounds:
test_decode_bounds.py."""
import math
import re

import numpy as np
import pytest
import torch

import bench_mobile as bm
import export
from conftest import FAKE_RUNNER, MAX_SEQ_LEN, TINY_LS, write_script

pytest.importorskip("executorch.exir")

# --- Android (the adb and runner fakes: test_android.py) ------------------------------------------

def test_android_run_checks_adb_device_and_runner_before_any_export(fake_adb, tmp_path, monkeypatch):
    """A missing adb, device or runner is reported in seconds, not after a multi-minute export."""
    monkeypatch.setattr(export, "export_pte", lambda *a: pytest.fail("exported before checking the phone"))
    runner = write_script(tmp_path / "executor_runner", FAKE_RUNNER)
    args = ["--init_from", TINY_LS, "--device", "android", "--cache_dir", str(tmp_path / "cache")]
    with pytest.raises(SystemExit, match="bench_mobile.py: --device android needs --runner"):
        bm.main(args)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(SystemExit, match="adb is not on PATH"):
        bm.main(args + ["--runner", str(runner)])
    fake_adb(devices="")
    with pytest.raises(SystemExit, match="no Android device"):
        bm.main(args + ["--runner", str(runner)])


def test_cli_rejects_bad_input(capsys):
    with pytest.raises(SystemExit, match="--dtype 'fp16': choose from fp32, w8a8, 8da4w"):
        bm.main(["--init_from", TINY_LS, "--dtype", "fp16", "--device", "none"])
    with pytest.raises(SystemExit, match="--dtype 'fp16'"):         # int8, the W8A8 program's old name, passes
        bm.main(["--init_from", TINY_LS, "--dtype", "int8,fp16", "--device", "none"])
    with pytest.raises(SystemExit, match=r"must fit in --max_seq_len \(64\)"):    # by default the model's context
        bm.main(["--init_from", TINY_LS, "--prompt_len=300"])
    with pytest.raises(SystemExit, match=r"--max_seq_len \(100\) must be in 3..64"):
        bm.main(["--init_from", TINY_LS, "--max_seq_len=100", "--device", "none"])
    with pytest.raises(SystemExit, match="no checkpoint at mobilellm-9t:n_layers=2"):
        bm.main(["--init_from", "mobilellm-9t:n_layers=2", "--device", "none"])
    with pytest.raises(SystemExit, match="no checkpoint at mobilellm-9t"):
        bm.main(["--init_from", "mobilellm-9t", "--device", "none"])
    with pytest.raises(SystemExit, match="--init_from 'mobilellm-micro:n_layer=2': .*'n_layer' "
                                         "\\(did you mean 'n_layers'\\?\\) in the preset's overrides"):
        bm.main(["--init_from", "mobilellm-micro:n_layer=2", "--device", "none"])
    with pytest.raises(SystemExit, match="--lowering 'foo': choose shared and/or naive"):
        bm.main(["--init_from", TINY_LS, "--lowering", "shared,foo", "--device", "none"])
    with pytest.raises(SystemExit, match="use it with --device host"):
        bm.main(["--init_from", TINY_LS, "--device", "none", "--kernel_bound"])
    with pytest.raises(SystemExit, match="--data_dir: no val.bin .* in nowhere"):
        bm.main(["--init_from", TINY_LS, "--data_dir", "nowhere", "--max_seq_len", str(MAX_SEQ_LEN), "--prompt_len=4",
                 "--new_tokens=2"])
    for wrong in (["--device", "none"], ["--format", "ptl"]):
        for flag in (["--check_logits"], ["--data_dir", "data/x"]):
            with pytest.raises(SystemExit, match=f"{flag[0]} runs the .pte programs on this host"):
                bm.main(["--init_from", TINY_LS] + flag + wrong)


def test_every_compared_model_is_checked_before_the_first_export(monkeypatch):
    monkeypatch.setattr(bm, "cached_pte", lambda *a: pytest.fail("exported before checking every --compare entry"))
    with pytest.raises(SystemExit, match="--init_from 'nosuch': no checkpoint at nosuch"):
        bm.main(["--compare", f"{TINY_LS},nosuch", "--dtype", "fp32", "--device", "none"])
    with pytest.raises(SystemExit, match="no checkpoint at mobilellm-9t:dim=64"):
        bm.main(["--compare", f"{TINY_LS},mobilellm-9t:dim=64", "--dtype", "fp32", "--device", "none"])


def test_out_is_one_program_or_an_error_before_any_export(monkeypatch, tmp_path, export_cache, pte_fp32):
    monkeypatch.setattr(bm, "cached_pte", lambda *a: pytest.fail("exported though --out could not be written"))
    for many in (["--dtype", "fp32,w8a8"], ["--dtype", "fp32", "--lowering", "shared,naive"],
                 ["--dtype", "fp32", "--compare", f"{TINY_LS},{TINY_LS}"]):
        with pytest.raises(SystemExit, match="--out m.pte is one program: give one --init_from, one --dtype"):
            bm.main(["--init_from", TINY_LS, "--out", "m.pte", "--device", "none"] + many)
    with pytest.raises(SystemExit, match="--format ptl exports one model"):
        bm.main(["--compare", f"{TINY_LS},{TINY_LS}", "--format", "ptl"])
    with pytest.raises(SystemExit, match="--format ptl is fp32 only .*, not --dtype w8a8"):      # not a silent fp32
        bm.main(["--init_from", TINY_LS, "--format", "ptl", "--dtype", "w8a8", "--out", "m.ptl"])
    with pytest.raises(SystemExit, match="--out m.ptl: a --format pte program is a .pte file"):
        bm.main(["--init_from", TINY_LS, "--dtype", "fp32", "--out", "m.ptl"])
    monkeypatch.undo()
    out = tmp_path / "sub" / "m.pte"
    bm.main(["--init_from", TINY_LS, "--dtype", "fp32", "--max_seq_len", str(MAX_SEQ_LEN), "--device", "none",
             "--prompt_len=4", "--new_tokens=2", "--cache_dir", str(export_cache), "--out", str(out)])
    assert out.read_bytes() == pte_fp32[0].read_bytes() and [p.name for p in out.parent.iterdir()] == ["m.pte"]


def test_compared_checkpoints_with_one_file_name_each_get_their_own_programs_and_rows(fake_adb, tmp_path, monkeypatch,
                                                                                      capsys):
    """--compare runs/a/ckpt.pt,runs/b/ckpt.pt: both were named "ckpt.pt", so on a phone the second model's
    programs replaced the first's (one row for two models), and on the host two rows read "ckpt.pt"."""
    from checkpoint import model_checkpoint, save_checkpoint
    from loader import preset_model
    sources = []
    for run, seed in (("a", 0), ("b", 1)):
        (tmp_path / run).mkdir()
        save_checkpoint(model_checkpoint(preset_model(TINY_LS, seed=seed), {"kind": "char", "chars": "ab"}),
                        tmp_path / run / "ckpt.pt")
        sources.append(str(tmp_path / run / "ckpt.pt"))
    monkeypatch.setattr(export, "export_pte", lambda *a: (str(a).encode(), {"export_s": 0}))  # one per model
    log = fake_adb()
    runner = write_script(tmp_path / "executor_runner", FAKE_RUNNER)
    bm.main(["--compare", ",".join(sources), "--dtype", "fp32", "--device", "android", "--runner", str(runner),
             "--prompt_len=4", "--new_tokens=2", "--runs=1", "--cache_dir", str(tmp_path / "cache")])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "ms" not in line]
    assert [row.split("|")[1].strip() for row in rows] == ["a", "b"]            # each named by its folder
    assert log.read_text().count("--model_path=") == 4                   # decode and prefill of each model
    assert bm.model_names(["out-a/ckpt.pt", "out-b", "mobilellm-micro"]) == ["out-a", "out-b", "mobilellm-micro"]
    assert bm.model_names(["x/out", "y/out/ckpt.pt"]) == ["x/out", "y/out/ckpt.pt"]    # alike: named in full


def test_old_flag_spellings_still_work(capsys):
    """--prompt-len, --ckpt, --preset, ... from older command lines: the same options under their old names."""
    with pytest.raises(SystemExit, match=r"--prompt_len \+ --new_tokens \(302\) must fit in --max_seq_len \(30\)"):
        bm.main(["--preset", TINY_LS, "--prompt-len", "300", "--new-tokens=2", "--max-seq-len", "30"])
    with pytest.raises(SystemExit, match="no checkpoint at nowhere"):
        bm.main(["--ckpt", "nowhere", "--device", "none"])
    with pytest.raises(SystemExit, match="--data_dir runs the .pte programs on this host"):
        bm.main(["--preset", TINY_LS, "--val_data=data/x", "--val_tokens", "8", "--device", "none"])
    with pytest.raises(SystemExit, match="use it with --device host"):
        bm.main(["--preset", TINY_LS, "--device", "none", "--kernel-bound"])
    with pytest.raises(SystemExit):
        bm.main(["--help"])
    usage = capsys.readouterr().out
    assert "--prompt_len" in usage and "--prompt-len" not in usage and "--ckpt" not in usage


def test_host_table_end_to_end(pte_fp32, tmp_path, capsys, monkeypatch):
    path, info = pte_fp32                                          # the same program main() would export
    monkeypatch.setattr(export, "export_pte", lambda *args: (path.read_bytes(), info))
    monkeypatch.setattr(bm, "in_fresh_process", lambda fn, *args: fn(*args))   # spawning is tested above
    data = tmp_path / "data"                                       # a prepared dataset: 2 windows + 1 token
    data.mkdir()
    torch.randint(64, (2 * MAX_SEQ_LEN + 1,), generator=torch.Generator().manual_seed(0)).numpy().astype(
        np.uint16).tofile(data / "val.bin")
    (data / "meta.json").write_text('{"tokenizer": {"kind": "char", "chars": "x"}, "vocab_size": 64}')
    bm.main(["--init_from", TINY_LS, "--dtype", "fp32", "--eager", "fp32", "--device", "host", "--threads", "1",
             "--prompt_len", "4", "--new_tokens", "2", "--runs", "1", "--max_seq_len", str(MAX_SEQ_LEN),
             "--cache_dir", str(tmp_path), "--kernel_bound", "--check_logits",
             "--data_dir", str(data), "--eval_tokens", str(2 * MAX_SEQ_LEN)])
    out = capsys.readouterr().out
    assert "kernel bound = XNNPACK's matrix-vector products alone" in out
    reference = float(re.search(rf"model.py fp32 val loss ([\d.]+) .* on {2 * MAX_SEQ_LEN} tokens", out)[1])
    head, _, pte_row, eager_row = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("|")]
    assert [c.strip() for c in head][-7:] == ["DRAM bound tok/s", "kernel bound tok/s",
                                              "beyond it, ms per block application", "mem MB",
                                              "max abs logit error", "same next token", "val loss (perplexity)"]
    assert "ExecuTorch fp32 (shared)" in pte_row[1] and "eager PyTorch fp32" in eager_row[1]
    kernel_tok_s, beyond_ms = float(pte_row[-6]), float(pte_row[-5])   # kernel bound: ExecuTorch rows only
    assert kernel_tok_s > 0 and eager_row[-6].strip() == eager_row[-5].strip() == "-"
    assert beyond_ms == pytest.approx((float(pte_row[6]) - 1e3 / kernel_tok_s) / 2, abs=5e-3)  # 2 applications
    assert all(float(row[6]) > 0 for row in (pte_row, eager_row))       # decode ms/token
    for row in (pte_row, eager_row):                                    # both compute model.py's logits
        assert float(row[-3]) < 1e-4 and row[-2].strip() == "100%"
        loss, perplexity = re.fullmatch(r" ([\d.]+) \(([\d.]+)\) ", row[-1]).groups()
        assert float(loss) == pytest.approx(reference, abs=1e-4) and float(perplexity) == pytest.approx(
            math.exp(reference), rel=1e-3)
    assert reference > 3                                            # random weights: about ln(64) = 4.16


def test_a_row_faster_than_its_dram_bound_is_marked():
    row = dict(model="m", runtime="r", load_ms=1, init_ms=1, prefill_ms=1, mem_mb=1, dram_bytes=1e8)  # 100 MB/token
    table = bm.format_table([dict(row, decode_ms=10.0), dict(row, decode_ms=2.0)], 4, bandwidth=20.0,
                            kernel_column=False)                                  # bound: 20 GB/s / 100 MB = 200
    slow, fast = [line.split("|")[9].strip() for line in table.splitlines()[2:]]
    assert (slow, fast) == ("200", "200*")                                     # 100 and 500 tok/s


def test_logit_agreement_measures_the_difference_and_the_chosen_tokens():
    reference = torch.tensor([[0.0, 1.0, 0.5], [2.0, 0.0, 0.0]])
    error, same = bm.logit_agreement(torch.tensor([[0.0, 0.25, 0.5], [2.0, 0.0, 0.1]]), reference)
    assert error == pytest.approx(0.75) and same == 0.5                  # row 0 now picks token 2
    tokens = bm.check_tokens(50, 6, seed=3)
    assert torch.equal(tokens, bm.check_tokens(50, 6, seed=3)) and not torch.equal(tokens, bm.check_tokens(50, 6, 4))
