# Train a small character-level Shakespeare model on a CPU in about a minute.
# nanoGPT's "I only have a macbook" model made shallower (2 layers, 4 heads, 128 wide, block 64:
# 0.4M parameters), trained with Muon for the blocks' weight matrices and AdamW for embeddings and
# gains (optimizer='muon'), on batches of 48, evaluated at the start, the middle and the end. For a
# budget of a minute or two, more steps of a smaller model beat fewer steps of a deeper one: why in
# docs/optimizers.md, the figures (against nanoGPT's recipe too) in docs/performance.md.
# $ python data/shakespeare_char/prepare.py
# $ python train.py config/train_shakespeare_char_cpu.py
# $ python sample.py --out_dir=out-shakespeare-char-cpu --device=cpu
# nanoGPT's own settings, for comparison: --optimizer=adamw --n_layer=4 --batch_size=12
# --learning_rate=1e-3 --min_lr=1e-4 --warmup_iters=100 --max_iters=2000 --lr_decay_iters=2000
# --eval_interval=250

out_dir = 'out-shakespeare-char-cpu'
# evaluate at the start, the middle and the end (plot.py draws a curve, not a line): each of the
# 2 x 20 batches of an evaluation costs a forward pass, a large share of a short run
eval_interval = 400
eval_iters = 20  # a rough but cheap estimate
log_interval = 50
always_save_checkpoint = False  # keep the best checkpoint by val loss

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
# with 2 layers the step's fixed costs (Muon's, Python's) weigh more: fewer, larger batches
batch_size = 48
block_size = 64  # context of up to 64 previous characters

n_layer = 2  # see above: the best depth for a budget of ~2 CPU-minutes
n_head = 4
n_embd = 128
dropout = 0.0  # too small and too short a run to overfit

optimizer = 'muon'  # Muon for the blocks' weight matrices, AdamW for embeddings and gains
muon_learning_rate = 0.03  # 0.02 (torch's default) and 0.04 both did worse
# lower than torch's 0.95: a short run, whose gradients change quickly (0.95: 1.612 against 1.598,
# batch 32)
muon_momentum = 0.9
learning_rate = 4e-3  # AdamW's: a tiny model and a short run tolerate a high peak learning rate
max_iters = 800
lr_decay_iters = 800  # make equal to max_iters usually
min_lr = 4e-4  # learning_rate / 10 usually
beta2 = 0.99  # make a bit bigger because number of tokens per iter is small
warmup_iters = 30  # Muon's normalized updates need little warmup

device = 'cpu'
dtype = 'float32'  # bfloat16 autocast is faster only on CPUs with native bf16 (AVX-512 BF16, AMX)
# compiling takes longer than it saves on a run this short (16 s for ~10% faster steps)
compile = False
