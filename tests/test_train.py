"""train.py and configurator.py on tiny models and tiny data: learning, exact resume, DDP equivalence,
crash-safe checkpoints, Ctrl-C, NaN stops, clear errors, the shipped configs."""
import importlib.util
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

import checkpoint
import int8
import loader
import train as train_module
from configurator import ConfigError, configure
from dataset import DataError
from model import MobileLLM
from optim import build_optimizer
from train import TrainConfig, TrainError, model_config, train

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("prepare_shakespeare_char", REPO / "data/shakespeare_char/prepare.py")
prepare_char = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prepare_char)

WORDS = "the king and queen of england spoke to a fool who was wise and the fool laughed at them".split()


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A tiny character-level dataset written by data/shakespeare_char/prepare.py from a local file."""
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(8)).capitalize() + "." for _ in range(1500)]
    folder = tmp_path_factory.mktemp("tinychar")
    (folder / "input.txt").write_text("\n".join(lines) + "\n")
    prepare_char.prepare(folder / "input.txt", folder)
    return folder


def tiny(data_dir, out_dir, **overrides):
    settings = dict(data_dir=str(data_dir), out_dir=str(out_dir), n_layers=2, dim=32, n_heads=4, n_kv_heads=2,
                    ffn_dim=64, block_size=32, batch_size=4, eval_iters=2, eval_interval=10, max_iters=20,
                    learning_rate=3e-3, warmup_iters=2, dtype="fp32", quiet=True)
    return TrainConfig(**{**settings, **overrides})


def test_a_few_steps_lower_the_loss_and_write_the_log(data_dir, tmp_path):
    records = train(tiny(data_dir, tmp_path, max_iters=30, dtype="auto"))     # bf16 where the CPU has it
    assert records[-1]["val_loss"] < records[0]["val_loss"] - 0.5
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert lines == records
    assert {"iter", "train_loss", "val_loss", "lr", "tokens", "elapsed_s"} <= set(lines[-1])
    assert lines[-1]["iter"] == 30 and lines[-1]["tokens"] == 30 * 4 * 32
    plotted = importlib.util.find_spec("matplotlib") is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "log.jsonl"] + ["loss.png"] * plotted
    assert not plotted or (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"    # no temporary file, a whole image
    model, ckpt = checkpoint.load_model(tmp_path)        # weights_only=True loading of everything we store
    assert ckpt["iter_num"] == 30 and ckpt["tokenizer"]["kind"] == "char"
    assert ckpt["data_state"]["iter_num"] == 30 and "torch" in ckpt["rng"]
    assert ckpt["optimizer"]["first"]["state"] and ckpt["optimizer"]["second"]["state"]      # AdamW's and Muon's


def test_training_says_it_replaces_an_earlier_run_and_ends_with_the_command_to_sample(data_dir, tmp_path, capsys):
    train(tiny(data_dir, tmp_path, max_iters=10, quiet=False, peak_flops=1.0))
    said = capsys.readouterr().out
    assert said.splitlines()[-1] == f"sample from it: python sample.py --init_from={tmp_path}"
    assert "an earlier run's" not in said
    assert re.search(r"each iteration is 0.0 TFLOP: at least [\d,]+ s at this device's peak FLOP/s", said)
    train(tiny(data_dir, tmp_path, max_iters=10, quiet=False, peak_flops=1.0))      # the same out_dir again
    assert f"{tmp_path / 'ckpt.pt'} is an earlier run's, which this run replaces at its first save, a Ctrl-C's " \
           "after its first step included (to continue that run instead: --init_from=resume)" in capsys.readouterr().out


def test_a_new_run_leaves_the_earlier_run_in_its_folder_until_it_has_something_to_save(data_dir, tmp_path,
                                                                                       monkeypatch, capsys):
    earlier = train(tiny(data_dir, tmp_path, max_iters=10))
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    get_batch = train_module.get_batch
    monkeypatch.setattr(train_module, "get_batch", lambda *args: (
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT), get_batch(*args))[1])
    with pytest.raises(KeyboardInterrupt, match=f"before this run's first step: nothing saved, and {tmp_path} "
                                                "still holds the earlier run"):
        train(tiny(data_dir, tmp_path, max_iters=20, learning_rate=1e-3))        # Ctrl-C in its first eval
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files
    monkeypatch.undo()
    assert train(TrainConfig(init_from="resume", out_dir=str(tmp_path), quiet=True)) == []     # finished, as it was
    assert [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()] == earlier
    evaluate = train_module.evaluate
    monkeypatch.setattr(train_module, "evaluate", lambda *args: {**evaluate(*args), "val_loss": 9.0 + args[6]})
    train(tiny(data_dir, tmp_path, max_iters=20, quiet=False, peak_flops=1.0))       # never improves on its first
    monkeypatch.undo()
    assert "nothing saved: no eval improved on this run's first, and" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files
    interrupt_at(5, monkeypatch)
    with pytest.raises(KeyboardInterrupt, match="stopped at iteration 5; to resume"):    # its progress is kept
        train(tiny(data_dir, tmp_path, max_iters=20, learning_rate=1e-3))
    monkeypatch.undo()
    assert checkpoint.load_checkpoint(tmp_path)["iter_num"] == 5
    assert [json.loads(line)["iter"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [0]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_continues_exactly_with_the_runs_own_settings(data_dir, tmp_path, optimizer, capsys):
    common = dict(lr_decay_iters=20, gradient_accumulation_steps=2, always_save_checkpoint=True, optimizer=optimizer)
    straight = train(tiny(data_dir, tmp_path / "a", max_iters=20, **common))
    train(tiny(data_dir, tmp_path / "b", max_iters=10, **common))
    capsys.readouterr()
    resumed = train(TrainConfig(init_from="resume", out_dir=str(tmp_path / "b"), max_iters=20, peak_flops=1.0))
    said = capsys.readouterr().out
    assert "resuming with settings changed from the run's: max_iters 10 -> 20, peak_flops 0.0 -> 1.0\n" in said
    assert resumed[-1]["val_loss"] == straight[-1]["val_loss"]   # every other setting came from the checkpoint
    a, b = checkpoint.load_checkpoint(tmp_path / "a"), checkpoint.load_checkpoint(tmp_path / "b")
    assert a["iter_num"] == b["iter_num"] == 20
    for name, weight in a["model"].items():
        assert torch.equal(weight, b["model"][name]), name
    log = [json.loads(line)["iter"] for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert log == [0, 10, 20]                            # no duplicate eval at the resume point


def test_resume_drops_evals_logged_past_the_checkpoint(data_dir, tmp_path):
    """A run killed outright (no save on the way out) may have logged evals after its last checkpoint:
    the resumed run redoes them, and the log holds each iteration once."""
    train(tiny(data_dir, tmp_path, max_iters=10, eval_interval=5, always_save_checkpoint=True))
    with open(tmp_path / "log.jsonl", "a") as log:
        log.write(json.dumps(dict(iter=15, train_loss=9.0, val_loss=9.0)) + "\n")
    train(TrainConfig(init_from="resume", out_dir=str(tmp_path), max_iters=20))
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log] == [0, 5, 10, 15, 20] and log[3]["val_loss"] < 9


def test_a_resumed_run_whose_evals_are_worse_than_the_runs_best_keeps_the_best_checkpoint(data_dir, tmp_path,
                                                                                            monkeypatch):
    """always_save_checkpoint=False saves only when val loss improves on the best of the whole run, its part
    before the resume included: a resumed run that only gets worse must not replace the best model."""
    train(tiny(data_dir, tmp_path, max_iters=4, eval_interval=2))
    best = (tmp_path / "ckpt.pt").read_bytes()
    ckpt = checkpoint.load_checkpoint(tmp_path)
    assert ckpt["iter_num"] == 4 and math.isfinite(ckpt["best_val_loss"])
    evaluate = train_module.evaluate
    monkeypatch.setattr(train_module, "evaluate", lambda *args: {**evaluate(*args), "val_loss": 9.0 + args[6]})
    records = train(TrainConfig(init_from="resume", out_dir=str(tmp_path), max_iters=8, quiet=True))
    assert [r["iter"] for r in records] == [6, 8]
    assert (tmp_path / "ckpt.pt").read_bytes() == best
    assert [json.loads(line)["val_loss"] for line in (tmp_path / "log.jsonl").read_text().splitlines()][-2:] == [15, 17]


def test_resume_leaves_out_a_torn_log_line(data_dir, tmp_path, capsys):
    train(tiny(data_dir, tmp_path, max_iters=10, always_save_checkpoint=True))
    with open(tmp_path / "log.jsonl", "a") as log:
        log.write('\n{"iter": 10, "train_lo')                       # a blank line, and one cut short
    train(TrainConfig(init_from="resume", out_dir=str(tmp_path), max_iters=20, quiet=False, peak_flops=1.0))
    said = capsys.readouterr().out
    assert "log.jsonl: left out 2 line(s) that are not eval records" in said
    assert "max_iters 10 -> 20, peak_flops 0.0 -> 1.0 (the learning-rate schedule follows max_iters: it is laid" in said
    log = [json.loads(line)["iter"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log == [0, 10, 20]


def interrupt_at(iteration, monkeypatch, signum=signal.SIGINT, evals_before=1):
    """Signal this thread while the step to `iteration` draws its batch (one batch a step, after the
    evals before it: each draws 2 x eval_iters batches)."""
    get_batch, calls = train_module.get_batch, []

    def interrupting(*args):
        calls.append(1)
        if len(calls) == 2 * 2 * evals_before + iteration:
            signal.pthread_kill(threading.main_thread().ident, signum)       # to this thread, handled at once
        return get_batch(*args)

    monkeypatch.setattr(train_module, "get_batch", interrupting)


def test_ctrl_c_during_an_eval_cuts_it_short_and_the_resumed_run_evaluates_there(data_dir, tmp_path, monkeypatch):
    straight = train(tiny(data_dir, tmp_path / "a", max_iters=20))
    get_batch, calls = train_module.get_batch, []

    def interrupting(*args):
        calls.append(1)
        if len(calls) == 2 * 2 + 10 + 1:           # the first batch of the eval at iteration 10
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        return get_batch(*args)

    monkeypatch.setattr(train_module, "get_batch", interrupting)
    with pytest.raises(KeyboardInterrupt, match="stopped at iteration 10"):
        train(tiny(data_dir, tmp_path / "b", max_iters=20))
    assert len(calls) == 2 * 2 + 10 + 1                      # the other 3 eval batches were not drawn
    monkeypatch.undo()
    train(TrainConfig(init_from="resume", out_dir=str(tmp_path / "b"), quiet=True))
    log = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [(r["iter"], r["val_loss"]) for r in log] == [(r["iter"], r["val_loss"]) for r in straight]
    best = [checkpoint.load_checkpoint(tmp_path / run)["best_val_loss"] for run in ("a", "b")]
    assert best[0] == best[1] == min(r["val_loss"] for r in straight)


@pytest.mark.parametrize("stop_at", [10, 20])           # an eval's iteration, and max_iters (the last eval)
def test_a_run_stopped_where_an_eval_was_due_evaluates_when_resumed(data_dir, tmp_path, monkeypatch, stop_at):
    straight = train(tiny(data_dir, tmp_path / "a", max_iters=20))
    interrupt_at(stop_at, monkeypatch, evals_before=1 + (stop_at > 10))
    with pytest.raises(KeyboardInterrupt):
        train(tiny(data_dir, tmp_path / "b", max_iters=20))
    monkeypatch.undo()
    assert checkpoint.load_checkpoint(tmp_path / "b")["iter_num"] == stop_at
    train(TrainConfig(init_from="resume", out_dir=str(tmp_path / "b"), quiet=True))
    log = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log] == [0, 10, 20]
    assert [r["val_loss"] for r in log] == [r["val_loss"] for r in straight]


def test_ddp_two_gloo_processes_match_one_process(data_dir, tmp_path):
    """With Muon, the default (AdamW under DDP: tests/test_finetune.py's DDP test)."""
    common = dict(max_iters=6, eval_interval=6, gradient_accumulation_steps=2, always_save_checkpoint=True,
                  optimizer="muon")
    single = train(tiny(data_dir, tmp_path / "one", **common))
    args = [f"--{k}={v}" for k, v in vars(tiny(data_dir, tmp_path / "two", **common)).items()
            if v != getattr(TrainConfig(), k)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", str(REPO / "train.py"), *args],
                            env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    two = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert two[-1]["val_loss"] == pytest.approx(single[-1]["val_loss"], abs=1e-5)
    a, b = checkpoint.load_checkpoint(tmp_path / "one"), checkpoint.load_checkpoint(tmp_path / "two")
    for name, weight in a["model"].items():
        torch.testing.assert_close(b["model"][name], weight, atol=1e-5, rtol=1e-4)


def test_ddp_with_micro_steps_it_cannot_share_says_which_would_fit_once(data_dir, tmp_path):
    cfg = tiny(data_dir, tmp_path, max_iters=2)
    args = [f"--{k}={v}" for k, v in vars(cfg).items() if v != getattr(TrainConfig(), k)]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(REPO / "train.py"), *args], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode != 0
    said = "error: gradient_accumulation_steps (1) must be divisible by the number of processes (2), which share " \
           "its micro-steps: e.g. --gradient_accumulation_steps=2"
    assert result.stderr.count(said) == 1, result.stderr[-2000:]


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(data_dir, tmp_path, monkeypatch):
    cfg = tiny(data_dir, tmp_path, max_iters=10, always_save_checkpoint=True)
    train(cfg)

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        train(replace(cfg, max_iters=20, init_from="resume"))
    assert checkpoint.load_checkpoint(tmp_path)["iter_num"] == 10
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []     # no temp file left


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_good_checkpoint(data_dir, tmp_path, monkeypatch):
    cfg = tiny(data_dir, tmp_path, max_iters=10, always_save_checkpoint=True)
    train(cfg)
    forward = MobileLLM.forward

    def poisoned(self, idx, targets=None, input_pos=None):
        logits, loss = forward(self, idx, targets, input_pos)
        return logits, None if loss is None else loss * float("nan")

    monkeypatch.setattr(MobileLLM, "forward", poisoned)
    with pytest.raises(TrainError, match="became nan/inf at iteration 10.*last good checkpoint"):
        train(replace(cfg, max_iters=20, init_from="resume"))
    assert checkpoint.load_checkpoint(tmp_path)["iter_num"] == 10


def test_a_non_finite_eval_loss_stops_the_run_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    """Training steps stay finite, but the eval at iteration 20 gives nan: the run stops there, its checkpoint
    (saved at every eval here) stays the one of iteration 10, and the log gets no nan record."""
    cfg = tiny(data_dir, tmp_path, max_iters=10, always_save_checkpoint=True)
    train(cfg)
    log = (tmp_path / "log.jsonl").read_text()
    forward = MobileLLM.forward

    def nan_in_eval(self, idx, targets=None, input_pos=None):
        logits, loss = forward(self, idx, targets, input_pos)
        return logits, loss if self.training or loss is None else loss * float("nan")

    monkeypatch.setattr(MobileLLM, "forward", nan_in_eval)
    with pytest.raises(TrainError, match=r"non-finite eval loss .*nan.* at iteration 20; stopped, keeping the last "
                                         f"good checkpoint in {re.escape(str(tmp_path))}"):
        train(replace(cfg, max_iters=20, init_from="resume"))
    assert checkpoint.load_checkpoint(tmp_path)["iter_num"] == 10
    assert (tmp_path / "log.jsonl").read_text() == log


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])       # Ctrl-C, or kill / a scheduler
def test_ctrl_c_or_sigterm_saves_a_checkpoint_that_resumes(data_dir, tmp_path, monkeypatch, signum):
    get_batch = train_module.get_batch
    interrupt_at(7, monkeypatch, signum)
    cfg = tiny(data_dir, tmp_path, max_iters=20)
    handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    with pytest.raises(KeyboardInterrupt, match=f"to resume: python train.py --init_from=resume --out_dir={tmp_path}$"):
        train(cfg)
    assert checkpoint.load_checkpoint(tmp_path)["iter_num"] == 7      # the step in flight finished first
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers   # given back as they were
    monkeypatch.setattr(train_module, "get_batch", get_batch)
    with pytest.raises(ConfigError, match=f"{tmp_path / 'elsewhere'} holds no ckpt.pt: pass the run's folder"):
        train(TrainConfig(init_from="resume", out_dir=str(tmp_path / "elsewhere"), quiet=True))
    assert train(TrainConfig(init_from="resume", out_dir=str(tmp_path), quiet=True))[-1]["iter"] == 20


