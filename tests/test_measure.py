"""measure.py: decode timing calls the step as a prefill then one token at a time at the right positions,
greedily; eager timing leaves no cache behind; a fresh process reports its own peak memory."""
import torch

import measure
from model import MobileLLM, config_from_preset


def test_time_generation_prefills_then_decodes_greedily_at_each_position():
    calls = []

    def step(tokens, input_pos):                         # "logits" that make the greedy next token pos + 10
        calls.append((tokens.tolist(), input_pos.tolist()))
        return torch.nn.functional.one_hot(input_pos[-1:] + 10, 50).float()

    prefill_ms, decode_ms = measure.time_generation(step, prompt_len=4, new_tokens=3, runs=2, vocab_size=50)
    assert len(calls) == 3 * 4 and prefill_ms > 0 and decode_ms > 0          # warm-up + 2 runs, 1 + 3 steps each
    prompt, positions = calls[0]
    assert positions == [0, 1, 2, 3] and len(prompt[0]) == 4
    assert calls[1:4] == [([[13]], [4]), ([[14]], [5]), ([[15]], [6])]       # each token the last step's argmax
    assert [c[1] for c in calls[4:8]] == [[0, 1, 2, 3], [4], [5], [6]]


def test_eager_decode_frees_the_models_cache():
    model = MobileLLM(config_from_preset("mobilellm-micro")).eval()
    assert measure.eager_decode_ms(model, prompt_len=3, new_tokens=2) > 0
    assert model.caches is None


def test_peak_memory_of_a_fresh_process_is_its_own():
    """bench_mobile's memory column: a spawned child must not report its parent's peak (getrusage would,
    on Linux: ru_maxrss survives fork + exec)."""
    ballast = torch.ones(256 * 2**20 // 4)                   # 256 MB touched in this (parent) process
    child_peak = measure.in_fresh_process(measure.peak_rss_mb)
    assert measure.peak_rss_mb() - child_peak > 128, (measure.peak_rss_mb(), child_peak)
    del ballast


def test_bandwidth_is_a_plausible_number_of_gb_per_s():
    assert 0.1 < measure.memory_bandwidth_gbs(threads=1, mb=64, reps=2) < 10_000
