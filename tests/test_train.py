"""train.py end to end on the real tiny-shakespeare text: learning, the learning-rate schedule, the
checkpoint format, exact resume, stopping by signal or kill -9, divergence, nanoGPT checkpoints,
wandb."""

import fcntl
import glob
import math
import os
import pty
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import termios
import threading
import time

import numpy as np
import pytest
import torch

from nanogpt.checkpoints import load_checkpoint
from conftest import ROOT, TINY, error_line, hermetic_env, read_log
from nanogpt.dataloader import get_batch
from model import GPT, GPTConfig

# the reference run: 40 iterations with dropout (so resuming must restore the RNG too), warmup to
# iter 5, cosine decay over iters 6..26, then min_lr; an eval and a checkpoint every 20 iterations
RUN = [
    '--batch_size=8',
    '--dropout=0.1',
    '--learning_rate=1e-2',
    '--min_lr=1e-3',
    '--warmup_iters=6',
    '--lr_decay_iters=26',
    '--eval_interval=20',
    '--eval_iters=4',
    '--log_interval=1',
]
NANOGPT_KEYS = {'model', 'optimizer', 'model_args', 'iter_num', 'best_val_loss', 'config'}
MODEL_ARGS = {'n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'vocab_size', 'dropout'}


@pytest.fixture(scope='module')
def straight(train, tmp_path_factory):
    """The reference run, 40 iterations in one go: its out_dir."""
    out = tmp_path_factory.mktemp('straight')
    train(*RUN, '--max_iters=40', f'--out_dir={out}')
    return str(out)


def weights(out_dir):
    return torch.load(os.path.join(out_dir, 'ckpt.pt'), weights_only=True)


def assert_same_run(a, b):
    """Identical weights, optimizer state and logged losses and learning rates (timings aside)."""
    ca, cb = weights(a), weights(b)
    assert ca['iter_num'] == cb['iter_num']
    assert ca['model'].keys() == cb['model'].keys()
    for k in ca['model']:
        assert torch.equal(ca['model'][k], cb['model'][k]), k
    for p, state in ca['optimizer']['state'].items():
        for k, v in state.items():
            assert torch.equal(v, cb['optimizer']['state'][p][k]), (p, k)
    (train_a, eval_a), (train_b, eval_b) = read_log(a), read_log(b)
    assert [(r['iter'], r['loss'], r['lr']) for r in train_a.values()] == [
        (r['iter'], r['loss'], r['lr']) for r in train_b.values()
    ]
    assert eval_a == eval_b


def assert_identical(a, b, where=()):
    """a and b, nested dicts, lists and tuples of tensors and Python values, equal bit for bit."""
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, dict):
        assert a.keys() == b.keys(), (where, a.keys() ^ b.keys())
        for k in a:
            assert_identical(a[k], b[k], (*where, k))
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, (*where, i))
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, (where, a, b)


FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'resume_v2')
FIXTURE_RUN = [
    '--dataset=fixture',
    '--n_layer=1',
    '--n_head=2',
    '--n_embd=16',
    '--block_size=16',
    '--batch_size=4',
    '--gradient_accumulation_steps=2',
    '--bias=False',
    '--device=cpu',
    '--compile=False',
    '--dropout=0.1',
    '--eval_interval=4',
    '--eval_iters=2',
    '--log_interval=1',
    '--learning_rate=1e-2',
    '--warmup_iters=2',
    '--lr_decay_iters=8',
    '--min_lr=1e-3',
]


