# MobileLLM-125M with the paper's pretraining recipe (arXiv 2402.14905 §3.1 and Meta's MobileLLM code):
#   torchrun --nproc_per_node=8 train.py config/train_mobilellm_125m.py
# The paper: 32 GPUs x 32 sequences x 2048 tokens = 2.1M tokens per step, peak lr 2e-3, 480k steps (1T
# tokens; its exploration runs: 120k). Here gradient_accumulation_steps=32 keeps that global batch on any
# GPU count dividing 32 (8 GPUs: 4 micro-steps each). Meta's script instead runs 8 GPUs x 1 micro-step
# at lr 5e-4: the lr scales linearly with the global batch (--gradient_accumulation_steps=8
# --learning_rate=5e-4 --min_lr=5e-5).
# The paper's tokenizer is LLaMA-2's 32k SentencePiece; fineweb_edu here uses GPT-2's 50257 tokens,
# which adds 10.5M embedding parameters to the 125M ((50257 - 32000) x 576).
out_dir = "out-mobilellm-125m"
dataset = "fineweb_edu"

# model: 30 layers x dim 576, 9 query / 3 key-value heads, SwiGLU 1536, tied embeddings
n_layers = 30
dim = 576
n_heads = 9
n_kv_heads = 3
ffn_dim = 1536
share = "none"
block_size = 2048

# optimization: AdamW (0.9, 0.95), eps 1e-8, weight decay 0.1, 1000 warmup steps, cosine to 10%, clip 1.0
optimizer = "adamw"     # the paper's; train.py's quick default uses Muon
batch_size = 32
gradient_accumulation_steps = 32
max_iters = 480_000
lr_decay_iters = 480_000
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 1000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
eps = 1e-8
grad_clip = 1.0

# system
dtype = "bf16"
compile = True
eval_interval = 2000
eval_iters = 100
log_interval = 10
always_save_checkpoint = True
