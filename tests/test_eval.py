import json
import runpy
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import eval as ev
import int8
import loader
from checkpoint import model_checkpoint, save_checkpoint
from model import MobileLLM, ModelConfig
from tokenizer import char_tokenizer

CHARS = "\n !?.:_abcdefghijklmnopqrstuvwxyzABQ"


def tiny_model(vocab_size, block_size=64, seed=0):
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                         block_size=block_size)
    return MobileLLM(config).eval()


def hand_loglikelihood(model, ctx, cont):
    """Sum of log p(cont[j] | everything before it) from one plain forward over ctx + cont[:-1]."""
    tokens = torch.tensor([ctx + cont[:-1]])
    logprobs = F.log_softmax(model(tokens)[0][0].float(), dim=-1)       # (T, V)
    return sum(logprobs[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))


def test_continuation_loglikelihood_is_the_sum_of_token_logprobs():
    tok, model = char_tokenizer(CHARS), tiny_model(len(CHARS))
    ctx, cont = ev.encode_pair(tok, "Question: why?\nAnswer:", " because")
    assert tok.decode(ctx) == "Question: why?\nAnswer:" and tok.decode(cont) == " because"
    [ll] = ev.score(model, [(ctx, cont)])
    assert ll == pytest.approx(hand_loglikelihood(model, ctx, cont), abs=1e-4)
    assert ll < 0


def test_trailing_context_space_moves_to_the_continuation_and_bos_starts_the_context():
    tok = char_tokenizer(CHARS)
    tok.bos_id = 0
    ctx, cont = ev.encode_pair(tok, "Q: a ", "b")
    assert ctx == [0] + tok.encode("Q: a") and cont == tok.encode(" b")


def test_scoring_builds_no_autograd_graph():
    model = tiny_model(50)
    seen = []
    model.register_forward_hook(lambda module, args, out: seen.append(out[0].requires_grad))
    ev.score(model, [([1, 2, 3], [4, 5]), ([6], [7])])
    assert seen and not any(seen)                      # no activations kept for a backward that never comes


def test_batching_and_padding_change_no_score():
    tok, model = char_tokenizer(CHARS), tiny_model(len(CHARS))
    texts = [("a", " b"), ("hello there:", " general"), ("q", " a much longer answer than the rest"),
             ("why is the sky blue?", " air"), ("x", " y"), ("ab", " c d e")]
    requests = [ev.encode_pair(tok, c, k) for c, k in texts]
    one_by_one = ev.score(model, requests, batch_size=1)
    batched = ev.score(model, requests, batch_size=4)      # two padded batches, reordered by length inside
    assert batched == pytest.approx(one_by_one, abs=1e-4)
    assert batched == pytest.approx([hand_loglikelihood(model, c, k) for c, k in requests], abs=1e-4)


def test_long_context_is_cut_from_the_left_and_the_continuation_kept_whole():
    tok, model = char_tokenizer(CHARS), tiny_model(len(CHARS), block_size=16)
    ctx, cont = ev.encode_pair(tok, "a long context that does not fit in the window", " kept")
    [ll] = ev.score(model, [(ctx, cont)])
    kept = (ctx + cont)[-17:]            # block_size + 1 tokens: 16 inputs, the last 5 predict " kept"
    assert ll == pytest.approx(hand_loglikelihood(model, kept[:-len(cont)], cont), abs=1e-4)


def test_a_continuation_longer_than_the_window_is_scored_on_its_last_block_size_tokens_and_counted():
    tok, model = char_tokenizer(CHARS), tiny_model(len(CHARS), block_size=8)
    ctx, cont = ev.encode_pair(tok, "Q:", " a long answer")                 # 14 continuation tokens > 8
    [ll] = ev.score(model, [(ctx, cont)])
    kept = (ctx + cont)[-9:]                 # 8 inputs, all inside the continuation, predicting its last 8 tokens
    assert ll == pytest.approx(hand_loglikelihood(model, kept[:1], kept[1:]), abs=1e-4)
    docs = [dict(goal="g", sol1="a long answer", sol2="no", label=0), dict(goal="g", sol1="ab", sol2="ba", label=1)]
    result = ev.evaluate(model, tok, "piqa", ev.build_examples("piqa", docs))
    assert (result["truncated_continuations"], result["truncated_contexts"]) == (1, 4)   # every context is cut