def test_ctrl_c_after_the_steps_forward_and_backward_still_stops_after_that_step(data_dir, tmp_path, monkeypatch):
    clip, calls = torch.nn.utils.clip_grad_norm_, []

    def interrupting(*args, **kwargs):                   # the optimizer phase of step 7, after the stop all-reduce
        calls.append(1)
        if len(calls) == 7:
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        return clip(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", interrupting)
    with pytest.raises(KeyboardInterrupt, match="stopped at iteration 7"):
        train(tiny(data_dir, tmp_path, max_iters=20))


def test_muon_takes_the_block_matrices_and_adamw_the_rest(data_dir, tmp_path):
    model = MobileLLM(model_config(TrainConfig(n_layers=2, dim=32, n_heads=4, n_kv_heads=2, ffn_dim=64), 65))
    optimizer = build_optimizer(model, TrainConfig(optimizer="muon", learning_rate=1e-3, muon_lr=0.02), "cpu")
    names = {id(p): n for n, p in model.named_parameters()}
    muon = [names[id(p)] for g in optimizer.second.param_groups for p in g["params"]]
    adamw = [names[id(p)] for g in optimizer.first.param_groups for p in g["params"]]
    assert sorted(muon + adamw) == sorted(names.values())
    assert len(muon) == 2 * 7 and all(n.startswith("layers.") and n.endswith("weight") and "norm" not in n for n in muon)
    assert "tok_embeddings.weight" in adamw and "norm.weight" in adamw
    assert {g["lr_scale"] for g in optimizer.second.param_groups} == {20.0}
    train(tiny(data_dir, tmp_path, max_iters=4, eval_interval=4, optimizer="muon", always_save_checkpoint=True))
    with pytest.raises(ConfigError, match="optimizer state does not fit.*the same optimizer"):
        train(tiny(data_dir, tmp_path, max_iters=8, eval_interval=4, init_from="resume", optimizer="adamw"))


def test_muon_learns_at_least_as_fast_as_adamw_on_tiny_data(data_dir, tmp_path):
    adamw = train(tiny(data_dir, tmp_path / "adamw", max_iters=30, eval_interval=30))
    muon = train(tiny(data_dir, tmp_path / "muon", max_iters=30, eval_interval=30, optimizer="muon"))
    assert muon[-1]["val_loss"] < adamw[0]["val_loss"] - 0.5
    assert muon[-1]["val_loss"] < adamw[-1]["val_loss"] + 0.05


def test_default_config_is_a_deep_and_thin_mobilellm_ls():
    cfg = configure(TrainConfig(), [])
    config = model_config(cfg, vocab_size=65)
    assert cfg.dataset == "shakespeare_char" and cfg.dtype == "auto" and cfg.device == "auto"
    assert config.share == "immediate" and config.depth == 2 * config.n_layers
    assert cfg.optimizer == "muon" and cfg.lr_schedule == "cosine"
    assert config.dim <= 256 and config.n_kv_heads < config.n_heads    # thin, grouped-query attention
    with torch.device("meta"):
        assert MobileLLM(config).num_params() > 0


@pytest.mark.parametrize("name, layers, dim, depth, params", [
    ("train_mobilellm_125m", 30, 576, 30, 124_635_456), ("train_mobilellm_125m_ls", 30, 576, 60, 124_635_456),
    ("train_mobilellm_350m", 32, 960, 32, 345_355_200), ("train_mobilellm_350m_ls", 32, 960, 64, 345_355_200)])
def test_paper_configs_hold_the_paper_recipe(name, layers, dim, depth, params):
    cfg = configure(TrainConfig(), [str(REPO / "config" / f"{name}.py")])
    config = model_config(cfg, vocab_size=32000)
    with torch.device("meta"):
        assert MobileLLM(config).num_params() == params
    assert (config.n_layers, config.dim, config.depth, cfg.block_size) == (layers, dim, depth, 2048)
    assert (cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay, cfg.grad_clip) == (0.9, 0.95, 1e-8, 0.1, 1.0)
    assert cfg.warmup_iters == 1000 and cfg.max_iters == 480_000 and cfg.dtype == "bf16"
    assert cfg.optimizer == "adamw" and cfg.lr_schedule == "cosine"
    assert cfg.min_lr == pytest.approx(cfg.learning_rate / 10)
    paper_tokens = 32 * 32 * 2048                       # 32 GPUs x 32 sequences x 2048 tokens at lr 2e-3
    assert cfg.learning_rate == pytest.approx(2e-3 * cfg.batch_size * cfg.block_size
                                              * cfg.gradient_accumulation_steps / paper_tokens)


@pytest.mark.parametrize("argv, message", [
    (["--bogus=1"], "unknown config key.*'bogus'"),
    (["--batch_size=abc"], "'batch_size' must be int, got 'abc'"),
    (["--learning_rate=True"], "'learning_rate' must be float"),
    (["--compile=1"], "'compile' must be bool"),
    (["--max_iters"], "must look like --key=value"),
    (["--max_iters", "--compile=True"], "'--max_iters' must look like --key=value"),
])
def test_bad_overrides_are_clear_errors(argv, message):
    with pytest.raises(ConfigError, match=message):
        configure(TrainConfig(), argv)


def test_a_bool_setting_alone_is_true_and_true_false_take_any_case():
    assert configure(TrainConfig(), ["--compile", "--quiet=true"]) == replace(TrainConfig(), compile=True, quiet=True)
    assert configure(TrainConfig(), ["--compile", "False", "--max_iters", "5"]) == replace(TrainConfig(), max_iters=5)
    assert configure(TrainConfig(), ["--compile=TRUE"]).compile is True


def test_config_files_and_overrides_apply_in_order(tmp_path):
    config_file = tmp_path / "x.py"
    config_file.write_text("import math\nfrom math import sqrt\nbatch_size = 3\nlearning_rate = 1\nmin_lr = 0.1\n"
                           "def half(x):\n    return x / 2\nout_dir = 'o'\n")    # imports, functions: no settings
    cfg = configure(TrainConfig(), [str(config_file), "--batch_size=5", "--out_dir=2024"])
    assert (cfg.batch_size, cfg.learning_rate, cfg.out_dir) == (5, 1.0, "2024")
    cfg = configure(TrainConfig(), [str(config_file), "--batch_size", "6", "--out_dir", "2025"])   # --key value
    assert (cfg.batch_size, cfg.learning_rate, cfg.out_dir) == (6, 1.0, "2025")
    config_file.write_text("batch_sise = 3\n")
    with pytest.raises(ConfigError, match="'batch_sise' \\(did you mean 'batch_size'\\?\\) in config file"):
        configure(TrainConfig(), [str(config_file)])
    for text, says in (("batch_size = 3\nmax_iters = (\n", "line 2: '\\(' was never closed"),
                       ("batch_size = 3\nmax_iters = iters * 2\n", "line 2: NameError: name 'iters' is not defined"),
                       ("import json\n\nx = json.loads('{bad')\n", "line 3: JSONDecodeError")):      # not json's line
        config_file.write_text(text)
        with pytest.raises(ConfigError, match=f"config file {config_file}, {says}"):
            configure(TrainConfig(), [str(config_file)])


def test_bad_values_and_missing_data_are_clear_errors(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="learning_rate must be > 0"):
        train(tiny(data_dir, tmp_path, learning_rate=0.0))
    with pytest.raises(ConfigError, match="init_from='resum': did you mean 'resume'\\?"):
        train(tiny(data_dir, tmp_path, init_from="resum"))
    with pytest.raises(ConfigError, match="out_dir is empty"):
        train(tiny(data_dir, "", max_iters=1))
    with pytest.raises(ConfigError, match="dtype must be one of"):
        train(tiny(data_dir, tmp_path, dtype="fp16"))
    with pytest.raises(ConfigError, match="optimizer must be one of"):
        train(tiny(data_dir, tmp_path, optimizer="sgd"))
    with pytest.raises(ConfigError, match="lr_schedule must be one of"):
        train(tiny(data_dir, tmp_path, lr_schedule="linear"))
    with pytest.raises(ConfigError, match="cooldown_frac must be in"):
        train(tiny(data_dir, tmp_path, lr_schedule="wsd", cooldown_frac=0))
    with pytest.raises(ConfigError, match="bad model settings: dim .* divisible by n_heads"):
        train(tiny(data_dir, tmp_path, dim=30))
    for bad, says in (({"learning_rate": -1.0}, "learning_rate must be >= 0, got -1.0"),
                      ({"beta2": 1.0}, r"beta2 must be in \[0, 1\), got 1.0"),
                      ({"max_iters": -1}, "max_iters must be >= 0, got -1"),
                      ({"batch_size": 0}, "batch_size must be positive, got 0"),
                      ({"lr_decay_iters": 0}, "lr_decay_iters must be positive")):   # before torch sees them
        with pytest.raises(ConfigError, match=says):
            train(tiny(data_dir, tmp_path, **bad))
    with pytest.raises(DataError, match="not prepared.*prepare.py"):
        train(tiny(tmp_path / "nowhere", tmp_path))
    with pytest.raises(ConfigError, match="init_from=resume continues the run in out_dir, and .*empty holds no"):
        train(tiny(data_dir, tmp_path / "empty", init_from="resume"))


def test_resuming_what_is_not_a_training_run_says_what_to_do_instead(data_dir, tmp_path):
    train(tiny(data_dir, tmp_path / "run", max_iters=2, eval_interval=2))
    model, ckpt = checkpoint.load_model(tmp_path / "run")
    checkpoint.save_checkpoint(checkpoint.model_checkpoint(model, ckpt["tokenizer"]), tmp_path / "model")
    with pytest.raises(ConfigError, match=f"{tmp_path / 'model'} holds a model, not a training run .*fine-tune from "
                                         f"it instead, with --init_from={tmp_path / 'model'} and another out_dir"):
        train(tiny(data_dir, tmp_path / "model", init_from="resume"))
    ckpt_without_rng = checkpoint.load_checkpoint(tmp_path / "run")
    del ckpt_without_rng["rng"]
    checkpoint.save_checkpoint(ckpt_without_rng, tmp_path / "no-rng")
    with pytest.raises(ConfigError, match="no-rng holds a model, not a training run \\(no rng to resume\\)"):
        train(tiny(data_dir, tmp_path / "no-rng", init_from="resume"))
    checkpoint.save_checkpoint(int8.quantized_checkpoint(int8.quantize_model(model, "w8a8"), ckpt, "w8a8"),
                               tmp_path / "int8")
    with pytest.raises(ConfigError, match="holds an int8 \\(w8a8\\) checkpoint, whose weights cannot be trained"):
        train(tiny(data_dir, tmp_path / "int8", init_from="resume"))


def test_command_line_reports_errors_in_one_line():
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "--n_layer=4"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: unknown config key(s) 'n_layer' (did you mean 'n_layers'?) in")
    assert "Traceback" not in result.stderr


def test_command_line_ctrl_c_saves_says_how_to_resume_and_exits_130(data_dir, tmp_path):
    settings = {**asdict(tiny(data_dir, tmp_path, max_iters=100_000, eval_interval=100_000)), "quiet": False,
                "peak_flops": 1e12}
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py")] + [f"--{k}={v}" for k, v in settings.items()],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:                  # the header: the run and its signal handlers are set
            if "parameters" in line:
                break
        else:                                     # it ended before its header (readline would spin forever on EOF)
            pytest.fail(f"train.py ended before its header: {proc.communicate(timeout=60)[1][-2000:]}")
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err
    assert "stopping after this step, with a checkpoint; an eval in progress is cut short (press Ctrl-C again" in err
    assert f"saved {tmp_path / 'ckpt.pt'}" in out
    assert f"to resume: python train.py --init_from=resume --out_dir={tmp_path}" in err


def test_resuming_a_bf16_run_where_bf16_is_emulated_says_how_to_continue_in_fp32(data_dir, tmp_path, monkeypatch,
                                                                                  capsys):
    train(tiny(data_dir, tmp_path, max_iters=4, eval_interval=4, dtype="bf16"))
    monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda: False)
    train(TrainConfig(init_from="resume", out_dir=str(tmp_path), max_iters=6, peak_flops=1.0))
    assert "which this device emulates far slower than fp32: --dtype=fp32 continues" in capsys.readouterr().out


