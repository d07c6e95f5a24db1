# MobileLLM-350M with the paper's recipe: the 125M file's optimization settings, a wider model.
#   torchrun --nproc_per_node=8 train.py config/train_mobilellm_350m.py
import os

exec(open(os.path.join(os.path.dirname(__file__), "train_mobilellm_125m.py")).read())
out_dir = "out-mobilellm-350m"

# model: 32 layers x dim 960, 15 query / 5 key-value heads, SwiGLU 2560
n_layers = 32
dim = 960
n_heads = 15
n_kv_heads = 5
ffn_dim = 2560