def biased_model(vocab_size, favourite):
    """A model whose output ignores its input: logits are a hand-set bias favouring one token."""
    model = tiny_model(vocab_size)
    model.output = nn.Linear(model.config.dim, vocab_size, bias=True)
    nn.init.zeros_(model.output.weight)
    nn.init.zeros_(model.output.bias)
    model.output.bias.data[favourite] = 10.0
    return model


def piqa_docs(labels):
    return [dict(goal="pick one", sol1="aaaa", sol2="bbbb", label=label) for label in labels]


def test_a_model_forced_to_prefer_one_choice_scores_the_expected_accuracy():
    tok = char_tokenizer(CHARS)
    labels = [0, 0, 0, 1, 0, 1, 1, 0]                     # choice 0 ("aaaa") is right 5 times out of 8
    examples = ev.build_examples("piqa", piqa_docs(labels))
    likes_a = ev.evaluate(biased_model(len(CHARS), tok.encode("a")[0]), tok, "piqa", examples)
    likes_b = ev.evaluate(biased_model(len(CHARS), tok.encode("b")[0]), tok, "piqa", examples)
    assert (likes_a["n"], likes_a["acc"], likes_a["acc_norm"]) == (8, 5 / 8, 5 / 8)
    assert (likes_b["acc"], likes_b["acc_norm"]) == (3 / 8, 3 / 8)


def test_acc_norm_divides_by_the_choice_length_as_the_harness_does():
    # A uniform model gives every token log(1/V): " " + choice costs (len + 1) tokens, so acc picks the shortest
    # choice, while acc_norm = -(len + 1)/len * log V prefers the longest.
    tok, model = char_tokenizer(CHARS), biased_model(len(CHARS), 0)
    model.output.bias.data.zero_()
    docs = [dict(goal="g", sol1="ab", sol2="abcdef", label=0), dict(goal="g", sol1="abcdef", sol2="ab", label=1),
            dict(goal="g", sol1="abc", sol2="a", label=0)]
    result = ev.evaluate(model, tok, "piqa", ev.build_examples("piqa", docs))
    assert result["acc"] == pytest.approx(2 / 3) and result["acc_norm"] == pytest.approx(1 / 3)


def test_a_tokenizer_larger_than_the_embedding_is_refused_before_scoring(tmp_path):
    data = tmp_path / "piqa.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in piqa_docs([0, 1])))
    save_checkpoint(model_checkpoint(tiny_model(len(CHARS) - 3), char_tokenizer(CHARS).spec), tmp_path / "ckpt")
    with pytest.raises(SystemExit, match=f"eval.py: cannot load .*ckpt: the tokenizer has {len(CHARS)} tokens but "
                                         f"the model only {len(CHARS) - 3} embeddings"):
        ev.main(["--init_from", str(tmp_path / "ckpt"), "--tasks", "piqa", "--data", str(data), "--device", "cpu",
                 "--out", str(tmp_path / "results.json")])
    assert not (tmp_path / "results.json").exists()

def test_task_adapters_follow_the_harness_formats():
    ex = ev.TASKS["winogrande"].adapter(dict(sentence="Tom gave Bob a gift because _ was kind.", option1="Tom",
                                             option2="Bob", answer="2"))
    assert ex.contexts == ["Tom gave Bob a gift because Tom", "Tom gave Bob a gift because Bob"]
    assert ex.continuations == [" was kind.", " was kind."] and ex.label == 1
    ex = ev.TASKS["hellaswag"].adapter(dict(activity_label="Cooking", ctx_a="A man cuts.", ctx_b="he then",
                                            endings=["eats [title] it.", "runs."], label="1"))
    assert ex.contexts[0] == "Cooking: A man cuts. He then" and ex.continuations == [" eats. it.", " runs."]
    ex = ev.TASKS["arc_easy"].adapter(dict(question="Q?", choices=dict(text=["x", "y", "z"], label=["A", "B", "C"]),
                                           answerKey="C"))
    assert (ex.contexts[0], ex.label) == ("Question: Q?\nAnswer:", 2)
    ex = ev.TASKS["siqa"].adapter(dict(context="C.", question="Q?", answerA="a", answerB="b", answerC="c", label="2"))
    assert (ex.contexts[0], ex.continuations, ex.label) == ("Q: C. Q?\nA:", [" a", " b", " c"], 1)
    ex = ev.TASKS["boolq"].adapter(dict(passage="P.", question="is it", answer=True))
    assert (ex.contexts[0], ex.continuations, ex.label) == ("P.\nQuestion: is it?\nAnswer:", [" no", " yes"], 1)


