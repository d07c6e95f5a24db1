import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from checkpoint import CheckpointError, model_checkpoint, save_checkpoint
from dataset import DataError
from int8 import load_quantized
from quantize import int8_path, main
from test_int8 import CHARS, SPEC, tiny_model

REPO = Path(__file__).resolve().parents[1]


def float_checkpoint(tmp_path, model):
    data = tmp_path / "data"
    data.mkdir()
    np.random.default_rng(0).integers(0, len(CHARS), 400).astype(np.uint16).tofile(data / "val.bin")
    (data / "meta.json").write_text(json.dumps({"tokenizer": SPEC, "vocab_size": len(CHARS)}))
    save_checkpoint(model_checkpoint(model, SPEC, train_config={"dataset": "test", "data_dir": str(data)},
                                     optimizer={"state": {}}), tmp_path / "src")
    return tmp_path / "src"


def test_command_line_writes_the_checkpoint_and_reports_every_variant_when_asked(tmp_path, capsys):
    src = float_checkpoint(tmp_path, tiny_model())
    main(["--init_from", str(src)])
    assert capsys.readouterr().out == f"wrote {tmp_path / 'src-w8a8' / 'ckpt.pt'} (w8a8)\n"     # no report
    model, ckpt = load_quantized(tmp_path / "src-w8a8")
    assert "optimizer" not in ckpt and ckpt["train_config"]["dataset"] == "test"
    main([str(src), "--mode=w8", "--report", "--eval_tokens=64", "--block_size=16", "--new_tokens=2"])
    report = capsys.readouterr().out                                   # the old positional form still works
    for variant in ("| fp32 |", "| bf16 |", "| w8a8 |", "| w8 |", "| w8a8-fake |"):
        assert variant in report
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in report.splitlines()
            if line.startswith("| ") and "variant" not in line}
    assert all(float(cells[0]) > 0 and float(cells[-1]) > 0 for cells in rows.values())   # loss, tokens/s
    assert float(rows["w8a8"][4].strip().rstrip("x")) < 0.5                                     # size vs fp32
    assert (tmp_path / "src-w8" / "ckpt.pt").is_file()
    main([str(src), "--report", "--variants=w8a8-fake", "--eval_tokens=64", "--block_size=16", "--decode_tokens=0"])
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [r[0].strip() for r in rows] == ["variant", "fp32", "w8a8-fake"]   # fp32, the reference, and what was asked
    assert rows[-1][-1].strip() == "-"                                 # no decode timed (the flag's old spelling)
    with pytest.raises(SystemExit):
        main([str(src), "--report", "--variants=fp16"])
    assert "unknown variant(s) fp16" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="already quantized"):
        main(["--init_from", str(tmp_path / "src-w8a8"), "--out_dir", str(tmp_path / "again")])
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit, match="--out_dir .*a-file is a file: give a folder"):
        main(["--init_from", str(src), "--out_dir", str(tmp_path / "a-file")])
    written = (tmp_path / "src-w8a8" / "ckpt.pt").stat().st_mtime_ns
    with pytest.raises(DataError, match="no val.bin .* in .*nowhere"):
        main(["--init_from", str(src), "--report", "--data_dir", str(tmp_path / "nowhere")])
    assert (tmp_path / "src-w8a8" / "ckpt.pt").stat().st_mtime_ns == written     # checked before writing
    other = tmp_path / "other"                                       # data of another tokenizer: refused
    other.mkdir()
    np.zeros(100, dtype=np.uint16).tofile(other / "val.bin")
    (other / "meta.json").write_text(json.dumps({"tokenizer": {"kind": "tiktoken", "encoding": "gpt2"},
                                                 "vocab_size": 50257}))
    with pytest.raises(DataError, match="holds tokens of a tiktoken tokenizer .*not of the model's char tokenizer"):
        main(["--init_from", str(src), "--report", "--data_dir", str(other)])
    assert (tmp_path / "src-w8a8" / "ckpt.pt").stat().st_mtime_ns == written


def test_what_does_not_load_is_one_line_naming_it(tmp_path):
    (tmp_path / "cut.gguf").write_bytes(b"GGUF" + bytes(20))
    for bad in (tmp_path / "cut.gguf", "mobilellm-micro:n_layer=2"):
        result = subprocess.run([sys.executable, str(REPO / "quantize.py"), "--init_from", str(bad)],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert result.stderr.startswith(f"error: cannot load {bad}: "), result.stderr


def test_the_int8_checkpoint_goes_beside_our_run_and_here_for_a_gguf_or_a_hub_id(tmp_path, monkeypatch):
    (tmp_path / "run").mkdir()
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "SmolLM2.Q4_1.gguf").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert int8_path("run", "", "w8a8") == int8_path("run/ckpt.pt", "", "w8a8") == Path("run-w8a8/ckpt.pt")
    (tmp_path / "run" / "model.pt").write_bytes(b"")                                   # a checkpoint file
    assert int8_path("run/model.pt", "", "w8a8") == Path("run/model-w8a8/ckpt.pt")
    assert int8_path("models/SmolLM2.Q4_1.gguf", "", "w8") == Path("out-SmolLM2.Q4_1-w8/ckpt.pt")  # not in models/
    assert int8_path("facebook/MobileLLM-1.5B", "", "w8a8") == Path("out-MobileLLM-1.5B-w8a8/ckpt.pt")
    assert int8_path("run", "elsewhere", "w8a8") == Path("elsewhere/ckpt.pt")


def test_an_out_dir_that_is_the_float_checkpoints_own_folder_is_refused_before_anything_is_written(tmp_path,
                                                                                                   monkeypatch):
    (tmp_path / "src").mkdir()
    src = float_checkpoint(tmp_path, tiny_model())                    # src/ckpt.pt: a training run's folder
    before = (src / "ckpt.pt").read_bytes()
    monkeypatch.chdir(tmp_path)
    for init_from, out_dir in ((src, src), (src / "ckpt.pt", src), (src, "src"), ("src", f"../{tmp_path.name}/src")):
        with pytest.raises(SystemExit, match="^--out_dir would overwrite the float checkpoint: choose another folder$"):
            main(["--init_from", str(init_from), "--out_dir", str(out_dir)])
    assert (src / "ckpt.pt").read_bytes() == before                   # the trained weights, optimizer and all
    assert sorted(p.name for p in src.iterdir()) == ["ckpt.pt"]
