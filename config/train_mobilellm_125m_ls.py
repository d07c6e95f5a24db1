# MobileLLM-LS-125M (§2.3): the 125M recipe with immediate block-wise weight sharing, each of the 30
# blocks applied twice in a row (60 block applications, the same 125M parameters).
#   torchrun --nproc_per_node=8 train.py config/train_mobilellm_125m_ls.py
import os

exec(open(os.path.join(os.path.dirname(__file__), "train_mobilellm_125m.py")).read())
out_dir = "out-mobilellm-125m-ls"
share = "immediate"
share_repeats = 2
