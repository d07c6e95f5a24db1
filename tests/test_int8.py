import pytest
import torch
import torch.nn as nn

from checkpoint import CheckpointError, load_model, model_checkpoint, save_checkpoint
from int8 import (Int8Embedding, Int8Linear, dequantize_per_channel, dequantize_per_token, load_quantized,
                  quantize_model, quantize_per_channel, quantize_per_token, quantized_checkpoint, set_simulate,
                  w8_linear, w8_linear_simulated)
from model import MobileLLM, ModelConfig
from tokenizer import load_tokenizer

CHARS = "abcdefghijklmnopqrstuvwxyz .,\n"
SPEC = {"kind": "char", "chars": CHARS}


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    base = dict(vocab_size=len(CHARS), dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, block_size=32)
    return MobileLLM(ModelConfig(**{**base, **kw})).eval()


# --- the math on hand-made tensors ------------------------------------------------------------------

def test_per_channel_scales_are_max_abs_over_127():
    w = torch.tensor([[0.5, -1.27, 0.0], [2.54, 1.0, -1.0]])
    q, scale = quantize_per_channel(w)
    torch.testing.assert_close(scale, torch.tensor([0.01, 0.02]))
    assert q.dtype == torch.int8
    assert q.tolist() == [[50, -127, 0], [127, 50, -50]]


def test_per_token_scale_and_zero_point_map_min_to_minus_128_and_max_to_127():
    x = torch.tensor([[-1.0, 0.0, 2.0],     # lo=-1, hi=2
                      [1.0, 3.0, 2.0],      # all positive: the range is stretched to include 0
                      [0.0, 0.0, 0.0]])     # all zero: any scale, zero maps back to 0
    q, scale, zero = quantize_per_token(x)
    torch.testing.assert_close(scale[:2], torch.tensor([3 / 255, 3 / 255]))
    assert zero[:2].tolist() == [-128 + 85, -128]
    assert q[0].tolist() == [-128, -128 + 85, 127]      # min -> -128, 0 -> the zero point, max -> 127
    assert q[1].tolist() == [-128 + 85, 127, -128 + 170]
    assert dequantize_per_token(q, scale, zero)[2].tolist() == [0.0, 0.0, 0.0]
    assert dequantize_per_token(q, scale, zero)[0, 1].item() == 0.0   # 0 is exactly representable


@pytest.mark.parametrize("magnitude", [1e-3, 1.0, 300.0])
def test_round_trip_error_is_at_most_half_a_step(magnitude):
    torch.manual_seed(0)
    x = torch.randn(16, 40) * magnitude + torch.linspace(-magnitude, 2 * magnitude, 16)[:, None]  # skewed rows
    q, scale, zero = quantize_per_token(x)
    err = (dequantize_per_token(q, scale, zero) - x).abs()
    assert (err <= scale[:, None] / 2 * (1 + 1e-5)).all()
    qw, scale_w = quantize_per_channel(x)
    err_w = (dequantize_per_channel(qw, scale_w) - x).abs()
    assert (err_w <= scale_w[:, None] / 2 * (1 + 1e-5)).all()
    assert err.max() > 0 and err_w.max() > 0          # real rounding happened: the bound is not vacuous


# --- Int8Linear --------------------------------------------------------------------------------------

def test_int8_linear_matches_float_linear_within_the_derived_bound():
    # y - y_hat = (x - x_hat) W_hat^T + x (W - W_hat)^T, and each rounding error is at most half a step, so
    # |y - y_hat|[t, n] <= scale_x[t]/2 * sum_k |W_hat[n, k]| + scale_w[n]/2 * sum_k |x[t, k]|
    torch.manual_seed(0)
    linear = nn.Linear(48, 24, bias=False)
    x = torch.randn(5, 7, 48) * 3
    int8 = Int8Linear.from_linear(linear, "w8a8")
    y, y_hat = linear(x).detach(), int8(x)
    assert y_hat.shape == (5, 7, 24)
    _, scale_x, _ = quantize_per_token(x.reshape(-1, 48))
    w_hat = dequantize_per_channel(int8.qweight, int8.scale)
    bound = (scale_x[:, None] / 2 * w_hat.abs().sum(1)[None, :]
             + int8.scale[None, :] / 2 * x.reshape(-1, 48).abs().sum(1)[:, None])            # (35, 24)
    err = (y - y_hat).reshape(-1, 24).abs()
    assert (err <= bound * (1 + 1e-4) + 1e-6).all()
    assert err.max() > 0


