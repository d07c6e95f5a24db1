import math

import pytest
import torch
import torch.nn.functional as F

from model import (PRESETS, SHARE_STRATEGIES, Attention, MobileLLM, ModelConfig, apply_rope, block_schedule,
                   config_from_dict, config_from_preset, rope_tables, sample_next_token)


def tiny_config(**kw):
    base = dict(vocab_size=97, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=48, block_size=24)
    return ModelConfig(**{**base, **kw})


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return MobileLLM(tiny_config(**kw)).eval()


def meta_params(name):
    with torch.device("meta"):
        return MobileLLM(config_from_preset(name)).num_params()


# --- presets ---------------------------------------------------------------------------------

def test_125m_parameter_count_is_metas_exactly():
    assert meta_params("mobilellm-125m") == 124_635_456


@pytest.mark.parametrize("name, published, last_digit", [
    ("mobilellm-350m", 345.3e6, 0.1e6), ("mobilellm-600m", 603.1e6, 0.1e6),
    ("mobilellm-1b", 1.01e9, 0.01e9), ("mobilellm-1.5b", 1.51e9, 0.01e9)])
def test_larger_presets_match_published_counts(name, published, last_digit):
    # Meta quotes these to a few digits (some truncated, some rounded): agree within one unit of the last
    assert abs(meta_params(name) - published) < last_digit


def test_every_preset_has_an_ls_twin_with_the_same_parameters_and_double_depth():
    for name in [n for n in PRESETS if not n.endswith("-ls")]:
        base, ls = config_from_preset(name), config_from_preset(name + "-ls")
        assert ls.share == "immediate" and ls.depth == 2 * base.depth
        assert meta_params(name) == meta_params(name + "-ls")


def test_paper_models_have_head_dim_64():
    for name in ("mobilellm-125m", "mobilellm-350m", "mobilellm-600m", "mobilellm-1b", "mobilellm-1.5b"):
        config = config_from_preset(name)
        assert config.head_dim == 64 and config.vocab_size == 32000 and config.tie_embeddings


# --- attention -------------------------------------------------------------------------------

