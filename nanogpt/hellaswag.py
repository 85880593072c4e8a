"""
HellaSwag, scored exactly as lm-evaluation-harness's `hellaswag` task (zero-shot): the query and the
endings pass through its preprocess(), each ending is a continuation with a space before it, and the
model's choice is the ending with the highest summed log-probability (acc), or the highest
log-probability per character of the ending (acc_norm). eval.py and train.py (eval_hellaswag) use
it.
"""

import json
import os
import re
from contextlib import nullcontext

import torch
from torch.nn import functional as F

from configurator import UserError
from nanogpt import checkpoints

HELLASWAG_FIELDS = ('activity_label', 'ctx_a', 'ctx_b', 'endings', 'label')


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
            f"{where}: missing field(s) {', '.join(missing)} "
            f"(a HellaSwag item has {', '.join(HELLASWAG_FIELDS)})"
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
            f"{where}: label must be the index of the right ending (0-{len(endings) - 1}), "
            f"got {row['label']!r}"
        )


def load_hellaswag(path='', limit=0):
    """HellaSwag items (dicts with HELLASWAG_FIELDS): from a local .jsonl (one item per line, as in
    the original hellaswag_val.jsonl) or, for path '', the validation split of Rowan/hellaswag from
    the hub."""
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
                                f"{path} line {n} is not JSON: "
                                "a HellaSwag file has one item per line"
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

        checkpoints.check_hub('Rowan/hellaswag', 'dataset', '--hellaswag_path=hellaswag_val.jsonl')
        try:
            rows = list(datasets.load_dataset('Rowan/hellaswag', split='validation'))
        except Exception as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(
                f"could not load Rowan/hellaswag from the Hugging Face hub or its cache "
                f"({reason}); without network access, give a local copy with "
                "--hellaswag_path=hellaswag_val.jsonl"
            ) from None
    if not rows:
        raise UserError(f"{path or 'Rowan/hellaswag'} has no items")
    return rows[:limit] if limit > 0 else rows


def encode_pair(enc, context, continuation):
    """Token ids of (context, continuation) as lm-evaluation-harness's causal models encode them:
    trailing spaces of the context move to the continuation, the two are encoded as one string, and
    the context's own encoding marks where the continuation starts."""
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
    process scores its share (rows[rank::world_size]) and the counts are summed: every process must
    call it."""
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
            f"hellaswag needs a model with the GPT-2 tokenizer, but {what} has a "
            f"{vocab_size}-token character-level vocabulary"
            f"{f' ({meta_path})' if meta_path else ''}; use --tasks=val"
        )
