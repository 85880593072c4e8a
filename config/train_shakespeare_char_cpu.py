# Train a small character-level Shakespeare model on a CPU in about two minutes.
# nanoGPT's "I only have a macbook" model (4 layers, 4 heads, 128 wide, 0.8M parameters, block 64), trained
# with Muon for the blocks' weight matrices and AdamW for the embeddings and gains (optimizer='muon'), on
# batches of 32 instead of 12 (fewer steps, so fewer Muon steps and less per-step overhead), with one
# evaluation at the end instead of one every 250 iterations.
# $ python data/shakespeare_char/prepare.py
# $ python train.py config/train_shakespeare_char_cpu.py
# Measured on a 2-core AMD EPYC VM (AVX-512 BF16, so torch.optim.Muon's bfloat16 path; float32, eager):
#   `python bench_recipes.py --pairs=1` on the idle VM, 2 threads: this recipe (740 iterations) val 1.642 in
#   95.7 s wall; nanoGPT's recipe through train.py val 1.914 in 99.0 s (1.03x; at 700 iterations, another
#   sitting: val 1.657 in 82.1 s against 91.2 s). One thread per run, CPU time, runs sharing the machine:
#   700 iterations val 1.658 in 150 s; muon_learning_rate 0.02 and 50 warmup iterations 1.664; nanoGPT's
#   recipe 1.914 in 148 s; the previous AdamW recipe (batch 32, lr 4e-3): 1.880 at 700 iterations.
# More in docs/optimizers.md, with what did not help.
# Then:
# $ python sample.py --out_dir=out-shakespeare-char-cpu --device=cpu
# nanoGPT's own settings, for comparison: --optimizer=adamw --batch_size=12 --learning_rate=1e-3 --min_lr=1e-4
# --warmup_iters=100 --max_iters=2000 --lr_decay_iters=2000 --eval_interval=250

out_dir = 'out-shakespeare-char-cpu'
eval_interval = 740  # evaluate at the start and at the end only: evaluation is a large share of a short run
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

optimizer = 'muon'  # Muon for the blocks' weight matrices, AdamW for embeddings and gains
muon_learning_rate = 0.03  # 0.02 (torch's default) gave 1.664, 0.03 1.658, 0.04 (batch 64) no better
learning_rate = 4e-3  # AdamW's: a tiny model and a short run tolerate a high peak learning rate
max_iters = 740
lr_decay_iters = 740  # make equal to max_iters usually
min_lr = 4e-4  # learning_rate / 10 usually
beta2 = 0.99  # make a bit bigger because number of tokens per iter is small
warmup_iters = 30  # Muon's normalized updates need little warmup

device = 'cpu'
dtype = 'float32'  # bfloat16 autocast is faster only on CPUs with native bf16 (AVX-512 BF16, AMX)
compile = False  # compiling takes longer than it saves on a run this short
