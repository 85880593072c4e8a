"""Nothing in out_dir is lost: one run at a time (an OS lock, which a SIGKILL releases), a run that
fails or is stopped before its first save leaves out_dir as it found it (bytes and mtimes), a
forgotten --init_from=resume is refused with the command that continues the run, a full disk while
saving is one line with the previous checkpoint intact, and a stop signal ends even a long
evaluation at once. The real train.py, in subprocesses."""

import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from nanogpt.checkpoints import load_checkpoint
from nanogpt.outdir import RunLog
from configurator import UserError
from conftest import error_line, hermetic_env, read_log
from test_train import assert_same_run

RUN = [
    '--max_iters=8',
    '--eval_interval=4',
    '--eval_iters=2',
    '--learning_rate=1e-2',
    '--warmup_iters=2',
    '--lr_decay_iters=8',
    '--min_lr=1e-3',
    '--dropout=0.1',
]


def snapshot(folder):
    """Every file under folder: relative path -> (size, mtime in ns, bytes); None when folder does
    not exist."""
    if not os.path.isdir(folder):
        return None
    files = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, 'rb') as f:
                files[os.path.relpath(path, folder)] = (
                    os.stat(path).st_size,
                    os.stat(path).st_mtime_ns,
                    f.read(),
                )
    return files


@pytest.fixture(scope='module')
def alone(train, tmp_path_factory):
    """RUN trained alone: its out_dir, also the earlier run that later runs must not lose."""
    out = tmp_path_factory.mktemp('alone')
    train(*RUN, f'--out_dir={out}')
    return out


@pytest.fixture
def earlier(alone, tmp_path):
    """A copy of the run alone (ckpt.pt and log.jsonl, mtimes kept) in a fresh out_dir."""
    out = tmp_path / 'out'
    shutil.copytree(alone, out)
    return out


