"""data/<name>/prepare.py on local files: the .bin files decode back to the text, meta.json names the
tokenizer, and a failed download says how to pass a local file."""
import importlib.util
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]


def load_prepare(name):
    spec = importlib.util.spec_from_file_location(f"prepare_{name}", REPO / "data" / name / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module              # so worker processes can unpickle its functions
    spec.loader.exec_module(module)
    return module


def decode_split(folder, split):
    meta = json.loads((folder / "meta.json").read_text())
    tokenizer = load_tokenizer(meta["tokenizer"])
    assert tokenizer.vocab_size == meta["vocab_size"]
    files = sorted(folder.glob(f"{split}.bin")) or sorted(folder.glob(f"{split}_*.bin"))
    return "".join(tokenizer.decode(np.fromfile(f, dtype=np.uint16).tolist()) for f in files)


@pytest.fixture
def shakespeare_slice(shared_dir, tmp_path):
    text = (shared_dir / "data/tinyshakespeare/input.txt").read_text()[:20_000]
    (tmp_path / "input.txt").write_text(text)
    return tmp_path / "input.txt", text


@pytest.mark.parametrize("name, kind", [("shakespeare_char", "char"), ("shakespeare", "tiktoken")])
def test_shakespeare_bins_round_trip(name, kind, shakespeare_slice, tmp_path):
    path, text = shakespeare_slice
    out = tmp_path / "out"
    load_prepare(name).prepare(path, out)
    train, val = decode_split(out, "train"), decode_split(out, "val")
    assert train + val == text and len(val) == pytest.approx(len(text) / 10, abs=2)
    assert json.loads((out / "meta.json").read_text())["tokenizer"]["kind"] == kind


def test_gutenberg_takes_a_train_val_folder_or_books(shared_dir, tmp_path):
    source = tmp_path / "books"
    source.mkdir()
    texts = {split: (shared_dir / f"data/gutenberg_children/{split}.txt").read_text()[:15_000]
             for split in ("train", "val")}
    for split, text in texts.items():
        (source / f"{split}.txt").write_text(text)
    prepare = load_prepare("gutenberg")
    prepare.prepare([source], "gpt2", tmp_path / "bpe")
    assert decode_split(tmp_path / "bpe", "train") == texts["train"]
    assert decode_split(tmp_path / "bpe", "val") == texts["val"]
    prepare.prepare([source / "train.txt", source / "val.txt"], "char", tmp_path / "char")
    joined = decode_split(tmp_path / "char", "train") + decode_split(tmp_path / "char", "val")
    assert joined == texts["train"] + "\n\n" + texts["val"]


def test_gutenberg_strips_the_license_header():
    book = "The Project Gutenberg eBook\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\nOnce upon a time.\n" \
           "*** END OF THE PROJECT GUTENBERG EBOOK X ***\nLicense text"
    assert load_prepare("gutenberg").strip_gutenberg_header(book) == "Once upon a time.\n"


def test_fineweb_tokenize_and_shard_on_local_documents(shared_dir, tmp_path):
    docs = [d for d in (shared_dir / "data/tinyshakespeare/input.txt").read_text()[:30_000].split("\n\n") if d.strip()]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    prepare = load_prepare("fineweb_edu")
    shards = prepare.tokenize_and_shard(prepare.local_documents([tmp_path / "docs.jsonl"]), tmp_path / "out",
                                        shard_tokens=2000, workers=2)
    assert shards[0].name == "val_000000.bin" and shards[1].name == "train_000001.bin"
    assert all(s.stat().st_size == 2 * 2000 for s in shards[:-1])
    eot = "<|endoftext|>"
    assert decode_split(tmp_path / "out", "val") + decode_split(tmp_path / "out", "train") == \
        "".join(eot + d for d in docs)


def test_preparing_again_leaves_none_of_the_earlier_shards(shared_dir, tmp_path):
    docs = [d for d in (shared_dir / "data/tinyshakespeare/input.txt").read_text()[:30_000].split("\n\n") if d.strip()]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    prepare = load_prepare("fineweb_edu")
    documents = prepare.local_documents([tmp_path / "docs.jsonl"])
    many = prepare.tokenize_and_shard(documents, tmp_path / "out", shard_tokens=2000, workers=1)
    few = prepare.tokenize_and_shard(prepare.local_documents([tmp_path / "docs.jsonl"]), tmp_path / "out",
                                     shard_tokens=2000, workers=1, max_tokens=3000)
    assert len(many) > 2 and [p.name for p in few] == ["val_000000.bin", "train_000001.bin"]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.bin")) == ["train_000001.bin", "val_000000.bin"]

    def offline():
        raise OSError("no route to host")
        yield

    with pytest.raises(OSError):                          # a stream that fails at once replaces nothing
        prepare.tokenize_and_shard(offline(), tmp_path / "out", shard_tokens=2000, workers=1)
    assert len(list((tmp_path / "out").glob("*.bin"))) == 2 and (tmp_path / "out" / "meta.json").is_file()
    with pytest.raises(SystemExit, match="no text"):
        prepare.tokenize_and_shard(iter([]), tmp_path / "empty", shard_tokens=2000, workers=1)


def test_a_preparation_killed_midway_leaves_a_folder_that_reads_as_not_prepared(shakespeare_slice, tmp_path,
                                                                                monkeypatch):
    from dataset import DataError, load_dataset
    from train import TrainConfig
    load_prepare("shakespeare_char")                          # puts data/ on the path, for prepare_common
    import prepare_common
    text = shakespeare_slice[1]
    tokenizer = load_tokenizer({"kind": "char", "chars": "".join(sorted(set(text)))})
    prepare_common.write_dataset(tmp_path, tokenizer, text[:15_000], text[15_000:])
    assert load_dataset(TrainConfig(data_dir=str(tmp_path)))[0]["vocab_size"] == tokenizer.vocab_size

    real_encode, real_write = prepare_common.encode, prepare_common.write_tokens
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def killed_at_val(tokenizer, text, desc):
        if desc == "encoding val":
            raise KeyboardInterrupt
        return real_encode(tokenizer, text, desc)

    monkeypatch.setattr(prepare_common, "encode", killed_at_val)
    with pytest.raises(KeyboardInterrupt):                   # while encoding: the earlier preparation is whole
        prepare_common.write_dataset(tmp_path, tokenizer, text[:10_000], text[10_000:])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files
    monkeypatch.setattr(prepare_common, "encode", real_encode)

    def killed_writing_val(ids, path):
        if path.name == "val.bin":
            raise KeyboardInterrupt
        real_write(ids, path)

    monkeypatch.setattr(prepare_common, "write_tokens", killed_writing_val)
    with pytest.raises(KeyboardInterrupt):                   # train.bin rewritten, val.bin not: a mixed folder
        prepare_common.write_dataset(tmp_path, tokenizer, text[:10_000], text[10_000:])
    with pytest.raises(DataError, match="is not prepared: no .*meta.json"):
        load_dataset(TrainConfig(data_dir=str(tmp_path)))


@pytest.mark.parametrize("name", ["shakespeare_char", "shakespeare"])
def test_shakespeare_prepares_offline_from_the_copy_in_data(name, tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    prepare = load_prepare(name)
    monkeypatch.setattr(sys.modules["prepare_common"], "download", offline)
    prepare.prepare(None, tmp_path)
    text = (REPO / "data" / "tinyshakespeare.txt").read_text()
    assert len(text) == 1_115_394
    assert decode_split(tmp_path, "train") + decode_split(tmp_path, "val") == text


def test_offline_download_fails_with_one_clear_message(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    load_prepare("gutenberg")                                       # puts data/ (prepare_common) on sys.path
    from prepare_common import download
    with pytest.raises(SystemExit, match="could not download https://example.org/x.txt.*--input PATH"):
        download("https://example.org/x.txt", tmp_path / "x.txt")
    assert list(tmp_path.iterdir()) == []                  # no partial download left behind


def test_without_tiktokens_files_preparing_stops_with_one_line_before_any_work(tmp_path, monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    fineweb, shakespeare = load_prepare("fineweb_edu"), load_prepare("shakespeare")
    message = "could not load tiktoken's 'gpt2' encoding: .*Offline\\? Point TIKTOKEN_CACHE_DIR"
    with pytest.raises(SystemExit, match=message):       # not a pool restarting its failing workers forever
        fineweb.tokenize_and_shard(iter(["a document"]), tmp_path / "fw", shard_tokens=100, workers=2)
    with pytest.raises(SystemExit, match=message):
        shakespeare.prepare(None, tmp_path / "sh")
    assert list(tmp_path.iterdir()) == []


def test_an_error_reading_the_documents_stops_the_pool_with_its_message(tmp_path):
    def documents():
        yield "a document"
        raise SystemExit("the stream broke")            # a lost connection, as stream_remote says it

    fineweb = load_prepare("fineweb_edu")
    with pytest.raises(SystemExit, match="the stream broke"):       # not a pool waiting forever
        fineweb.tokenize_and_shard(documents(), tmp_path / "fw", shard_tokens=100, workers=2)
    with pytest.raises(SystemExit, match="--input .*nope.txt: no such file"):
        fineweb.local_documents([tmp_path / "nope.txt"])


def test_missing_local_file_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="--input .*nope.txt: no such file"):
        load_prepare("shakespeare").prepare(tmp_path / "nope.txt", tmp_path)
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)))
    (tmp_path / "empty.txt").write_text("\n \n")
    for path, says in ((tmp_path / "binary.txt", "not UTF-8 text \\(invalid start byte at byte 128\\)"),
                       (tmp_path / "empty.txt", "the file holds no text"), (tmp_path, "a folder, not a text file")):
        with pytest.raises(SystemExit, match=f"--input .*: {says}"):
            load_prepare("shakespeare_char").prepare(path, tmp_path / "out")


