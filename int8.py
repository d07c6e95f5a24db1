"""
int8 weights and activations for a trained MobileLLM, the way the paper quantizes it (§3.5, Fig. 7): min/max
quantization to 8 bits, per token for activations and per output channel for weights, weights and activations
(W8A8) or weights only (W8), with no retraining. The math, the modules that replace nn.Linear and nn.Embedding
(model.py stays untouched), and int8 checkpoints; `python quantize.py` is the command that makes one and
measures what it costs.

  from int8 import quantize_model, load_quantized
  qmodel = quantize_model(model, "w8a8")              # a float MobileLLM, swapped in place
  qmodel, ckpt = load_quantized("out-x-w8a8")         # an int8 checkpoint written by quantize.py

The math (everything below is these few lines, applied to every Linear of the model):

  int8 holds the integers -128 .. 127. A float tensor x is stored as integers q and a float step `scale`:
      q = clamp(round(x / scale) + zero, -128, 127)          quantize
      x ~ (q - zero) * scale                                  dequantize; error <= scale / 2 inside [lo, hi]
  "min/max" means the range [lo, hi] that the 256 levels cover is simply the smallest and largest value.

  Weights W (out, in): symmetric, one scale per output channel (row), zero = 0:
      scale_w[n] = max(|W[n, :]|) / 127,  q_w = round(W / scale_w)       levels -127 .. 127
  Activations x (tokens, in): asymmetric, one scale and zero point per token (row), computed at run time:
      lo = min(x[t, :], 0), hi = max(x[t, :], 0)     (0 is kept in range so it is exactly representable)
      scale_x[t] = (hi - lo) / 255,  zero[t] = -128 - round(lo / scale_x[t])     lo -> -128, hi -> 127
  Then a Linear y = x W^T becomes one integer matmul plus a float rescale per output:
      y[t, n] = scale_x[t] * scale_w[n] * sum_k (q_x[t, k] - zero[t]) * q_w[n, k]
              = scale_x[t] * scale_w[n] * (acc[t, n] - zero[t] * wsum[n])
      acc = q_x @ q_w^T  (int8 x int8 -> int32, torch._int_mm),  wsum[n] = sum_k q_w[n, k]  (precomputed)
  Symmetric weights make the weight zero point vanish, so no cross terms; the per-token activation zero
  point costs one multiply-add per output. This is also how XNNPACK's dynamically quantized linear works
  (per-token asymmetric int8 activations x per-channel symmetric int8 weights), the kernel ExecuTorch uses
  on phones. The same formula evaluated in float on dequantized tensors is the "simulated" (fake-quant)
  path; it must give the same numbers as the integer path (tests/test_int8.py checks it).

  Weight-only int8 ("w8") keeps activations in float: y = (x @ q_w^T) * scale_w, 1/4 of the weight bytes.

Embeddings and the tied LM head (§2.2.3): the token embedding and the output projection are ONE matrix
E (vocab, dim). It is quantized once, per row: a row of E is the embedding of one token *and* one output
channel of the LM head, so per-row scales are at the same time per-token (for the lookup) and
per-output-channel (for the head). The int8 embedding looks rows up and dequantizes them (a gather: there is
no matmul, so nothing to quantize on the activation side); the LM head is an Int8Linear holding the very
same int8 tensor and scales (the same Python objects, saved once), so the tie survives quantization. The
checkpoint is then ~1/4 of fp32 even when the embedding is most of the model (small models, GPT-2's 50k
vocabulary). An untied model gets two independent int8 matrices. RMSNorm weights (a few thousand numbers)
stay float.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import CheckpointError, checkpoint_file, load_checkpoint, load_weights, model_checkpoint
from model import MobileLLM, config_from_dict
from torch_private import int_mm, weight_int8_mm

MODES = ("w8a8", "w8")
QMIN, QMAX = -128, 127
MIN_SCALE = 1e-12        # an all-zero row still gets a positive scale (its integers are then all zero-point)


# --- the quantization math -------------------------------------------------------------------------

def quantize_per_channel(w):
    """Symmetric min/max int8 per output channel. w (N, K) float -> q (N, K) int8 in [-127, 127], scale (N,)."""
    scale = (w.float().abs().amax(dim=1) / 127).clamp_min(MIN_SCALE)                  # (N,)
    q = torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)        # (N, K)
    return q, scale


def dequantize_per_channel(q, scale):
    return q.float() * scale[:, None]                                                   # (N, K)


def quantize_per_token(x):
    """Asymmetric min/max int8 per token (row). x (M, K) float -> q (M, K) int8, scale (M,), zero (M,) int32."""
    x = x.float()
    lo = x.amin(dim=1).clamp(max=0)                                                     # (M,)
    hi = x.amax(dim=1).clamp(min=0)                                                     # (M,)
    scale = ((hi - lo) / (QMAX - QMIN)).clamp_min(MIN_SCALE)                            # (M,)
    zero = QMIN - torch.round(lo / scale)                                               # (M,) in [-128, 127]
    q = (torch.round(x / scale[:, None]) + zero[:, None]).clamp(QMIN, QMAX).to(torch.int8)
    return q, scale, zero.to(torch.int32)


def dequantize_per_token(q, scale, zero):
    return (q.int() - zero[:, None]).float() * scale[:, None]                           # (M, K)


def w8a8_linear(x, qweight, scale, weight_sum):
    """The real int8 path. x (M, K) float; qweight (N, K) int8; scale (N,); weight_sum (N,) int32 -> (M, N)."""
    q_x, scale_x, zero_x = quantize_per_token(x)
    acc = int_mm(q_x, qweight.t())                                                      # (M, N) int32
    acc = acc - zero_x[:, None] * weight_sum[None, :]                                   # remove the zero point
    return acc.float() * scale_x[:, None] * scale.float()[None, :]


def w8a8_linear_simulated(x, qweight, scale):
    """The fake-quant path: the same rounding, the matmul in float on dequantized tensors."""
    return F.linear(dequantize_per_token(*quantize_per_token(x)), dequantize_per_channel(qweight, scale))


def w8_linear(x, qweight, scale):
    """Weight-only int8: float activations times int8 weights, rescaled per output channel."""
    if x.device.type == "cpu":          # a fused CPU kernel that reads the int8 weights directly
        return weight_int8_mm(x, qweight, scale)
    return F.linear(x.float(), qweight.float()) * scale.float()


def w8_linear_simulated(x, qweight, scale):
    return F.linear(x.float(), dequantize_per_channel(qweight, scale))


# --- the modules that replace nn.Linear and nn.Embedding ----------------------------------------------

class Int8Linear(nn.Module):
    """A bias-free Linear with int8 weights. mode "w8a8": activations quantized per token at run time and an
    int8 x int8 -> int32 matmul; "w8": float activations. simulate=True (set_simulate) runs the fake-quant
    float path."""

    def __init__(self, qweight, scale, mode="w8a8"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode, self.simulate = mode, False
        self.in_features, self.out_features = qweight.size(1), qweight.size(0)
        self.register_buffer("qweight", qweight)                                        # (N, K) int8
        self.register_buffer("scale", scale)                                            # (N,) float32
        self.register_buffer("weight_sum", None, persistent=False)                       # (N,) int32
        self.refresh_weight_sum()

    def refresh_weight_sum(self):
        """sum_k q_w[n, k], the zero-point correction (derived from qweight, so not saved)."""
        self.weight_sum = self.qweight.sum(dim=1, dtype=torch.int32)

    @classmethod
    def from_linear(cls, linear, mode="w8a8"):
        if linear.bias is not None:
            raise ValueError("Int8Linear has no bias (MobileLLM's Linears have none)")
        return cls(*quantize_per_channel(linear.weight.detach()), mode=mode)

    def forward(self, x):
        x2 = x.reshape(-1, self.in_features)                                            # (M, K), M = B*T
        if self.mode == "w8a8":
            y = (w8a8_linear_simulated(x2, self.qweight, self.scale) if self.simulate
                 else w8a8_linear(x2, self.qweight, self.scale, self.weight_sum))
        else:
            y = (w8_linear_simulated if self.simulate else w8_linear)(x2, self.qweight, self.scale)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)                 # (B, T, N)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}" + \
               (", simulate=True" if self.simulate else "")


class Int8Embedding(nn.Module):
    """Token embedding stored as int8 rows with one scale per row (= per token): lookup, then dequantize."""

    def __init__(self, qweight, scale):
        super().__init__()
        self.register_buffer("qweight", qweight)                                        # (V, C) int8
        self.register_buffer("scale", scale)                                            # (V,) float32

    def forward(self, idx):
        return self.qweight[idx].float() * self.scale[idx].unsqueeze(-1)                # (B, T, C)


def is_quantized(model):
    return any(isinstance(m, (Int8Linear, Int8Embedding)) for m in model.modules())


@torch.no_grad()
def quantize_model(model, mode="w8a8"):
    """Swap every Linear and the embedding of a float MobileLLM for int8 modules, in place; returns it.
    A tied embedding/LM head stays tied: one int8 matrix and one scale vector serve both (see the top)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(model, MobileLLM):
        raise TypeError(f"quantize_model expects a MobileLLM, got {type(model).__name__}")
    if is_quantized(model):
        raise ValueError("this model is already quantized")
    tied = model.output.weight is model.tok_embeddings.weight
    q, scale = quantize_per_channel(model.tok_embeddings.weight)                        # per row = per token
    model.tok_embeddings = Int8Embedding(q, scale)
    model.output = Int8Linear(q, scale, mode) if tied else Int8Linear.from_linear(model.output, mode)
    for name, module in list(model.layers.named_modules()):
        if isinstance(module, nn.Linear):
            parent, _, child = name.rpartition(".")
            setattr(model.layers.get_submodule(parent), child, Int8Linear.from_linear(module, mode))
    return model


