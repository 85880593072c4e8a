# Evaluate OpenAI's pretrained gpt2-large (774M parameters: n_layer=36, n_head=20, n_embd=1280) on
# OpenWebText, without training: the reference losses a from-scratch GPT-2 run is compared with.
# $ python data/openwebtext/prepare.py    (once)
# $ python train.py config/eval_gpt2_large.py
# Expect train loss about 2.66 and val loss about 2.67 (nanoGPT's numbers).
batch_size = 8
eval_iters = 500  # use more iterations to get good estimate
eval_only = True
wandb_log = False
init_from = 'gpt2-large'
