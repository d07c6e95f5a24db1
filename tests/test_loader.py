import json

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
