# Train GPT-2 (124M) from scratch on OpenWebText, to a val loss of about 2.85 (nanoGPT: ~4 days
# on one node of 8x A100 40GB). Prepare the data first (python data/openwebtext/prepare.py), then:
# $ torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py
# With fewer GPUs the same global batch is kept through gradient accumulation, at a proportional
# cost in time (gradient_accumulation_steps must stay divisible by the number of GPUs).

wandb_log = False  # True to follow the run on Weights & Biases (run `wandb login` first)
wandb_project = 'owt'
wandb_run_name = 'gpt2-124M'

# these make the total batch size be ~0.5M tokens 12 batch size * 1024 block size * 40 gradaccum (5
# per GPU on 8 GPUs) = 491,520
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8

# this makes total number of tokens be 300B
max_iters = 600000
lr_decay_iters = 600000

# eval stuff
eval_interval = 1000
eval_iters = 200
log_interval = 10

# weight decay
weight_decay = 1e-1
