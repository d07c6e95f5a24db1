import argparse
import io
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import hf
import loader
import sample
from checkpoint import load_model, model_checkpoint, save_checkpoint
from int8 import quantize_model, quantized_checkpoint
from model import MobileLLM, ModelConfig, apply_rope
from tokenizer import Tokenizer, char_tokenizer, render_chat

CHARS = "abcdefgh \n"


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    base = dict(vocab_size=len(CHARS), dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, block_size=32)
    return MobileLLM(ModelConfig(**{**base, **kw})).eval()


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory):
    """A tiny char model trained (a few seconds) to continue the cycle 'abcdefgh'."""
    model = tiny_model().train()
    tok = char_tokenizer(CHARS)
    data = torch.tensor(tok.encode("abcdefgh" * 40))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        starts = torch.randint(len(data) - 17, (16,))
        x = torch.stack([data[s:s + 16] for s in starts])
        y = torch.stack([data[s + 1:s + 17] for s in starts])
        loss = model(x, y)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(model_checkpoint(model, tok.spec), out)
    return out


def run(argv, capsys):
    sample.main(argv)
    captured = capsys.readouterr()
    return captured.out, captured.err


# --- sample.py end to end --------------------------------------------------------------------

def test_sample_streams_the_trained_pattern_and_reports_speeds(trained_ckpt, capsys):
    out, err = run(["--init_from", str(trained_ckpt), "--start", "abcde", "--temperature", "0",
                    "--max_new_tokens", "19", "--num_samples", "2"], capsys)
    samples = out.split("\n---------------\n")
    assert samples[:2] == ["abcde" + "fghabcdefghabcdefgh"] * 2
    assert "prefill:" in err and "decode:" in err and "(36 tokens)" in err


def test_prompt_from_file_and_seeded_sampling_is_reproducible(trained_ckpt, tmp_path, capsys):
    (tmp_path / "prompt.txt").write_text("gh")
    argv = ["--init_from", str(trained_ckpt / "ckpt.pt"), "--start", f"FILE:{tmp_path / 'prompt.txt'}",
            "--temperature", "1.5", "--top_k", "5", "--top_p", "0.95", "--seed", "7", "--max_new_tokens", "30"]
    first, _ = run(argv, capsys)
    second, _ = run(argv, capsys)
    assert first == second and first.startswith("gh") and len(first.split("\n---")[0]) == 32


def test_prompt_longer_than_context_is_cropped_with_a_note(trained_ckpt, capsys):
    out, err = run(["--init_from", str(trained_ckpt), "--start", "abcdefgh" * 5, "--temperature", "0",
                    "--max_new_tokens", "4"], capsys)
    assert out.startswith(("abcdefgh" * 5)[-32:] + "abcd")
    assert "note: the prompt has 40 tokens, more than the context (32): keeping its last 32" in err


def test_an_int8_checkpoint_samples(trained_ckpt, tmp_path, capsys):
    model, ckpt = load_model(trained_ckpt)
    save_checkpoint(quantized_checkpoint(quantize_model(model, "w8"), ckpt, "w8"), tmp_path)
    out, _ = run(["--init_from", str(tmp_path), "--start", "abc", "--temperature", "0", "--max_new_tokens", "5"], capsys)
    assert out.startswith("abcdefgh")


@pytest.mark.parametrize("int8", [False, True])
def test_a_checkpoint_file_is_read_once(trained_ckpt, tmp_path, monkeypatch, int8):
    if int8:
        model, ckpt = load_model(trained_ckpt)
        save_checkpoint(quantized_checkpoint(quantize_model(model, "w8"), ckpt, "w8"), tmp_path)
    reads, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: reads.append(a[0]) or real_load(*a, **kw))
    model, tok = loader.load_model_and_tokenizer(str(tmp_path if int8 else trained_ckpt))
    assert len(reads) == 1 and tok.decode(tok.encode("abc")) == "abc"


