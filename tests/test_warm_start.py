"""warm_start.py on its own: what a resumed run takes from its checkpoint. Resuming and fine-tuning end to
end are in test_train.py and test_finetune.py."""
from dataclasses import asdict, replace

import pytest

from configurator import ConfigError
from train import TrainConfig
from warm_start import changed_settings, model_fields, resumed_settings


def test_a_resume_takes_the_runs_settings_except_what_this_command_sets_and_where_it_runs():
    run = TrainConfig(max_iters=3000, batch_size=8, seed=7, dim=256, device="cuda", out_dir="old", quiet=True)
    ckpt = {"optimizer": {}, "iter_num": 10, "rng": {}, "train_config": asdict(run)}
    said = []
    now = TrainConfig(init_from="resume", out_dir="here", max_iters=4000)
    cfg = resumed_settings(now, {"init_from", "out_dir", "max_iters"}, ckpt, "cpu", said.append)
    assert (cfg.max_iters, cfg.batch_size, cfg.seed, cfg.dim) == (4000, 8, 7, 256)
    assert (cfg.init_from, cfg.out_dir, cfg.device, cfg.quiet) == ("resume", "here", "auto", False)
    assert said == ["resuming with settings changed from the run's: max_iters 3000 -> 4000 (the learning-rate "
                    "schedule follows max_iters: it is laid over the new length from here on)"]
    said.clear()
    resumed_settings(replace(now, lr_decay_iters=3000), {"max_iters", "lr_decay_iters"}, ckpt, "cpu", said.append)
    assert said[0].endswith("max_iters 3000 -> 4000")                  # a schedule of its own length: no note
    with pytest.raises(ConfigError, match="holds a model, not a training run"):
        resumed_settings(now, set(), {"train_config": asdict(run)}, "cpu", said.append)


def test_changed_settings_are_those_off_the_defaults_and_model_fields_are_the_shape():
    assert changed_settings(TrainConfig(max_iters=7, dim=TrainConfig.dim)) == {"max_iters"}
    assert {"n_layers", "dim", "share", "block_size"} <= set(model_fields(TrainConfig()))
    assert not {"max_iters", "vocab_size", "meta_ls_cache"} & set(model_fields(TrainConfig()))


def test_a_run_saved_on_more_gpus_than_this_machine_has_restores_its_rng_states(monkeypatch):
    """torch.cuda.set_rng_state_all indexes one generator per saved state: an 8-GPU run resumed on fewer GPUs
    must not ask for generators this machine lacks (mocked: one GPU, two states)."""
    import torch
    from warm_start import restore_rng_state
    generators = (torch.Generator(),)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda.random, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "default_generators", generators, raising=False)
    saved = torch.Generator().manual_seed(7).get_state()
    restore_rng_state({"torch": torch.get_rng_state(), "cuda": [saved, torch.Generator().get_state()]}, "cuda:0")
    assert torch.equal(generators[0].get_state(), saved)