def test_real_int8_and_fake_quant_agree():
    torch.manual_seed(1)
    linear = nn.Linear(40, 30, bias=False)
    x = torch.randn(2, 9, 40)
    for mode in ("w8a8", "w8"):
        int8 = Int8Linear.from_linear(linear, mode)
        real = int8(x)
        int8.simulate = True
        torch.testing.assert_close(real, int8(x), rtol=1e-5, atol=1e-6)
    x2 = torch.randn(3, 40)
    q, scale = quantize_per_channel(linear.weight.detach())
    torch.testing.assert_close(w8_linear(x2, q, scale), w8_linear_simulated(x2, q, scale), rtol=1e-5, atol=1e-6)


def test_int8_linear_keeps_the_input_dtype():
    linear = nn.Linear(16, 8, bias=False)
    assert Int8Linear.from_linear(linear)(torch.randn(2, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16


# --- the whole model ---------------------------------------------------------------------------------

def test_quantized_model_keeps_the_tie_and_stays_close_to_float():
    model = tiny_model()
    idx = torch.randint(0, len(CHARS), (2, 16))
    ref = model(idx)[0].detach()
    quantize_model(model, "w8a8")
    assert isinstance(model.tok_embeddings, Int8Embedding) and isinstance(model.layers[0].feed_forward.w2, Int8Linear)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert model.output.qweight is model.tok_embeddings.qweight and model.output.scale is model.tok_embeddings.scale
    logits = model(idx)[0].detach()
    assert (logits - ref).abs().max() < 0.05 * ref.abs().max()
    torch.testing.assert_close(set_simulate(model, True)(idx)[0].detach(), logits, rtol=1e-4, atol=1e-5)


def test_untied_model_gets_its_own_head():
    model = quantize_model(tiny_model(tie_embeddings=False), "w8")
    assert model.output.qweight is not model.tok_embeddings.qweight
    assert model(torch.tensor([[1, 2, 3]]))[0].shape == (1, 3, len(CHARS))


def test_quantizing_twice_or_a_bad_mode_is_refused():
    model = quantize_model(tiny_model())
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model)
    with pytest.raises(ValueError, match="mode"):
        quantize_model(tiny_model(), "int4")


# --- int8 checkpoints --------------------------------------------------------------------------------

def test_int8_checkpoint_round_trips_generates_text_and_is_a_quarter_of_fp32(tmp_path):
    model = tiny_model(dim=128, ffn_dim=256)
    save_checkpoint(model_checkpoint(model, SPEC), tmp_path / "fp32.pt")
    idx = torch.tensor([[0, 5, 9, 2]])
    quantize_model(model, "w8a8")
    save_checkpoint(quantized_checkpoint(model, {"tokenizer": SPEC, "iter_num": 3}, "w8a8"), tmp_path / "int8.pt")
    loaded, ckpt = load_quantized(tmp_path / "int8.pt")
    assert ckpt["quantization"] == "w8a8" and ckpt["iter_num"] == 3 and not loaded.training
    assert loaded.output.qweight is loaded.tok_embeddings.qweight
    torch.testing.assert_close(loaded(idx)[0], model(idx)[0])
    ratio = (tmp_path / "int8.pt").stat().st_size / (tmp_path / "fp32.pt").stat().st_size
    assert 0.24 < ratio <= 0.27
    text = load_tokenizer(ckpt["tokenizer"]).decode(loaded.generate(idx, 10, temperature=0)[0].tolist())
    assert len(text) == 14 and set(text) <= set(CHARS)
    with pytest.raises(CheckpointError, match="int8.load_quantized"):
        load_model(tmp_path / "int8.pt")


def test_load_quantized_refuses_float_and_foreign_checkpoints(tmp_path):
    save_checkpoint(model_checkpoint(tiny_model(), SPEC), tmp_path / "float")
    with pytest.raises(CheckpointError, match="not an int8 checkpoint"):
        load_quantized(tmp_path / "float")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a nanoMobileLLM checkpoint"):
        load_quantized(tmp_path / "foreign.pt")
