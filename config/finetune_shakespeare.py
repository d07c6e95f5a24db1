# Fine-tune a released model on your own text, on a CPU: SmolLM2-135M-Instruct (MobileLLM-125M's shape:
# 30 blocks x dim 576, tied 49,152-token embedding) on tiny shakespeare.
#   python data/shakespeare/prepare.py --tokenizer=../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf \
#       --out_dir=data/shakespeare_smollm2
#   python train.py config/finetune_shakespeare.py
#   python sample.py --init_from out-finetune-shakespeare --start "ROMEO:"
# The model's shape and tokenizer come from init_from; no model setting is given here except the shorter
# training window (block_size, below the model's 8192). The Q4_1 GGUF is dequantized to float when loaded, so
# training starts from those dequantized weights; online, init_from = "HuggingFaceTB/SmolLM2-135M-Instruct"
# starts from the original float weights (prepare the data with that --tokenizer and another --out_dir).
# Sized for a clear drop within ~10 minutes on 2 CPU cores (docs/finetune.md has the measured run): one step
# (4 x 256 tokens, every block training, the embedding frozen) costs ~0.8 TFLOP; each of the 5 evals runs
# 2 x 2 forward batches. The options below were timed side by side at equal wall time
# (experiments/finetune_options.py, docs/finetune.md): freezing the embedding pays, training fewer blocks and
# gradient checkpointing save memory but reach a higher loss in the same minutes.
init_from = "../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf"
out_dir = "out-finetune-shakespeare"
dataset = "shakespeare_smollm2"

block_size = 256
batch_size = 4
max_iters = 40
eval_interval = 10
eval_iters = 2
log_interval = 1
always_save_checkpoint = True

# a short warmup, then a gentle decay: a pretrained model needs a small, nearly constant lr
optimizer = "adamw"     # not train.py's default Muon, whose large steps suit training from scratch
learning_rate = 1e-4
min_lr = 5e-5
warmup_iters = 5

freeze_embedding = True     # the tied embedding/head: 28M of the 135M parameters; 13% less time per step
train_blocks = 0            # all 30 blocks train; 15 would cut the time per step by a quarter and the memory
                            # by a third, but the loss falls less in the same minutes
gradient_checkpointing = False  # True if memory is short (15% less at 17% more time per step)