@pytest.mark.parametrize("native", [True, False])
def test_default_dtype_is_bf16_only_where_the_cpu_has_it_and_the_model_is_wide(shared_dir, tmp_path, monkeypatch,
                                                                                native):
    """A CPU without AVX-512 BF16/AMX emulates bf16 ~100x slower than fp32: eval.py's default must not pick it."""
    import loader
    monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda: native)
    piqa = shared_dir / "data" / "piqa" / "valid.jsonl"
    tok = char_tokenizer("".join(sorted(set(piqa.read_text(encoding="utf-8")))))
    for dim, wide in ((32, False), (loader.CPU_BF16_MIN_DIM, True)):
        torch.manual_seed(0)
        model = MobileLLM(ModelConfig(vocab_size=tok.vocab_size, dim=dim, n_layers=1, n_heads=4, n_kv_heads=2,
                                      ffn_dim=64, block_size=64))
        save_checkpoint(model_checkpoint(model, tok.spec), tmp_path / f"ckpt{dim}")
        out = tmp_path / f"results{dim}.json"
        ev.main(["--init_from", str(tmp_path / f"ckpt{dim}"), "--tasks", "piqa", "--data", str(piqa), "--limit", "2",
                 "--device", "cpu", "--out", str(out)])
        assert json.loads(out.read_text())["dtype"] == ("bf16" if native and wide else "fp32")


def test_piqa_from_the_shared_jsonl_end_to_end(shared_dir, tmp_path, capsys):
    piqa = shared_dir / "data" / "piqa" / "valid.jsonl"
    chars = sorted(set(piqa.read_text(encoding="utf-8")) - {"1"})   # examples holding a "1" get skipped
    tok = char_tokenizer("".join(chars))
    model = tiny_model(tok.vocab_size, block_size=128)
    save_checkpoint(model_checkpoint(model, tok.spec), tmp_path / "ckpt")
    out = tmp_path / "results.json"
    results = ev.main(["--init_from", str(tmp_path / "ckpt"), "--tasks", "piqa", "--data", str(piqa),
                       "--limit", "24", "--batch_size", "8", "--dtype", "fp32", "--device", "cpu",
                       "--out", str(out)])
    report = json.loads(out.read_text())
    r = report["results"]["piqa"]
    assert report["dtype"] == "fp32"
    assert r == pytest.approx(results["piqa"], nan_ok=True)
    docs = ev.read_jsonl(piqa)[:24]
    expected_skipped = sum("1" in d["goal"] + d["sol1"] + d["sol2"] for d in docs)
    assert expected_skipped > 0 and (r["n"], r["skipped"]) == (24 - expected_skipped, expected_skipped)
    assert 0 <= r["acc"] <= 1 and 0 <= r["acc_norm"] <= 1 and r["truncated_contexts"] > 0
    assert "| piqa | " in capsys.readouterr().out
    # an int8 checkpoint goes through the same loader (loader.py) and scores within int8 noise of the float one
    ckpt = model_checkpoint(model, tok.spec)
    save_checkpoint(int8.quantized_checkpoint(int8.quantize_model(model, "w8"), ckpt, "w8"), tmp_path / "q")
    r8 = ev.main(["--init_from", str(tmp_path / "q"), "--tasks", "piqa", "--data", str(piqa), "--limit", "24",
                  "--dtype", "float32", "--device", "cpu", "--out", str(out)])["piqa"]
    assert r8["n"] == r["n"] and abs(r8["acc"] - r["acc"]) <= 0.25