def start(train_command, *args, **env):
    return subprocess.Popen(
        train_command(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=hermetic_env(**env),
    )


def test_two_runs_started_together_into_one_out_dir(train_command, alone, tmp_path):
    out = tmp_path / 'out'
    procs = [start(train_command, *RUN, f'--out_dir={out}') for _ in range(2)]
    results = [(p, *p.communicate(timeout=240)) for p in procs]
    done = [r for r in results if r[0].returncode == 0]
    refused = [r for r in results if r[0].returncode != 0]
    assert len(done) == 1 and len(refused) == 1, results
    winner, (loser, stdout, stderr) = done[0][0], refused[0]
    line = error_line(subprocess.CompletedProcess(loser.args, loser.returncode, stdout, stderr))
    # refused by the lock while the winner runs or, if it came late, by the winner's checkpoint:
    # never both writing
    assert (
        line
        == f"error: {out} is in use by another run (process {winner.pid}): one run at a time "
        "writes there; wait for it to end, or choose another --out_dir="
        or line.startswith(f"error: {out / 'ckpt.pt'} holds")
    )
    assert_same_run(out, alone)  # the winner's checkpoint and log, as if it had run alone
    assert sorted(os.listdir(out)) == ['ckpt.pt', 'log.jsonl']


def wait_until(condition, proc, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"timed out after {timeout} s"
        time.sleep(0.02)


def catches(pid, signum):
    """Whether process pid has a handler of its own for signal signum (its SigCgt mask in /proc)."""
    with open(f'/proc/{pid}/status') as f:
        caught = int(next(line for line in f if line.startswith('SigCgt:')).split()[1], 16)
    return bool(caught >> (signum - 1) & 1)


def test_a_held_lock_refuses_and_a_sigkill_releases_it(train, train_command, earlier):
    # a long run of the earlier run's continuation, which saves every 2 iterations
    holder = start(
        train_command,
        *RUN,
        '--init_from=resume',
        '--max_iters=100000',
        '--eval_interval=2',
        f'--out_dir={earlier}',
    )
    first = os.stat(earlier / 'ckpt.pt').st_mtime_ns
    # it runs and holds the lock
    wait_until(lambda: os.stat(earlier / 'ckpt.pt').st_mtime_ns != first, holder)
    line = error_line(train(*RUN, '--init_from=resume', f'--out_dir={earlier}', check=False))
    assert line.startswith(f"error: {earlier} is in use by another run (process {holder.pid}): ")
    holder.kill()  # SIGKILL: no handler, no clean-up, the kernel releases the lock
    holder.wait()
    iter_num = load_checkpoint(str(earlier / 'ckpt.pt'))['iter_num']
    result = train(
        *RUN, '--init_from=resume', f'--max_iters={iter_num + 2}', f'--out_dir={earlier}'
    )
    assert 'resuming training from' in result.stdout


def test_a_torchrun_job_is_refused_on_every_rank(train, earlier):
    # a holder that imports nothing heavy: flock on the folder, as train.py's rank 0 takes it
    holder = subprocess.Popen(
        [
            sys.executable,
            '-c',
            "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()",
            str(earlier),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == 'locked\n'
        before = snapshot(earlier)
        result = train(
            *RUN,
            '--init_from=resume',
            f'--out_dir={earlier}',
            check=False,
            torchrun=['--standalone', '--nproc_per_node=2'],
        )
        message = (
            f"error: {earlier} is in use by another run (process {holder.pid}): one run at a time "
            "writes there"
        )
        # each rank, at once
        assert result.returncode != 0 and result.stderr.count(message) == 2, result.stderr
        assert snapshot(earlier) == before
    finally:
        holder.communicate('')


def test_forgotten_resume_is_refused_with_the_command_that_continues(train, earlier):
    before = snapshot(earlier)
    result = train(*RUN, f'--out_dir={earlier}', check=False)
    line = error_line(result)
    command = re.fullmatch(
        rf"error: {earlier / 'ckpt.pt'} holds an earlier run: continue it with (.*), or start "
        r"over with --overwrite=True \(it is replaced at the new run's first save\) or another "
        r"--out_dir=",
        line,
    ).group(1)
    assert snapshot(earlier) == before
    argv = shlex.split(command)
    assert argv[0] == 'python' and argv[-1] == '--init_from=resume'
    continued = subprocess.run(
        [sys.executable, *argv[1:], '--max_iters=10'],
        capture_output=True,
        text=True,
        env=hermetic_env(),
    )
    assert continued.returncode == 0, continued.stderr
    assert load_checkpoint(str(earlier / 'ckpt.pt'))['iter_num'] == 10
    # asked to, a new run replaces it
    train(*RUN, '--max_iters=4', '--overwrite=True', f'--out_dir={earlier}')
    assert load_checkpoint(str(earlier / 'ckpt.pt'))['iter_num'] == 4


@pytest.mark.parametrize('case', ['nan', 'wandb_without_login', 'new_out_dir'])
def test_a_failed_start_touches_nothing(train, earlier, tmp_path, case):
    """Failures after the lock is taken, each before the run's first save: out_dir as it was, bytes
    and mtimes."""
    # even a run allowed to replace the earlier one
    out, env, args = earlier, hermetic_env(), ['--overwrite=True']
    if case == 'nan':  # diverges at once, before its first evaluation at iter 4
        args += ['--learning_rate=1e6', '--decay_lr=False']
        expected = r"error: loss is (nan|inf|-inf) at iter \d: training diverged"
    elif case == 'wandb_without_login':
        args += ['--wandb_log=True']
        env = hermetic_env(WANDB_MODE='online', HOME=str(tmp_path), WANDB_API_KEY='')
        expected = r"error: wandb did not start \(.*\): log in with wandb login"
    else:  # an out_dir that did not exist is not left behind, empty
        out = tmp_path / 'new' / 'out'
        args += ['--learning_rate=1e6', '--decay_lr=False']
        expected = r"error: loss is"
    before = snapshot(out)
    line = error_line(train(*RUN, *args, f'--out_dir={out}', check=False, env=env))
    assert re.match(expected, line), line
    assert snapshot(out) == before


def test_ctrl_c_during_start_up_is_one_quiet_line(train_command, earlier):
    before = snapshot(earlier)
    proc = start(train_command, *RUN, '--overwrite=True', f'--out_dir={earlier}')

    def importing_torch():
        with open(f'/proc/{proc.pid}/maps') as f:
            return 'libtorch' in f.read()

    wait_until(importing_torch, proc)
    # still starting: the loop's stop handler is not installed yet
    assert not catches(proc.pid, signal.SIGTERM)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0 and stderr.strip() == 'interrupted', stderr
    assert snapshot(earlier) == before


def test_a_stop_before_the_first_step_leaves_out_dir_as_it_was(train_command, alone, tmp_path):
    out = tmp_path / 'out'
    # hours of evaluation at iter 0: the stop comes before any training step
    command = [*RUN, '--eval_iters=1000000', f'--out_dir={out}']
    for attempt in ('new out_dir', 'out_dir holding a checkpoint of iteration 0'):
        before = snapshot(out)
        proc = start(train_command, *command)  # the same command each time, no --overwrite
        # the loop's stop handler is in place (SIGINT is caught from the start: configurator)
        wait_until(lambda: catches(proc.pid, signal.SIGTERM), proc)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        assert 'SIGINT received: stopped before the first training step; nothing saved' in stdout
        assert 'best val loss' not in stdout  # no evaluation finished
        assert snapshot(out) == before, attempt
        if before is None:  # next: what earlier versions left after such a stop, which holds no
            # training and blocks nothing
            out.mkdir()
            torch.save(dict(load_checkpoint(str(alone / 'ckpt.pt')), iter_num=0), out / 'ckpt.pt')


def test_a_stop_signal_ends_a_long_evaluation_and_saves(train, train_command, earlier):
    # continues the run at iter 8: a save at iter 9 (so log.jsonl shows iter 9), then hours of
    # evaluation at iter 10
    args = [*RUN, '--init_from=resume', f'--out_dir={earlier}', '--max_iters=100']
    args += ['--checkpoint_interval=9', '--eval_interval=10', '--eval_iters=1000000']
    proc = start(train_command, *args)
    wait_until(lambda: 9 in read_log(earlier)[0], proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)  # within a batch, not hours
    assert proc.returncode == 0, stderr
    assert 'SIGTERM received: saved a checkpoint at iter 10' in stdout
    assert load_checkpoint(str(earlier / 'ckpt.pt'))['iter_num'] == 10
    train(*RUN, '--init_from=resume', '--max_iters=12', f'--out_dir={earlier}')
    assert read_log(earlier)[1][12]['val_loss'] > 0  # and it continues from there


def test_full_disk_while_logging_is_one_line(tmp_path):
    log = RunLog(str(tmp_path / 'log.jsonl'), 0)
    log({'iter': 0, 'loss': 4.2}, 'iter 0: loss 4.2')
    log.commit()  # the first save: from now on each row is appended
    before = (tmp_path / 'log.jsonl').read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    # write() fails with EFBIG past it
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) + 10, hard))
    try:
        with pytest.raises(UserError) as e:
            log({'iter': 1, 'loss': 4.1, 'note': 'x' * 100}, 'iter 1: loss 4.1')
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert (
        str(e.value)
        == f"cannot write the log {tmp_path / 'log.jsonl'} (File too large); the checkpoint "
        "beside it is intact"
    )


def limit_file_size(limit):
    """A preexec_fn: no file of the process may grow past limit bytes (write() then fails with
    EFBIG, SIGXFSZ being ignored), standing in for a full disk where no small filesystem can be
    mounted."""

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def small_tmpfs(path, size):
    """Mount a tmpfs of size bytes at path (as root, where permitted); False where it cannot be
    done."""
    path.mkdir()
    if os.geteuid() != 0 or not shutil.which('mount'):
        return False
    return (
        subprocess.run(
            ['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)], capture_output=True
        ).returncode
        == 0
    )


def test_full_disk_while_saving_is_one_line(train_command, alone, tmp_path):
    size = os.path.getsize(alone / 'ckpt.pt')
    disk = tmp_path / 'disk'
    # room for ckpt.pt and the log, not for a second checkpoint
    mounted = small_tmpfs(disk, size * 3 // 2)
    try:
        out = disk / 'out'
        shutil.copytree(alone, out)
        before = snapshot(out)
        cmd = train_command(*RUN, '--init_from=resume', '--max_iters=12', f'--out_dir={out}')
        result = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            env=hermetic_env(),
            timeout=240,
            preexec_fn=None if mounted else limit_file_size(size // 2),
        )
        line = error_line(result)
        reason = 'No space left on device' if mounted else 'File too large'
        assert re.fullmatch(
            rf"error: cannot write the checkpoint {out / 'ckpt.pt'} \((.*)\); {out / 'ckpt.pt'} is "
            r"intact, as before this write",
            line,
        ), line
        assert reason in line or 'unexpected pos' in line, line
        assert snapshot(out) == before  # no .tmp left, the checkpoint and the log as they were
        assert torch.equal(
            load_checkpoint(str(out / 'ckpt.pt'))['model']['lm_head.weight'],
            load_checkpoint(str(alone / 'ckpt.pt'))['model']['lm_head.weight'],
        )
    finally:
        if mounted:
            subprocess.run(['umount', str(disk)], check=True)