def test_fineweb_refuses_a_slice_that_leaves_nothing_to_train_on(shared_dir, tmp_path):
    docs = [d for d in (shared_dir / "data/tinyshakespeare/input.txt").read_text()[:30_000].split("\n\n") if d.strip()]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    prepare = load_prepare("fineweb_edu")
    with pytest.raises(SystemExit, match="--max_tokens=1,000 fills no more than the first shard, which validates"):
        prepare.tokenize_and_shard(prepare.local_documents([tmp_path / "docs.jsonl"]), tmp_path / "out",
                                   shard_tokens=1000, workers=1, max_tokens=1000)
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit, match="no more than the first shard.*nothing kept. Lower --shard_tokens"):
        prepare.tokenize_and_shard(prepare.local_documents([tmp_path / "docs.jsonl"]), tmp_path / "out",
                                   shard_tokens=100_000, workers=1)      # fewer tokens than one shard
    assert list((tmp_path / "out").iterdir()) == []


def test_a_bad_jsonl_line_is_one_clear_line(tmp_path):
    prepare = load_prepare("fineweb_edu")
    for line, says in (('{"content": "x"}', "KeyError"), ('{"text": "x"', "JSONDecodeError"), ('{"text": 3}', "int")):
        (tmp_path / "docs.jsonl").write_text('{"text": "fine"}\n\n' + line + "\n")
        with pytest.raises(SystemExit, match=f"docs.jsonl, line 3: .*{says}"):
            list(prepare.local_documents([tmp_path / "docs.jsonl"]))