def test_generation_stops_at_end_of_text():
    model = tiny_model()
    args = argparse.Namespace(max_new_tokens=20, temperature=0, top_k=None, top_p=None)
    greedy = model.generate(torch.tensor([[1, 2, 3]]), 20, temperature=0)[0, 3:].tolist()
    char = char_tokenizer(CHARS)
    eos = greedy[5]
    tok = Tokenizer({}, len(CHARS), char.encode, char.decode, eos_id=eos)
    new, steps, _, _ = sample.generate_one(model, [1, 2, 3], args, None, tok, out=open("/dev/null", "w"))
    assert new == greedy[:greedy.index(eos)] and steps == len(new)
    assert model.caches is None


def test_no_arguments_samples_from_the_default_training_run(trained_ckpt, tmp_path, monkeypatch, capsys):
    from train import TrainConfig
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=f"no {TrainConfig.out_dir}/ here: run `python train.py` first"):
        sample.main([])
    (tmp_path / TrainConfig.out_dir).mkdir()
    (tmp_path / TrainConfig.out_dir / "ckpt.pt").write_bytes((trained_ckpt / "ckpt.pt").read_bytes())
    out, _ = run(["--start", "abc", "--temperature", "0", "--max_new_tokens", "5"], capsys)
    assert out.startswith("abcdefgh")
    out, err = run([], capsys)
    assert out.startswith("\n") and out.count("---------------") == 1 and "(199 tokens)" in err


def test_one_set_of_dtype_names_with_torchs_names_as_aliases(capsys):
    assert [loader.torch_dtype(n) for n in ("fp32", "bf16", "fp16", "float32", "bfloat16", "float16")] == \
        [torch.float32, torch.bfloat16, torch.float16] * 2
    with pytest.raises(ValueError, match="unknown dtype 'half': choose from fp32, bf16, fp16"):
        loader.torch_dtype("half")
    with pytest.raises(SystemExit):
        sample.main(["--init_from", "mobilellm-micro", "--benchmark", "--dtype", "half"])
    assert "invalid choice: 'half'" in capsys.readouterr().err
    with pytest.raises(SystemExit):                     # export.py's old name for W8A8 is not a dtype here
        sample.main(["--init_from", "mobilellm-micro", "--benchmark", "--dtype", "int8"])
    assert "invalid choice: 'int8'" in capsys.readouterr().err


def test_bad_inputs_are_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit, match="no checkpoint at"):
        sample.main(["--init_from", str(tmp_path / "missing")])
    (tmp_path / "ckpt.pt").write_bytes(b"not a torch file")
    with pytest.raises(SystemExit, match="not a readable checkpoint"):
        sample.main(["--init_from", str(tmp_path)])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="^error: device='cuda' but CUDA is not available"):
            sample.main(["--device", "cuda", "--init_from", "mobilellm-micro", "--benchmark"])
    save_checkpoint(model_checkpoint(tiny_model(), {"kind": "char", "chars": CHARS}), tmp_path)
    with pytest.raises(SystemExit, match="no such file"):
        sample.main(["--init_from", str(tmp_path), "--start", "FILE:/no/such/prompt.txt"])
    with pytest.raises(SystemExit, match=f"^error: --start FILE:{tmp_path}: a folder$"):
        sample.main(["--init_from", str(tmp_path), "--start", f"FILE:{tmp_path}"])
    with pytest.raises(SystemExit, match=r"^error: --start FILE:.*ckpt.pt: not UTF-8 text \(invalid start byte"):
        sample.main(["--init_from", str(tmp_path), "--start", f"FILE:{tmp_path / 'ckpt.pt'}"])
    with pytest.raises(SystemExit, match="^error: --start: characters not in this model's vocabulary: 'XYZ'$"):
        sample.main(["--init_from", str(tmp_path), "--start", "XYZ"])
    with pytest.raises(SystemExit):
        sample.main(["--init_from", "mobilellm-micro"])          # a preset has no tokenizer: --benchmark only
    assert "mobilellm-micro is a preset (random weights, no tokenizer): use it with --benchmark" in \
        capsys.readouterr().err
    hf.export_hf(tiny_model(), tmp_path / "hf")                   # trained weights, written without a tokenizer
    with pytest.raises(SystemExit):
        sample.main(["--init_from", str(tmp_path / "hf")])
    assert f"{tmp_path / 'hf'} holds no tokenizer (no text can be encoded for it)" in capsys.readouterr().err
    for flag, value, minimum in (("--top_k", "-1", 0), ("--prompt_len", "0", 1)):  # usage errors, on stderr
        with pytest.raises(SystemExit):
            sample.main(["--init_from", "mobilellm-micro", "--benchmark", flag, value])
        assert f"argument {flag}: must be an integer >= {minimum}, got {value}" in capsys.readouterr().err


