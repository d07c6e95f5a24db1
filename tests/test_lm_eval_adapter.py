import functools
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import eval as ev  # noqa: E402
import lm_eval_adapter as adapter  # noqa: E402
from checkpoint import model_checkpoint, save_checkpoint  # noqa: E402
from model import MobileLLM, ModelConfig  # noqa: E402
from tokenizer import char_tokenizer  # noqa: E402

CHARS = "\n !?.:_abcdefghijklmnopqrstuvwxyzABQ"
ROOT = Path(__file__).resolve().parents[1]


def tiny_model(vocab_size, block_size):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                         block_size=block_size)
    return MobileLLM(config).eval()


def tiny_lm(tmp_path, chars=CHARS, block_size=16, batch_size=4):
    """The adapter over a saved tiny checkpoint with a char tokenizer (no BOS, no EOS)."""
    tok = char_tokenizer(chars)
    save_checkpoint(model_checkpoint(tiny_model(tok.vocab_size, block_size), tok.spec), tmp_path / "ckpt")
    return adapter.NanoMobileLLM(init_from=tmp_path / "ckpt", device="cpu", batch_size=batch_size)


def requests(request_type, *arguments):
    return [Instance(request_type, {}, args, i) for i, args in enumerate(arguments)]


def test_model_args_are_checked_and_a_missing_cuda_means_the_cpu(tmp_path):
    lm = tiny_lm(tmp_path)
    assert adapter.NanoMobileLLM(tmp_path / "ckpt", device="cpu", batch_size="8").batch_size == 8   # CLI strings
    cli = dict(batch_size="3", max_batch_size=None, device="cpu")             # what lm-eval's CLI always sends
    model_args = dict(init_from=tmp_path / "ckpt", batch_size=2)
    assert adapter.NanoMobileLLM.create_from_arg_obj(model_args, cli).batch_size == 2
    assert adapter.NanoMobileLLM.create_from_arg_string(f"init_from={tmp_path / 'ckpt'}", cli).batch_size == 3
    with pytest.raises(ValueError, match="--model_args initfrom: takes init_from=<model> \\(required\\), batch_size"):
        adapter.NanoMobileLLM.create_from_arg_string(f"initfrom={tmp_path / 'ckpt'}", cli)
    with pytest.raises(ValueError, match="--model_args without init_from: takes init_from=<model>"):
        adapter.NanoMobileLLM.create_from_arg_string("", cli)
    with pytest.raises(ValueError, match="no 'auto'"):
        adapter.NanoMobileLLM(tmp_path / "ckpt", device="cpu", batch_size="auto")
    with pytest.raises(ValueError, match="unknown dtype"):
        adapter.NanoMobileLLM(tmp_path / "ckpt", device="cpu", dtype="int8")
    with pytest.raises(ValueError, match=r"mobilellm-micro is a preset \(random weights, no tokenizer\): give"):
        adapter.NanoMobileLLM("mobilellm-micro", device="cpu")
    if not torch.cuda.is_available():
        assert adapter.pick_device("cuda:0") == "cpu" and adapter.pick_device(None) == "cpu"
    with pytest.raises(ValueError, match="device='gpu': use cpu, cuda"):        # a typo is no CPU fallback
        adapter.pick_device("gpu")
    bf16 = adapter.NanoMobileLLM(tmp_path / "ckpt", device="cpu", dtype="bfloat16")
    [(ll, _)], [(ll16, _)] = (m.loglikelihood(requests("loglikelihood", ("Q: why?", " because"))) for m in (lm, bf16))
    assert ll16 == pytest.approx(ll, abs=0.1) and ll16 != ll                  # autocast ran, in bfloat16


def test_loglikelihood_equals_eval_scoring(tmp_path):
    lm = tiny_lm(tmp_path, block_size=16)
    pairs = [("Question: why?\nAnswer:", " because"),                   # continuation starting with a space
             ("Q: a ", "b"),                                            # the context's trailing space moves over
             ("abc", "d"),
             ("a long context that does not fit in the window", " kept")]   # cut from the left to block_size
    results = lm.loglikelihood(requests("loglikelihood", *pairs))
    expected = ev.score(lm.model, [ev.encode_pair(lm.tokenizer, c, k) for c, k in pairs])
    assert [ll for ll, _ in results] == pytest.approx(expected, abs=1e-5)
    assert all(isinstance(greedy, bool) for _, greedy in results)


def test_a_context_ending_in_a_newline_is_split_as_the_harness_splits_it(tmp_path):
    # The harness moves all trailing whitespace of a context into the continuation, eval.encode_pair only
    # spaces: for "Q?\n" + "A" the adapter scores "\nA" after "Q?". No eval.py task has such a context.
    lm = tiny_lm(tmp_path)
    [(ll, _)] = lm.loglikelihood(requests("loglikelihood", ("Q?\n", "A")))
    assert ll == pytest.approx(ev.score(lm.model, [ev.encode_pair(lm.tokenizer, "Q?", "\nA")])[0], abs=1e-5)
    assert ll != pytest.approx(ev.score(lm.model, [ev.encode_pair(lm.tokenizer, "Q?\n", "A")])[0], abs=1e-3)


