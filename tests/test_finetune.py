"""Fine-tuning with train.py --init_from=<model source> on tiny models written by the tests (our checkpoint,
a Hugging Face dir): data tokenized with the model's tokenizer, settings taken from the model, frozen
parameters, gradient checkpointing, exact resume, DDP, and the errors for data or settings that do not fit."""
import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
import loader
import sample
from configurator import ConfigError, configure_and_report
from dataset import DataError
from int8 import quantize_model, quantized_checkpoint
from model import Block, MobileLLM, ModelConfig
from tokenizer import char_tokenizer
from train import TrainConfig, train
from warm_start import changed_settings, model_fields

REPO = Path(__file__).resolve().parents[1]
WORDS = "the king and queen of england spoke to a fool who was wise and the fool laughed at them".split()


def load_prepare(name):
    spec = importlib.util.spec_from_file_location(f"prepare_{name}", REPO / "data" / name / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sentences(seed, n):
    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(8)).capitalize() + "." for _ in range(n)) + "\n"


def tiny_model(vocab_size, **kw):
    torch.manual_seed(0)
    base = dict(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, block_size=32,
                share="immediate")
    return MobileLLM(ModelConfig(**{**base, **kw}))


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A released model stand-in: one of our checkpoints (random weights) with a character tokenizer."""
    text = sentences(0, 1500)
    folder = tmp_path_factory.mktemp("source")
    tokenizer = char_tokenizer("".join(sorted(set(text))))
    checkpoint.save_checkpoint(checkpoint.model_checkpoint(tiny_model(tokenizer.vocab_size), tokenizer.spec), folder)
    (folder / "input.txt").write_text(text)
    return folder


@pytest.fixture(scope="module")
def data_dir(source, tmp_path_factory):
    """The text tokenized with the source's tokenizer by data/shakespeare/prepare.py --tokenizer=<source>."""
    folder = tmp_path_factory.mktemp("data")
    load_prepare("shakespeare").prepare(source / "input.txt", folder, tokenizer=str(source))
    return folder


def finetune(source, data_dir, out_dir, **overrides):
    settings = dict(init_from=str(source), data_dir=str(data_dir), out_dir=str(out_dir), batch_size=4,
                    eval_iters=2, eval_interval=10, max_iters=20, learning_rate=3e-3, warmup_iters=2,
                    dtype="float32", quiet=True, optimizer="adamw")        # as config/finetune_shakespeare.py
    return TrainConfig(**{**settings, **overrides})


def weights(path):
    return checkpoint.load_checkpoint(path)["model"]


def test_prepare_encodes_with_the_source_tokenizer(source, data_dir):
    meta = json.loads((data_dir / "meta.json").read_text())
    assert meta["tokenizer"] == checkpoint.load_checkpoint(source)["tokenizer"]
    tokenizer = loader.load_model_and_tokenizer(str(source))[1]
    decoded = [tokenizer.decode(np.fromfile(data_dir / f"{split}.bin", dtype=np.uint16).tolist())
               for split in ("train", "val")]
    assert "".join(decoded) == (source / "input.txt").read_text()


def test_a_model_tokenizer_needs_an_out_dir_of_its_own(tmp_path):
    shakespeare = load_prepare("shakespeare")
    with pytest.raises(SystemExit, match="--tokenizer=out-x needs --out_dir"):
        shakespeare.output_dir(None, "out-x", tmp_path)
    assert shakespeare.output_dir(None, "gpt2", tmp_path) == tmp_path
    assert shakespeare.output_dir("data/x", "out-x", tmp_path) == Path("data/x")
    with pytest.raises(SystemExit, match="--tokenizer=mobilellm-micro: that model comes without a tokenizer"):
        shakespeare.source_tokenizer("mobilellm-micro")


def test_fine_tune_lowers_the_loss_and_keeps_the_model_and_its_tokenizer(source, data_dir, tmp_path, capsys):
    records = train(finetune(source, data_dir, tmp_path))
    assert records[-1]["val_loss"] < records[0]["val_loss"] - 0.5
    model, tokenizer = loader.load_model_and_tokenizer(str(tmp_path))
    source_model, source_tokenizer = loader.load_model_and_tokenizer(str(source))
    assert model.config == source_model.config          # dim 32 etc., not TrainConfig's defaults (dim 128)
    assert tokenizer.spec == source_tokenizer.spec
    ckpt = checkpoint.load_checkpoint(tmp_path)
    assert ckpt["train_config"]["init_from"] == str(source) and ckpt["train_config"]["dim"] == 32
    sample.main(["--init_from", str(tmp_path), "--start", "The king", "--max_new_tokens", "20"])
    assert capsys.readouterr().out.startswith("The king")


