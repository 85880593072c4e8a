"""Shared fixtures: the real tiny-shakespeare text prepared as a char dataset, and running train.py
(or torchrun train.py) in a subprocess with a hermetic environment and a tiny model."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(ROOT, '..', 'shared', 'data', 'tinyshakespeare', 'input.txt')
# why a test that needs the text skips without it (README.md's Tests says where to get it)
NO_SHAKESPEARE = (
    "the tiny-shakespeare text is not at ../shared/data/tinyshakespeare/input.txt beside the "
    f"checkout ({os.path.normpath(SHAKESPEARE)}): see README.md, Tests"
)
TORCHRUN = os.path.join(os.path.dirname(sys.executable), 'torchrun')
# small enough that an iteration takes milliseconds on a CPU
TINY = [
    '--n_layer=2',
    '--n_head=2',
    '--n_embd=32',
    '--block_size=32',
    '--batch_size=4',
    '--gradient_accumulation_steps=1',
    '--bias=False',
    '--device=cpu',
    '--compile=False',
]


def too_few_gpus(item):
    """For a test marked gpus(n), which needs n CUDA GPUs: the reason to skip it here, or None."""
    marker = item.get_closest_marker('gpus')
    if marker and torch.cuda.is_available() and torch.cuda.device_count() < marker.args[0]:
        return f"needs {marker.args[0]} CUDA GPUs, this machine has {torch.cuda.device_count()}"


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu need a CUDA GPU: without one they are skipped, the only tests that may skip;
    those
    marked gpus(n) too on a machine with fewer than n GPUs."""
    for item in items:
        if 'gpu' in item.keywords and not torch.cuda.is_available():
            item.add_marker(
                pytest.mark.skip(reason='needs a CUDA GPU (on one: python -m pytest -q -m gpu)')
            )
        elif too_few_gpus(item):
            item.add_marker(pytest.mark.skip(reason=too_few_gpus(item)))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A skip is a failure in CI (CI=true, which .ci/run sets), except for gpu tests on a machine
    without CUDA, and so is a gpu test skipped on a machine with CUDA (unless it needs more GPUs
    than there are): a missing data file must not pass unnoticed."""
    outcome = yield
    report = outcome.get_result()
    gpu = 'gpu' in item.keywords
    if report.skipped and (
        gpu
        and torch.cuda.is_available()
        and not too_few_gpus(item)
        or not gpu
        and os.environ.get('CI') == 'true'
    ):
        report.outcome = 'failed'
        report.longrepr = f"skipped where nothing may skip: {report.longrepr}"


def pytest_terminal_summary(terminalreporter):
    """Skips for want of the tiny-shakespeare text, counted in one line at the end that says where
    it goes: pytest -q shows a skip as one letter."""
    missing = [
        r for r in terminalreporter.stats.get('skipped', []) if 'tinyshakespeare' in str(r.longrepr)
    ]
    if missing:
        terminalreporter.write_line(
            f"{len(missing)} tests skipped: {NO_SHAKESPEARE}",
            yellow=True,
            bold=True,
        )


def hermetic_env(**extra):
    """No network, no wandb account, one thread per process (several processes share 2 cores)."""
    env = dict(
        os.environ,
        HF_HUB_OFFLINE='1',
        TRANSFORMERS_OFFLINE='1',
        WANDB_MODE='offline',
        OMP_NUM_THREADS='1',
        PYTHONUNBUFFERED='1',
    )
    for k in [
        k for k in env if k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')
    ]:
        del env[k]
    env.update(extra)
    return env


def copy_code(dst, *ignore):
    """A copy of the repository's code and data scripts in dst: without git, caches, prepared data
    and the runs in the root's out*/ folders (nanogpt/outdir.py is code), and `ignore`."""
    skip = shutil.ignore_patterns(
        '.git',
        '.venv',
        '.notes',
        '__pycache__',
        '.pytest_cache',
        '*.bin',
        '*.pkl',
        'wandb',
        *ignore,
    )

    def ignored(folder, names):
        runs = (
            {n for n in names if n.startswith('out')} if os.path.samefile(folder, ROOT) else set()
        )
        return set(skip(folder, names)) | runs

    shutil.copytree(ROOT, dst, ignore=ignored)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def read_log(out_dir):
    """The rows of out_dir/log.jsonl: (training rows by iter, eval rows by iter)."""
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        rows = [json.loads(line) for line in f]
    return (
        {r['iter']: r for r in rows if 'loss' in r},
        {r['iter']: r for r in rows if 'val_loss' in r},
    )


def error_line(result):
    """The one line a user error prints on stderr: exit status 1, no traceback."""
    assert result.returncode == 1, result.stdout + result.stderr
    assert 'Traceback' not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr
    return lines[0]


@pytest.fixture(scope='session')
def shakespeare_char(tmp_path_factory):
    """data/shakespeare_char/prepare.py run on the real tiny-shakespeare text, into a temporary
    folder. Without the text (outside CI), the files it prepares in data/shakespeare_char, if they
    are there: a GPU machine is given those, not the text (see ../shared/gpu-check.sh)."""
    if not os.path.isfile(SHAKESPEARE):
        prepared = os.path.join(ROOT, 'data', 'shakespeare_char')
        if os.environ.get('CI') != 'true' and all(
            os.path.isfile(os.path.join(prepared, f)) for f in ('train.bin', 'val.bin', 'meta.pkl')
        ):
            return prepared
        if os.environ.get('CI') == 'true':
            pytest.fail(f"{SHAKESPEARE} is missing: CI needs ../shared/data beside the checkout")
        pytest.skip(NO_SHAKESPEARE)
    out = tmp_path_factory.mktemp('shakespeare_char')
    subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, 'data', 'shakespeare_char', 'prepare.py'),
            f'--input={SHAKESPEARE}',
            f'--out_dir={out}',
        ],
        check=True,
        capture_output=True,
    )
    return str(out)


@pytest.fixture(scope='session')
def train_command(shakespeare_char):
    """command(*args, torchrun=None): the command line of train.py with the tiny model on the
    prepared data, args appended after the defaults; torchrun is a list of torchrun options."""

    def command(*args, torchrun=None):
        launcher = [TORCHRUN, *torchrun] if torchrun else [sys.executable]
        return [
            *launcher,
            os.path.join(ROOT, 'train.py'),
            '--dataset=shakespeare_char',
            f'--data_dir={shakespeare_char}',
            *TINY,
            *args,
        ]

    return command


@pytest.fixture(scope='session')
def train(train_command):
    """run(*args, torchrun=None, check=True, env=None, cwd=None): run train_command(*args) to
    completion."""

    def run(*args, torchrun=None, check=True, env=None, cwd=None, timeout=240):
        cmd = train_command(*args, torchrun=torchrun)
        result = subprocess.run(
            cmd, capture_output=True, text=True, env=env or hermetic_env(), cwd=cwd, timeout=timeout
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
            )
        return result

    return run
