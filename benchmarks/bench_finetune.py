"""
Finetuning a model pretrained here, three ways at equal iterations: all weights (AdamW), the top
Blocks only (freeze_layers) and LoRA adapters (lora_rank). Tiny Shakespeare in GPT-2 tokens is cut
in two: a small GPT is pretrained on the first part, then finetuned from its out_dir
(init_from=<path>) on the other part, a different set of plays. Prints each method's trainable
parameters and its val loss on the finetuning data before (iteration 0: the pretrained model) and
after, all through train.py and its log.jsonl.

    python benchmarks/bench_finetune.py          # ../shared/data/tinyshakespeare/input.txt
    python benchmarks/bench_finetune.py --input=path/to/input.txt --finetune_iters=400 \
        --pretrain_iters=2000
"""

import json
import os
import subprocess
import sys
import tempfile

# the repository's root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import ROOT, configure

# -----------------------------------------------------------------------------
# the tiny Shakespeare text
input = os.path.join(ROOT, '..', 'shared', 'data', 'tinyshakespeare', 'input.txt')
split = 0.5  # the first half of the text pretrains, the second half is the finetuning data
pretrain_iters = 300
finetune_iters = 100
model = [
    '--n_layer=4',
    '--n_head=4',
    '--n_embd=64',
    '--block_size=32',
    '--batch_size=8',
    '--bias=False',
]
full_learning_rate = 1e-3  # full finetuning and freeze_layers
# adapters start at zero and are scaled by alpha / rank: they take a larger step
lora_learning_rate = 3e-3
lora_rank = 8
freeze_layers = 3  # of model's 4 Blocks: only the top one (and ln_f) trains
# -----------------------------------------------------------------------------
configure(globals())
COMMON = [
    *model,
    '--device=cpu',
    '--compile=False',
    '--dropout=0.0',
    '--gradient_accumulation_steps=1',
    '--log_interval=50',
    '--eval_iters=10',
]


def run(*args):
    subprocess.run(
        [sys.executable, os.path.join(ROOT, 'train.py'), *COMMON, *args],
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
    )


def evals(out_dir):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return {r['iter']: r['val_loss'] for r in map(json.loads, f) if 'val_loss' in r}


def trainable(out_dir):
    """The parameters a run trained: those the optimizer has state for, counted from the
    checkpoint."""
    import torch

    ckpt = torch.load(os.path.join(out_dir, 'ckpt.pt'), weights_only=True)
    return sum(s['exp_avg'].numel() for s in ckpt['optimizer']['state'].values())


with tempfile.TemporaryDirectory() as tmp:
    with open(input) as f:
        text = f.read()
    cut = int(len(text) * split)
    for name, part in (('pretrain', text[:cut]), ('finetune', text[cut:])):
        with open(os.path.join(tmp, f'{name}.txt'), 'w') as f:
            f.write(part)
        subprocess.run(
            [
                sys.executable,
                os.path.join(ROOT, 'data', 'prepare_text.py'),
                f'--input={tmp}/{name}.txt',
                '--tokenizer=gpt2',
                f'--out_dir={tmp}/{name}',
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    pretrained = os.path.join(tmp, 'out-pretrained')
    run(
        f'--data_dir={tmp}/pretrain',
        f'--max_iters={pretrain_iters}',
        f'--lr_decay_iters={pretrain_iters}',
        '--learning_rate=3e-3',
        '--min_lr=3e-4',
        '--warmup_iters=30',
        f'--eval_interval={pretrain_iters}',
        f'--out_dir={pretrained}',
    )
    print(
        f"pretrained {pretrain_iters} iterations on the first {split:.0%} of {input}: "
        f"val loss {evals(pretrained)[pretrain_iters]:.4f} on its own held-out text"
    )
    methods = {
        'full': [f'--learning_rate={full_learning_rate}'],
        f'freeze_layers={freeze_layers}': [
            f'--learning_rate={full_learning_rate}',
            f'--freeze_layers={freeze_layers}',
        ],
        f'lora_rank={lora_rank}': [
            f'--learning_rate={lora_learning_rate}',
            f'--lora_rank={lora_rank}',
        ],
    }
    for name, args in methods.items():
        out = os.path.join(tmp, f'out-{name}')
        run(
            f'--init_from={pretrained}',
            f'--data_dir={tmp}/finetune',
            f'--max_iters={finetune_iters}',
            '--decay_lr=False',
            f'--eval_interval={finetune_iters // 4}',
            f'--out_dir={out}',
            *args,
        )
        losses = evals(out)
        print(
            f"{name:>16}: {trainable(out):>9,} trainable parameters, {' '.join(args)}: val loss "
            + ", ".join(f"iter {it} {loss:.4f}" for it, loss in sorted(losses.items()))
        )
