import json

import pytest
import torch
import torch.nn.functional as F

import hf
from model import MobileLLM, ModelConfig, apply_rope
from tokenizer import char_tokenizer, load_tokenizer, render_chat


def tiny_config(**kw):
    base = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, block_size=32)
    return ModelConfig(**{**base, **kw})


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return MobileLLM(tiny_config(**kw)).eval()


def meta_style_dir(tmp_path, weights, layer_sharing, fmt="bin"):
    """An HF dir as Meta publishes it: LLaMA key names, share_embedding with tie_word_embeddings false,
    no lm_head tensor, layer_sharing for the -layer-share models."""
    config = dict(architectures=["MobileLLMForCausalLM"], model_type="mobilellm", vocab_size=97, hidden_size=32,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                  hidden_act="silu", max_position_embeddings=32, rms_norm_eps=1e-5, rope_theta=10000.0,
                  tie_word_embeddings=False, share_embedding=True, layer_sharing=layer_sharing,
                  torch_dtype="float16")
    (tmp_path / "config.json").write_text(json.dumps(config))
    if fmt == "bin":
        torch.save(weights, tmp_path / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file
        save_file(weights, str(tmp_path / "model.safetensors"))
    return tmp_path


def random_llama_weights(n_layers=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"self_attn.q_proj.weight": (32, 32), "self_attn.k_proj.weight": (16, 32),
              "self_attn.v_proj.weight": (16, 32), "self_attn.o_proj.weight": (32, 32),
              "mlp.gate_proj.weight": (48, 32), "mlp.up_proj.weight": (48, 32), "mlp.down_proj.weight": (32, 48),
              "input_layernorm.weight": (32,), "post_attention_layernorm.weight": (32,)}
    w = {f"model.layers.{i}.{k}": torch.randn(s, generator=g) * 0.2 for i in range(n_layers) for k, s in shapes.items()}
    w["model.embed_tokens.weight"] = torch.randn(97, 32, generator=g) * 0.5
    w["model.norm.weight"] = 1 + 0.1 * torch.randn(32, generator=g)
    return {k: v.half() for k, v in w.items()}   # Meta ships float16


def textbook_llama_logits(w, idx, schedule):
    """LLaMA forward written from scratch on the raw HF tensors (fp32), blocks applied in `schedule` order."""
    w = {k: v.float() for k, v in w.items()}
    T = idx.size(1)
    rms = lambda x, g: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * g
    freqs = 1.0 / 10000.0 ** (torch.arange(0, 8, 2).float() / 8)
    angles = torch.outer(torch.arange(T).float(), freqs)
    x = w["model.embed_tokens.weight"][idx]
    for i in schedule:
        p = lambda name: w[f"model.layers.{i}.{name}"]
        h = rms(x, p("input_layernorm.weight"))
        q = (h @ p("self_attn.q_proj.weight").T).view(1, T, 4, 8).transpose(1, 2)
        k = (h @ p("self_attn.k_proj.weight").T).view(1, T, 2, 8).transpose(1, 2)
        v = (h @ p("self_attn.v_proj.weight").T).view(1, T, 2, 8).transpose(1, 2)
        q, k = apply_rope(q, angles.cos(), angles.sin()), apply_rope(k, angles.cos(), angles.sin())
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        att = (q @ k.transpose(-1, -2) / 8 ** 0.5).masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
        x = x + (att.softmax(-1) @ v).transpose(1, 2).reshape(1, T, 32) @ p("self_attn.o_proj.weight").T
        h = rms(x, p("post_attention_layernorm.weight"))
        x = x + (F.silu(h @ p("mlp.gate_proj.weight").T) * (h @ p("mlp.up_proj.weight").T)) @ p("mlp.down_proj.weight").T
    return rms(x, w["model.norm.weight"]) @ w["model.embed_tokens.weight"].T   # share_embedding: no lm_head


@pytest.mark.parametrize("share", ["none", "immediate"])
def test_our_model_to_hf_and_back_gives_identical_logits(tmp_path, share):
    model = tiny_model(share=share, tie_embeddings=share == "none")
    hf.export_hf(model, tmp_path)
    back, tokenizer = hf.load_hf(tmp_path)
    idx = torch.randint(97, (2, 12))
    assert torch.equal(model(idx)[0], back(idx)[0]) and tokenizer is None
    assert back.config.depth == model.config.depth and back.config.tie_embeddings == model.config.tie_embeddings
    modes = {f.name: f.stat().st_mode & 0o777 for f in tmp_path.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"]      # not owner-only, as safetensors writes it


def test_ls_export_is_unrolled_and_transformers_llama_loads_it_unchanged(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny_model(share="immediate")
    hf.export_hf(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_hidden_layers"] == 4 and config["architectures"] == ["LlamaForCausalLM"]
    llama = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert sum(p.numel() for p in llama.model.layers.parameters()) == 2 * sum(
        p.numel() for p in model.layers.parameters())   # the file doubles
    idx = torch.randint(97, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(llama(idx).logits, model(idx)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layer_sharing, schedule", [(False, [0, 1]), (True, [0, 0, 1, 1])])
def test_meta_style_dir_loads_and_matches_the_source_weights(tmp_path, layer_sharing, schedule):
    w = random_llama_weights()
    meta_style_dir(tmp_path, w, layer_sharing)
    model, _ = hf.load_hf(tmp_path)
    assert model.config.tie_embeddings and model.output.weight is model.tok_embeddings.weight
    assert model.config.share == ("immediate" if layer_sharing else "none")
    idx = torch.randint(97, (1, 10))
    torch.testing.assert_close(model(idx)[0], textbook_llama_logits(w, idx, schedule), atol=1e-4, rtol=1e-4)


def test_pytorch_model_bin_is_preferred_over_safetensors(tmp_path):
    w = random_llama_weights()
    meta_style_dir(tmp_path, w, False, fmt="safetensors")
    (tmp_path / "model.safetensors").write_bytes(b"broken conversion")   # Meta's 125M safetensors is reported broken
    torch.save(w, tmp_path / "pytorch_model.bin")
    model, _ = hf.load_hf(tmp_path)
    torch.testing.assert_close(model.tok_embeddings.weight, w["model.embed_tokens.weight"].float())


def test_safetensors_dir_and_sentencepiece_tokenizer(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "sp"), vocab_size=40,
                                   model_type="bpe", minloglevel=2)
    (tmp_path / "hf").mkdir()
    hf_dir = meta_style_dir(tmp_path / "hf", random_llama_weights(), False, fmt="safetensors")
    (hf_dir / "tokenizer.model").write_bytes((tmp_path / "sp.model").read_bytes())
    model, tokenizer = hf.load_hf(hf_dir)
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
    assert tokenizer.decode(tokenizer.encode("the lazy fox")) == "the lazy fox"
    hf.export_hf(model, tmp_path / "out", tokenizer)
    _, again = hf.load_hf(tmp_path / "out")
    assert again.spec["kind"] == "sentencepiece" and again.encode("the lazy fox") == tokenizer.encode("the lazy fox")


# --- tokenizer.json (SmolLM2's format) -----------------------------------------------------------

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello there"}, {"role": "user", "content": "how are you?"}]
TEXT = "hello there, how are you?<|im_end|>"


def export_with_tokenizer(out_dir, chat_tokenizer, add_bos):
    """A tiny model (320 embeddings for a 300-token vocabulary) and the ChatML tokenizer, as an HF dir."""
    tokenizer = load_tokenizer({**chat_tokenizer.spec, "add_bos": add_bos})
    model = tiny_model(vocab_size=320)
    hf.export_hf(model, out_dir, tokenizer)
    return model, tokenizer


def prompt_ids(tokenizer, text):
    return ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(text)


@pytest.mark.parametrize("add_bos", [False, True])
def test_model_and_tokenizer_json_to_hf_and_back(tmp_path, chat_tokenizer, add_bos):
    model, tokenizer = export_with_tokenizer(tmp_path, chat_tokenizer, add_bos)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == ((0 if add_bos else None), 2)
    back, loaded = hf.load_hf(tmp_path)
    idx = torch.randint(320, (1, 12))
    assert torch.equal(model(idx)[0], back(idx)[0])
    assert loaded.spec["kind"] == "tokenizers" and loaded.spec["add_bos"] == add_bos
    assert prompt_ids(loaded, TEXT) == prompt_ids(tokenizer, TEXT) and prompt_ids(loaded, TEXT)[0] == (
        0 if add_bos else tokenizer.encode("hello")[0])
    assert (loaded.bos_id, loaded.eos_id, loaded.chat_template) == (tokenizer.bos_id, 2, tokenizer.chat_template)


@pytest.mark.parametrize("add_bos", [False, True])
def test_transformers_reads_our_tokenizer_files_as_we_do(tmp_path, chat_tokenizer, add_bos):
    transformers = pytest.importorskip("transformers")
    _, tokenizer = export_with_tokenizer(tmp_path, chat_tokenizer, add_bos)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert theirs(TEXT)["input_ids"] == prompt_ids(tokenizer, TEXT)      # BOS only when add_bos
    assert (theirs.bos_token, theirs.eos_token, theirs.eos_token_id) == ("<|endoftext|>", "<|im_end|>", 2)
    rendered = theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered == render_chat(tokenizer.chat_template, MESSAGES, tokenizer)
    assert rendered.startswith("<|endoftext|><|im_start|>system\nbe brief<|im_end|>\n")


def test_hf_dir_tokenizer_config_forms(tmp_path, chat_tokenizer):
    """What repos ship: AddedToken dicts, no add_bos_token (tokenizer.json's post-processor says), named
    templates in the config, a chat_template.jinja that wins, and a tokenizer.model that tokenizer.json beats."""
    tokenizers = pytest.importorskip("tokenizers")
    hf.export_hf(tiny_model(vocab_size=320), tmp_path)
    bpe = tokenizers.Tokenizer.from_str(chat_tokenizer.spec["json"])
    processors = tokenizers.processors
    bos_first = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    bpe.post_processor = processors.Sequence([processors.ByteLevel(), bos_first])
    (tmp_path / "tokenizer.json").write_text(bpe.to_str())
    (tmp_path / "tokenizer.model").write_bytes(b"not a SentencePiece model")
    config = {"bos_token": {"content": "<|im_start|>", "special": True}, "eos_token": {"content": "<|im_end|>"},
              "chat_template": [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "chat"}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = hf.load_hf(tmp_path)[1]
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.chat_template) == (1, 2, "chat")
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    tokenizer = hf.load_hf(tmp_path)[1]
    assert (tokenizer.bos_id, tokenizer.chat_template) == (None, "{{ messages }}")


def test_an_export_that_fails_midway_leaves_no_directory_that_looks_like_a_model(tmp_path, monkeypatch):
    safetensors = pytest.importorskip("safetensors.torch")
    hf.export_hf(tiny_model(), tmp_path)                                  # an earlier, whole export
    assert (tmp_path / "config.json").is_file()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        hf.export_hf(tiny_model(share="immediate"), tmp_path)            # new weights never written
    assert not (tmp_path / "config.json").exists()                         # so the old weights are not read as it


@pytest.mark.parametrize("kind", ["char", "tiktoken"])
def test_a_char_or_tiktoken_tokenizer_is_written_as_a_tokenizer_json_that_tokenizes_alike(tmp_path, kind):
    from tokenizer import tiktoken_tokenizer
    ours = char_tokenizer("\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz") if kind == "char" \
        else tiktoken_tokenizer("gpt2")
    text = "ROMEO:\nBut, soft!  what light through yonder window breaks?\n\n"
    hf.export_hf(tiny_model(), tmp_path, ours)
    back = hf.load_hf(tmp_path)[1]
    assert back.spec["kind"] == "tokenizers" and back.encode(text) == ours.encode(text)
    assert back.decode(ours.encode(text)) == text
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert theirs(text).input_ids == ours.encode(text) and theirs.decode(ours.encode(text)) == text


def test_export_py_writes_a_checkpoint_with_its_tokenizer_and_an_int8_one_as_its_float_weights(
        tmp_path, chat_tokenizer, capsys):
    import export
    from checkpoint import model_checkpoint, save_checkpoint
    from int8 import quantize_model
    model = tiny_model(vocab_size=320)
    save_checkpoint(model_checkpoint(model, chat_tokenizer.spec), tmp_path / "ckpt" / "ckpt.pt")
    export.main(["--init_from", str(tmp_path / "ckpt"), "--format", "hf", "--out", str(tmp_path / "hf")])
    assert "and the tokenizer's files" in capsys.readouterr().out
    back, tokenizer = hf.load_hf(tmp_path / "hf")
    idx = torch.randint(320, (1, 12))
    assert torch.equal(model(idx)[0], back(idx)[0]) and tokenizer.encode(TEXT) == chat_tokenizer.encode(TEXT)
    qmodel = quantize_model(tiny_model(vocab_size=320), "w8a8")
    save_checkpoint(model_checkpoint(qmodel, chat_tokenizer.spec, quantization="w8a8"), tmp_path / "q" / "ckpt.pt")
    export.main(["--init_from", str(tmp_path / "q"), "--format", "hf", "--out", str(tmp_path / "hf_q")])
    back = hf.load_hf(tmp_path / "hf_q")[0]
    assert torch.equal(back.layers[1].feed_forward.w2.weight, export.dequantized(qmodel).layers[1].feed_forward.w2.weight)
    with pytest.raises(SystemExit):
        export.main(["--init_from", str(tmp_path / "ckpt"), "--format", "hf"])          # no --out
    assert "--format hf needs --out" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    (dict(hidden_act="gelu"), "hidden_act"), (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    (dict(attention_bias=True), "attention_bias"), (dict(model_type="gpt2"), "model_type"),
    (dict(num_attention_heads=5), "divisible"), (dict(vocab_size=None), "vocab_size")])
def test_unrepresentable_hf_config_is_one_clear_error(tmp_path, change, message):
    meta_style_dir(tmp_path, random_llama_weights(), False)
    config = {**json.loads((tmp_path / "config.json").read_text()), **change}
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    with pytest.raises(hf.HFFormatError, match=message):
        hf.load_hf(tmp_path)


def test_missing_or_mismatched_weights_are_clear_errors(tmp_path):
    meta_style_dir(tmp_path, random_llama_weights(n_layers=1), False)
    with pytest.raises(hf.HFFormatError, match="do not match its config.json"):
        hf.load_hf(tmp_path)
    meta_style_dir(tmp_path, random_llama_weights(n_layers=3), False)
    with pytest.raises(hf.HFFormatError, match="no place for: model.layers.2"):
        hf.load_hf(tmp_path)
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(hf.HFFormatError, match="has no weights"):
        hf.load_hf(tmp_path)


def test_repo_id_offline_is_one_clear_error(monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("cannot reach the hub and the file is not cached")

    monkeypatch.setattr(hub, "hf_hub_download", offline)
    with pytest.raises(RuntimeError, match="Offline\\? Give a local HF-format dir"):
        hf.load_hf("facebook/MobileLLM-125M")


def fake_hub(monkeypatch, repo, tmp_path, repo_id, expected_revision=None):
    """Serve the files of dir `repo` as the hub repo `repo_id` would; returns the list of file names asked for."""
    hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub.errors import RemoteEntryNotFoundError
    cache, asked = tmp_path / "cache", []

    def fake_download(asked_repo_id, filename, revision=None):
        asked.append(filename)
        assert (asked_repo_id, revision) == (repo_id, expected_revision)
        if not (repo / filename).is_file():     # the hub's 404 (built without the HTTP response it wraps)
            missing = RemoteEntryNotFoundError.__new__(RemoteEntryNotFoundError)
            Exception.__init__(missing, f"404: {repo_id} has no {filename}")
            raise missing
        cache.mkdir(exist_ok=True)
        (cache / filename).write_bytes((repo / filename).read_bytes())
        return str(cache / filename)

    monkeypatch.setattr(hub, "hf_hub_download", fake_download)
    return asked


def test_repo_id_downloads_config_tokenizer_and_one_weights_format(tmp_path, monkeypatch):
    """A fake hub serves a Meta-style repo (a broken safetensors beside pytorch_model.bin, no tokenizer):
    load_hf fetches config.json, asks for tokenizer.json then tokenizer.model, takes pytorch_model.bin only."""
    repo = tmp_path / "repo"
    repo.mkdir()
    meta_style_dir(repo, random_llama_weights(), True)
    (repo / "model.safetensors").write_bytes(b"broken conversion")
    asked = fake_hub(monkeypatch, repo, tmp_path, "facebook/MobileLLM-tiny-layer-share", "v1")
    model, tokenizer = hf.load_hf("facebook/MobileLLM-tiny-layer-share", revision="v1")
    assert asked == ["config.json", "tokenizer.json", "tokenizer.model", "pytorch_model.bin"] and tokenizer is None
    assert model.config.share == "immediate"
    torch.testing.assert_close(model.tok_embeddings.weight,
                               torch.load(repo / "pytorch_model.bin", weights_only=True)["model.embed_tokens.weight"].float())


def test_repo_id_with_tokenizer_json_downloads_its_config_and_template(tmp_path, monkeypatch, chat_tokenizer):
    """A SmolLM2-style repo: tokenizer.json + tokenizer_config.json (no chat_template.jinja), safetensors only."""
    model = tiny_model(vocab_size=320)
    hf.export_hf(model, tmp_path / "repo", chat_tokenizer)
    asked = fake_hub(monkeypatch, tmp_path / "repo", tmp_path, "HuggingFaceTB/SmolLM2-tiny-Instruct")
    back, tokenizer = hf.load_hf("HuggingFaceTB/SmolLM2-tiny-Instruct")
    assert asked == ["config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                     "pytorch_model.bin", "model.safetensors"]
    assert tokenizer.encode(TEXT) == chat_tokenizer.encode(TEXT) and tokenizer.eos_id == 2
    assert tokenizer.chat_template == chat_tokenizer.chat_template
    assert torch.equal(back.tok_embeddings.weight, model.tok_embeddings.weight)