def test_a_missing_model_fails_before_any_task_data_is_read_or_downloaded(tmp_path, monkeypatch):
    (tmp_path / "out-shakespeare-char").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ev, "load_docs", lambda *a: pytest.fail("task data read before the model was checked"))
    with pytest.raises(SystemExit, match=r"^eval.py: no checkpoint at out-shakespeare \(did you mean "
                                         r"'out-shakespeare-char'\?\)"):
        ev.main(["--init_from", "out-shakespeare", "--tasks", "piqa"])


def test_a_run_stopped_after_its_first_task_keeps_that_tasks_results(tmp_path, monkeypatch, capsys):
    tok = char_tokenizer(CHARS + "P")
    save_checkpoint(model_checkpoint(tiny_model(tok.vocab_size), tok.spec), tmp_path / "ckpt")
    (tmp_path / "piqa.jsonl").write_text("".join(json.dumps(d) + "\n" for d in piqa_docs([0, 1])))
    (tmp_path / "boolq.jsonl").write_text(json.dumps(dict(passage="P.", question="is it", answer=True)) + "\n")
    real_evaluate = ev.evaluate

    def stopped_at_the_second(model, tokenizer, name, *args):
        if name == "boolq":
            raise KeyboardInterrupt
        return real_evaluate(model, tokenizer, name, *args)

    monkeypatch.setattr(ev, "evaluate", stopped_at_the_second)
    with pytest.raises(SystemExit) as stop:
        ev.main(["--init_from", str(tmp_path / "ckpt"), "--tasks", "piqa,boolq", "--device", "cpu", "--dtype", "fp32",
                 "--data", f"piqa={tmp_path / 'piqa.jsonl'},boolq={tmp_path / 'boolq.jsonl'}",
                 "--out", str(tmp_path / "r.json")])
    assert stop.value.code == 130
    assert f"eval.py: stopped during boolq; piqa in {tmp_path / 'r.json'}" in capsys.readouterr().err
    assert list(json.loads((tmp_path / "r.json").read_text())["results"]) == ["piqa"]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loader, "load_model_and_tokenizer", interrupted)    # eval.py's own import of it, re-run
    monkeypatch.setattr(sys, "argv", ["eval.py", "--init_from", str(tmp_path / "ckpt"), "--tasks", "boolq",
                                      "--data", str(tmp_path / "boolq.jsonl"), "--device", "cpu"])
    with pytest.raises(SystemExit) as stop:                       # from the command line: Ctrl-C, no traceback
        runpy.run_path(ev.__file__, run_name="__main__")
    assert stop.value.code == 130


class RowsAPI(BaseHTTPRequestHandler):
    """The dataset viewer's /rows endpoint over the server's records, at most `length` per request."""

    def do_GET(self):
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlparse(self.path).query))
        offset, length = int(query["offset"]), int(query["length"])
        rows = [dict(row_idx=i, row=d) for i, d in enumerate(self.server.docs[offset:offset + length], offset)]
        body = json.dumps(dict(rows=rows, num_rows_total=len(self.server.docs))).encode()
        self.send_response(200)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_download_pages_through_the_rows_api_and_caches(tmp_path, monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), RowsAPI)
    server.docs = [dict(goal=f"g{i}", sol1="a", sol2="b", label=i % 2) for i in range(150)]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(ev, "ROWS_API", f"http://127.0.0.1:{server.server_port}/rows")
    monkeypatch.setattr(ev, "CACHE_DIR", tmp_path)
    try:
        assert ev.load_docs("piqa") == server.docs
    finally:
        server.shutdown()
    assert ev.load_docs("piqa") == server.docs           # from the cache now: the server is gone
    assert (tmp_path / "piqa.jsonl").is_file()


