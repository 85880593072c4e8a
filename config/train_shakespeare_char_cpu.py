# Train a small character-level Shakespeare model on a CPU: about two minutes on a 2-core laptop.
# This is nanoGPT's "I only have a macbook" recipe (4 layers, 4 heads, 128 wide, 0.8M parameters,
# block 64, batch 12, 2000 iterations) as a config file:
# $ python data/shakespeare_char/prepare.py
# $ python train.py config/train_shakespeare_char_cpu.py
# Expect a val loss of about 1.88 at iteration 2000 (see the README's results table for the measured
# time); the samples look like Shakespeare at a glance. Then:
# $ python sample.py --out_dir=out-shakespeare-char-cpu --device=cpu

out_dir = 'out-shakespeare-char-cpu'
eval_interval = 250
eval_iters = 20  # a rough but cheap estimate: evaluation is a large share of a short run
log_interval = 10
always_save_checkpoint = False  # keep the best checkpoint by val loss

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 12
block_size = 64  # context of up to 64 previous characters

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0  # too small and too short a run to overfit

learning_rate = 1e-3
max_iters = 2000
lr_decay_iters = 2000  # make equal to max_iters usually
min_lr = 1e-4  # learning_rate / 10 usually
beta2 = 0.99  # make a bit bigger because number of tokens per iter is small
warmup_iters = 100

device = 'cpu'
dtype = 'float32'
compile = False
