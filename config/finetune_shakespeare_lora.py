# Finetune OpenAI's GPT-2 XL (1.5B) on tiny Shakespeare, in GPT-2 tokens, with LoRA adapters:
# nanoGPT's config/finetune_shakespeare.py on one 24 GB GPU instead of a large one
# (docs/finetuning.md). $ python data/shakespeare/prepare.py
# $ python train.py config/finetune_shakespeare_lora.py
# Then: python sample.py --out_dir=out-shakespeare-lora (ckpt.pt holds the merged weights, as any
# checkpoint)
#
# Memory per GPU before activations: float32 weights (4 bytes per parameter) and, for each trainable
# one, its gradient (4) and AdamW's two moments (8); `python bench.py --mode=memory` prints these
# from the tensors.
#   full finetuning (1,558M trainable):        16 x 1,558M             = 23.2 GiB: no room left on
# 24 GB
#   freeze_layers=36 (the top 12 Blocks, 369M): 4 x 1,558M + 12 x 369M  =  9.9 GiB
#   LoRA rank 8 on c_attn, c_proj, c_fc (9.8M):  4 x 1,567M + 12 x 9.8M  =  5.9 GiB (0.63% of the
# weights train) Activations come on top and are the same for all three (LoRA's gradients still flow
# through every Block): ~3 GiB per 1024-token sequence in bfloat16, ~0.8 GiB with
# activation_checkpointing=True (docs/scale.md).
import time

out_dir = 'out-shakespeare-lora'
eval_interval = 5
eval_iters = 40
wandb_log = False  # feel free to turn on
wandb_project = 'shakespeare'
wandb_run_name = 'ft-lora-' + str(time.time())

dataset = 'shakespeare'
init_from = 'gpt2-xl'  # or the out_dir of a model trained here

# only save checkpoints if the validation loss improves
always_save_checkpoint = False

# 1 batch_size * 32 grad_accum * 1024 tokens = 32,768 tokens/iter; shakespeare has 301,966 tokens,
# ~9.2 iters an epoch
batch_size = 1
gradient_accumulation_steps = 32
max_iters = 20

# rank-8 adapters on the attention and MLP projections of every Block; every GPT-2 weight stays
# frozen
lora_rank = 8
lora_alpha = 16.0
lora_dropout = 0.05
lora_targets = 'c_attn,c_proj,c_fc'

# adapters start at zero (lora_B) and learn only a low-rank update: a larger constant LR than full
# finetuning's 3e-5
learning_rate = 2e-4
decay_lr = False