def test_a_fine_tuned_checkpoint_exports_and_quantizes_like_any_other(source, data_dir, tmp_path):
    pytest.importorskip("gguf")
    import export
    import quantize
    train(finetune(source, data_dir, tmp_path / "ft", max_iters=4))
    model, tokenizer = loader.load_model_and_tokenizer(str(tmp_path / "ft"))
    idx = torch.tensor([tokenizer.encode("The king and the fool")])
    export.main(["--init_from", str(tmp_path / "ft"), "--format", "gguf", "--out", str(tmp_path / "ft.gguf")])
    again, tok = loader.load_model_and_tokenizer(str(tmp_path / "ft.gguf"))
    assert torch.allclose(again(idx)[0], model(idx)[0], atol=1e-5) and tok.encode("The king") == tokenizer.encode("The king")
    quantize.main(["--init_from", str(tmp_path / "ft"), "--out_dir", str(tmp_path / "q")])
    qmodel, _ = loader.load_model_and_tokenizer(str(tmp_path / "q"))
    assert 0 < (qmodel(idx)[0] - model(idx)[0]).abs().max() < 0.1 * model(idx)[0].abs().max()


def test_frozen_parameters_are_saved_unchanged_and_not_optimized(source, data_dir, tmp_path):
    train(finetune(source, data_dir, tmp_path, freeze_embedding=True, train_blocks=1, max_iters=10))
    before, after = weights(source), weights(tmp_path)
    frozen = {name for name in before if name.startswith(("tok_embeddings.", "output.", "layers.0."))}
    for name in before:
        assert torch.equal(before[name], after[name]) == (name in frozen), name
    trained_tensors = len(before) - len(frozen)              # layers.1.* (9 tensors) and norm.weight
    assert len(checkpoint.load_checkpoint(tmp_path)["optimizer"]["state"]) == trained_tensors == 10


def test_resume_of_a_fine_tune_continues_exactly(source, data_dir, tmp_path):
    common = dict(lr_decay_iters=20, gradient_accumulation_steps=2, always_save_checkpoint=True, freeze_embedding=True)
    straight = train(finetune(source, data_dir, tmp_path / "a", max_iters=20, **common))
    train(finetune(source, data_dir, tmp_path / "b", max_iters=10, **common))
    resumed = train(finetune(source, data_dir, tmp_path / "b", max_iters=20, **common, init_from="resume"))
    assert resumed[-1]["val_loss"] == straight[-1]["val_loss"]
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    for name, weight in a.items():
        assert torch.equal(weight, b[name]), name
    assert loader.load_model_and_tokenizer(str(tmp_path / "b"))[1].spec["kind"] == "char"
    changed = finetune(source, data_dir, tmp_path / "b", max_iters=30, **{**common, "freeze_embedding": False},
                       init_from="resume")
    with pytest.raises(ConfigError, match="set freeze_embedding and train_blocks as the run did"):
        train(changed, set_keys=changed_settings(changed) | {"freeze_embedding"})   # set on purpose


def test_resume_keeps_a_fine_tunes_shorter_block_size(source, data_dir, tmp_path):
    train(finetune(source, data_dir, tmp_path, max_iters=4, block_size=16))     # the model's context is 32
    resume = TrainConfig(init_from="resume", out_dir=str(tmp_path), max_iters=6, quiet=True)
    train(resume, set_keys={"init_from", "out_dir", "max_iters", "quiet"})       # as the command line sets them
    assert checkpoint.load_checkpoint(tmp_path)["train_config"]["block_size"] == 16


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(source, data_dir, tmp_path, monkeypatch):
    model = tiny_model(30).train()
    x, y = torch.randint(30, (3, 32)), torch.randint(30, (3, 32))
    block_calls, block_forward = [], Block.forward
    monkeypatch.setattr(Block, "forward", lambda *args: block_calls.append(1) or block_forward(*args))
    results = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = checkpointing
        block_calls.clear()
        loss = model(x, y)[1]
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()], len(block_calls)))
    (loss_plain, grads_plain, calls_plain), (loss_ckpt, grads_ckpt, calls_ckpt) = results
    assert (calls_plain, calls_ckpt) == (4, 8)           # 2 blocks applied twice (LS); recomputed in backward
    assert torch.equal(loss_plain, loss_ckpt)
    for plain, ckpt in zip(grads_plain, grads_ckpt):
        torch.testing.assert_close(ckpt, plain, rtol=1e-5, atol=1e-7)
    plain = train(finetune(source, data_dir, tmp_path / "plain", max_iters=5, freeze_embedding=True))
    ckpt = train(finetune(source, data_dir, tmp_path / "ckpt", max_iters=5, freeze_embedding=True,
                          gradient_checkpointing=True))
    assert ckpt[-1]["val_loss"] == pytest.approx(plain[-1]["val_loss"], abs=1e-6)