def reference_attention(attn, x, n_heads, n_kv_heads):
    """Textbook causal multi-head attention with K/V heads repeated for grouped queries."""
    B, T, C = x.shape
    D = C // n_heads
    q = attn.wq(x).view(B, T, n_heads, D).transpose(1, 2)
    k = attn.wk(x).view(B, T, n_kv_heads, D).transpose(1, 2)
    v = attn.wv(x).view(B, T, n_kv_heads, D).transpose(1, 2)
    cos, sin = rope_tables(D, T, 10000.0)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k = k.repeat_interleave(n_heads // n_kv_heads, dim=1)
    v = v.repeat_interleave(n_heads // n_kv_heads, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = scores.softmax(-1) @ v
    return attn.wo(y.transpose(1, 2).reshape(B, T, C))


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_attention_equals_textbook_multi_head_attention(n_kv_heads):
    torch.manual_seed(0)
    config = tiny_config(n_kv_heads=n_kv_heads)
    attn = Attention(config)
    x = torch.randn(2, 10, config.dim)
    cos, sin = rope_tables(config.head_dim, 10, config.rope_theta)
    out = attn(x, cos, sin)
    assert out.shape == (2, 10, config.dim)
    assert attn.wk.weight.shape == (n_kv_heads * config.head_dim, config.dim)
    torch.testing.assert_close(out, reference_attention(attn, x, 4, n_kv_heads), atol=1e-5, rtol=1e-5)


def test_rope_rotation_preserves_norm_and_is_relative():
    cos, sin = rope_tables(8, 20, 10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    rot = lambda x, p: apply_rope(x, cos[p:p + 1], sin[p:p + 1])
    torch.testing.assert_close(rot(q, 5).norm(), q.norm())
    # the score between positions depends only on their distance
    torch.testing.assert_close((rot(q, 7) * rot(k, 3)).sum(), (rot(q, 14) * rot(k, 10)).sum(), atol=1e-5, rtol=0)


# --- the model -------------------------------------------------------------------------------

def test_forward_shapes_and_loss():
    model = tiny_model()
    idx = torch.randint(0, 97, (2, 16))
    logits, loss = model(idx)
    assert logits.shape == (2, 16, 97) and loss is None
    _, loss = model(idx, targets=torch.randint(0, 97, (2, 16)))
    assert loss.ndim == 0 and abs(loss.item() - math.log(97)) < 0.3   # near-uniform at init


def test_ignored_targets_do_not_count():
    model = tiny_model()
    idx = torch.randint(0, 97, (1, 8))
    targets = idx.clone()
    targets[0, 4:] = -1
    logits, loss = model(idx, targets)
    torch.testing.assert_close(loss, F.cross_entropy(logits[0, :4], idx[0, :4]))


@pytest.mark.parametrize("share", SHARE_STRATEGIES)
def test_causality(share):
    model = tiny_model(share=share)
    idx = torch.randint(0, 97, (1, 16))
    changed = idx.clone()
    changed[0, 9] = (idx[0, 9] + 1) % 97
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


@pytest.mark.parametrize("share", SHARE_STRATEGIES)
def test_kv_cache_decoding_equals_full_forward(share):
    model = tiny_model(share=share)
    idx = torch.randint(0, 97, (2, 20))
    full, _ = model(idx)
    model.setup_cache(batch_size=2, max_seq_len=24)
    pieces = [model(idx[:, :7], input_pos=torch.arange(7))[0]]                # prefill
    for t in range(7, 20):                                                     # one token at a time
        pieces.append(model(idx[:, t:t + 1], input_pos=torch.tensor([t]))[0])
    assert len(model.caches) == model.config.depth
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_decode_through_an_fp32_cache_close_to_fp32(dtype):
    """sample.py --dtype float16/bfloat16 on CPU: half weights, fp32 KV cache; logits stay close to fp32."""
    model = tiny_model()
    idx = torch.randint(0, 97, (1, 12))
    reference, _ = model(idx)
    model.to(dtype).setup_cache(batch_size=1, max_seq_len=24)
    assert model.caches[0].k.dtype == torch.float32
    pieces = [model(idx[:, :5], input_pos=torch.arange(5))[0]]
    pieces += [model(idx[:, t:t + 1], input_pos=torch.tensor([t]))[0] for t in range(5, 12)]
    logits = torch.cat(pieces, dim=1)
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    assert (logits.float() - reference).abs().max() < 0.05 * reference.abs().max()


def test_ls_125m_decodes_through_60_cache_entries_with_30_blocks():
    with torch.device("meta"):
        model = MobileLLM(config_from_preset("mobilellm-125m-ls"))
        model.setup_cache(1, 16)
    assert len(model.layers) == 30 and len(model.caches) == 60


def greedy_without_cache(model, idx, n):
    for _ in range(n):
        logits, _ = model(idx[:, -model.config.block_size:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


@pytest.mark.parametrize("share", ["none", "immediate"])
def test_greedy_generate_equals_cache_free_greedy(share):
    model = tiny_model(share=share)
    idx = torch.randint(0, 97, (2, 5))
    torch.testing.assert_close(model.generate(idx, 12, temperature=0), greedy_without_cache(model, idx, 12))


def test_generate_past_block_size_slides_the_context_like_nanogpt():
    model = tiny_model()                                                       # block_size 24
    idx = torch.randint(0, 97, (1, 20))
    out = model.generate(idx, 15, temperature=0)
    assert out.shape == (1, 35)
    torch.testing.assert_close(out, greedy_without_cache(model, idx, 15))
    assert model.caches is None


def test_sampling_respects_top_k_and_top_p():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    assert sample_next_token(logits, temperature=0).item() == 0
    top2 = {sample_next_token(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert top2 == {0, 1}
    # p(0) ~ 0.72, p(1) ~ 0.27: top_p=0.5 keeps only token 0, top_p=0.9 keeps 0 and 1
    assert {sample_next_token(logits, 1.0, top_p=0.5, generator=g).item() for _ in range(100)} == {0}
    assert {sample_next_token(logits, 1.0, top_p=0.9, generator=g).item() for _ in range(300)} == {0, 1}


def test_seeded_sampling_is_reproducible():
    model = tiny_model()
    idx = torch.zeros(1, 1, dtype=torch.long)
    a = model.generate(idx, 10, temperature=1.0, generator=torch.Generator().manual_seed(3))
    b = model.generate(idx, 10, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


# --- sharing (§2.2.3 embeddings, §2.3 blocks) --------------------------------------------------

@pytest.mark.parametrize("share, repeats, order", [
    ("none", 2, [0, 1, 2]),
    ("immediate", 2, [0, 0, 1, 1, 2, 2]),
    ("repeat_all", 2, [0, 1, 2, 0, 1, 2]),
    ("reverse", 2, [0, 1, 2, 2, 1, 0]),
    ("immediate", 3, [0, 0, 0, 1, 1, 1, 2, 2, 2]),
])
def test_blocks_run_in_the_strategys_order(share, repeats, order):
    model = tiny_model(share=share, share_repeats=repeats)
    calls = []
    for i, layer in enumerate(model.layers):
        layer.register_forward_hook(lambda module, args, out, i=i: calls.append(i))
    model(torch.randint(0, 97, (1, 6)))
    assert calls == order == block_schedule(model.config)


@pytest.mark.parametrize("share", ["immediate", "repeat_all", "reverse"])
def test_shared_model_equals_explicitly_unrolled_model(share):
    shared = tiny_model(share=share)
    unrolled = MobileLLM(tiny_config(n_layers=shared.config.depth)).eval()
    state = {k: v for k, v in shared.state_dict().items() if not k.startswith("layers.")}
    for depth, block in enumerate(shared.schedule):
        for key, value in shared.layers[block].state_dict().items():
            state[f"layers.{depth}.{key}"] = value
    unrolled.load_state_dict(state)
    idx = torch.randint(0, 97, (2, 12))
    torch.testing.assert_close(shared(idx)[0], unrolled(idx)[0])
    assert unrolled.num_params() > shared.num_params()


def test_tied_embeddings_are_one_tensor_and_counted_once():
    tied, untied = tiny_model(), tiny_model(tie_embeddings=False)
    assert tied.output.weight is tied.tok_embeddings.weight
    assert untied.output.weight is not untied.tok_embeddings.weight
    assert untied.num_params() - tied.num_params() == 97 * 32
    tied.load_state_dict(tied.state_dict())
    assert tied.output.weight is tied.tok_embeddings.weight      # loading keeps them tied


def test_sharing_models_have_as_many_parameters_as_their_base():
    base = tiny_model().num_params()
    for share in ("immediate", "repeat_all", "reverse"):
        assert tiny_model(share=share).num_params() == base


def test_residual_projections_get_scaled_init():
    model = MobileLLM(tiny_config(n_layers=8, dim=256, n_heads=4, ffn_dim=512))
    std = model.config.init_std
    assert abs(model.layers[0].attention.wq.weight.std().item() - std) < 0.002
    assert abs(model.layers[0].attention.wo.weight.std().item() - std / math.sqrt(16)) < 0.001


def test_plain_mlp_baselines_have_two_matrices():
    swiglu, gelu = tiny_model(), tiny_model(ffn_type="gelu")
    assert gelu.layers[0].feed_forward.w3 is None
    assert swiglu.num_params() - gelu.num_params() == 3 * 32 * 48
    assert gelu(torch.randint(0, 97, (1, 4)))[0].shape == (1, 4, 97)


# --- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, field", [
    (dict(dim=30), "dim"), (dict(n_kv_heads=3), "n_kv_heads"), (dict(share="sideways"), "share"),
    (dict(share="immediate", share_repeats=1), "share_repeats"), (dict(n_layers=0), "n_layers"),
    (dict(ffn_type="tanh"), "ffn_type"), (dict(dim=36, n_heads=4, n_kv_heads=2), "head dim"),
    (dict(norm_eps=0.0), "norm_eps"), (dict(vocab_size=1.5), "vocab_size"),
])
def test_bad_configs_raise_value_errors_naming_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**kw)


def test_unknown_preset_and_unknown_config_key_are_clear_errors():
    with pytest.raises(ValueError, match="unknown preset"):
        config_from_preset("mobilellm-7b")
    with pytest.raises(ValueError, match="n_layer\\b"):
        config_from_dict({"n_layer": 4})


def test_too_long_input_and_missing_cache_are_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 25, dtype=torch.long))
    with pytest.raises(RuntimeError, match="setup_cache"):
        model(torch.zeros(1, 1, dtype=torch.long), input_pos=torch.tensor([0]))