def successor_model(vocab_size, block_size=16):
    """A model whose greedy next token is always the token after the current one in the vocabulary: the blocks
    add nothing to the residual stream, and the output row of token t + 1 is the embedding of t."""
    model = tiny_model(vocab_size, block_size)
    for layer in model.layers:
        nn.init.zeros_(layer.attention.wo.weight)
        nn.init.zeros_(layer.feed_forward.w2.weight)
    model.output = nn.Linear(model.config.dim, vocab_size, bias=False)
    model.output.weight.data = 10 * model.tok_embeddings.weight.data.roll(1, dims=0)
    return model


def test_is_greedy_says_whether_greedy_decoding_gives_the_continuation(tmp_path):
    lm = tiny_lm(tmp_path)
    lm.model = successor_model(lm.tokenizer.vocab_size)
    results = lm.loglikelihood(requests("loglikelihood", ("ab", "cde"), ("ab", "cdd"), ("xy", "z")))
    assert [greedy for _, greedy in results] == [True, False, True]


def test_an_empty_context_needs_a_bos_or_eos_token(tmp_path):
    lm = tiny_lm(tmp_path)
    with pytest.raises(ValueError, match="no BOS or EOS"):
        lm.loglikelihood(requests("loglikelihood", ("", "abc")))
    lm.tokenizer.eos_id = 0                       # now the empty context is that token, as in the harness
    [(ll, _)] = lm.loglikelihood(requests("loglikelihood", ("", "abc")))
    assert ll == pytest.approx(ev.score(lm.model, [([0], lm.tokenizer.encode("abc"))])[0], abs=1e-5)


def own_loss_in_windows(model, tokens, block_size):
    """The model's summed token loss over tokens[1:] (tokens[0] is context only), each token predicted once:
    windows of block_size predictions, each as long as the block allows, ending at its last prediction."""
    total, done = 0.0, 1
    while done < len(tokens):
        end = min(done + block_size, len(tokens))
        start = max(0, end - 1 - block_size)
        x = torch.tensor([tokens[start:end - 1]])
        y = torch.tensor([[t if start + 1 + j >= done else -1 for j, t in enumerate(tokens[start + 1:end])]])
        total += model(x, targets=y)[1].item() * (end - done)      # loss is the mean over the scored targets
        done = end
    return total


def test_loglikelihood_rolling_equals_the_models_own_loss(tmp_path):
    lm = tiny_lm(tmp_path, block_size=16)
    short, long = "hello there", "a text of forty characters and then some more"
    assert len(short) < 16 < 2 * 16 < len(long)
    # no BOS/EOS: the first character is context only
    rolling = lm.loglikelihood_rolling(requests("loglikelihood_rolling", (short,), (long,)))
    tokens = [lm.tokenizer.encode(text) for text in (short, long)]
    x, y = torch.tensor([tokens[0][:-1]]), torch.tensor([tokens[0][1:]])
    assert -rolling[0] == pytest.approx(lm.model(x, targets=y)[1].item() * (len(short) - 1), rel=1e-5)
    assert -rolling[1] == pytest.approx(own_loss_in_windows(lm.model, tokens[1], 16), rel=1e-5)
    # with an EOS token, it conditions the first character, which is then scored too
    lm.tokenizer.eos_id = 0
    [with_eos] = lm.loglikelihood_rolling(requests("loglikelihood_rolling", (long,)))
    assert -with_eos == pytest.approx(own_loss_in_windows(lm.model, [0] + tokens[1], 16), rel=1e-5)


def generate(lm, context, **gen_kwargs):
    return lm.generate_until(requests("generate_until", (context, gen_kwargs)))[0]


def test_generate_until_stops_at_stop_strings_eos_and_max_gen_toks(tmp_path, monkeypatch):
    lm = tiny_lm(tmp_path)
    lm.model = successor_model(lm.tokenizer.vocab_size)       # greedy from "a": "bcdefgh..."
    decoded = []
    generate_tokens = lm.model.generate_tokens

    def counting_generate_tokens(*args, **kwargs):
        for token in generate_tokens(*args, **kwargs):
            decoded.append(token.item())
            yield token

    monkeypatch.setattr(lm.model, "generate_tokens", counting_generate_tokens)
    assert generate(lm, "xya", until=["xx"], max_gen_toks=6) == "bcdefg"
    assert generate(lm, "xya", until=["de", "ef"], max_gen_toks=20) == "bc"      # the first stop string seen
    assert lm.tokenizer.decode(decoded[6:]) == "bcde"                             # decoding stopped there
    assert generate(lm, "xya", until="f", max_gen_toks=20) == "bcde"
    lm.tokenizer.eos_id = lm.tokenizer.encode("e")[0]
    assert generate(lm, "xya", until=[], max_gen_toks=20) == "bcd"
    assert generate(lm, "a prompt longer than the block of the model: a", until=["zz"], max_gen_toks=3) == "bcd"
    with pytest.raises(ValueError, match="greedily only"):
        generate(lm, "a", until=["x"], do_sample=True, temperature=1.0)