def test_a_run_records_the_dtype_auto_chose_for_its_model(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda: True)
    out = tmp_path / "run"
    train_module.train(TrainConfig(max_iters=1, eval_iters=1, eval_interval=1, batch_size=2, block_size=16,
                                   quiet=True, out_dir=str(out), data_dir=str(data_dir)))   # not the repo's data/
    saved = torch.load(out / "ckpt.pt", weights_only=True)["train_config"]
    assert saved["dtype"] == "fp32"                                        # dim 128: below CPU_BF16_MIN_DIM


def test_resume_reads_the_checkpoint_onto_the_cpu_whatever_the_device(data_dir, tmp_path, monkeypatch):
    """The RNG states must be CPU tensors (torch.set_rng_state refuses a CUDA one: every resume on a GPU
    failed), so the checkpoint is read with map_location="cpu"; a device other than the CPU is mocked by
    reading onto the meta device whenever another map_location is asked for."""
    cfg = tiny(data_dir, tmp_path, max_iters=4, eval_interval=4)
    train(cfg)
    load = checkpoint.load_checkpoint
    monkeypatch.setattr(train_module, "load_checkpoint", lambda path, map_location="cpu", **kw:
                        load(path, "cpu" if map_location == "cpu" else "meta", **kw))
    assert train(replace(cfg, init_from="resume", max_iters=6, eval_interval=6, device="cpu:0"))[-1]["iter"] == 6


