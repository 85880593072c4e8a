# Train a small character-level Shakespeare model on a CPU in under two minutes.
# nanoGPT's "I only have a macbook" model (4 layers, 4 heads, 128 wide, 0.8M parameters, block 64),
# trained faster to a lower loss: batches of 32 instead of 12 (more tokens per step, so the per-step
# overhead is amortised: 13-18k tok/s instead of 12-14k on a 2-core CPU), a 4x higher peak learning rate
# (4e-3, 50 warmup iterations), 700 iterations, and one evaluation at the end instead of one every 250.
# $ python data/shakespeare_char/prepare.py
# $ python train.py config/train_shakespeare_char_cpu.py
# Measured on a 2-core AMD EPYC VM (AVX2, no AVX-512; float32, eager), wall time of the whole command:
# val loss 1.880 at 700 iterations in 94 s (115 s in a slower sitting of the same VM); nanoGPT's recipe:
# about 1.91 at 2000 iterations in about 122 s there; 800 iterations gave 1.838 in 121 s. The issue's
# target (1.70 within 110 s) is not reached there. bfloat16 autocast is much slower there (no AVX-512
# BF16: emulated); torch.compile gains ~6% per step but its compile time costs more on a 2-minute run.
# Then:
# $ python sample.py --out_dir=out-shakespeare-char-cpu --device=cpu
# nanoGPT's own settings, for comparison: --batch_size=12 --learning_rate=1e-3 --min_lr=1e-4
# --warmup_iters=100 --max_iters=2000 --lr_decay_iters=2000 --eval_interval=250

out_dir = 'out-shakespeare-char-cpu'
eval_interval = 700  # evaluate at the start and at the end only: evaluation is a large share of a short run
eval_iters = 20  # a rough but cheap estimate
log_interval = 50
always_save_checkpoint = False  # keep the best checkpoint by val loss

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 32
block_size = 64  # context of up to 64 previous characters

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0  # too small and too short a run to overfit

learning_rate = 4e-3  # a tiny model and a short run tolerate a high peak learning rate
max_iters = 700
lr_decay_iters = 700  # make equal to max_iters usually
min_lr = 4e-4  # learning_rate / 10 usually
beta2 = 0.99  # make a bit bigger because number of tokens per iter is small
warmup_iters = 50

device = 'cpu'
dtype = 'float32'  # bfloat16 autocast is faster only on CPUs with native bf16 (AVX-512 BF16, AMX)
compile = False  # compiling takes longer than it saves on a run this short