def test_top_k_0_samples_from_every_token(trained_ckpt, monkeypatch, capsys):
    seen, real = [], MobileLLM.generate_tokens

    def spy(self, idx, max_new_tokens, temperature, top_k, top_p, generator):
        seen.append(top_k)
        return real(self, idx, max_new_tokens, temperature, top_k, top_p, generator)

    monkeypatch.setattr(MobileLLM, "generate_tokens", spy)
    for k in ("0", "5"):
        run(["--init_from", str(trained_ckpt), "--start", "ab", "--max_new_tokens", "3", "--top_k", k], capsys)
    assert seen == [None, 5]


def test_benchmark_runs_on_a_preset(capsys):
    out, err = run(["--init_from", "mobilellm-micro", "--benchmark", "--prompt_len", "8", "--max_new_tokens", "6",
                    "--dtype", "bfloat16"], capsys)
    assert "dtype bf16" in out and "(5 tokens)" in err                  # torch's name is an alias of bf16
    assert "8-token prompt" in out
    out, _ = run(["--init_from", "mobilellm-micro", "--benchmark", "--prompt_tokens=4", "--max_new_tokens", "2"], capsys)
    assert "4-token prompt" in out                                      # the flag's old spelling still works


def test_transformers_reference_decodes_the_same_weights_and_prompt_greedily_and_prints_its_row(capsys, monkeypatch):
    """--benchmark --transformers_reference: transformers' LlamaForCausalLM, built from our HF export of the same
    (layer-shared) weights, greedily decodes the same tokens after the same prompt, in --dtype, and gets its row."""
    transformers = pytest.importorskip("transformers")
    ours, theirs, loaded = [], [], {}
    real_generate_one, real_load = sample.generate_one, sample.load_model_and_tokenizer
    real_from_pretrained, real_generate = transformers.LlamaForCausalLM.from_pretrained, \
        transformers.LlamaForCausalLM.generate

    def from_pretrained(*args, **kwargs):
        loaded["llama"] = real_from_pretrained(*args, **kwargs)
        return loaded["llama"]

    def generate_one(model, ids, *args, **kwargs):
        result = real_generate_one(model, ids, *args, **kwargs)
        ours.append((ids, result[0]))
        return result

    monkeypatch.setattr(sample, "generate_one", generate_one)
    monkeypatch.setattr(sample, "load_model_and_tokenizer", lambda *a: loaded.setdefault("ours", real_load(*a)))
    monkeypatch.setattr(transformers.LlamaForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(transformers.LlamaForCausalLM, "generate",
                        lambda self, *a, **kw: theirs.append(real_generate(self, *a, **kw)) or theirs[-1])
    out, err = run(["--init_from", "mobilellm-micro-ls", "--benchmark", "--prompt_len", "8", "--max_new_tokens", "6",
                    "--transformers_reference"], capsys)
    prompt, tokens = ours[-1]                               # the timed sample (after the warm-up one)
    assert len(tokens) == 6 and theirs[-1][0, :8].tolist() == prompt
    assert theirs[-1][0, 8:].tolist() == tokens             # the same weights, prompt and greedy decoding
    assert len(loaded["llama"].model.layers) == len(loaded["ours"][0].schedule)     # every block application
    idx = torch.tensor([prompt])
    with torch.no_grad():
        torch.testing.assert_close(loaded["llama"](idx).logits, loaded["ours"][0](idx)[0], atol=1e-4, rtol=1e-4)
    row = f"transformers {transformers.__version__} LlamaForCausalLM, same weights, dtype fp32, eager"
    assert out.splitlines()[-1] == row
    assert err.count("(5 tokens)") == 2 and err.count("prefill:") == 2    # our report, then the reference's
    loaded.clear()
    out, _ = run(["--init_from", "mobilellm-micro-ls", "--benchmark", "--prompt_len", "4", "--max_new_tokens", "2",
                  "--transformers_reference", "--dtype", "bf16"], capsys)
    assert out.splitlines()[-1].endswith("dtype bf16, eager")
    assert {p.dtype for p in loaded["llama"].parameters()} == {torch.bfloat16}


def test_compiled_decode_step_decodes_like_eager():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = tiny_model(share="immediate")
    args = argparse.Namespace(max_new_tokens=12, temperature=0, top_k=None, top_p=None)
    eager, _, _, _ = sample.generate_one(model, [1, 2, 3], args, None)
    sample.compile_decode_step(model)
    compiled, _, _, _ = sample.generate_one(model, [1, 2, 3], args, None)
    assert compiled == eager
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1     # one graph for every position
    linears = 7 * len(model.schedule) + 1       # wq wk wv wo w1 w2 w3 per block application, and the head
    assert torch._dynamo.utils.counters["inductor"]["decompose_mm"] == linears    # all as matrix-vector loops


def test_hf_dir_loads_through_load_model_and_tokenizer(tmp_path):
    import hf
    pytest.importorskip("safetensors")
    model = tiny_model(share="immediate")
    hf.export_hf(model, tmp_path)
    loaded, tokenizer = loader.load_model_and_tokenizer(str(tmp_path))
    idx = torch.randint(len(CHARS), (1, 9))
    assert torch.equal(loaded(idx)[0], model(idx)[0]) and tokenizer is None


def test_a_tokenizer_larger_than_the_embedding_is_refused_and_a_smaller_one_is_fine(chat_tokenizer, tmp_path):
    save_checkpoint(model_checkpoint(tiny_model(vocab_size=200), chat_tokenizer.spec), tmp_path / "small")
    with pytest.raises(ValueError, match="tokenizer has 300 tokens but the model only 200 embeddings"):
        loader.load_model_and_tokenizer(str(tmp_path / "small"))
    save_checkpoint(model_checkpoint(tiny_model(vocab_size=320), chat_tokenizer.spec), tmp_path / "padded")
    assert loader.load_model_and_tokenizer(str(tmp_path / "padded"))[1].vocab_size == 300


# --- chat ----------------------------------------------------------------------------------------

CONVERSATION = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
                {"role": "user", "content": "how are you?"}, {"role": "assistant", "content": "fine thanks"}]


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory, chat_tokenizer):
    """A tiny instruct model (a padded 320-token vocabulary) trained to reply to CONVERSATION's user messages,
    saved with its tokenizer.json spec."""
    ids = chat_tokenizer.encode(render_chat(chat_tokenizer.chat_template, CONVERSATION, chat_tokenizer, False))
    ids = torch.tensor([ids])
    model = tiny_model(vocab_size=320, block_size=64).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = model(ids[:, :-1], ids[:, 1:])[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path_factory.mktemp("chat")
    save_checkpoint(model_checkpoint(model.eval(), chat_tokenizer.spec), out)
    return out


def test_tokenizers_spec_checkpoint_reloads_offline_with_the_same_ids(chat_ckpt, chat_tokenizer):
    _, tokenizer = loader.load_model_and_tokenizer(str(chat_ckpt))
    text = "<|im_start|>user\nhow are you?<|im_end|>"
    assert tokenizer.encode(text) == chat_tokenizer.encode(text) and tokenizer.encode(text)[0] == 1
    assert tokenizer.eos_id == 2 and tokenizer.chat_template == chat_tokenizer.chat_template


@pytest.mark.parametrize("fmt", ["checkpoint", "hf"])
def test_chat_replies_in_the_template_and_stops_at_eos(chat_ckpt, tmp_path, capsys, fmt):
    init_from = chat_ckpt
    if fmt == "hf":
        import hf
        model, tokenizer = loader.load_model_and_tokenizer(str(chat_ckpt))
        init_from = hf.export_hf(model, tmp_path, tokenizer)
    out, err = run(["--init_from", str(init_from), "--chat", "--start", "hi", "--temperature", "0",
                    "--max_new_tokens", "20"], capsys)
    assert out == "hello there\n---------------\n"
    assert "(5 tokens)" in err    # decode steps: "hello there" is 5 tokens, then <|im_end|> ends it (not 20)


def test_interactive_keeps_the_conversation(chat_ckpt, capsys, monkeypatch):
    prompts, real_generate_one = [], sample.generate_one
    monkeypatch.setattr(sample, "generate_one", lambda model, ids, *a, **kw: prompts.append(ids) or
                        real_generate_one(model, ids, *a, **kw))
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\nhow are you?\n"))
    out, err = run(["--init_from", str(chat_ckpt), "--interactive", "--temperature", "0"], capsys)
    assert out == "hello there\nfine thanks\n" and err == "> " * 3
    _, tokenizer = loader.load_model_and_tokenizer(str(chat_ckpt))
    assert tokenizer.decode(prompts[1]) == render_chat(tokenizer.chat_template, CONVERSATION[:3], tokenizer)


def test_interactive_takes_start_as_the_first_message(chat_ckpt, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("how are you?\n"))
    out, err = run(["--init_from", str(chat_ckpt), "--interactive", "--temperature", "0", "--start", "hi"], capsys)
    assert out == "hello there\nfine thanks\n" and err == "> hi\n" + "> " * 2      # as llama.cpp's -i -p
    with pytest.raises(SystemExit):
        sample.main(["--init_from", str(chat_ckpt), "--interactive", "--num_samples", "2"])
    assert "--interactive gives one reply per message" in capsys.readouterr().err


def test_with_compile_the_decode_step_is_compiled_before_the_timed_samples(trained_ckpt, capsys, monkeypatch):
    args = ["--init_from", str(trained_ckpt), "--start", "ab", "--max_new_tokens", "8"]
    eager_out, _ = run(args, capsys)
    monkeypatch.setattr(sample, "compile_decode_step", lambda model: None)     # compiling itself: tested above
    out, err = run(args + ["--compile"], capsys)
    assert out == eager_out and err.index("compiled the decode step in") < err.index("decode:")   # same samples


def test_ctrl_c_stops_a_reply_and_the_conversation_goes_on_without_that_exchange(chat_ckpt, capsys, monkeypatch):
    prompts, real_generate_one = [], sample.generate_one

    def stopped_first(model, ids, *args, **kwargs):
        prompts.append(ids)
        if len(prompts) == 1:
            raise KeyboardInterrupt
        return real_generate_one(model, ids, *args, **kwargs)

    monkeypatch.setattr(sample, "generate_one", stopped_first)
    monkeypatch.setattr("sys.stdin", io.StringIO("tell me a long story\nhi\n"))
    out, err = run(["--init_from", str(chat_ckpt), "--interactive", "--temperature", "0"], capsys)
    assert out == " [stopped]\nhello there\n" and err == "> " * 3
    _, tokenizer = loader.load_model_and_tokenizer(str(chat_ckpt))
    assert tokenizer.decode(prompts[1]) == render_chat(tokenizer.chat_template, CONVERSATION[:1], tokenizer)


def test_a_long_conversation_drops_its_oldest_exchange_and_keeps_the_system_message(chat_tokenizer, capsys):
    messages = [{"role": "system", "content": "be brief"}] + CONVERSATION + [{"role": "user", "content": "hi"}]
    fits = len(chat_tokenizer.encode(render_chat(chat_tokenizer.chat_template, messages[:1] + messages[3:],
                                                 chat_tokenizer)))
    ids, kept = sample.encode_chat(chat_tokenizer, messages, block_size=fits)
    assert "dropping its oldest exchange" in capsys.readouterr().err
    assert kept == messages[:1] + messages[3:] and len(ids) == fits
    with pytest.raises(SystemExit, match="more than the context"):
        sample.encode_chat(chat_tokenizer, messages, block_size=10)


def test_system_message_opens_the_chat_prompt(chat_ckpt, capsys, monkeypatch):
    prompts, real_generate_one = [], sample.generate_one
    monkeypatch.setattr(sample, "generate_one", lambda model, ids, *a, **kw: prompts.append(ids) or
                        real_generate_one(model, ids, *a, **kw))
    run(["--init_from", str(chat_ckpt), "--chat", "--system", "be brief", "--start", "hi", "--temperature", "0",
         "--max_new_tokens", "2"], capsys)
    _, tokenizer = loader.load_model_and_tokenizer(str(chat_ckpt))
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert [tokenizer.decode(ids) for ids in prompts] == [render_chat(tokenizer.chat_template, messages, tokenizer)]


@pytest.mark.parametrize("flags, says", [(["--system", "be brief"], "--system needs --chat or --interactive"),
                                         (["--temperature=-0.5"], "--temperature must be >= 0"),
                                         (["--top_p=0"], "--top_p must be in (0, 1]"),
                                         (["--top_p=1.5"], "--top_p must be in (0, 1]")])
def test_sampling_settings_that_cannot_work_are_usage_errors(flags, says, capsys, monkeypatch):
    monkeypatch.setattr(sample, "load_model_and_tokenizer", lambda *a: pytest.fail("loaded before checking"))
    with pytest.raises(SystemExit):
        sample.main(["--init_from", "mobilellm-micro", "--benchmark"] + flags)
    assert f"error: {says}" in capsys.readouterr().err


def test_chat_without_a_template_is_one_clear_error(trained_ckpt, chat_tokenizer, tmp_path):
    with pytest.raises(SystemExit, match="error: .* has no chat template") as e:
        sample.main(["--init_from", str(trained_ckpt), "--chat", "--start", "abc"])
    assert "\n" not in e.value.code
    spec = {**chat_tokenizer.spec, "chat_template": None}
    save_checkpoint(model_checkpoint(tiny_model(vocab_size=320), spec), tmp_path)
    with pytest.raises(SystemExit, match="has no chat template"):
        sample.main(["--init_from", str(tmp_path), "--interactive"])


# --- the KV cache, and Meta's layer-share cache ------------------------------------------------

def greedy_without_cache(model, idx, n):
    for _ in range(n):
        idx = torch.cat([idx, model(idx[:, -model.config.block_size:])[0][:, -1].argmax(-1, keepdim=True)], 1)
    return idx


@pytest.mark.parametrize("share", ["none", "immediate"])
def test_kv_cache_greedy_equals_cache_free_greedy_in_sample(share):
    model = tiny_model(share=share)
    args = argparse.Namespace(max_new_tokens=40, temperature=0, top_k=None, top_p=None)
    new, _, _, _ = sample.generate_one(model, [1, 2, 3, 4, 5], args, None)   # runs past block_size 32
    assert new == greedy_without_cache(model, torch.tensor([[1, 2, 3, 4, 5]]), 40)[0, 5:].tolist()


def metas_cached_greedy(model, prompt, n):
    """Meta's loop (facebookresearch/MobileLLM utils/modeling_llama.py with transformers 4.41 generate), written
    independently of model.py's cache: each unique block owns one growing list of keys/values that both of
    its applications append to; a prompt uses SDPA's is_causal (top-left aligned), one token uses no mask."""
    c = model.config
    caches = [None] * c.n_layers

    def forward(tokens, positions):
        B, T = tokens.shape
        x = model.tok_embeddings(tokens)
        cos, sin = model.rope_cos[positions], model.rope_sin[positions]
        for b in range(c.n_layers):
            layer = model.layers[b]
            for _ in range(2):
                h = layer.attention_norm(x)
                att = layer.attention
                q = att.wq(h).view(B, T, c.n_heads, c.head_dim).transpose(1, 2)
                k = att.wk(h).view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)
                v = att.wv(h).view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
                if caches[b] is not None:
                    k, v = torch.cat([caches[b][0], k], 2), torch.cat([caches[b][1], v], 2)
                caches[b] = (k, v)
                y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=True)
                x = x + att.wo(y.transpose(1, 2).reshape(B, T, -1))
                x = x + layer.feed_forward(layer.ffn_norm(x))
        return model.output(model.norm(x))[:, -1]

    idx = torch.tensor([prompt])
    logits = forward(idx, torch.arange(len(prompt)))
    out = []
    for step in range(n):
        token = logits.argmax(-1, keepdim=True)
        out.append(token.item())
        logits = forward(token, torch.tensor([len(prompt) + step]))
    return out


