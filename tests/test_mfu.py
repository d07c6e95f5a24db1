import math

import pytest

import mfu
from train import TrainConfig, model_config


def test_flops_of_a_fine_tune_leave_out_the_gradients_frozen_weights_do_not_need():
    c = model_config(TrainConfig(share="none", n_layers=2), vocab_size=65)
    block = c.dim * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads) + 3 * c.dim * c.ffn_dim
    scores, head = 4 * c.dim * 128, 65 * c.dim
    full = mfu.flops_per_token(c, 128)
    assert full == 2 * (6 * block + 3 * scores) + 6 * head
    # block 0 and the embedding frozen: block 0 runs forward only, block 1 fully, the head without its own gradient
    assert mfu.flops_per_token(c, 128, frozen_blocks=[0], frozen_embedding=True) == (
        (2 * block + scores) + (6 * block + 3 * scores) + 4 * head)
    # only the embedding trains: every block passes gradients down, none computes its own
    assert mfu.flops_per_token(c, 128, frozen_blocks=[0, 1]) == 2 * (4 * block + 3 * scores) + 6 * head


def test_flops_count_shared_blocks_once_per_application():
    base = model_config(TrainConfig(share="none"), vocab_size=65)
    shared = model_config(TrainConfig(share="immediate"), vocab_size=65)
    per_block = (mfu.flops_per_token(shared, 256) - mfu.flops_per_token(base, 256))
    assert per_block > 0 and math.isclose(
        per_block, mfu.flops_per_token(base, 256) - 6 * 65 * base.dim, rel_tol=1e-9)


def test_peak_flops_is_the_fastest_matmul_not_the_mean(monkeypatch):
    """A rep slowed by another process must not lower the peak (MFU would pass 100%)."""
    clock = iter([0.0, 0.5, 1.0, 1.1, 2.0, 2.3])                 # reps of 0.5 s, 0.1 s and 0.3 s
    monkeypatch.setattr(mfu.time, "perf_counter", lambda: next(clock))
    assert mfu.measure_peak_flops("cpu", "fp32", n=8, reps=3) == pytest.approx(2 * 8 ** 3 / 0.1)


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989),
    ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100-PCIE-40GB", 312), ("NVIDIA L4", 121), ("NVIDIA L40S", 362),
    ("NVIDIA L40", 181), ("NVIDIA A10", 125), ("NVIDIA GeForce RTX 4090", 165),
    ("NVIDIA A10G", None), ("NVIDIA RTX A1000", None), ("Tesla T4", None)])
def test_a_gpus_datasheet_peak_is_its_own_not_a_namesakes(name, tflops):
    """Matched as whole words: an L40S is not an L4 (3x its peak), an RTX A1000 not an A100."""
    peak = mfu.datasheet_peak(name)
    assert (peak if peak is None else peak / 1e12) == tflops


def test_peak_flops_keeps_timing_until_min_seconds_have_passed(monkeypatch):
    """Eight quick reps inside another process's burst would all be slow: timing goes on for min_seconds."""
    reps = iter([0.05] * 8 + [0.01] * 20)                       # a burst over the first eight, then the real speed
    now = [0.0]

    def clock():                                                # each rep's start and end
        now[0] += next(reps) if clock.ended else 0.0
        clock.ended = not clock.ended
        return now[0]
    clock.ended = False
    monkeypatch.setattr(mfu.time, "perf_counter", clock)
    assert mfu.measure_peak_flops("cpu", "fp32", n=8, reps=8, min_seconds=0.5) == pytest.approx(2 * 8 ** 3 / 0.01)