def piqa_tokenizer_chars(path, n):
    """Every character of the first n PIQA records and of the prompt, so no example is skipped."""
    docs = ev.read_jsonl(path)[:n]
    return "".join(sorted(set("Question: \nAnswer:").union(*(d["goal"] + d["sol1"] + d["sol2"] for d in docs))))


def test_offline_piqa_task_gives_eval_pys_scores_and_accuracies(shared_dir, tmp_path, monkeypatch):
    piqa = shared_dir / "data" / "piqa" / "valid.jsonl"
    lm = tiny_lm(tmp_path, piqa_tokenizer_chars(piqa, 20), block_size=128, batch_size=16)
    monkeypatch.chdir(ROOT)                          # the task's data path is relative to the project root
    out = lm_eval.simple_evaluate(model="nanomobilellm", model_args=dict(init_from=str(tmp_path / "ckpt"),
                                  device="cpu", batch_size=16), tasks=["piqa_local"], limit=20, log_samples=True,
                                  task_manager=TaskManager(include_path=str(ROOT / "lm_eval_tasks"),
                                                           include_defaults=False))
    harness = out["results"]["piqa_local"]
    ours = ev.main(["--init_from", str(tmp_path / "ckpt"), "--tasks", "piqa", "--data", str(piqa), "--limit", "20",
                    "--dtype", "float32", "--device", "cpu", "--out", str(tmp_path / "r.json")])["piqa"]
    assert ours["n"] == 20 and ours["skipped"] == 0 and ours["truncated_contexts"] > 0
    assert (harness["acc,none"], harness["acc_norm,none"]) == (ours["acc"], ours["acc_norm"])
    # and the same log-likelihood for every choice of every example
    examples = ev.build_examples("piqa", ev.read_jsonl(piqa)[:20])
    expected = ev.score(lm.model, [ev.encode_pair(lm.tokenizer, c, k)
                                   for ex in examples for c, k in zip(ex.contexts, ex.continuations)])
    samples = sorted(out["samples"]["piqa_local"], key=lambda s: s["doc_id"])
    assert [ll for s in samples for [ll, _] in s["filtered_resps"]] == pytest.approx(expected, abs=1e-4)


def test_runner_reads_a_piqa_copy_named_by_an_including_yaml(tmp_path, monkeypatch):
    lm = tiny_lm(tmp_path, batch_size=2)
    docs = [dict(goal="pick one", sol1="aaaa", sol2="bb", label=label) for label in (0, 1, 1)]
    (tmp_path / "piqa.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "piqa_mine.yaml").write_text(   # as the task file's comment says, with an absolute include
        f"include: {ROOT / 'lm_eval_tasks' / 'piqa_local.yaml'}\ntask: piqa_mine\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {tmp_path / 'piqa.jsonl'}\n")
    monkeypatch.setattr(sys, "argv", ["lm_eval_adapter.py"])
    # lm-eval's CLI indexes its ~15k built-in task configs first (half a minute); this test needs only its own
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", functools.partial(TaskManager, include_defaults=False))
    adapter.main(["--model_args", f"init_from={tmp_path / 'ckpt'},device=cpu,batch_size=2", "--batch_size", "3",
                  "--include_path", str(tasks), "--tasks", "piqa_mine", "--output_path", str(tmp_path / "out")])
    [results] = (tmp_path / "out").rglob("results_*.json")
    report = json.loads(results.read_text())
    assert report["config"]["model_args"] == dict(init_from=str(tmp_path / "ckpt"), device="cpu", batch_size=2)
    assert report["n-samples"]["piqa_mine"] == dict(original=3, effective=3)       # our 3 records, not PIQA's
    result = report["results"]["piqa_mine"]
    lls = ev.score(lm.model, [ev.encode_pair(lm.tokenizer, "Question: pick one\nAnswer:", " " + sol)
                              for sol in ("aaaa", "bb")])
    acc = sum(ev.argmax(lls) == d["label"] for d in docs) / 3
    acc_norm = sum(ev.argmax([lls[0] / 4, lls[1] / 2]) == d["label"] for d in docs) / 3
    assert (result["acc,none"], result["acc_norm,none"]) == (pytest.approx(acc), pytest.approx(acc_norm))
    with pytest.raises(SystemExit, match="^lm_eval_adapter.py: no checkpoint at .*nowhere"):     # one line
        adapter.main(["--model_args", f"init_from={tmp_path / 'nowhere'},device=cpu", "--include_path", str(tasks),
                      "--tasks", "piqa_mine", "--output_path", str(tmp_path / "out")])
