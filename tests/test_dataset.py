import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import dataset
from dataset import DataError, get_batch, load_dataset, seeded_generator


def write_dataset(folder, splits):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").write_text(json.dumps({"vocab_size": 1000, "tokenizer": {"kind": "char"}}))
    for name, tokens in splits.items():
        np.asarray(tokens, dtype=np.uint16).tofile(folder / f"{name}.bin")


def test_a_batch_is_windows_of_the_tokens_and_their_next_tokens():
    shard = np.arange(500, dtype=np.uint16)
    x, y = get_batch([shard], 4, 16, seeded_generator(1, 0, 7), "cpu")
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(y, x + 1)                                    # token ids = positions: y is x one step on
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(4, 15, dtype=torch.int64))


def test_batches_depend_only_on_the_generator_keys():
    shards = [np.arange(1000, dtype=np.uint16), np.arange(1000, 2000, dtype=np.uint16)]
    draw = lambda *keys: get_batch(shards, 8, 32, seeded_generator(*keys), "cpu")[0]
    assert torch.equal(draw(1337, 0, 5, 0), draw(1337, 0, 5, 0))   # a resumed run draws the same batch
    assert not torch.equal(draw(1337, 0, 5, 0), draw(1337, 0, 5, 1))
    assert not torch.equal(draw(1337, 0, 5, 0), draw(1337, 1, 5, 0))   # eval batches differ from training's
    first_shard = {bool((draw(1337, 0, it, 0) < 1000).all()) for it in range(20)}
    assert first_shard == {True, False}                             # both shards are drawn from


def test_shards_load_and_missing_or_short_data_are_clear_errors(tmp_path, monkeypatch):
    cfg = SimpleNamespace(data_dir=str(tmp_path / "d"), dataset="d", block_size=8)
    with pytest.raises(DataError, match=f"is not prepared: no .*meta.json; write it with one of data/\\*/prepare.py "
                                        f"--out_dir={tmp_path / 'd'}, or fix data_dir"):
        load_dataset(cfg)
    for name in ("books", "plays"):                                 # a repo whose data/ has two datasets
        (tmp_path / "repo" / "data" / name).mkdir(parents=True)
        (tmp_path / "repo" / "data" / name / "prepare.py").touch()
    monkeypatch.setattr(dataset, "REPO_DIR", tmp_path / "repo")
    with pytest.raises(DataError, match=r"run `python data/plays/prepare.py`"):
        load_dataset(SimpleNamespace(data_dir="", dataset="plays", block_size=8))
    with pytest.raises(DataError, match=r"there is no data/nope/prepare.py: choose one of books, plays, or set"):
        load_dataset(SimpleNamespace(data_dir="", dataset="nope", block_size=8))
    write_dataset(tmp_path / "d", {"train_000000": range(100), "train_000001": range(50), "val": range(30)})
    meta, splits = load_dataset(cfg)
    assert meta["vocab_size"] == 1000 and [len(s) for s in splits["train"]] == [100, 50]
    with pytest.raises(DataError, match=r"val.bin holds no more than block_size=40 tokens"):
        load_dataset(SimpleNamespace(**{**vars(cfg), "block_size": 40}))
    (tmp_path / "d" / "val.bin").unlink()
    with pytest.raises(DataError, match=r"has no val.bin \(or val_\*.bin shards\)"):
        load_dataset(cfg)
