# Train a small model on your own text with your own byte-level BPE, on a CPU: the CPU recipe
# (config/train_shakespeare_char_cpu.py: 2 layers, 4 heads, 128 wide, Muon) on BPE tokens.
# $ python data/prepare_text.py --input=my_book.txt --tokenizer=bpe --vocab_size=1024 \
#       --out_dir=data/my_book_bpe
# $ python train.py config/train_my_bpe.py
# $ python sample.py --out_dir=out-my-bpe --start="ROMEO:"
# A 1024-token BPE spells tiny Shakespeare's val split in 2.26 bytes per token (characters: 1.00,
# GPT-2: 3.09), so a 64-token block sees ~145 bytes of text, and the 1024-row embedding stays small
# next to the blocks; docs/data.md compares the tokenizers in bits per byte.

out_dir = 'out-my-bpe'
dataset = 'my_book_bpe'  # data/my_book_bpe, as prepared above
# the model's vocab_size is the BPE's (in data/my_book_bpe/tokenizer.json)

# the CPU recipe's settings, unchanged
eval_interval = 800
eval_iters = 20
log_interval = 50
always_save_checkpoint = False
gradient_accumulation_steps = 1
batch_size = 48
block_size = 64  # 64 tokens: ~145 bytes of text
n_layer = 2
n_head = 4
n_embd = 128
dropout = 0.0
optimizer = 'muon'
muon_learning_rate = 0.03
muon_momentum = 0.9
learning_rate = 4e-3
max_iters = 800
lr_decay_iters = 800
min_lr = 4e-4
beta2 = 0.99
warmup_iters = 30
device = 'cpu'
dtype = 'float32'
compile = False