def set_simulate(model, simulate):
    """Switch every Int8Linear between the real integer path and the fake-quant float path."""
    for m in model.modules():
        if isinstance(m, Int8Linear):
            m.simulate = simulate
    return model


# --- int8 checkpoints: our format plus "quantization" ------------------------------------------------

def load_quantized(path, device="cpu", ckpt=None):
    """Rebuild an int8 MobileLLM from a checkpoint written by quantize.py (ckpt: its dict, when already
    loaded from path). Returns (model in eval mode, ckpt)."""
    ckpt = ckpt or load_checkpoint(path)
    mode = ckpt.get("quantization")
    if mode not in MODES:
        raise CheckpointError(f"{checkpoint_file(path)} is not an int8 checkpoint (quantization={mode!r}): "
                              "load it with checkpoint.load_model, or make one with `python quantize.py`")
    try:
        model = quantize_model(MobileLLM(config_from_dict(ckpt["model_config"])), mode)
    except ValueError as e:
        raise CheckpointError(f"{checkpoint_file(path)}: its model_config does not make a model: {e}") from e
    load_weights(model, ckpt["model"], path)      # copies in place: the tied head and embedding stay one tensor
    for module in model.modules():
        if isinstance(module, Int8Linear):
            module.refresh_weight_sum()
    return model.to(device).eval(), ckpt


TRAINING_RECORD = ("train_config", "iter_num", "best_val_loss")    # kept in the int8 checkpoint


def quantized_checkpoint(model, ckpt, mode):
    """Our checkpoint format plus "quantization"; ckpt: the source's, or just its "tokenizer" (spec).
    Training state (optimizer, data position) is dropped."""
    extra = {k: ckpt[k] for k in TRAINING_RECORD if k in ckpt}
    return model_checkpoint(model, ckpt["tokenizer"], quantization=mode, **extra)
