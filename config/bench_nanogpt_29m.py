# The size of nanoGPT's 29.9M-parameter GPT (6 layers, dim 384, context 256, batch 8, GPT-2's 50257-token
# vocabulary), to compare with nanoGPT's own training speed (see docs/training.md):
#   python bench_train.py config/bench_nanogpt_29m.py
# Same shapes in MobileLLM terms: 6 heads of 64 with full multi-head attention, no layer sharing, and a
# SwiGLU of 1024 (3 x 384 x 1024 weights, the same as GPT's 4x GELU MLP): 29.9M parameters.
vocab_size = 50257
n_layers = 6
dim = 384
n_heads = 6
n_kv_heads = 6
ffn_dim = 1024
share = "none"
block_size = 256
batch_size = 8
gradient_accumulation_steps = 1
optimizer = "adamw"     # nanoGPT's
