"""
How the repo measures a model on this host: decode time through a KV cache (bench_mobile.py's programs and
eager rows, quantize.py --report, the ablations), a process's memory, the host's read bandwidth, and a fresh
process to measure in. Imports only torch.
"""
import multiprocessing
import statistics
import time

import torch


def time_generation(step, prompt_len, new_tokens, runs, vocab_size):
    """The benchmarks' decode timing (sample.py times its own streaming sampler as it prints).
    step(tokens (1, T), input_pos (T,)) -> last-token logits (1, V).
    Warm-up once, then `runs` times: prefill a random prompt_len-token prompt and decode new_tokens greedily.
    Returns (median prefill ms, median decode ms per token)."""
    prompt = torch.randint(0, vocab_size, (1, prompt_len))
    prefill_ms, decode_ms = [], []
    for run in range(runs + 1):
        t0 = time.perf_counter()
        logits = step(prompt, torch.arange(prompt_len))
        t1 = time.perf_counter()
        for pos in range(prompt_len, prompt_len + new_tokens):
            logits = step(logits.argmax(-1, keepdim=True), torch.tensor([pos]))
        t2 = time.perf_counter()
        if run:                                                   # run 0 is the warm-up
            prefill_ms.append(1e3 * (t1 - t0))
            decode_ms.append(1e3 * (t2 - t1) / new_tokens)
    return statistics.median(prefill_ms), statistics.median(decode_ms)


def cached_forward(model, max_seq_len):
    """A step for time_generation through model.py's own static KV cache (model.clear_cache() frees it)."""
    model.setup_cache(1, max_seq_len)

    @torch.no_grad()
    def step(tokens, input_pos):
        return model(tokens, input_pos=input_pos)[0][:, -1]

    return step


def eager_decode_ms(model, prompt_len, new_tokens, runs=1):
    """Median ms per greedily decoded token of a model in eager PyTorch, through its KV cache."""
    step = cached_forward(model, prompt_len + new_tokens)
    try:
        return time_generation(step, prompt_len, new_tokens, runs, model.config.vocab_size)[1]
    finally:
        model.clear_cache()


def seconds(fn):
    """Wall seconds of one call of fn()."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def proc_status_mb(field):
    """A memory line of /proc/self/status in MB: VmRSS (resident now) or VmHWM (peak resident). Not
    getrusage's ru_maxrss for the peak: Linux carries that across fork + exec, so a spawned child would
    report its parent's peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(f"{field}:")) / 1024


def rss_mb():
    return proc_status_mb("VmRSS")


def peak_rss_mb():
    return proc_status_mb("VmHWM")


def in_fresh_process(fn, *args):
    """Run fn(*args) in a new process (spawned, so nothing is shared: its time, threads and peak memory are
    its own) and return its result."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def memory_bandwidth_gbs(threads, mb=512, reps=5):
    """Read bandwidth of this host: best of `reps` sums over a buffer far larger than the caches."""
    torch.set_num_threads(threads)
    x = torch.ones(mb * 2**20 // 4)
    x.sum()
    best = min(seconds(x.sum) for _ in range(reps))
    return x.numel() * 4 / best / 1e9