def test_a_text_too_short_for_both_splits_or_a_vocabulary_over_uint16_writes_nothing(tmp_path):
    load_prepare("shakespeare_char")                          # puts data/ on the path, for prepare_common
    import prepare_common
    (tmp_path / "one.txt").write_text("a")                    # 90% of one character: an empty train split
    with pytest.raises(SystemExit, match="the text is too short: 0 train and 1 val tokens"):
        load_prepare("shakespeare_char").prepare(tmp_path / "one.txt", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    big = load_tokenizer({"kind": "char", "chars": "".join(map(chr, range(0x4E00, 0x4E00 + 70_000)))})
    with pytest.raises(SystemExit, match="70,000 tokens: its ids do not fit in the uint16 token files"):
        prepare_common.write_dataset(tmp_path / "out", big, "\u4e00" * 10, "\u4e01")
    with pytest.raises(SystemExit, match="token id 70,000 does not fit"):   # an id past a vocab_size that fits
        prepare_common.uint16_ids([1, 70_000])
    assert not (tmp_path / "out").exists()


def test_ctrl_c_in_a_preparation_is_one_line_and_exit_code_130(capsys):
    load_prepare("shakespeare_char")                          # puts data/ on the path, for prepare_common
    import prepare_common
    with pytest.raises(SystemExit) as stop:
        with prepare_common.ctrl_c_is_one_line("data/x/prepare.py"):
            raise KeyboardInterrupt
    assert stop.value.code == 130
    assert capsys.readouterr().err == ("data/x/prepare.py: interrupted; nothing half-written (a folder without "
                                       "meta.json is not a dataset)\n")
