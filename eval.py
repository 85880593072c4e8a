"""
Evaluate a model on HellaSwag and on held-out text:
$ python eval.py --init_from=gpt2 --tasks=hellaswag
$ python eval.py --out_dir=out-shakespeare-char-cpu --tasks=val
Prints one line per task and writes the results as JSON to out_json.

hellaswag is scored exactly as lm-evaluation-harness's `hellaswag` task (zero-shot): see
nanogpt/hellaswag.py.
"""

import json
import os
from contextlib import nullcontext

import numpy as np
import torch

from nanogpt import checkpoints
from nanogpt.hellaswag import check_gpt2_tokenizer, hellaswag_score, load_hellaswag
from nanogpt import dataloader
from nanogpt import runtime
from configurator import ANY, NON_NEGATIVE, POSITIVE, OneOf, OutPath, UserError, check, configure

# -----------------------------------------------------------------------------
# 'resume' (from out_dir/ckpt.pt), a gpt2 variant (e.g. 'gpt2-xl') or a local Hugging Face dir
init_from = 'resume'
out_dir = 'out'  # ignored if init_from is not 'resume'
tasks = 'val'  # comma-separated: 'hellaswag' (GPT-2 tokenizer only), 'val'
# a local .jsonl in HellaSwag's fields; '' = the validation split of Rowan/hellaswag from the hub
hellaswag_path = ''
hellaswag_limit = 0  # score only the first N items (0 = all 10,042)
# a prepared val.bin, or a plain text file; '' = the val.bin of the checkpoint's dataset
val_path = ''
batch_size = 8  # hellaswag items (4 sequences each) or val windows per forward pass
# where the results go; '' = eval.json in out_dir (resume) or in the current directory
out_json = ''
device = 'auto'  # 'auto' (cuda, else mps, else cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
# 'auto' (bfloat16 or float16 on GPUs, float32 elsewhere), 'float32', 'bfloat16', 'float16'
dtype = 'auto'
compile = False  # use PyTorch 2.0 to compile the model to be faster
# True: a Hugging Face directory may load pytorch_model.bin, a pickle that can run code
allow_unsafe_pickle = False
# -----------------------------------------------------------------------------

TASKS = ('hellaswag', 'val')


def check_settings(c):
    """Each setting's allowed values (configurator.check: bools need none), before anything is
    touched."""
    check(
        c,
        dict(
            init_from=ANY,
            out_dir=ANY,
            tasks=ANY,
            hellaswag_path=ANY,
            hellaswag_limit=NON_NEGATIVE,
            val_path=ANY,
            batch_size=POSITIVE,
            out_json=OutPath(folder=False, optional=True),
            device=ANY,
            dtype=OneOf('auto', *runtime.DTYPES),
        ),
    )
    task_list = [t.strip() for t in c['tasks'].split(',') if t.strip()]
    if not task_list or not set(task_list) <= set(TASKS):
        raise UserError(f"tasks must be hellaswag, val or hellaswag,val, got {c['tasks']!r}")


@torch.no_grad()
def val_loss(model, data, device, ctx=None, batch_size=8, progress=False):
    """Mean loss over every non-overlapping window of block_size + 1 tokens of data (a uint16
    array), each window once: every token but the first and a tail shorter than a window is
    predicted exactly once."""
    from tqdm import tqdm

    block_size = model.config.block_size
    # windows data[s:s + block_size + 1]
    starts = torch.arange(0, len(data) - block_size, block_size)
    if len(starts) == 0:
        raise UserError(
            f"the text has {len(data)} tokens, too few for one window of {block_size + 1}"
        )
    total = 0.0
    bar = tqdm(total=len(starts), desc='val', unit='window', disable=not progress)
    for i in range(0, len(starts), batch_size):
        # (B, block_size)
        x, y = dataloader.get_batch(data, starts[i : i + batch_size], block_size, device)
        with ctx or nullcontext():
            _, loss = model(x, y)
        # every window has block_size targets, so the mean of means is the mean
        total += loss.item() * len(x)
        bar.update(len(x))
    bar.close()
    return {'loss': total / len(starts), 'windows': len(starts), 'tokens': len(starts) * block_size}