def test_offline_download_fails_with_one_message_saying_how_to_pass_data(tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "ROWS_API", "http://127.0.0.1:9/rows")      # nothing listens on the discard port
    monkeypatch.setattr(ev, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(ev.time, "sleep", lambda seconds: None)
    with pytest.raises(ev.EvalError, match=r"could not download boolq .*--data boolq=PATH.jsonl .*passage, question"):
        ev.load_docs("boolq")


def test_clear_errors_for_unknown_task_malformed_line_and_missing_file(tmp_path):
    with pytest.raises(ev.EvalError, match="unknown task.*piqa_typo.*choose from: arc_easy"):
        ev.parse_tasks("piqa,piqa_typo")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(piqa_docs([0])[0]) + "\n{not json\n")
    with pytest.raises(ev.EvalError, match="bad.jsonl, line 2: not a JSON object"):
        ev.read_jsonl(bad)
    with pytest.raises(ev.EvalError, match="no data file at .*missing.jsonl"):
        ev.read_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(ev.EvalError, match="record 1: not a piqa record.*needs goal, sol1, sol2, label"):
        ev.build_examples("piqa", [dict(question="wrong task's fields")])
    with pytest.raises(SystemExit, match="unknown task"):
        ev.main(["--init_from", "unused", "--tasks", "nope"])
    assert ev.parse_tasks("piqa,piqa") == ["piqa"]
    data = tmp_path / "piqa.jsonl"
    data.write_text(json.dumps(piqa_docs([0])[0]) + "\n")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit, match="--out .*a-file/r.json: cannot make its folder"):     # before any scoring
        ev.main(["--init_from", "mobilellm-micro", "--tasks", "piqa", "--data", str(data),
                 "--out", str(tmp_path / "a-file" / "r.json")])
    with pytest.raises(SystemExit, match="is a folder: give the .json file"):
        ev.main(["--init_from", "mobilellm-micro", "--tasks", "piqa", "--data", str(data), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"eval.py: mobilellm-micro is a preset \(random weights, no tokenizer\)"):
        ev.main(["--init_from", "mobilellm-micro", "--tasks", "piqa", "--data", str(data),
                 "--out", str(tmp_path / "new" / "r.json")])
    assert not (tmp_path / "new").exists()                  # a run that scored nothing makes no folder


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_device_error_not_a_model_that_cannot_load(tmp_path):
    data = tmp_path / "piqa.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in piqa_docs([0, 1])))
    with pytest.raises(SystemExit, match="^eval.py: device='cuda' but CUDA is not available"):
        ev.main(["--init_from", "unused", "--tasks", "piqa", "--data", str(data), "--device", "cuda"])


def test_the_paper_row_is_found_from_the_model_name():
    assert ev.paper_row("facebook/MobileLLM-125M") == ("mobilellm-125m", dict(zip(ev.TASKS, ev.PAPER["mobilellm-125m"])))
    assert ev.paper_row("facebook/MobileLLM-350M-layer-share")[1]["piqa"] == 69.8
    assert ev.paper_row("/models/MobileLLM-LS-125M")[1]["arc_easy"] == 45.8
    assert ev.paper_row("out-shakespeare-char") == (None, None)
    table = ev.markdown_table({"piqa": dict(n=10, acc=0.5, acc_stderr=0.1, acc_norm=0.6, acc_norm_stderr=0.1)},
                              *ev.paper_row("facebook/MobileLLM-125M"))
    assert table.splitlines()[-1] == "| piqa | 10 | 50.0 ± 10.0 | 60.0 ± 10.0 | 65.3 |"


def test_simulate_int8_scores_a_w8a8_checkpoint_without_int8_matmuls(shared_dir, tmp_path, monkeypatch):
    piqa = shared_dir / "data" / "piqa" / "valid.jsonl"
    tok = char_tokenizer("".join(sorted(set(piqa.read_text(encoding="utf-8")))))
    model = tiny_model(tok.vocab_size, block_size=128)
    qmodel = int8.quantize_model(model, "w8a8")
    save_checkpoint(int8.quantized_checkpoint(qmodel, model_checkpoint(model, tok.spec), "w8a8"), tmp_path / "q")
    args = ["--init_from", str(tmp_path / "q"), "--tasks", "piqa", "--data", str(piqa), "--limit", "16",
            "--dtype", "fp32", "--device", "cpu", "--out", str(tmp_path / "r.json")]
    real = ev.main(args)["piqa"]
    monkeypatch.setattr(int8, "int_mm", lambda *a: pytest.fail("an int8 matmul ran"))
    simulated = ev.main(args + ["--simulate_int8"])["piqa"]
    assert (simulated["acc"], simulated["acc_norm"]) == (real["acc"], real["acc_norm"])
    assert json.loads((tmp_path / "r.json").read_text())["simulate_int8"] is True