@torch.no_grad()
def test_meta_ls_cache_reproduces_metas_cached_decoding_and_the_default_does_not():
    prompt, n = [3, 1, 4, 1, 5, 9, 2, 6], 12
    meta = tiny_model(seed=1, share="immediate", meta_ls_cache=True, dim=64, n_heads=4, n_kv_heads=2)
    ours = tiny_model(seed=1, share="immediate", dim=64, n_heads=4, n_kv_heads=2)
    reference = metas_cached_greedy(meta, prompt, n)
    idx = torch.tensor([prompt])
    assert meta.generate(idx, n, temperature=0)[0, len(prompt):].tolist() == reference
    assert ours.generate(idx, n, temperature=0)[0, len(prompt):].tolist() == greedy_without_cache(ours, idx, n)[0, 8:].tolist()
    # the two behaviours really differ: prefill logits of the second application's cache path
    meta.setup_cache(1, 20)
    ours.setup_cache(1, 20)
    pos = torch.arange(len(prompt))
    assert not torch.allclose(meta(idx, input_pos=pos)[0], ours(idx, input_pos=pos)[0])
    torch.testing.assert_close(meta(idx)[0], ours(idx)[0])   # without a cache both are the trained model


def test_meta_ls_cache_flag_decodes_as_metas_code_and_needs_a_layer_shared_model(tmp_path, capsys):
    """README: sample.py --meta_ls_cache decodes Meta's layer-shared models as Meta's own code does."""
    tok = char_tokenizer(CHARS)
    model = tiny_model(seed=1, share="immediate", dim=64, n_heads=4, n_kv_heads=2, init_std=0.3)   # not uniform
    save_checkpoint(model_checkpoint(model, tok.spec), tmp_path / "ls")
    with torch.no_grad():
        reference = "abcdefgh" + tok.decode(metas_cached_greedy(model, tok.encode("abcdefgh"), 12))
    argv = ["--init_from", str(tmp_path / "ls"), "--start", "abcdefgh", "--temperature", "0", "--max_new_tokens", "12"]
    meta, ours = (run(argv + flag, capsys)[0].split("\n---------------\n")[0] for flag in (["--meta_ls_cache"], []))
    assert meta == reference != ours                                  # the flag reaches the model's cache
    save_checkpoint(model_checkpoint(tiny_model(), tok.spec), tmp_path / "plain")
    with pytest.raises(SystemExit, match="^error: meta_ls_cache reproduces Meta's immediate layer sharing; it needs "
                                         "share='immediate'"):
        sample.main(["--init_from", str(tmp_path / "plain"), "--meta_ls_cache", "--start", "ab"])


