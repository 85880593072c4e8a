# Evaluate OpenAI's pretrained gpt2-medium (350M parameters: n_layer=24, n_head=16, n_embd=1024) on
# OpenWebText, without training: the reference losses a from-scratch GPT-2 run is compared with.
# $ python data/openwebtext/prepare.py    (once)
# $ python train.py config/eval_gpt2_medium.py
# Expect train loss about 2.85 and val loss about 2.84 (nanoGPT's numbers).
batch_size = 8
eval_iters = 500  # use more iterations to get good estimate
eval_only = True
wandb_log = False
init_from = 'gpt2-medium'
