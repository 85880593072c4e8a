# LoRA-finetune the CPU recipe's own model on a CPU in under a minute: the recipe of
# config/finetune_shakespeare_lora.py (GPT-2 XL on a GPU) at a laptop's size, to see how it works
# before renting a GPU. The checkpoint is character-level, so the data is too (docs/finetuning.md).
# $ python train.py config/train_shakespeare_char_cpu.py
# $ python train.py config/finetune_shakespeare_char_lora_cpu.py
# $ python sample.py --out_dir=out-shakespeare-char-lora-cpu
# Rank-8 adapters on every Block's projections train 32,768 parameters (A and B); the model's
# 0.4M weights stay as they are, and ckpt.pt holds the merged weights (sample.py reads it as any).
# An iteration runs the whole model forward and backward, as the CPU recipe's do: 300 of them are
# 3/8 of its 800 (66 s on an idle 2-core VM), so about 25 s there plus 4 evaluations (an estimate
# from that measurement: this config was not timed on an idle machine).

out_dir = 'out-shakespeare-char-lora-cpu'
init_from = 'out-shakespeare-char-cpu'  # the out_dir of config/train_shakespeare_char_cpu.py
eval_interval = 100
eval_iters = 20  # a rough but cheap estimate
log_interval = 50
always_save_checkpoint = False  # keep the best checkpoint by val loss

dataset = 'shakespeare_char'  # the checkpoint's characters
gradient_accumulation_steps = 1
batch_size = 48
block_size = 64  # the checkpoint's

# rank-8 adapters on the attention and MLP projections of both Blocks; every base weight stays
# frozen. No dropout: too short a run to overfit
lora_rank = 8
lora_alpha = 16.0
lora_dropout = 0.0
lora_targets = 'c_attn,c_proj,c_fc'

optimizer = 'adamw'  # LoRA's adapters train with AdamW
# adapters start at zero (lora_B): a constant learning rate, above GPT-2's 2e-4 for a tiny model
learning_rate = 3e-3
decay_lr = False
max_iters = 300

device = 'cpu'
dtype = 'float32'
compile = False  # compiling takes longer than it saves on a run this short
