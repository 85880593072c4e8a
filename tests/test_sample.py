"""sample.py and bench.py as a user runs them: on a freshly trained tiny checkpoint, on a checkpoint
in
nanoGPT's own format, and on the mistakes a user makes."""

import math
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, hermetic_env
from model import GPT, GPTConfig
from nanogpt.tokenizer import gpt2_encoding

SEP = '---------------'


def run(script, *args, cwd=None):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, script), '--device=cpu', *args],
        capture_output=True,
        text=True,
        env=hermetic_env(),
        cwd=cwd,
        timeout=240,
    )


def samples(stdout):
    """The samples sample.py printed: all of stdout, each sample followed by a separator line."""
    assert stdout.endswith(f'\n{SEP}\n'), stdout
    return stdout.split(f'\n{SEP}\n')[:-1]


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    assert 'Traceback' not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope='module')
def trained(train, tmp_path_factory):
    out = tmp_path_factory.mktemp('out-sample')
    train(
        f'--out_dir={out}',
        '--max_iters=30',
        '--eval_interval=30',
        '--eval_iters=2',
        '--learning_rate=1e-2',
        '--warmup_iters=0',
    )
    return str(out)


@pytest.mark.smoke
def test_samples_have_requested_count_and_length_and_are_reproducible(trained):
    args = (f'--out_dir={trained}', '--num_samples=3', '--max_new_tokens=25', '--start=ROMEO:')
    first = run('sample.py', *args)
    assert first.returncode == 0, first.stderr
    texts = samples(first.stdout)
    assert len(texts) == 3
    # not in stdout
    assert "decoding with the checkpoint's tokenizer: char (65 characters" in first.stderr
    assert '3 samples of 25 tokens in' in first.stderr
    for text in texts:  # character vocabulary: one character per token
        assert text.startswith('ROMEO:') and len(text) == len('ROMEO:') + 25
    assert samples(run('sample.py', *args).stdout) == texts  # same seed, same text
    assert samples(run('sample.py', *args, '--seed=7').stdout) != texts
    # streaming prints the same text as it is generated (one sample: the same random draws)
    one = samples(run('sample.py', *args, '--num_samples=1').stdout)
    streamed = run('sample.py', *args, '--num_samples=1', '--stream=True')
    assert streamed.returncode == 0, streamed.stderr
    assert samples(streamed.stdout) == one
    # without the KV cache (nanoGPT's loop) greedy decoding gives the same text
    greedy = [
        run('sample.py', *args, '--temperature=0', f'--kv_cache={c}').stdout for c in (True, False)
    ]
    assert samples(greedy[0]) == samples(greedy[1])


def test_file_prompt_is_read(trained, tmp_path):
    prompt = tmp_path / 'prompt.txt'
    prompt.write_text('JULIET:\nO Romeo', encoding='utf-8')
    result = run(
        'sample.py',
        f'--out_dir={trained}',
        f'--start=FILE:{prompt}',
        '--num_samples=1',
        '--max_new_tokens=5',
    )
    assert result.returncode == 0, result.stderr
    [text] = samples(result.stdout)
    assert text.startswith('JULIET:\nO Romeo') and len(text) == len('JULIET:\nO Romeo') + 5


@pytest.mark.format
def test_nanogpt_format_checkpoint_with_gpt2_tokens(tmp_path):
    """A checkpoint as nanoGPT writes it (compiled keys, only its own keys, a BPE dataset)."""
    torch.manual_seed(0)
    model_args = dict(
        n_layer=2, n_head=2, n_embd=32, block_size=64, bias=False, vocab_size=50304, dropout=0.0
    )
    model = GPT(GPTConfig(**model_args)).eval()
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu', verbose=False)
    torch.save(
        {
            'model': {'_orig_mod.' + k: v for k, v in model.state_dict().items()},
            'optimizer': optimizer.state_dict(),
            'model_args': model_args,
            'iter_num': 100,
            'best_val_loss': torch.tensor(3.0),
            'config': {'dataset': 'openwebtext', 'batch_size': 12},
        },
        tmp_path / 'ckpt.pt',
    )
    result = run(
        'sample.py',
        f'--out_dir={tmp_path}',
        '--start=Hello world',
        '--num_samples=2',
        '--max_new_tokens=10',
        '--temperature=0',
    )
    assert result.returncode == 0, result.stderr
    enc = gpt2_encoding()
    expected = enc.decode(
        model.generate(torch.tensor([enc.encode('Hello world')]), 10, temperature=0)[0].tolist()
    )
    assert samples(result.stdout) == [expected, expected]


