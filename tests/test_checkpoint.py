import os
import subprocess
import sys

import pytest
import torch

from checkpoint import CheckpointError, atomic_write, load_checkpoint, load_model, model_checkpoint, save_checkpoint
from model import MobileLLM, ModelConfig

SPEC = {"kind": "char", "chars": "abc"}


def tiny():
    torch.manual_seed(0)
    return MobileLLM(ModelConfig(vocab_size=3, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=32,
                                 block_size=8, share="immediate"))


def test_round_trip_rebuilds_the_same_model(tmp_path):
    model = tiny()
    save_checkpoint(model_checkpoint(model, SPEC, iter_num=7), tmp_path)
    loaded, ckpt = load_model(tmp_path)
    idx = torch.tensor([[0, 1, 2, 1]])
    torch.testing.assert_close(loaded(idx)[0], model(idx)[0])
    assert ckpt["iter_num"] == 7 and ckpt["tokenizer"] == SPEC and not loaded.training
    assert loaded.output.weight is loaded.tok_embeddings.weight


def test_compiled_model_saves_plain_keys(tmp_path):
    ckpt = model_checkpoint(torch.compile(tiny()), SPEC)
    assert not any(k.startswith("_orig_mod.") for k in ckpt["model"])


def test_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(model_checkpoint(tiny(), SPEC, iter_num=1), tmp_path)

    def dying_save(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(model_checkpoint(tiny(), SPEC, iter_num=2), tmp_path)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path)["iter_num"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]       # no temp file left behind


def test_the_temporary_file_of_a_writer_killed_outright_is_removed_by_the_next_write(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()                      # a process that has ended
    (tmp_path / f".ckpt.pt.tmp{dead}").write_bytes(b"half a checkpoint")
    (tmp_path / f".ckpt.pt.tmp{os.getppid()}").write_bytes(b"being written")       # a process that runs
    (tmp_path / f".log.jsonl.tmp{dead}").write_bytes(b"another file's")
    (tmp_path / ".ckpt.pt.tmp99999999999999999999").write_bytes(b"no pid of this machine")
    save_checkpoint(model_checkpoint(tiny(), SPEC, iter_num=1), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["ckpt.pt", f".ckpt.pt.tmp{os.getppid()}", f".log.jsonl.tmp{dead}", ".ckpt.pt.tmp99999999999999999999"])
    (tmp_path / f".m[1].pte.tmp{dead}").write_bytes(b"")                   # a name glob would read as a pattern
    atomic_write(tmp_path / "m[1].pte", lambda tmp: tmp.write_bytes(b"x"))
    assert not (tmp_path / f".m[1].pte.tmp{dead}").exists()


def test_missing_corrupt_and_foreign_files_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "ckpt.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="not a readable checkpoint: not a file torch.save writes$"):
        load_checkpoint(tmp_path)
    (tmp_path / "ckpt.pt").write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(CheckpointError, match="ckpt.pt is a GGUF file, not a torch checkpoint: name it .gguf"):
        load_checkpoint(tmp_path)
    torch.save({"state_dict": {}}, tmp_path / "ckpt.pt")
    whole = (tmp_path / "ckpt.pt").read_bytes()
    (tmp_path / "ckpt.pt").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(CheckpointError, match=r"truncated or damaged \(RuntimeError: [^\n]*zip archive[^\n.]*\)$"):
        load_checkpoint(tmp_path)
    (tmp_path / "ckpt.pt").write_bytes(whole)
    with pytest.raises(CheckpointError, match="not a nanoMobileLLM checkpoint"):
        load_checkpoint(tmp_path)


def test_checkpoint_that_does_not_fit_its_config_is_a_clear_error(tmp_path):
    ckpt = model_checkpoint(tiny(), SPEC)
    ckpt["model_config"]["dim"] = 32
    save_checkpoint(ckpt, tmp_path)
    with pytest.raises(CheckpointError, match=r"ckpt.pt: its weights do not fit the model its model_config describes:"
                                              r" \d+ tensors expected, \d+ of another shape \(e.g. tok_embeddings."
                                              r"weight: \(3, 16\) in the file, \(3, 32\) in the model\)$"):
        load_model(tmp_path)
    ckpt = model_checkpoint(tiny(), SPEC)
    ckpt["model"]["extra.weight"] = ckpt["model"].pop("norm.weight")
    save_checkpoint(ckpt, tmp_path)
    with pytest.raises(CheckpointError, match=r"1 missing \(e.g. norm.weight\); 1 not the model's \(e.g. extra"):
        load_model(tmp_path)
    ckpt["model_config"]["n_heads"] = 3
    save_checkpoint(ckpt, tmp_path)
    with pytest.raises(CheckpointError, match="its model_config does not make a model: "):
        load_model(tmp_path)


def test_pickled_code_is_refused(tmp_path):
    torch.save({"model": {}, "model_config": {}, "evil": print}, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match=r"safe load \(weights_only=True\) refuses \(Unsupported global: "
                                              r"GLOBAL print was not an allowed global by default.\)$"):
        load_checkpoint(tmp_path)