def test_a_missing_built_in_dataset_is_prepared_on_first_use_and_a_failed_preparation_is_one_error(
        data_dir, tmp_path, monkeypatch):
    """`python train.py` on a fresh checkout: data/shakespeare_char/ holds only its prepare.py, which train.py
    runs first; a resume prepares the run's own dataset, not the default one. Here in a stand-in repository,
    with a prepare.py that copies the tiny dataset."""
    import dataset
    folder = tmp_path / "repo" / "data" / "shakespeare_char"
    folder.mkdir(parents=True)
    copy = "import shutil\n" + "".join(f"shutil.copy({str(data_dir / name)!r}, {str(folder)!r})\n"
                                        for name in ("train.bin", "val.bin", "meta.json"))
    fail = "import sys\nsys.exit('no space left on device')\n"
    monkeypatch.setattr(dataset, "REPO_DIR", tmp_path / "repo")

    def unprepare(script):
        for path in folder.iterdir():
            path.unlink()
        (folder / "prepare.py").write_text(script)

    unprepare(copy)
    cfg = replace(tiny(data_dir, tmp_path / "a", max_iters=2, eval_interval=2), data_dir="", dataset="shakespeare_char")
    assert [r["iter"] for r in train(cfg)] == [0, 2]
    assert (folder / "train.bin").read_bytes() == (data_dir / "train.bin").read_bytes()
    unprepare(copy)                                          # its data gone: a resume prepares it again
    assert [r["iter"] for r in train(TrainConfig(init_from="resume", out_dir=str(tmp_path / "a"), max_iters=4,
                                                 quiet=True))] == [4] and (folder / "train.bin").is_file()
    unprepare(fail)
    with pytest.raises(DataError, match=r"preparing dataset 'shakespeare_char' failed \(the line above says why\); "
                                        r"then run `python data/shakespeare_char/prepare.py` again"):
        train(replace(cfg, out_dir=str(tmp_path / "b")))
    train(tiny(data_dir, tmp_path / "c", max_iters=2, eval_interval=2))      # a run on a data_dir of its own ...
    assert [r["iter"] for r in train(TrainConfig(init_from="resume", out_dir=str(tmp_path / "c"), max_iters=4,
                                                 quiet=True))] == [4]        # ... resumes without the default's


