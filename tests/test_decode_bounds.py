"""decode_bounds.py: the bytes a decode step reads, and the product chain whose speed gives the kernel bound."""
import pytest
import torch

import decode_bounds as db
from test_export import load_method

pytest.importorskip("executorch.exir")


def test_weight_reads_count_each_block_application_and_which_are_cached():
    """125M: 30 blocks of 576x(9+3+3+9)x64 attention and 3 x 576x1536 SwiGLU weights, plus the 32000x576 head."""
    from model import config_from_preset
    block = 576 * 64 * 24 + 3 * 576 * 1536
    per_token = 30 * block + 32000 * 576
    assert db.weight_reads_per_token(config_from_preset("mobilellm-125m"), "w8a8", True) == (per_token, 0)
    assert db.weight_reads_per_token(config_from_preset("mobilellm-125m"), "8da4w", True) == (per_token / 2, 0)
    ls = config_from_preset("mobilellm-125m-ls")
    assert db.weight_reads_per_token(ls, "fp32", shared=True) == (4 * per_token, 4 * 30 * block)
    assert db.weight_reads_per_token(ls, "fp32", shared=False) == (4 * (per_token + 30 * block), 0)
    repeat_all = config_from_preset("mobilellm-125m-ls", share="repeat_all")      # re-applied after all others
    assert db.weight_reads_per_token(repeat_all, "w8a8", shared=True) == (per_token + 30 * block, 0)


@pytest.mark.parametrize("preset,shared", [("mobilellm-125m", True), ("mobilellm-125m-ls", True),
                                           ("mobilellm-125m-ls", False)])
def test_product_stream_reads_the_models_weights_in_its_order(preset, shared):
    """Each block application's front and back products, shared where the program shares the block, then
    the head: per call exactly the bytes weight_reads_per_token counts."""
    from model import config_from_preset
    config = config_from_preset(preset)
    with torch.device("meta"):
        stream = db.ProductStream(config, shared)
    depth = config.n_layers * (config.share_repeats if config.share != "none" else 1)
    assert len(stream.schedule) == depth and len(stream.fronts) == (config.n_layers if shared else depth)
    assert stream.schedule[:4] == ([0, 0, 1, 1] if config.share != "none" and shared else [0, 1, 2, 3])
    read = sum(db.linear_weights(stream.fronts[b]) + db.linear_weights(stream.backs[b]) for b in stream.schedule)
    read += db.linear_weights(stream.head)
    assert 4 * read == sum(db.weight_reads_per_token(config, "fp32", shared))


@pytest.mark.parametrize("shared", [True, False])
def test_lowered_stream_computes_its_products_and_splits_and_shares_delegates_as_the_program(tiny, shared,
                                                                                           tmp_path):
    torch.manual_seed(0)
    stream = db.ProductStream(tiny.config, shared).eval()
    applications, blocks = len(stream.schedule), len(set(stream.schedule))
    x = torch.randn(1, 1, tiny.config.dim)
    with torch.no_grad():
        expected = stream(x)
    data, info = db.product_stream_pte(stream, "fp32")
    assert info["delegate_calls"] == 2 * applications + 1             # a front and a back per application, head
    assert info["delegates"] == 2 * blocks + 1                         # a shared block's are packed once
    path = tmp_path / "stream.pte"
    path.write_bytes(data)
    torch.testing.assert_close(load_method(path).execute([x])[0], expected, rtol=1e-4, atol=1e-5)


def test_kernel_seconds_times_the_models_product_stream(tiny, monkeypatch):
    lowered = []
    monkeypatch.setattr(db, "product_stream_pte", lambda stream, dtype: (lowered.append((stream, dtype)) or
                                                                         (b"program", {})))
    monkeypatch.setattr(db, "program_seconds", lambda data, inputs, threads: 0.004 if data == b"program" else 1)
    assert db.kernel_seconds(tiny.config, "w8a8", True, threads=1) == 0.004
    assert lowered[0][0].schedule == [0, 0] and lowered[0][1] == "w8a8"       # tiny: one block applied twice
