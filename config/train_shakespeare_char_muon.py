# config/train_shakespeare_char.py (6 layers, 6 heads, 384 wide, block 256, batch 64) trained with
# Muon for the blocks' weight matrices and AdamW for the embeddings, gains and biases, for a GPU.
# $ python data/shakespeare_char/prepare.py
# $ python train.py config/train_shakespeare_char_muon.py
# Why these settings (not yet measured on a GPU; compare with nanoGPT's ~1.47 at 5000 iterations):
# - Muon's orthogonalized updates move every direction of a weight matrix at the same rate, so a
#   small model needs fewer steps: on the 4x4x128 CPU model Muon reached in 700 iterations (1.65)
# what
#   AdamW had not reached in 2000 (1.91). Half of nanoGPT's 5000 iterations is a cautious first
# guess;
#   nanoGPT's run starts to overfit after ~5000 anyway, and with fewer steps it overfits less.
# - muon_learning_rate 0.02 and momentum 0.95 are Keller Jordan's defaults for GPT-sized matrices
# and
#   torch.optim.Muon's own; the AdamW side keeps nanoGPT's 1e-3 (it now trains only the embeddings).
# - On CUDA, train.py uses torch.optim.Muon (Newton-Schulz in bfloat16, native on the GPU).

out_dir = 'out-shakespeare-char-muon'
eval_interval = 250
eval_iters = 200
log_interval = 10
# we expect to overfit on this small dataset: keep the best val checkpoint
always_save_checkpoint = False

wandb_log = False
wandb_project = 'shakespeare-char'
wandb_run_name = 'mini-gpt-muon'

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

optimizer = 'muon'
muon_learning_rate = 0.02  # the blocks' matrices
learning_rate = 1e-3  # AdamW: embeddings (and the tied lm_head), LayerNorm gains
max_iters = 2500
lr_decay_iters = 2500  # make equal to max_iters usually
min_lr = 1e-4  # learning_rate / 10; Muon's minimum is scaled the same way (0.002)
beta2 = 0.99  # make a bit bigger because number of tokens per iter is small
warmup_iters = 100