def test_settings_that_contradict_the_model_are_refused_naming_both(source, data_dir, tmp_path):
    common = [f"--init_from={source}", f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--quiet=True",
              "--dtype=float32", "--max_iters=2", "--eval_interval=2", "--eval_iters=1", "--batch_size=2"]
    for override, message in [("--dim=64", r"dim=64 \(the model has dim=32\)"),
                              ("--dim=128", r"dim=128 \(the model has dim=32\)"),      # the default, but set
                              ("--block_size=64", r"block_size=64 \(the model's context is 32\)")]:
        with pytest.raises(ConfigError, match=f"contradict the model {source}: {message}"):
            train(*configure_and_report(TrainConfig(), common + [override]))
    train(*configure_and_report(TrainConfig(), common + ["--block_size=16", "--n_layers=2"]))   # agrees / is lower
    ckpt = checkpoint.load_checkpoint(tmp_path)
    assert ckpt["train_config"]["block_size"] == 16 and ckpt["model_config"]["block_size"] == 32


def test_data_of_another_tokenizer_is_refused_with_the_command_to_prepare_it(source, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "input.txt").write_text(sentences(1, 300).upper())
    load_prepare("shakespeare_char").prepare(other / "input.txt", other)
    with pytest.raises(DataError, match=f"holds tokens of a char tokenizer .*of the model {source}.*"
                                         f"prepare.py --tokenizer={source} --out_dir=data/<name>"):
        train(finetune(source, other, tmp_path / "out"))
    with pytest.raises(DataError, match=rf"'my_text' is not prepared.*prepare.py --tokenizer={source} "
                                        r"--out_dir=data/my_text` \(or data/gutenberg/prepare.py\)$"):
        train(finetune(source, "", tmp_path / "out", dataset="my_text"))     # a config's own dataset, named


def test_sources_that_cannot_be_fine_tuned_are_refused(source, data_dir, tmp_path):
    import quantize
    model, ckpt = quantize.load_float_source(source)
    checkpoint.save_checkpoint(quantized_checkpoint(quantize_model(model, "w8"), ckpt, "w8"),
                               tmp_path / "int8")
    with pytest.raises(ConfigError, match="is an int8 checkpoint.*fine-tune the float model"):
        train(finetune(tmp_path / "int8", data_dir, tmp_path / "out"))
    with pytest.raises(ConfigError, match="out_dir's own checkpoint: continue it with --init_from=resume"):
        train(finetune(source, data_dir, source))
    with pytest.raises(ConfigError, match="'nowhere/ckpt.pt' is not 'scratch', 'resume' or a model that loads"):
        train(finetune("nowhere/ckpt.pt", data_dir, tmp_path / "out"))
    with pytest.raises(ConfigError, match="comes without a tokenizer"):
        train(finetune("mobilellm-micro", data_dir, tmp_path / "out"))


def sentencepiece_tokenizer(text_file, folder):
    spm = pytest.importorskip("sentencepiece")
    from tokenizer import sentencepiece_tokenizer
    spm.SentencePieceTrainer.train(input=str(text_file), model_prefix=str(folder / "sp"), vocab_size=64,
                                   model_type="bpe", hard_vocab_limit=False, minloglevel=2)
    return sentencepiece_tokenizer(folder / "sp.model")


def same_tokenizer_in_another_form(spec, folder):
    """spec written differently without changing how it encodes: the tokenizer.json's text laid out anew and
    no chat template, or the SentencePiece model file copied elsewhere."""
    if spec["kind"] == "tokenizers":
        return {**spec, "json": json.dumps(json.loads(spec["json"]), indent=1), "chat_template": None}
    copy = folder / "copy.model"
    copy.write_bytes(Path(spec["model_file"]).read_bytes())
    return {**spec, "model_file": str(copy)}