def test_gradients_are_clipped_to_grad_clip_and_a_non_finite_gradient_skips_the_update(data_dir):
    from types import SimpleNamespace
    from dataset import load_dataset
    cfg = tiny(data_dir, "unused", optimizer="adamw")
    meta, splits = load_dataset(cfg)
    torch.manual_seed(0)
    model = MobileLLM(model_config(cfg, meta["vocab_size"]))
    optimizer = build_optimizer(model, cfg, "cpu")
    seen, step = [], optimizer.step

    def spy():                                      # the gradient norm the update is made with
        seen.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item())
        step()

    optimizer.step = spy
    no_stop = SimpleNamespace(requested=False)
    for clip in (1e-3, 0.0):                        # 0 disables clipping
        loss, _ = train_module.train_step(model, model, optimizer, splits["train"], replace(cfg, grad_clip=clip),
                                          1e-3, 0, 0, 1, "cpu", no_stop)
        assert math.isfinite(loss)
    assert seen[0] == pytest.approx(1e-3, rel=1e-3) and seen[1] > 0.1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.norm.weight.register_hook(lambda grad: grad * float("inf"))     # a finite loss, an infinite gradient
    loss, _ = train_module.train_step(model, model, optimizer, splits["train"], cfg, 1e-3, 2, 0, 1, "cpu", no_stop)
    assert math.isnan(loss) and len(seen) == 2                              # no update made ...
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # ... the weights as they were
