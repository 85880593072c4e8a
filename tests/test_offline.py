"""Without a network, what reaches for the Hugging Face hub fails at once in one line that says how
to work offline (its client would retry for about a minute), and the route it names works. The hub
is a closed port on this machine (HF_ENDPOINT), so these tests run the same with a network or
without, and the cache is an empty temporary folder (HF_HOME)."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT, error_line, free_port, hermetic_env


def online_env(hf_home, **extra):
    """hermetic_env with the hub switched on: an unreachable endpoint and a cache of our own."""
    env = hermetic_env(HF_HOME=str(hf_home), HF_ENDPOINT=f'http://127.0.0.1:{free_port()}')
    del env['HF_HUB_OFFLINE'], env['TRANSFORMERS_OFFLINE']
    return dict(env, **extra)


def cache_tiny_gpt2(hf_home):
    """A tiny GPT-2 (GPT-2's vocabulary, 1 layer of 8) where the hub's cache keeps 'gpt2'."""
    from transformers import GPT2Config, GPT2LMHeadModel

    repo = os.path.join(hf_home, 'hub', 'models--gpt2')
    snapshot = os.path.join(repo, 'snapshots', '0' * 40)
    config = GPT2Config(n_layer=1, n_head=1, n_embd=8, n_positions=32)
    GPT2LMHeadModel(config).save_pretrained(snapshot)
    os.makedirs(os.path.join(repo, 'refs'))
    with open(os.path.join(repo, 'refs', 'main'), 'w') as f:
        f.write('0' * 40)


def run(*args, env):
    # the hub's client alone would retry for ~25 s per file: the timeout catches a retry storm
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=40
    )


@pytest.mark.parametrize('script', ['sample.py', 'train.py'])
def test_unreachable_hub_fails_at_once_naming_the_offline_route(script, train_command, tmp_path):
    cmd = train_command('--init_from=gpt2')[1:] if script == 'train.py' else ['sample.py']
    result = run(*cmd, '--init_from=gpt2', '--device=cpu', env=online_env(tmp_path))
    line = error_line(result)
    assert 'cannot reach the Hugging Face hub for gpt2' in line, line
    assert 'HF_HUB_OFFLINE=1 (gpt2 is not in the cache' in line and '--init_from=DIR' in line, line


def test_the_offline_route_it_names_works(tmp_path):
    cache_tiny_gpt2(str(tmp_path))
    args = ['sample.py', '--init_from=gpt2', '--device=cpu', '--num_samples=1']
    line = error_line(run(*args, '--max_new_tokens=3', env=online_env(tmp_path)))
    assert 'HF_HUB_OFFLINE=1 (gpt2 is in the cache' in line, line
    offline = run(*args, '--max_new_tokens=3', env=online_env(tmp_path, HF_HUB_OFFLINE='1'))
    assert offline.returncode == 0, offline.stderr
    assert 'loading weights from pretrained gpt: gpt2' in offline.stderr


def test_hellaswag_from_an_unreachable_hub_fails_at_once(tmp_path):
    code = 'import eval; eval.load_hellaswag()'
    line = error_line(run('-c', code, env=online_env(tmp_path)))
    assert 'cannot reach the Hugging Face hub for Rowan/hellaswag' in line, line
    assert '--hellaswag_path=hellaswag_val.jsonl' in line, line
