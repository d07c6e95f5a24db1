# MobileLLM-LS-350M (§2.3): the 350M recipe with immediate block-wise weight sharing, each of the 32
# blocks applied twice in a row (64 block applications, the same 345M parameters).
#   torchrun --nproc_per_node=8 train.py config/train_mobilellm_350m_ls.py
import os

exec(open(os.path.join(os.path.dirname(__file__), "train_mobilellm_350m.py")).read())
out_dir = "out-mobilellm-350m-ls"
share = "immediate"
share_repeats = 2