@pytest.mark.format
def test_a_checkpoint_of_an_earlier_version_resumes_bitwise(tmp_path):
    # written by the code of an earlier commit (tests/fixtures/resume_v2/README.md), at iteration 4:
    # resumed to iteration 8 by today's code, it ends bit for bit where it ends when it goes through
    # today's format on the way (resumed to 5 and saved, then resumed to 8): two runs on this CPU,
    # no stored float depends on the CPU that made the fixture
    def resume(out, max_iters):
        subprocess.run(
            [
                sys.executable,
                os.path.join(ROOT, 'train.py'),
                *FIXTURE_RUN,
                f"--data_dir={os.path.join(FIXTURE, 'data')}",
                f'--max_iters={max_iters}',
                '--init_from=resume',
                f'--out_dir={out}',
            ],
            check=True,
            capture_output=True,
            env=hermetic_env(),
        )

    straight, through_today = tmp_path / 'straight', tmp_path / 'through_today'
    shutil.copytree(os.path.join(FIXTURE, 'split'), straight)
    shutil.copytree(os.path.join(FIXTURE, 'split'), through_today)
    resume(through_today, 5)
    old, today = weights(straight), weights(through_today)
    assert today['iter_num'] == 5 and old['iter_num'] == 4
    assert old['config'].keys() != today['config'].keys()  # today's format has other settings
    resume(straight, 8)
    resume(through_today, 8)
    a, b = weights(straight), weights(through_today)
    assert_identical(
        {k: a[k] for k in ('iter_num', 'model', 'optimizer', 'rng_states', 'sampler_state')},
        {k: b[k] for k in ('iter_num', 'model', 'optimizer', 'rng_states', 'sampler_state')},
    )
    (train_a, eval_a), (train_b, eval_b) = read_log(straight), read_log(through_today)
    assert [(r['iter'], r['loss'], r['lr']) for r in train_a.values()] == [
        (r['iter'], r['loss'], r['lr']) for r in train_b.values()
    ]
    assert eval_a[8] == eval_b[8]


def test_learns_real_shakespeare(train, tmp_path):
    # the shipped config file, found from another directory, shrunk to a 200-iteration run
    out = tmp_path / 'out'
    train(
        'config/train_shakespeare_char.py',
        '--n_layer=2',
        '--n_head=4',
        '--n_embd=64',
        '--block_size=64',
        '--batch_size=16',
        '--max_iters=200',
        '--learning_rate=3e-3',
        '--min_lr=1e-3',
        '--warmup_iters=10',
        '--lr_decay_iters=200',
        '--dropout=0',
        '--eval_interval=100',
        '--eval_iters=10',
        '--log_interval=50',
        '--out_dir=out',
        cwd=tmp_path,
    )
    # MFU is measured from the 6th iteration of a process on; before that the log says so (-1). Its
    # value, a timing against a measured peak (a loaded machine slows either), is not tested
    rows, evals = read_log(out)
    assert rows[0]['mfu'] == -1.0 and rows[50]['mfu'] > 0
    # an untrained model guesses uniformly
    assert evals[0]['val_loss'] == pytest.approx(math.log(65), abs=0.1)
    assert evals[200]['val_loss'] < 2.7  # a char model that has learned the letter statistics
    ckpt = load_checkpoint(str(out / 'ckpt.pt'))
    # with always_save_checkpoint=False it was written when val improved, last at iteration 200
    assert ckpt['iter_num'] == 200 and ckpt['best_val_loss'] == evals[200]['val_loss']


def test_learning_rate_schedule(straight):
    rows, _ = read_log(straight)
    lr, min_lr = 1e-2, 1e-3
    assert rows[0]['lr'] == pytest.approx(lr * 1 / 7)  # warmup: (it + 1) / (warmup_iters + 1)
    assert rows[5]['lr'] == pytest.approx(lr * 6 / 7)
    assert rows[6]['lr'] == pytest.approx(lr)  # the top of the cosine
    assert rows[16]['lr'] == pytest.approx((lr + min_lr) / 2)  # halfway through the decay
    assert rows[26]['lr'] == pytest.approx(min_lr)
    assert rows[30]['lr'] == pytest.approx(min_lr)  # after lr_decay_iters
    assert rows[39]['loss'] < rows[0]['loss'] - 0.5
    assert weights(straight)['optimizer']['param_groups'][0]['lr'] == pytest.approx(min_lr)


