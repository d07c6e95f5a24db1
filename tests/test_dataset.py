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
    with pytest.raises(DataError, match=f"^data_dir {tmp_path / 'd'} is not prepared: no .*meta.json; write it "
                                        f"with one of data/\\*/prepare.py "
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


def test_a_short_last_shard_is_drawn_in_proportion_to_its_windows():
    shards = [np.arange(10_000, dtype=np.uint16), np.arange(10_000, 10_070, dtype=np.uint16)]   # a 70-token tail
    from_tail = sum(int(get_batch(shards, 1, 64, seeded_generator(1, 0, it), "cpu")[0][0, 0]) >= 10_000
                    for it in range(400))
    assert from_tail <= 4                              # 6 windows of 9,942: ~0.06%, not half the batches


def test_a_single_files_batches_are_those_it_always_drew():
    shard = np.arange(5000, dtype=np.uint16)
    x = get_batch([shard], 3, 8, seeded_generator(1337, 0, 3, 0), "cpu")[0]
    g = seeded_generator(1337, 0, 3, 0)
    torch.randint(1, (1,), generator=g)                # the old uniform draw of the file
    assert x[:, 0].tolist() == torch.randint(5000 - 8, (3,), generator=g).tolist()


def test_empty_token_files_are_clear_errors(tmp_path):
    write_dataset(tmp_path / "d", {"train": [], "val": range(30)})
    with pytest.raises(DataError, match=r"train.bin holds no more than block_size=8 tokens"):
        load_dataset(SimpleNamespace(data_dir=str(tmp_path / "d"), dataset="d", block_size=8))
    write_dataset(tmp_path / "e", {"train": range(30), "val": []})
    with pytest.raises(DataError, match="holds 0 validation token"):
        dataset.validation_tokens(None, 1000, 10, tmp_path / "e")
    write_dataset(tmp_path / "e", {"val": [5]})
    with pytest.raises(DataError, match="holds 1 validation token"):
        dataset.validation_tokens(None, 1000, 1, tmp_path / "e")   # quantize's check before it writes anything


def test_validation_tokens_refuse_another_tokenizers_data_and_an_unprepared_folder(tmp_path):
    write_dataset(tmp_path / "d", {"val": range(30)})             # meta.json: a char tokenizer
    gpt2 = {"kind": "tiktoken", "encoding": "gpt2"}
    with pytest.raises(DataError, match="holds tokens of a char tokenizer .*not of the model's tiktoken tokenizer"):
        dataset.validation_tokens(None, 50257, 10, tmp_path / "d", gpt2)
    assert len(dataset.validation_tokens(None, 1000, 10, tmp_path / "d", {"kind": "char"})) == 10
    assert len(dataset.validation_tokens(None, 1000, 10, tmp_path / "d")) == 10   # no tokenizer (a preset): ids only
    (tmp_path / "d" / "meta.json").unlink()                       # a preparation stopped part-way
    with pytest.raises(DataError, match="is not prepared: no meta.json"):
        dataset.validation_tokens(None, 1000, 10, tmp_path / "d")


def test_a_built_in_dataset_stopped_part_way_is_prepared_again(tmp_path, monkeypatch):
    folder = tmp_path / "data" / "shakespeare_char"
    folder.mkdir(parents=True)
    np.arange(100, dtype=np.uint16).tofile(folder / "train.bin")  # written, but no meta.json: killed part-way
    monkeypatch.setattr(dataset, "REPO_DIR", tmp_path)
    ran = []
    monkeypatch.setattr(dataset.subprocess, "run", lambda cmd: ran.append(cmd) or SimpleNamespace(returncode=0))
    cfg = SimpleNamespace(data_dir="", dataset="shakespeare_char")
    dataset.prepare_if_missing(cfg)
    assert len(ran) == 1 and ran[0][1].endswith("shakespeare_char/prepare.py")
    (folder / "meta.json").write_text("{}")
    dataset.prepare_if_missing(cfg)
    assert len(ran) == 1
