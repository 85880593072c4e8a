"""
Evaluate a model on HellaSwag and on held-out text:
$ python eval.py --init_from=gpt2 --tasks=hellaswag
$ python eval.py --out_dir=out-shakespeare-char-cpu --tasks=val
Prints one line per task and writes the results as JSON to out_json.

hellaswag is scored exactly as lm-evaluation-harness's `hellaswag` task (zero-shot): the query and
the endings pass through its preprocess(), each ending is a continuation with a space before it, and
the model's choice is the ending with the highest summed log-probability (acc), or the highest
log-probability per character of the ending (acc_norm). train.py imports load_hellaswag and
hellaswag_score from here.
"""

import json
import os
import re
from contextlib import nullcontext

import numpy as np
import torch
from torch.nn import functional as F

from nanogpt import checkpoints
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

HELLASWAG_FIELDS = ('activity_label', 'ctx_a', 'ctx_b', 'endings', 'label')
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


def hellaswag_preprocess(text):
    """lm-evaluation-harness's hellaswag preprocess(): the brackets are artifacts of the WikiHow
    part."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def hellaswag_example(row):
    """(query, choices, label) of one HellaSwag item, as lm-evaluation-harness's process_docs builds
    them."""
    query = hellaswag_preprocess(
        row['activity_label'] + ': ' + row['ctx_a'] + ' ' + row['ctx_b'].capitalize()
    )
    return query, [hellaswag_preprocess(ending) for ending in row['endings']], int(row['label'])


def check_hellaswag_row(row, where):
    missing = [k for k in HELLASWAG_FIELDS if k not in row]
    if missing:
        raise UserError(
            f"{where}: missing field(s) {', '.join(missing)} (a HellaSwag item has {', '.join(HELLASWAG_FIELDS)})"
        )
    endings = row['endings']
    if (
        not isinstance(endings, list)
        or len(endings) < 2
        or not all(isinstance(e, str) for e in endings)
    ):
        raise UserError(f"{where}: endings must be a list of at least two strings")
    if not all(isinstance(row[k], str) for k in HELLASWAG_FIELDS[:3]):
        raise UserError(f"{where}: activity_label, ctx_a and ctx_b must be strings")
    if not str(row['label']).isdigit() or int(row['label']) >= len(endings):
        raise UserError(
            f"{where}: label must be the index of the right ending (0-{len(endings) - 1}), got {row['label']!r}"
        )


def load_hellaswag(path='', limit=0):
    """HellaSwag items (dicts with HELLASWAG_FIELDS): from a local .jsonl (one item per line, as in
    the
    original hellaswag_val.jsonl) or, for path '', the validation split of Rowan/hellaswag from the
    hub."""
    if path:
        rows = []
        try:
            with open(path, encoding='utf-8') as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except ValueError:
                            raise UserError(
                                f"{path} line {n} is not JSON: a HellaSwag file has one item per line"
                            ) from None
                        if not isinstance(rows[-1], dict):
                            raise UserError(f"{path} line {n} is not a JSON object")
                        check_hellaswag_row(rows[-1], f"{path} line {n}")
        except OSError as e:
            raise UserError(f"cannot read the HellaSwag file {path}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise UserError(
                f"{path} is not UTF-8 text: a HellaSwag file has one JSON item per line"
            ) from None
    else:
        import datasets  # imported here: it takes seconds, and only this needs it

        try:
            rows = list(datasets.load_dataset('Rowan/hellaswag', split='validation'))
        except Exception as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(
                f"could not load Rowan/hellaswag from the Hugging Face hub or its cache ({reason}); "
                "without network access, give a local copy with --hellaswag_path=hellaswag_val.jsonl"
            ) from None
    if not rows:
        raise UserError(f"{path or 'Rowan/hellaswag'} has no items")
    return rows[:limit] if limit > 0 else rows


def encode_pair(enc, context, continuation):
    """Token ids of (context, continuation) as lm-evaluation-harness's causal models encode them:
    trailing spaces of the context move to the continuation, the two are encoded as one string, and
    the context's
    own encoding marks where the continuation starts."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = enc.encode_ordinary(context + continuation)
    context_ids = enc.encode_ordinary(context)
    return context_ids, whole[len(context_ids) :]