@pytest.mark.parametrize("kind", ["tokenizers", "sentencepiece"])
def test_hf_dir_with_its_tokenizer(kind, tmp_path, request):
    pytest.importorskip("safetensors")
    import hf
    books = tmp_path / "books"
    books.mkdir()
    (books / "train.txt").write_text(sentences(2, 1500))
    (books / "val.txt").write_text(sentences(3, 200))
    tokenizer = request.getfixturevalue("chat_tokenizer") if kind == "tokenizers" else \
        sentencepiece_tokenizer(books / "train.txt", tmp_path)
    hf.export_hf(tiny_model(tokenizer.vocab_size, share="none"), tmp_path / "hf", tokenizer)
    load_prepare("gutenberg").prepare([books], str(tmp_path / "hf"), tmp_path / "data")
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["tokenizer"]["kind"] == kind
    meta["tokenizer"] = same_tokenizer_in_another_form(meta["tokenizer"], tmp_path)     # still accepted
    (tmp_path / "data" / "meta.json").write_text(json.dumps(meta))
    records = train(finetune(tmp_path / "hf", tmp_path / "data", tmp_path / "out", max_iters=10, eval_interval=5))
    assert records[-1]["val_loss"] < records[0]["val_loss"] - 0.3
    model, reloaded = loader.load_model_and_tokenizer(str(tmp_path / "out"))
    assert reloaded.spec == loader.load_model_and_tokenizer(str(tmp_path / "hf"))[1].spec
    assert model.config.share == "none"                               # the source's, not TrainConfig's default


def test_ddp_fine_tune_with_frozen_parameters_matches_one_process(source, data_dir, tmp_path):
    common = dict(max_iters=4, eval_interval=4, gradient_accumulation_steps=2, always_save_checkpoint=True,
                  freeze_embedding=True, train_blocks=1)
    single = train(finetune(source, data_dir, tmp_path / "one", **common))
    args = [f"--{k}={v}" for k, v in vars(finetune(source, data_dir, tmp_path / "two", **common)).items()
            if v != getattr(TrainConfig(), k)]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(REPO / "train.py"), *args], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    two = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert two[-1]["val_loss"] == pytest.approx(single[-1]["val_loss"], abs=1e-5)
    one_weights, two_weights = weights(tmp_path / "one"), weights(tmp_path / "two")
    for name, weight in one_weights.items():
        torch.testing.assert_close(two_weights[name], weight, atol=1e-5, rtol=1e-4)
    assert torch.equal(two_weights["tok_embeddings.weight"], weights(source)["tok_embeddings.weight"])


def test_finetune_config_takes_the_model_settings_from_the_model():
    cfg, set_keys = configure_and_report(TrainConfig(), [str(REPO / "config" / "finetune_shakespeare.py")])
    assert set(model_fields(TrainConfig())) & set_keys == {"block_size"}             # the model's shape is the GGUF's
    assert cfg.init_from.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and cfg.dataset == "shakespeare_smollm2"
    assert cfg.freeze_embedding and cfg.always_save_checkpoint and cfg.eval_interval < cfg.max_iters
    assert cfg.optimizer == "adamw"


def test_finetune_options_runs_each_variant_for_the_same_time_in_its_own_process(source, data_dir, capsys):
    from experiments import finetune_options
    cfg = finetune_options.OptionsConfig(**{**finetune(source, data_dir, "unused").__dict__, "minutes": 0.02,
                                             "variants": "freeze_embedding=False;freeze_embedding=True,train_blocks=1"})
    results = finetune_options.main(cfg, {"init_from", "data_dir"})
    full, frozen = results.values()
    model = loader.load_model_and_tokenizer(str(source))[0]
    assert full["trained"] == model.num_params()
    assert frozen["trained"] == sum(p.numel() for p in model.layers[-1].parameters()) + model.norm.weight.numel()
    for r in (full, frozen):
        assert r["train_s"] >= 60 * 0.02 and r["steps"] >= 1             # trained for the time asked
        assert r["val_after"] < r["val_before"] and r["dtype"] == "fp32"
        assert 0 < r["peak_training_gib"] and 0 < r["peak_loading_gib"]
    assert capsys.readouterr().out.count("| freeze_embedding=") == 2   # one table row per variant