def numbers(pattern, text):
    """The numbers that pattern's groups capture in text (commas dropped), checked finite and
    positive."""
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in:\n{text}"
    values = [float(g.replace(',', '')) for g in match.groups()]
    assert all(math.isfinite(v) and v > 0 for v in values), (pattern, values)
    return values


def test_bench_train_profile_and_generate(shakespeare_char, tmp_path):
    tiny = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=4']
    result = run(
        'bench.py', *tiny, '--burnin=2', '--iters=3', '--real_data=False', '--vocab_size=65'
    )
    assert result.returncode == 0, result.stderr
    ms, tokens_per_s, _mfu, loss = numbers(
        r'time per iteration: ([\d.]+)ms, ([\d,]+) tokens/s, MFU: ([\d.]+)%, '
        r'loss ([\d.]+)',
        result.stdout,
    )
    # the figures agree with each other; the timings themselves (and MFU) are not tested
    assert tokens_per_s == pytest.approx(4 * 32 / (ms / 1000), rel=0.01)
    assert loss < 2 * math.log(65)
    trace = tmp_path / 'trace'
    result = run(
        'bench.py',
        *tiny,
        '--profile=True',
        f'--profile_dir={trace}',
        '--real_data=False',
        '--vocab_size=65',
    )
    assert result.returncode == 0, result.stderr
    assert 'Self CPU' in result.stdout and any(trace.iterdir())
    # a context long enough for the cache to matter: without it every token reruns up to 300
    # positions
    result = run(
        'bench.py',
        '--n_layer=2',
        '--n_head=2',
        '--n_embd=64',
        '--block_size=512',
        '--mode=generate',
        '--max_new_tokens=300',
        '--vocab_size=65',
    )
    assert result.returncode == 0, result.stderr
    (cached,) = numbers(r'with KV cache: ([\d.]+) tokens/s', result.stdout)
    (uncached,) = numbers(r'without KV cache: ([\d.]+) tokens/s', result.stdout)
    (speedup,) = numbers(r'KV cache speedup: ([\d.]+)x', result.stdout)
    assert speedup == pytest.approx(cached / uncached, abs=0.06)


def test_bench_speed_prints_both_paths_and_the_ratio():
    tiny = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=4']
    result = run(
        'bench.py',
        *tiny,
        '--mode=speed',
        '--burnin=1',
        '--iters=2',
        '--rounds=2',
        '--real_data=False',
        '--vocab_size=65',
        '--compile=False',
    )
    assert result.returncode == 0, result.stderr
    faithful = numbers(
        r'faithful \(eager, float32, no TF32\): ([\d.]+)ms/iter, ([\d,]+) tokens/s', result.stdout
    )
    fast = numbers(
        r'fast \(compile=False, float32, \d+ threads\): ([\d.]+)ms/iter, ([\d,]+) tokens/s',
        result.stdout,
    )
    for ms, tokens_per_s in (faithful, fast):
        assert tokens_per_s == pytest.approx(4 * 32 / (ms / 1000), rel=0.01)
    (speedup,) = numbers(r'training speedup: ([\d.]+)x', result.stdout)
    assert speedup == pytest.approx(faithful[0] / fast[0], abs=0.02)


def test_sample_errors(trained, tmp_path):
    empty = tmp_path / 'empty'
    empty.mkdir()
    assert_one_line_error(
        run('sample.py', f'--out_dir={empty}'), f'no checkpoint at {empty}', 'train one first'
    )
    assert_one_line_error(
        run('sample.py', f'--out_dir={trained}', '--start=hello ☃ world§'),
        'not in the',
        "'☃'",
        "'§'",
    )
    assert_one_line_error(
        run('sample.py', f'--out_dir={trained}', '--max_new_tokens=0'),
        'max_new_tokens must be at least 1, got 0',
    )
    unknown = tmp_path / 'unknown'
    unknown.mkdir()
    torch.save({'model': {}, 'model_args': {'n_layers': 2, 'width': 3}}, unknown / 'ckpt.pt')
    assert_one_line_error(
        run('sample.py', f'--out_dir={unknown}'), 'format this code does not know'
    )
    truncated = tmp_path / 'truncated'
    truncated.mkdir()
    data = open(os.path.join(trained, 'ckpt.pt'), 'rb').read()
    (truncated / 'ckpt.pt').write_bytes(data[: len(data) // 2])
    assert_one_line_error(run('sample.py', f'--out_dir={truncated}'), 'truncated or corrupt')
