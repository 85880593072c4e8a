"""One forward pass for every use: a change to how a Block or the attention computes, made in a copy
of the repository, reaches sample.py, eval.py and serve.py alike (serve's batched greedy text
still equals sample.py's); the serving engine's decode step waits for the device the same number
of times with 1 row as with 8; a row's logits do not depend on the other rows of a step."""

import json
import os
import subprocess
import sys
import time

import httpx
import pytest
import torch

from conftest import copy_code, SHAKESPEARE, free_port, hermetic_env
from model import GPT, GPTConfig
from nanogpt import batching
from nanogpt.generate import KVCache, start
from test_serve import PROMPTS, checkpoint  # noqa: F401 (a fixture: a 2-layer random char model)

# (file, text, replacement): each a change of the function the model computes
EDITS = {
    'unchanged': None,
    'Block.forward': ('model.py', 'x = x + self.mlp(', 'x = x + 0.5 * self.mlp('),
    'CausalSelfAttention.forward': (
        'model.py',
        '        mask = None\n',
        '        q = 2 * q\n        mask = None\n',
    ),
}
TOKENS = 40  # the checkpoint's block is 32 characters: the window slides


def copy_repo(dst, edit):
    copy_code(dst)
    if edit:
        name, old, new = edit
        path = os.path.join(dst, name)
        src = open(path, encoding='utf-8').read()
        assert src.count(old) == 1, old
        with open(path, 'w', encoding='utf-8') as f:
            f.write(src.replace(old, new))


def launch(repo, script, *args):
    return subprocess.Popen(
        [sys.executable, os.path.join(repo, script), '--device=cpu', *args],
        cwd=repo,
        env=hermetic_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc):
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return out


def test_a_change_to_the_model_reaches_sample_eval_and_serve(checkpoint, tmp_path):  # noqa: F811
    if not os.path.isfile(SHAKESPEARE):
        pytest.skip(f"{SHAKESPEARE} not found")
    text = tmp_path / 'val.txt'
    text.write_text(open(SHAKESPEARE, encoding='utf-8').read()[:3000], encoding='utf-8')
    runs = {}
    for name, edit in EDITS.items():  # every process at once: they share the CPU's cores
        repo = str(tmp_path / name.replace('.', '-'))
        copy_repo(repo, edit)
        port = free_port()
        runs[name] = dict(
            port=port,
            serve=launch(repo, 'serve.py', f'--out_dir={checkpoint}', f'--port={port}'),
            sample=launch(
                repo,
                'sample.py',
                f'--out_dir={checkpoint}',
                f'--start={PROMPTS[0]}',
                '--num_samples=1',
                f'--max_new_tokens={TOKENS}',
                '--temperature=0',
            ),
            eval=launch(
                repo,
                'eval.py',
                f'--out_dir={checkpoint}',
                f'--val_path={text}',
                f'--out_json={tmp_path / name}.json',
            ),
        )
    results = {}
    try:
        for name, run in runs.items():
            url = f"http://127.0.0.1:{run['port']}"
            deadline = time.monotonic() + 120
            while run['serve'].poll() is None and time.monotonic() < deadline:
                try:
                    httpx.get(f'{url}/health', timeout=1)
                    break
                except httpx.TransportError:  # not listening yet
                    time.sleep(0.05)
            # four prompts in one request: decoded together
            body = dict(prompt=PROMPTS[:4], max_tokens=TOKENS, temperature=0)
            reply = httpx.post(f'{url}/v1/completions', json=body, timeout=60)
            assert reply.status_code == 200, reply.text
            finish(run['eval'])
            results[name] = dict(
                serve=[c['text'] for c in reply.json()['choices']],
                sample=finish(run['sample']).removesuffix('\n---------------\n'),
                val=json.load(open(f'{tmp_path / name}.json'))['results']['val']['loss'],
            )
    finally:
        for run in runs.values():
            run['serve'].kill()
            run['serve'].communicate()
    base = results['unchanged']
    for name, r in results.items():
        # serve's batched greedy is sample.py's, in every copy
        assert PROMPTS[0] + r['serve'][0] == r['sample'], name
        if name != 'unchanged':  # and each of the three follows the change
            assert r['sample'] != base['sample'] and r['serve'] != base['serve'], name
            assert r['val'] != base['val'], name


