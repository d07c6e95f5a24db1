import json

import pytest
import torch

import checkpoint
import loader
from checkpoint import CheckpointError
from configurator import ConfigError
from loader import source_kind


def test_source_kind_names_every_init_from_the_loader_takes(tmp_path):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({}))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    ckpt_dir = tmp_path / "out"
    ckpt_dir.mkdir()
    assert source_kind("mobilellm-125m") == "preset"
    assert source_kind(str(gguf)) == "gguf" and source_kind("missing/model.gguf") == "gguf"
    assert source_kind(str(hf_dir)) == "hf" and source_kind("HuggingFaceTB/SmolLM2-135M-Instruct") == "hf"
    assert source_kind(str(ckpt_dir)) == "checkpoint" and source_kind("missing/ckpt.pt") == "checkpoint"
    assert source_kind(str(tmp_path / "out2")) == "checkpoint"      # owner/name, but its owner is a folder here


def test_a_missing_source_is_one_error_that_names_what_was_meant(tmp_path, monkeypatch):
    (tmp_path / "out-shakespeare-char").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"^no checkpoint at mobilellm-12m \(did you mean 'mobilellm-125m'\?\): "
                                              r"--init_from takes our out_dir"):
        loader.load_model_and_tokenizer("mobilellm-12m")
    with pytest.raises(CheckpointError, match=r"at out-shakespeare \(did you mean 'out-shakespeare-char'\?\)"):
        loader.load_model_and_tokenizer("out-shakespeare")
    with pytest.raises(CheckpointError, match=r"^no checkpoint at out-shakespeare-char/ckpt.pt: "):
        loader.load_model_and_tokenizer("out-shakespeare-char/ckpt.pt")      # nothing close: no guess


def test_a_checkpoint_whose_tokenizer_does_not_load_is_named(tmp_path):
    model = loader.preset_model("mobilellm-micro:n_layers=1+vocab_size=8")
    checkpoint.save_checkpoint(checkpoint.model_checkpoint(model, {"kind": "weird"}), tmp_path)
    with pytest.raises(CheckpointError, match=r"ckpt.pt: its tokenizer does not load \(ValueError: .*'weird'"):
        loader.load_model_and_tokenizer(str(tmp_path))


def test_a_preset_with_overrides_loads_in_every_script_with_its_seed():
    model, tokenizer = loader.load_model_and_tokenizer("mobilellm-micro-ls:n_layers=2+dim=32+n_heads=2,n_kv_heads=1")
    assert tokenizer is None and (model.config.n_layers, model.config.dim, model.config.n_heads) == (2, 32, 2)
    again = loader.load_model_and_tokenizer("mobilellm-micro-ls:n_layers=2+dim=32+n_heads=2,n_kv_heads=1")[0]
    other = loader.load_model_and_tokenizer("mobilellm-micro-ls:n_layers=2+dim=32+n_heads=2,n_kv_heads=1", seed=1)[0]
    assert torch.equal(model.output.weight, again.output.weight)
    assert not torch.equal(model.output.weight, other.output.weight)
    assert source_kind("mobilellm-micro:dim=64") == "preset" and source_kind("mobilellm-micro:") == "preset"
    with pytest.raises(ConfigError, match=r"'n_layer' \(did you mean 'n_layers'\?\) in the preset's overrides"):
        loader.load_model_and_tokenizer("mobilellm-micro:n_layer=2")
    with pytest.raises(ConfigError, match="'n_layers' must be int, got 'two'"):
        loader.require_source("mobilellm-micro:n_layers=two")
    with pytest.raises(ConfigError, match="bad override 'dim' in 'mobilellm-micro:dim': use preset:field=value"):
        loader.require_source("mobilellm-micro:dim")
    with pytest.raises(CheckpointError, match="no checkpoint at mobilellm-12m:dim=64 \\(did you mean "
                                              "'mobilellm-125m:dim=64'\\?\\)"):
        loader.require_source("mobilellm-12m:dim=64")
    assert source_kind("out-run:2") == "checkpoint"


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_on_a_cpu_is_bf16_only_where_native_and_the_model_is_wide(monkeypatch, native):
    monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda: native)
    wide, narrow = loader.CPU_BF16_MIN_DIM, loader.CPU_BF16_MIN_DIM - 64
    assert loader.resolve_dtype("auto", "cpu", wide) == ("bf16" if native else "fp32")
    assert loader.resolve_dtype("auto", "cpu", narrow) == "fp32"     # the quick default (dim 128)
    assert loader.resolve_dtype("bf16", "cpu", narrow) == "bf16"     # asked for: never silently ignored
    assert loader.resolve_dtype("bfloat16", "cpu", narrow) == "bf16"  # torch's name is an alias


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_auto_device_is_the_cpu_without_cuda_and_asking_for_cuda_is_a_clear_error():
    assert loader.resolve_device("auto") == "cpu" and loader.resolve_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match=r"device='cuda:1' but CUDA is not available here \(use --device=cpu or "):
        loader.resolve_device("cuda:1")


@pytest.mark.parametrize("name", ["foo", "gpu", "cuda:x", "xpu"])
def test_a_device_torch_does_not_know_or_we_do_not_run_on_is_a_clear_error(name):
    with pytest.raises(ConfigError, match=f"device='{name}': use cpu, cuda, cuda:N, mps or auto"):
        loader.resolve_device(name)
    if not torch.backends.mps.is_available():
        with pytest.raises(ConfigError, match="device='mps' but MPS .* is not available here"):
            loader.resolve_device("mps")


@pytest.mark.parametrize("major, native", [(7, False), (8, True), (9, True)])
def test_auto_dtype_on_a_gpu_is_bf16_only_where_its_tensor_cores_have_it(monkeypatch, major, native):
    """A V100 or T4 (sm70/75) creates bf16 tensors (torch.cuda.is_bf16_supported() says True: emulation) but
    computes them no faster than fp32: auto must choose fp32 there."""
    from types import SimpleNamespace
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(major=major, minor=0))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True, raising=False)
    assert loader.native_bf16("cuda") is native
    assert loader.resolve_dtype("auto", "cuda", 576) == ("bf16" if native else "fp32")
