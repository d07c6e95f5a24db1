import pytest

import bench_train
import loader
from configurator import ConfigError, accept_old_flags, configure

TINY = ["--n_layers=1", "--dim=16", "--n_heads=2", "--n_kv_heads=1", "--ffn_dim=32", "--block_size=8",
        "--batch_size=2", "--iters=1", "--warmup=0", "--peak_flops=1e9"]


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


def test_reports_tokens_per_second_and_mfu_per_dtype(capsys):
    results = bench_train.main(configure(bench_train.BenchConfig(), TINY + ["--dtype=fp32"]))
    assert list(results) == ["fp32"] and results["fp32"] > 0
    out = capsys.readouterr().out
    assert "tokens/s  MFU" in out and "of 1 GFLOP/s" in out


def test_dtype_takes_a_list_as_bench_mobile_does_and_the_old_flag_still_works(capsys):
    argv = accept_old_flags(TINY + ["--dtypes=fp32,bf16"], bench_train.OLD_FLAGS)
    results = bench_train.main(configure(bench_train.BenchConfig(), argv))
    assert list(results) == ["fp32", "bf16"] and "bf16 / fp32 speedup" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="dtype must be one of .* got 'int4'"):
        bench_train.main(configure(bench_train.BenchConfig(), TINY + ["--dtype=fp32,int4"]))


@pytest.mark.parametrize("setting", ["--iters=0", "--rounds=0", "--warmup=-1"])
def test_counts_that_time_nothing_are_clear_errors(setting):
    name, value = setting[2:].split("=")
    with pytest.raises(ConfigError, match=f"^{name} must be at least {max(0, int(value) + 1)}, got {value}$"):
        bench_train.main(configure(bench_train.BenchConfig(), TINY + ["--dtype=fp32", setting]))


@pytest.mark.parametrize("native", [True, False])
def test_default_dtypes_leave_out_emulated_bf16(capsys, monkeypatch, native):
    monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda: native)
    results = bench_train.main(configure(bench_train.BenchConfig(), TINY + ["--device=cpu"]))
    assert list(results) == (["fp32", "bf16"] if native else ["fp32"])
    assert ("timing fp32 only" in capsys.readouterr().out) != native


def test_compare_times_each_variant_in_alternating_rounds(capsys, monkeypatch):
    order = []
    timed = bench_train.tokens_per_second

    def record(cfg, dtype, device):
        order.append((cfg.optimizer, cfg.muon_lr, dtype))
        return timed(cfg, dtype, device)

    monkeypatch.setattr(bench_train, "tokens_per_second", record)
    cfg = configure(bench_train.BenchConfig(), TINY + ["--dtype=fp32", "--rounds=2", "--muon_lr=0.02",
                                                       "--compare=optimizer=adamw;optimizer=muon,muon_lr=0.05"])
    medians = bench_train.main(cfg)
    assert order == [("adamw", 0.02, "fp32"), ("muon", 0.05, "fp32")] * 2
    assert list(medians) == ["optimizer=adamw", "optimizer=muon,muon_lr=0.05"]
    assert "1.000x the first" in capsys.readouterr().out


@pytest.mark.parametrize("compare, message", [("optimizer", "not a comma-separated list of key=value"),
                                              ("bogus=1", "unknown config key"),
                                              ("optimizer=sgd", "optimizer must be one of")])
def test_bad_compare_variants_are_clear_errors(compare, message):
    with pytest.raises(ConfigError, match=message):
        bench_train.main(configure(bench_train.BenchConfig(), TINY + [f"--compare={compare}"]))


def test_compare_times_each_variant_in_its_own_dtype_and_names_a_bad_one(monkeypatch):
    timed = []
    monkeypatch.setattr(bench_train, "tokens_per_second", lambda cfg, dtype, device: timed.append(dtype) or (1.0,))
    bench_train.main(configure(bench_train.BenchConfig(), TINY + ["--dtype=fp32", "--rounds=1",
                                                                  "--compare=dim=16;dtype=bf16"]))
    assert timed == ["fp32", "bf16"]
    with pytest.raises(ConfigError, match="--compare variant 'n_heads=3': bad model settings: dim .* divisible"):
        bench_train.main(configure(bench_train.BenchConfig(), TINY + ["--dtype=fp32", "--compare=dim=16;n_heads=3"]))
    with pytest.raises(ConfigError, match="--compare variant 'init_from=x': init_from='x': bench_train.py times"):
        bench_train.main(configure(bench_train.BenchConfig(), TINY + ["--dtype=fp32", "--compare=dim=16;init_from=x"]))
    with pytest.raises(ConfigError, match="--compare variant 'train_blocks=5': train_blocks=5 but the model has 1"):
        bench_train.main(configure(bench_train.BenchConfig(),
                                   TINY + ["--dtype=fp32", "--compare=dim=16;train_blocks=5"]))
    assert timed == ["fp32", "bf16"]                                  # refused before any timing


def test_fine_tuning_options_change_what_is_timed_and_the_mfu(capsys, monkeypatch):
    built, build = [], bench_train.build_optimizer
    monkeypatch.setattr(bench_train, "build_optimizer", lambda model, cfg, device: built.append(model) or build(
        model, cfg, device))
    flops = []
    monkeypatch.setattr(bench_train, "flops_per_token", lambda *a: flops.append(a) or 1.0)
    argv = TINY + ["--dtype=fp32", "--n_layers=2", "--train_blocks=1", "--freeze_embedding=True",
                   "--gradient_checkpointing=True"]
    bench_train.main(configure(bench_train.BenchConfig(), argv))
    model = built[0]
    assert model.gradient_checkpointing
    assert not model.tok_embeddings.weight.requires_grad
    assert not any(p.requires_grad for p in model.layers[0].parameters())
    assert all(p.requires_grad for p in model.layers[1].parameters())
    assert list(flops[0][2]) == [0] and flops[0][3] is True


def test_a_model_to_fine_tune_is_refused_not_ignored():
    with pytest.raises(ConfigError, match="init_from='some/model': bench_train.py times random weights"):
        bench_train.main(configure(bench_train.BenchConfig(), TINY + ["--dtype=fp32", "--init_from=some/model"]))