@pytest.mark.format
def test_checkpoint_is_nanogpt_format(straight):
    # torch.load(weights_only=True) inside
    ckpt = load_checkpoint(os.path.join(straight, 'ckpt.pt'))
    assert NANOGPT_KEYS <= set(ckpt)
    assert set(ckpt['model_args']) == MODEL_ARGS
    # trained from scratch: nanoGPT's GELU, recorded beside model_args
    assert ckpt['gelu'] == 'exact'
    assert not [k for k in ckpt['model'] if k.startswith('_orig_mod.')]
    assert ckpt['iter_num'] == 40 and ckpt['config']['dataset'] == 'shakespeare_char'
    assert ckpt['config']['dtype'] == 'float32'  # the resolved choice, not 'auto'
    _, evals = read_log(straight)
    assert ckpt['best_val_loss'] == min(r['val_loss'] for r in evals.values())
    # what nanoGPT's sample.py does with it
    model = GPT(GPTConfig(**ckpt['model_args']))
    torch.nn.Module.load_state_dict(model, ckpt['model'], strict=True)
    # and what exact resume needs
    assert set(ckpt['rng_states'][0]) == {'python', 'numpy', 'torch', 'cuda'}
    assert isinstance(ckpt['sampler_state'], torch.Tensor) and ckpt['scaler'] == {}


@pytest.mark.smoke
def test_exact_resume(train, straight, tmp_path):
    out = tmp_path / 'out'
    train(*RUN, '--max_iters=20', f'--out_dir={out}')
    train(*RUN, '--max_iters=40', '--init_from=resume', f'--out_dir={out}')
    assert_same_run(straight, out)


def test_sigterm_saves_and_resumes_exactly(train, train_command, tmp_path):
    out = tmp_path / 'out'
    stop = stop_with_sigterm(train_command(*RUN, '--max_iters=100000', f'--out_dir={out}'), out, 5)
    assert weights(out)['iter_num'] == stop
    # continuing gives exactly the run that was never stopped
    train(*RUN, f'--max_iters={stop + 3}', '--init_from=resume', f'--out_dir={out}')
    reference = tmp_path / 'reference'
    train(*RUN, f'--max_iters={stop + 3}', f'--out_dir={reference}')
    assert_same_run(reference, out)


