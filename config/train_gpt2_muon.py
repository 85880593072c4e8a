# config/train_gpt2.py (GPT-2 124M on OpenWebText, ~0.5M tokens per iteration) with Muon for the
# blocks' weight matrices and AdamW for the embeddings, gains and biases, for a node of 8 GPUs:
# $ torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_muon.py
# Why these settings (not yet measured on GPUs; nanoGPT's AdamW run reaches ~2.85 in 600k
# iterations):
# - Keller Jordan's Muon write-up (https://kellerjordan.github.io/posts/muon/) measured ~1.35x fewer
#   tokens than AdamW to the same loss for GPT-2 124M, so 450k iterations (600k / 1.35, rounded up)
# is
#   the budget to test; the cosine decay ends there too.
# - muon_learning_rate 0.02 and momentum 0.95 are the defaults of that write-up and of
# torch.optim.Muon.
#   The update of a (out, in) matrix is orthogonalized, then scaled by sqrt(max(1, out / in)), so
# one lr
#   fits every matrix shape. AdamW keeps nanoGPT's 6e-4 for the embeddings (the tied lm_head) and
# gains.
# - muon_weight_decay 0: the write-up's runs used none for Muon; weight_decay 0.1 still applies to
#   AdamW's 2-D parameters (the embeddings), as in nanoGPT.
# - Every rank runs the Newton-Schulz iteration on every matrix (the gradients are already averaged
# by
#   DDP): ~5 matmul passes over 85M weights per step, small next to a step over 0.5M tokens.

wandb_log = False
wandb_project = 'owt'
wandb_run_name = 'gpt2-124M-muon'

# 12 batch size * 1024 block size * 40 gradaccum (5 per GPU on 8 GPUs) = 491,520 tokens per
# iteration
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8

optimizer = 'muon'
muon_learning_rate = 0.02
muon_momentum = 0.95
muon_weight_decay = 0.0
max_iters = 450000
lr_decay_iters = 450000

eval_interval = 1000
eval_iters = 200
log_interval = 10

weight_decay = 1e-1