def test_meta_ls_cache_needs_immediate_sharing():
    with pytest.raises(ValueError, match="meta_ls_cache"):
        tiny_model(meta_ls_cache=True)


def test_a_reader_that_goes_away_ends_the_sample_quietly(trained_ckpt):
    """python sample.py | head: exit code 141 (128 + SIGPIPE) and no BrokenPipeError traceback."""
    run = subprocess.Popen([sys.executable, str(Path(sample.__file__)), "--init_from", str(trained_ckpt),
                            "--start", "abc", "--max_new_tokens", "100000", "--temperature", "0"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert run.stdout.read(10)                                  # the sample has started streaming ...
        run.stdout.close()                                          # ... and the reader leaves
        code = run.wait(timeout=60)                 # before reading stderr: one that goes on fails, not hangs
    finally:
        run.kill()
    err = run.stderr.read().decode()
    assert code == 141 and "Traceback" not in err, err


def test_ctrl_c_ends_a_sample_or_a_conversation_without_a_traceback(monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loader, "load_model_and_tokenizer", interrupted)
    monkeypatch.setattr(sys, "argv", ["sample.py", "--init_from", "mobilellm-micro", "--benchmark"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(Path(sample.__file__)), run_name="__main__")
    assert stop.value.code == 130                                   # the shell's code for Ctrl-C, and no traceback


def test_decode_timings_wait_for_each_token_as_a_gpu_computes_it_asynchronously(monkeypatch):
    """On CUDA a token is ready only when .item() returns: the prefill's device time is prefill time, not
    the first decode step's (mocked: tokens whose .item() waits for their device work)."""
    from types import SimpleNamespace
    clock = [0.0]
    monkeypatch.setattr(sample.time, "perf_counter", lambda: clock[0])

    class Token:
        def __init__(self, work):
            self.work = work

        def item(self):
            clock[0] += self.work
            return 1

    class Model:
        norm = SimpleNamespace(weight=torch.zeros(1))

        def generate_tokens(self, idx, n, *args):
            yield Token(5.0)                            # the prefill: 5 s on the device
            for _ in range(n - 1):
                yield Token(1.0)                        # each decode step: 1 s

        def clear_cache(self):
            pass

    args = argparse.Namespace(max_new_tokens=4, temperature=0, top_k=0, top_p=None)
    new, steps, prefill_s, decode_s = sample.generate_one(Model(), [0], args, None)
    assert (steps, prefill_s, decode_s) == (3, 5.0, 3.0)


def test_a_character_split_across_tokens_streams_whole(chat_tokenizer):
    """Byte-level BPE spells é and 🦙 in 2 and 4 byte tokens: each is written once all its bytes are out, never
    as U+FFFD, and the streamed text is the sample's text."""
    from types import SimpleNamespace
    text = " é and 🦙!"
    new = chat_tokenizer.encode(text)
    assert any(chat_tokenizer.decode(new[:i]).endswith("\ufffd") for i in range(len(new)))   # split mid-character

    class Model:
        norm = SimpleNamespace(weight=torch.zeros(1))

        def generate_tokens(self, idx, n, *args):
            yield from (torch.tensor(t) for t in new[:n])

        def clear_cache(self):
            pass

    class Stream(io.StringIO):
        def write(self, s):
            writes.append(s)
            return super().write(s)

    writes, out = [], Stream()
    prompt = chat_tokenizer.encode("hi")
    args = argparse.Namespace(max_new_tokens=len(new), temperature=0, top_k=0, top_p=None)
    assert sample.generate_one(Model(), prompt, args, None, chat_tokenizer, out=out)[0] == new
    assert out.getvalue() == "hi" + text and not any("\ufffd" in s for s in writes)
