# Evaluate OpenAI's pretrained gpt2 (124M parameters: n_layer=12, n_head=12, n_embd=768) on
# OpenWebText, without training: the reference losses a from-scratch GPT-2 run is compared with.
# $ python data/openwebtext/prepare.py    (once)
# $ python train.py config/eval_gpt2.py
# Expect train loss about 3.11 and val loss about 3.12 (nanoGPT's numbers).
batch_size = 8
eval_iters = 500  # use more iterations to get good estimate
eval_only = True
wandb_log = False
init_from = 'gpt2'