def tiny_model():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=65, n_layer=2, n_head=2, n_embd=64)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@torch.no_grad()
def test_a_rows_logits_do_not_depend_on_the_other_rows():
    """A step of the engine's shape (all slots): row 0's logits are bit for bit the same whatever
    the other slots hold and however long they are."""
    model = tiny_model()
    logits = []
    for others in (0, 3, 7):
        cache = KVCache.empty(model.config, 8, 'cpu')
        start(model, cache.rows(0, 1), torch.arange(10)[None])
        g = torch.Generator().manual_seed(others)
        for s in range(1, 8):  # other rows of other lengths, or nothing there
            length = others * s % 31 + 1
            start(model, cache.rows(s, s + 1), torch.randint(0, 65, (1, length), generator=g))
        tokens = torch.randint(0, 65, (8, 1), generator=g)
        tokens[0] = 10
        logits.append(model(tokens, kv_cache=cache)[0][0])
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[0], logits[2])


def test_a_decode_step_waits_for_the_device_as_often_with_1_row_as_with_8(monkeypatch):
    """The engine's steps, driven here without its thread, with every way a CPU tensor reaches the
    host counted (.item, .tolist, .cpu, .numpy, bool/int/float of a tensor, torch.tensor from
    Python data: a copy to the device on a GPU)."""
    model = tiny_model()
    counts = []
    names = ('item', 'tolist', 'cpu', 'numpy', '__bool__', '__int__', '__float__')
    real = {n: getattr(torch.Tensor, n) for n in names}
    real_tensor = torch.tensor

    def counted(fn):
        def wrapper(*args, **kwargs):
            counts[-1] += 1
            return fn(*args, **kwargs)

        return wrapper

    def steps(n_rows):
        engine = batching.Engine(model, lambda ids: 'x' * len(ids), None, 'cpu', 8, 8)
        rows = [
            batching.Row(i, [1 + i] * (3 + i), i, lambda *a: None, 20, 0.8 * (i % 2), 0.9, 5, [])
            for i in range(n_rows)
        ]
        engine.submit(rows)
        with torch.no_grad():
            engine.admit()
            engine.step()  # the rows' contexts are read here
            per_step = []
            for _ in range(5):
                counts.append(0)
                engine.admit()
                engine.step()
                per_step.append(counts.pop())
        assert all(len(row.new) == 6 for row in rows)
        return per_step

    counts.append(0)
    with monkeypatch.context() as m:
        for name, fn in real.items():
            m.setattr(torch.Tensor, name, counted(fn))
        m.setattr(torch, 'tensor', counted(real_tensor))
        one, eight = steps(1), steps(8)
    assert one == eight and set(one) == {1}, (one, eight)  # the tokens' one .tolist()


@torch.no_grad()
def test_rows_that_fill_the_block_and_end_there_leave_their_slot_usable():
    """A row whose last token fills its slot's block while another row goes on, then new rows in
    both slots: each completion equals GPT.generate's (the engine's greedy text)."""
    model = tiny_model()
    texts = {}

    def emit(index, text, finish, error=None):
        assert error is None, error
        texts[index] = texts.get(index, '') + text

    decode = lambda ids: ''.join(chr(48 + i) for i in ids)  # noqa: E731
    engine = batching.Engine(model, decode, None, 'cpu', 2, 4)
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]
    lengths = [30, 45, 20, 40]  # 3 + 30 - 1 = 32 positions: the first row ends with its slot full
    # while the second goes on, its window sliding; then two more rows take the two slots
    for batch in ((0, 1), (2, 3)):
        engine.submit(
            [batching.Row(i, prompts[i], 0, emit, lengths[i], 0, 1, 0, []) for i in batch]
        )
        while engine.waiting or engine.active:
            engine.admit()
            engine.step()
    for i, p in enumerate(prompts):
        new = model.generate(torch.tensor([p]), lengths[i], temperature=0)[0, len(p) :]
        assert texts[i] == decode(new.tolist()), i