def main():
    from nanogpt.tokenizer import bits_per_byte, load_tokenizer

    task_list = [t.strip() for t in tasks.split(',') if t.strip()]
    # TF32 off: evaluation in float32 is exact float32, on CUDA too
    dev, run_dtype, ctx = runtime.setup(device, dtype, tf32=False)

    # model, and where its vocabulary and data are; a model that cannot read HellaSwag is refused
    # before the items are loaded (from the hub, which may take a while to answer)
    model, source = checkpoints.load_model(init_from, out_dir, allow_unsafe_pickle)
    data_dir, meta_path, what = source['data_dir'], source['meta_path'], source['what']
    rows = None
    if 'hellaswag' in task_list:
        check_gpt2_tokenizer(model.config.vocab_size, meta_path, what)
        rows = load_hellaswag(hellaswag_path, hellaswag_limit)
    # float32 weights run under ctx (autocast): the numerics of training's evaluation, its val loss
    model = runtime.inference_model(model, dev, run_dtype, compile)

    results = {}
    for task in task_list:
        if task == 'hellaswag':
            r = results['hellaswag'] = hellaswag_score(
                model, rows, dev, ctx, batch_size, progress=True
            )
            print(
                f"hellaswag: acc {r['acc']:.4f}, acc_norm {r['acc_norm']:.4f} ({r['items']} items)",
                flush=True,
            )
        else:
            path = val_path or (data_dir and os.path.join(data_dir, 'val.bin'))
            if not path:
                raise UserError(
                    f"{what} has no dataset of its own: give --val_path=a val.bin or a text file"
                )
            if not os.path.isfile(path):
                raise UserError(
                    f"{path} not found: prepare the dataset, "
                    "or give --val_path=a val.bin or a text file"
                )
            if path.endswith('.bin'):
                # refuses an empty or odd-length file, which np.memmap cannot map
                dataloader.count_tokens(path)
                data = np.memmap(path, dtype=np.uint16, mode='r')
            else:
                try:
                    with open(path, encoding='utf-8') as f:
                        text = f.read()
                except UnicodeDecodeError:
                    raise UserError(
                        f"{path} is not UTF-8 text (a prepared dataset's file ends in .bin)"
                    ) from None
                # the checkpoint's, else GPT-2
                encode, _ = load_tokenizer(meta_path, source['record'], model.config.vocab_size)
                data = np.array(encode(text), dtype=np.uint16)
            if len(data) and int(data.max()) >= model.config.vocab_size:
                raise UserError(
                    f"{path} holds token id {int(data.max())} but the model's vocab_size is "
                    f"{model.config.vocab_size}: the data was prepared for another vocabulary"
                )
            r = results['val'] = val_loss(model, data, dev, ctx, batch_size, progress=True)
            r['perplexity'] = float(np.exp(r['loss']))
            # the windows' targets: every token from the second, up to a tail shorter than a window
            targets = data[1 : r['tokens'] + 1]
            r['bpb'] = bits_per_byte(r['loss'], targets, source['record'], meta_path)
            r['path'] = os.path.abspath(path)
            print(
                f"val: loss {r['loss']:.4f}, perplexity {r['perplexity']:.3f} "
                f"({r['windows']} windows of {model.config.block_size} tokens in {path}), "
                f"{r['bpb']:.4f} bits per byte",
                flush=True,
            )

    path = out_json or os.path.join(out_dir if init_from == 'resume' else '.', 'eval.json')
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:  # written atomically, like checkpoints
        json.dump({'model': what, 'results': results, 'config': config}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    print(f"results written to {path}")


if __name__ == '__main__':
    config = configure(globals())
    check_settings(config)
    main()