def wait_for_iteration(out_dir, it, proc, timeout=120):
    """Wait until the run in proc has logged training iteration `it`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            if it in read_log(out_dir)[0]:
                return
        except (OSError, ValueError):  # not written yet, or a line being written
            pass
        time.sleep(0.05)
    raise AssertionError(f"iteration {it} not logged in {out_dir} after {timeout} s")


def stop_with_sigterm(command, out_dir, it):
    """Start a training command, send it SIGTERM once it has logged iteration `it`, and return the
    iteration its checkpoint was saved at, as the run says; it must exit cleanly."""
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=hermetic_env()
    )
    wait_for_iteration(out_dir, it, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    return int(re.search(r'SIGTERM received: saved a checkpoint at iter (\d+)', stdout).group(1))


def test_kill_9_leaves_a_loadable_checkpoint(train_command, tmp_path):
    # a checkpoint at every iteration and a model big enough that saving takes a while, so kills
    # land in the middle of writes as well as between them
    out = tmp_path / 'out'
    args = [
        '--n_embd=256',
        '--n_head=4',
        '--eval_interval=1',
        '--eval_iters=1',
        '--max_iters=100000',
        f'--out_dir={out}',
    ]
    last = 0
    for attempt in range(2):
        resume = ['--init_from=resume'] if attempt else []
        proc = subprocess.Popen(
            train_command(*args, *resume),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=hermetic_env(),
        )
        wait_for_iteration(out, last + 3, proc)  # this run has saved checkpoints of its own
        time.sleep(random.uniform(0, 0.3))
        proc.kill()
        proc.wait()
        ckpt = load_checkpoint(str(out / 'ckpt.pt'), keys=tuple(NANOGPT_KEYS))
        assert ckpt['iter_num'] >= last + 3
        last = ckpt['iter_num']


def test_nonfinite_loss_stops_and_keeps_checkpoint(train, straight, tmp_path):
    out = tmp_path / 'out'
    shutil.copytree(straight, out)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    result = train(
        *RUN,
        '--init_from=resume',
        '--learning_rate=1e6',
        '--decay_lr=False',
        '--max_iters=100',
        '--eval_interval=1000',
        f'--out_dir={out}',
        check=False,
    )
    line = error_line(result)
    failed = int(
        re.match(r'error: loss is (nan|inf|-inf) at iter (\d+): training diverged', line).group(2)
    )
    # it trained on after the resume point
    assert failed > 40 and f'iter {failed - 1}: loss' in result.stdout
    # and, having saved nothing, left out_dir as it found it: the log of the run it resumed, not a
    # word more
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == before


def test_best_val_loss_records_only_improvements(train, straight, tmp_path):
    # with learning_rate=0 the weights stay exactly as they are, so val loss never improves
    ckpt = weights(straight)
    frozen = [
        '--init_from=resume',
        '--learning_rate=0',
        '--decay_lr=False',
        '--max_iters=42',
        '--eval_interval=1',
    ]
    # always_save_checkpoint=False: nothing is written
    out = tmp_path / 'keep'
    out.mkdir()
    torch.save(ckpt, out / 'ckpt.pt')
    before = (out / 'ckpt.pt').read_bytes()
    train(*RUN, *frozen, '--always_save_checkpoint=False', f'--out_dir={out}')
    assert (out / 'ckpt.pt').read_bytes() == before
    # always_save_checkpoint=True: written every eval, but best_val_loss keeps the better value
    out = tmp_path / 'always'
    out.mkdir()
    torch.save(dict(ckpt, best_val_loss=0.5), out / 'ckpt.pt')
    train(*RUN, *frozen, '--always_save_checkpoint=True', f'--out_dir={out}')
    assert weights(out)['iter_num'] == 42 and weights(out)['best_val_loss'] == 0.5


@pytest.mark.format
def test_resumes_a_nanogpt_checkpoint(train, straight, tmp_path):
    ours = weights(straight)
    optimizer = ours['optimizer']
    for group in optimizer['param_groups']:
        group['fused'] = False  # nanoGPT uses the fused AdamW on CUDA only
    nanogpt = {  # exactly nanoGPT's keys: a compiled model's weights, best_val_loss as a tensor
        'model': {'_orig_mod.' + k: v for k, v in ours['model'].items()},
        'optimizer': optimizer,
        'model_args': ours['model_args'],
        'iter_num': 40,
        'best_val_loss': torch.tensor(ours['best_val_loss']),
        'config': {k: v for k, v in ours['config'].items() if k not in ('data_dir', 'seed')},
    }
    out = tmp_path / 'out'
    out.mkdir()
    torch.save(nanogpt, out / 'ckpt.pt')
    result = train(*RUN, '--init_from=resume', '--max_iters=42', f'--out_dir={out}')
    assert 'note: the checkpoint has no random state' in result.stdout
    _, evals = read_log(out)
    _, reference = read_log(straight)
    assert evals[40] == reference[40]  # the same weights evaluated on the same batches
    assert weights(out)['iter_num'] == 42 and NANOGPT_KEYS <= set(weights(out))


def test_wandb_offline_run(train, tmp_path):
    out = tmp_path / 'out'
    train(
        '--max_iters=2',
        '--eval_interval=2',
        '--eval_iters=1',
        '--wandb_log=True',
        '--wandb_project=test',
        f'--out_dir={out}',
        env=hermetic_env(WANDB_MODE='offline', WANDB_SILENT='true'),
    )
    runs = glob.glob(str(out / 'wandb' / 'offline-run-*' / 'run-*.wandb'))
    assert len(runs) == 1
    assert b'val/loss' in open(runs[0], 'rb').read()  # the logged metrics are in the run's file


@pytest.mark.architecture
def test_finetune_from_local_hugging_face_directory(train, shakespeare_char, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(
        GPT2Config(vocab_size=65, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    ).save_pretrained(tmp_path / 'hf')
    out = tmp_path / 'out'
    train(
        f'--init_from={tmp_path / "hf"}',
        '--max_iters=4',
        '--eval_interval=4',
        '--eval_iters=2',
        '--learning_rate=1e-3',
        '--decay_lr=False',
        f'--out_dir={out}',
    )
    ckpt = weights(out)
    # GPT-2's shape from the directory, its 64 positions cropped to this run's block_size of 32
    assert ckpt['model_args'] == dict(
        n_layer=2, n_head=2, n_embd=32, block_size=32, bias=True, vocab_size=65, dropout=0.0
    )
    assert ckpt['model']['transformer.wpe.weight'].shape == (32, 32)
    rows, evals = read_log(out)
    # iteration 0's loss is the Hugging Face model's own on that iteration's batch: the sampler's
    # first draw of batch_size 4 windows of block_size 32
    data = np.memmap(os.path.join(shakespeare_char, 'train.bin'), dtype=np.uint16, mode='r')
    ix = torch.randint(len(data) - 32, (1, 4), generator=torch.Generator().manual_seed(1337))[0]
    x, y = get_batch(data, ix, 32, 'cpu')
    with torch.no_grad():
        logits = GPT2LMHeadModel.from_pretrained(tmp_path / 'hf').eval()(x).logits  # (4, 32, 65)
    assert rows[0]['loss'] == pytest.approx(
        torch.nn.functional.cross_entropy(logits.view(-1, 65), y.view(-1)).item(), abs=1e-5
    )
    assert evals[0]['val_loss'] == pytest.approx(math.log(65), abs=0.05)  # random GPT-2 weights
    assert evals[4]['val_loss'] < evals[0]['val_loss'] - 0.01
    # GPT-2's tanh GELU is recorded, and a resumed run keeps it (and records it again)
    assert ckpt['gelu'] == 'tanh'
    train(
        '--init_from=resume',
        '--max_iters=5',
        '--eval_interval=5',
        '--eval_iters=2',
        f'--out_dir={out}',
    )
    assert weights(out)['iter_num'] == 5 and weights(out)['gelu'] == 'tanh'


def test_eval_only(train, straight, tmp_path):
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'ckpt.pt').write_bytes(open(os.path.join(straight, 'ckpt.pt'), 'rb').read())
    before = (out / 'ckpt.pt').read_bytes()
    train(*RUN, '--init_from=resume', '--eval_only=True', f'--out_dir={out}')
    rows, evals = read_log(out)
    assert rows == {} and list(evals) == [40]
    assert evals[40] == read_log(straight)[1][40]  # the same weights evaluated on the same batches
    assert (out / 'ckpt.pt').read_bytes() == before


def test_prints_the_model_and_settings_the_run_uses(train, straight, tmp_path):
    # from the weights of the straight run (2 layers, block_size 32) with other shape settings: the
    # checkpoint's shape is the run's, and the printed config says so
    out = tmp_path / 'out'
    result = train(
        *RUN,
        f"--init_from={os.path.join(straight, 'ckpt.pt')}",
        '--n_layer=3',
        '--block_size=64',
        '--max_iters=2',
        '--eval_interval=2',
        f'--out_dir={out}',
    )
    ckpt = weights(straight)
    params = GPT(GPTConfig(**ckpt['model_args'])).get_num_params()
    assert f"number of parameters: {params / 1e6:.2f}M\n" in result.stdout  # nanoGPT's line
    config = next(line for line in result.stdout.splitlines() if line.startswith('config: '))
    assert ', n_layer=2,' in config and ', block_size=32,' in config
    assert weights(out)['config']['block_size'] == 32
    # the tokens a logged iteration counts are of the blocks it trained on: 8 windows of 32
    assert read_log(out)[1][2]['tokens'] == 2 * 8 * 32


def copy_of_the_code(folder):
    """train.py and what it imports, copied into folder (to be changed there)."""
    for name in ('train.py', 'model.py', 'configurator.py'):
        shutil.copy(os.path.join(ROOT, name), folder / name)
    shutil.copytree(os.path.join(ROOT, 'nanogpt'), folder / 'nanogpt')


def test_a_model_option_is_one_field_and_one_setting(shakespeare_char, tmp_path):
    # a copy of the code with a new option: a GPTConfig field and a train.py setting, nothing else
    code = tmp_path / 'code'
    code.mkdir()
    copy_of_the_code(code)
    model_py = (code / 'model.py').read_text()
    (code / 'model.py').write_text(
        model_py.replace('class GPTConfig:\n', 'class GPTConfig:\n    rotary: bool = False\n', 1)
    )
    train_py = (code / 'train.py').read_text()
    (code / 'train.py').write_text(
        train_py.replace('\nseed = 1337\n', '\nseed = 1337\nrotary = False\n', 1)
    )
    out = tmp_path / 'out'

    def run(*args):
        subprocess.run(
            [
                sys.executable,
                str(code / 'train.py'),
                '--dataset=shakespeare_char',
                f'--data_dir={shakespeare_char}',
                *TINY,
                '--eval_iters=1',
                f'--out_dir={out}',
                *args,
            ],
            check=True,
            capture_output=True,
            env=hermetic_env(),
        )

    run('--rotary=True', '--max_iters=2', '--eval_interval=2')
    ckpt = weights(out)
    # beside model_args, which keeps nanoGPT's keys: nanoGPT's GPTConfig(**model_args) reads it
    assert ckpt['rotary'] is True and set(ckpt['model_args']) == MODEL_ARGS
    model = GPT(GPTConfig(**ckpt['model_args']))
    torch.nn.Module.load_state_dict(model, ckpt['model'], strict=True)
    # resumed without the setting, the run keeps the checkpoint's value (and saves it again)
    run('--init_from=resume', '--max_iters=4', '--eval_interval=2')
    assert weights(out)['iter_num'] == 4 and weights(out)['rotary'] is True


def test_a_cpu_run_of_the_gpu_config_says_what_is_happening(shakespeare_char, tmp_path):
    # nanoGPT's habit on a CPU: the GPU config, whose first evaluation alone takes many minutes here
    # (batches of 4 instead of 64, so that the stop below comes within seconds: still minutes)
    out = tmp_path / 'out'
    # stderr a terminal of 24 x 100 characters: the evaluation's progress bar shows
    terminal, stderr = pty.openpty()
    fcntl.ioctl(stderr, termios.TIOCSWINSZ, struct.pack('HHHH', 24, 100, 0, 0))
    proc = subprocess.Popen(
        [
            sys.executable,
            os.path.join(ROOT, 'train.py'),
            'config/train_shakespeare_char.py',
            f'--data_dir={shakespeare_char}',
            f'--out_dir={out}',
            '--device=cpu',
            '--batch_size=4',
        ],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env=hermetic_env(),
    )
    os.close(stderr)
    lines, shown = [], []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    threading.Thread(target=lambda: read_terminal(terminal, shown), daemon=True).start()

    def wait_for(condition, timeout=120):
        deadline = time.time() + timeout
        while not condition():
            assert proc.poll() is None and time.time() < deadline, (lines, shown)
            time.sleep(0.05)

    # before the evaluation starts: how long it will take, and the command that suits a CPU
    wait_for(
        lambda: any(line.startswith('note: each evaluation will take about') for line in lines)
    )
    note = next(line for line in lines if line.startswith('note: '))
    assert 'python train.py config/train_shakespeare_char_cpu.py' in note
    wait_for(lambda: 'eval:' in b''.join(shown).decode(errors='replace'))  # its progress
    assert not any(line.startswith('step 0:') for line in lines)
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    proc.wait(timeout=300)
    assert proc.returncode == 0
    assert any('stopped before the first training step; nothing saved' in line for line in lines)
    assert not out.exists()  # as it was


def read_terminal(fd, chunks):
    """Collect what is written to a pseudo-terminal until its other end is closed."""
    try:
        while chunk := os.read(fd, 4096):
            chunks.append(chunk)
    except OSError:  # EIO: the process has ended
        pass