@torch.no_grad()
def hellaswag_score(
    model, rows, device, ctx=None, batch_size=8, rank=0, world_size=1, progress=False
):
    """{'acc', 'acc_norm', 'items'} of model on the HellaSwag items rows. With world_size > 1 every
    process
    scores its share (rows[rank::world_size]) and the counts are summed: every process must call
    it."""
    from tqdm import tqdm
    from nanogpt.tokenizer import gpt2_encoding

    enc = gpt2_encoding()
    block_size = model.config.block_size
    share = rows[rank::world_size]
    # every process runs the same number of forward passes (a sharded model's passes are
    # collective): shorter shares are topped up with an item that is not counted
    per_rank = -(-len(rows) // world_size)
    weights = [1.0] * len(share) + [0.0] * (per_rank - len(share))
    share = share + rows[:1] * (per_rank - len(share))
    counts = torch.zeros(3, dtype=torch.float64)  # right by acc, right by acc_norm, items
    was_training = model.training
    model.eval()
    bar = tqdm(total=per_rank, desc='hellaswag', unit='item', disable=not progress)
    for i in range(0, per_rank, batch_size):
        seqs, n_cont, items = [], [], []
        for row in share[i : i + batch_size]:
            query, choices, label = hellaswag_example(row)
            # lengths without the space
            items.append((label, torch.tensor([float(len(c)) for c in choices])))
            for choice in choices:
                context_ids, cont_ids = encode_pair(enc, query, ' ' + choice)
                # lm-eval keeps the last tokens too
                seqs.append((context_ids + cont_ids)[-(block_size + 1) :])
                n_cont.append(len(cont_ids))
        # inputs x and targets y (rows, T), right-padded: -1 marks targets that are not the
        # continuation's
        T = max(len(s) for s in seqs) - 1
        x = torch.zeros(len(seqs), T, dtype=torch.long)
        y = torch.full((len(seqs), T), -1, dtype=torch.long)
        for j, s in enumerate(seqs):
            x[j, : len(s) - 1] = torch.tensor(s[:-1])
            y[j, len(s) - 1 - n_cont[j] : len(s) - 1] = torch.tensor(s[-n_cont[j] :])
        x, y = x.to(device), y.to(device)
        with ctx or nullcontext():
            logits, _ = model(x, y)  # (rows, T, vocab_size)
        logprobs = (
            F.log_softmax(logits.float(), dim=-1)
            .gather(2, y.clamp(min=0).unsqueeze(-1))
            .squeeze(-1)
        )
        # (rows,) log-probability of each continuation
        lls = (logprobs * (y >= 0)).sum(dim=1).cpu().double()
        k = 0
        for (label, lengths), weight in zip(items, weights[i : i + batch_size]):
            ll = lls[k : k + len(lengths)]
            k += len(lengths)
            counts += weight * torch.tensor(
                [float(ll.argmax() == label), float((ll / lengths).argmax() == label), 1.0],
                dtype=torch.float64,
            )
        bar.update(len(items))
    bar.close()
    model.train(was_training)
    if world_size > 1:
        counts = counts.to(device)
        torch.distributed.all_reduce(counts)
        counts = counts.cpu()
    right, right_norm, n = counts.tolist()
    return {'acc': right / n, 'acc_norm': right_norm / n, 'items': int(n)}


def check_gpt2_tokenizer(vocab_size, meta_path, what):
    """HellaSwag is text: it needs a model that reads GPT-2 BPE, not a character vocabulary."""
    if (meta_path and os.path.exists(meta_path)) or vocab_size < 50257:
        raise UserError(
            f"hellaswag needs a model with the GPT-2 tokenizer, but {what} has a {vocab_size}-token "
            f"character-level vocabulary{f' ({meta_path})' if meta_path else ''}; use --tasks=val"
        )


@torch.no_grad()
def val_loss(model, data, device, ctx=None, batch_size=8, progress=False):
    """Mean loss over every non-overlapping window of block_size + 1 tokens of data (a uint16
    array), each
    window once: every token but the first and a tail shorter than a window is predicted exactly
    once."""
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
    dev = runtime.pick_device(device)
    run_dtype = runtime.pick_dtype(dtype, dev)
    runtime.allow_tf32(dev)

    # model, and where its vocabulary and data are; a model that cannot read HellaSwag is refused
    # before the items are loaded (from the hub, which may take a while to answer)
    model, source = checkpoints.load_model(init_from, out_dir, allow_unsafe_pickle)
    data_dir, meta_path, what = source['data_dir'], source['meta_path'], source['what']
    rows = None
    if 'hellaswag' in task_list:
        check_gpt2_tokenizer(model.config.vocab_size, meta_path, what)
        rows = load_hellaswag(hellaswag_path, hellaswag_limit)
    model = runtime.inference_model(model, dev, run_dtype)  # its weights in dtype: no autocast
    if compile:
        model = torch.compile(model)  # model.config still reaches the GPT's config

    results = {}
    for task in task_list:
        if task == 'hellaswag':
            r = results['hellaswag'] = hellaswag_score(
                model, rows, dev, None, batch_size, progress=True
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
                    f"{path} not found: prepare the dataset, or give --val_path=a val.bin or a text file"
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
            r = results['val'] = val_loss(model, data, dev, batch_size=batch_size, progress=True)
            r['perplexity'] = float(np.exp(r['loss']))
            # the windows' targets: every token from the second, up to a tail shorter than a window
            targets = data[1 : r['tokens'] + 1]
            r['bpb'] = bits_per_byte(r['loss'], targets, source['record'], meta_path)
            r['path'] = os.path.abspath(path)
            print(
                f"val: loss {r['loss']:.4f}, perplexity {r['perplexity']:.3f} ({r['windows']} windows of "
                f"{model.config.block_size} tokens in {path}), {r['bpb']:.4f} bits per byte",
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
