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
    assert db.weight_reads_per_token(config_from_preset("mobilellm-125m"), "int8", True) == (per_token, 0)
    assert db.weight_reads_per_token(config_from_preset("mobilellm-125m"), "8da4w", True) == (per_token / 2, 0)
    ls = config_from_preset("mobilellm-125m-ls")
    assert db.weight_reads_per_token(ls, "fp32", shared=True) == (4 * per_token, 4 * 30 * block)
    assert db.weight_reads_per_token(ls, "fp32", shared=False) == (4 * (per_token + 30 * block), 0)
    repeat_all = config_from_preset("mobilellm-125m-ls", share="repeat_all")      # re-applied after all others
    assert db.weight_reads_per_token(repeat_all, "int8", shared=True) == (per_token + 30 * block, 0)


@pytest.mark.parametrize("hot_pairs", [0, 2])
def test_gemv_chain_computes_its_products_and_a_hot_one_shares_its_pairs_delegates(tiny, hot_pairs, tmp_path):
    config = tiny.config
    data, info, nbytes = db.gemv_chain_pte(config, "fp32", mb=0.1, hot_pairs=hot_pairs)
    n = info["delegate_calls"]
    assert n >= 4 and nbytes == n * 2 * config.dim * config.ffn_dim * 4
    assert info["delegates"] == (hot_pairs or n)                 # a hot chain re-reads its packed pairs
    torch.manual_seed(0)
    chain = db.GemvChain(config.dim, config.ffn_dim, n, hot_pairs or n).eval()
    path = tmp_path / "chain.pte"
    path.write_bytes(data)
    x = torch.randn(1, 1, config.dim)
    torch.testing.assert_close(load_method(path).execute([x])[0], chain(x), rtol=1e-4, atol=1e-5)
