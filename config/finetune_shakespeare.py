# Finetune OpenAI's GPT-2 XL (1.5B) on tiny Shakespeare, in GPT-2 tokens. Needs a GPU with enough
# memory (nanoGPT: a few minutes on one A100); for a smaller GPU use --init_from=gpt2 or
# gpt2-medium. Offline, point init_from at a local Hugging Face directory (config.json +
# model.safetensors). $ python data/shakespeare/prepare.py
# $ python train.py config/finetune_shakespeare.py
# Expect the val loss to fall from about 3.5 to about 3.2 (best checkpoint kept), then overfit.
# Then: python sample.py --out_dir=out-shakespeare
import time

out_dir = 'out-shakespeare'
eval_interval = 5
eval_iters = 40
wandb_log = False  # feel free to turn on
wandb_project = 'shakespeare'
wandb_run_name = 'ft-' + str(time.time())

dataset = 'shakespeare'
init_from = 'gpt2-xl'  # this is the largest GPT-2 model

# only save checkpoints if the validation loss improves
always_save_checkpoint = False

# the number of examples per iter:
# 1 batch_size * 32 grad_accum * 1024 tokens = 32,768 tokens/iter
# shakespeare has 301,966 tokens, so 1 epoch ~= 9.2 iters
batch_size = 1
gradient_accumulation_steps = 32
max_iters = 20

# finetune at constant LR
learning_rate = 3e-5
decay_lr = False
