import json
import sys

import pytest

from experiments import quickstart_vs_nanogpt as qvn

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_eval_lines_of_both_trainers_parse_and_other_lines_do_not():
    assert qvn.parse_eval("iter 250: train loss 1.8123, val loss 1.9456") == (250, 1.8123, 1.9456)
    assert qvn.parse_eval("step 500: train loss 1.6000, val loss 1.7800") == (500, 1.6, 1.78)
    # tqdm's carriage-return redraws can share the line with our eval line
    assert qvn.parse_eval("\r 12%|#  | 250/2000 [00:30<03:30]\riter 250: train loss 1.5, val loss 1.6\n")[0] == 250
    assert qvn.parse_eval("iter 12: loss 2.3456, time 120.00ms, mfu 1.20%") is None     # nanoGPT's per-step line
    assert qvn.parse_eval("saved out/ckpt.pt at iteration 250 (val loss improved)") is None


def test_a_run_is_timed_from_its_start_and_stopped_at_the_limit(tmp_path):
    script = ("import time\nprint('step 0: train loss 4.0, val loss 4.1')\ntime.sleep(0.5)\n"
              "print('step 10: train loss 3.0, val loss 3.2')\ntime.sleep(30)\nprint('step 20: train loss 2.0, val loss 2.1')")
    curve, finished = qvn.run_timed([sys.executable, "-c", script], tmp_path, 3, tmp_path / "run.log")
    assert [p["iter"] for p in curve] == [0, 10] and not finished
    assert curve[0]["t"] < curve[1]["t"] < 3 and curve[1]["t"] >= 0.5
    assert "step 10" in (tmp_path / "run.log").read_text()
    curve, finished = qvn.run_timed([sys.executable, "-c", "print('iter 5: train loss 1.0, val loss 1.5')"],
                                    tmp_path, 30, tmp_path / "quick.log")
    assert finished and curve[0]["val_loss"] == 1.5


def test_table_shows_the_latest_val_loss_each_minute_and_the_last_eval():
    curves = {"ours": [{"t": 5, "iter": 0, "train_loss": 4.2, "val_loss": 4.2},
                       {"t": 70, "iter": 500, "train_loss": 1.9, "val_loss": 2.0},
                       {"t": 170, "iter": 1000, "train_loss": 1.5, "val_loss": 1.6}],
              "theirs": [{"t": 100, "iter": 250, "train_loss": 2.4, "val_loss": 2.5}]}
    assert qvn.loss_at(curves["ours"], 60) == 4.2 and qvn.loss_at(curves["theirs"], 60) is None
    rows = qvn.table(curves, 3).splitlines()
    assert rows[0] == "| wall time | ours | theirs |"
    assert rows[2:5] == ["| 1 min | 4.2000 | - |", "| 2 min | 2.0000 | 2.5000 |", "| 3 min | 1.6000 | 2.5000 |"]
    assert rows[5] == "| last eval | 1.6000 (iter 1000, 170 s) | 2.5000 (iter 250, 100 s) |"


def test_main_runs_both_commands_for_the_same_time_and_writes_json_and_png(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_run(command, cwd, seconds, log_file):
        calls.append((command, cwd, seconds))
        return [{"t": 30.0, "iter": 0, "train_loss": 4.0, "val_loss": 4.0},
                {"t": 90.0, "iter": 100, "train_loss": 2.0, "val_loss": 2.1 + len(calls)}], True

    monkeypatch.setattr(qvn, "run_timed", fake_run)
    monkeypatch.setattr(qvn, "prepare", lambda nanogpt, input_file: None)
    with pytest.raises(SystemExit):                                       # not a nanoGPT checkout (yet)
        qvn.main(["--nanogpt", str(tmp_path / "nanoGPT")])
    assert "no nanoGPT checkout there" in capsys.readouterr().err
    (tmp_path / "nanoGPT").mkdir()
    (tmp_path / "nanoGPT" / "train.py").write_text("")
    result = qvn.main(["--nanogpt", str(tmp_path / "nanoGPT"), "--minutes", "2", "--out_dir", str(tmp_path / "out"),
                       "--max_iters=300"])
    (ours, ours_cwd, t1), (theirs, theirs_cwd, t2) = calls
    assert t1 == t2 == 120 and ours_cwd == qvn.REPO and theirs_cwd == tmp_path / "nanoGPT"
    assert ours[1] == "train.py" and "--max_iters=300" in ours
    assert theirs[1:3] == ["train.py", "config/train_shakespeare_char.py"] and "--device=cpu" in theirs
    assert "--max_iters=6300" in theirs and "--lr_decay_iters=6300" in theirs
    saved = json.loads((tmp_path / "out" / "quickstart_vs_nanogpt.json").read_text())
    assert saved["curves"]["nanoGPT"][-1]["val_loss"] == 4.1 and saved["machine"]["cores"] >= 1
    assert saved == json.loads(json.dumps(result))
    assert (tmp_path / "out" / "quickstart_vs_nanogpt.png").read_bytes()[:8] == PNG_MAGIC
    assert "| 2 min | 3.1000 | 4.1000 |" in capsys.readouterr().out
