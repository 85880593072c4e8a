"""
The out_dir a training run writes to: one run at a time (a lock), a new run never replaces an
earlier one unasked, and the run's log. Each log row goes, in one call, to every sink: a line on
stdout, a JSON line in out_dir/log.jsonl (plot.py reads it; no account needed) and wandb when it is
on; log.jsonl is kept in memory until the run's first checkpoint, so a run that fails or is stopped
before it leaves out_dir as it found it.
"""

import atexit
import contextlib
import fcntl
import json
import os
import shlex
import sys
import time

from nanogpt import checkpoints
from configurator import UserError

_locks = []  # the locked out_dirs' file descriptors, open (so locked) until the process ends


def lock_out_dir(out_dir, wait=0.0):
    """Make out_dir if need be and hold an exclusive lock on it for the rest of this process's life,
    so that one run at a time writes there. The lock is flock(2) on the folder itself, which writes
    nothing into it; the kernel releases it when the process ends, however it ends (a SIGKILL leaves
    no stale lock). A held lock is refused in one line naming the process that holds it, after
    trying for `wait` seconds (a job that torchrun restarts, whose previous processes may still be
    ending). A folder this made is removed at exit if the run left it empty. On a filesystem that
    cannot lock a folder (some network filesystems), out_dir/.lock is locked."""
    if not os.path.isdir(out_dir):
        try:
            os.makedirs(out_dir)
        except OSError as e:
            raise UserError(
                f"cannot make out_dir {out_dir} ({e.strerror}); choose another with --out_dir="
            ) from None
        atexit.register(remove_if_empty, out_dir)
    # e.g. a read-only filesystem: refused now, not at the first save
    if not os.access(out_dir, os.W_OK):
        raise UserError(f"cannot write to out_dir {out_dir}; choose another with --out_dir=")
    fd, lock_file = os.open(out_dir, os.O_RDONLY), None
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.5)
                continue
            holder = lock_holder(fd)
            os.close(fd)
            raise UserError(
                f"{out_dir} is in use by another run ({holder}): one run at a time writes there; "
                "wait for it to end, or choose another --out_dir="
            ) from None
        except OSError as e:  # the filesystem cannot flock a folder: a lock file instead, once
            os.close(fd)
            if lock_file:
                raise UserError(
                    f"cannot lock {lock_file} ({e.strerror}): out_dir must be on a filesystem with "
                    "file locks"
                ) from None
            lock_file = os.path.join(out_dir, '.lock')
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    _locks.append(fd)


def lock_holder(fd):
    """'process <pid>' holding an flock on fd's file, from /proc/locks (Linux), else 'another
    process'."""
    st = os.fstat(fd)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open('/proc/locks') as f:
            pids = [
                line.split()[4]
                for line in f
                if line.split()[1:2] == ['FLOCK'] and inode in line.split()
            ]
    except OSError:
        pids = []
    return f"process {pids[0]}" if pids and pids[0] not in ('0', '-1') else "another process"


def remove_if_empty(folder):
    with contextlib.suppress(OSError):
        os.rmdir(folder)  # only ever removes an empty folder


def check_new_run(out_dir, init_from, overwrite):
    """A new run (init_from other than 'resume') in an out_dir that holds a checkpoint would replace
    it at its first save: refused, with the command that continues that run, unless overwrite
    (docs/checkpoints.md). A checkpoint of iteration 0 holds no training (earlier versions saved one
    when stopped during the first evaluation): it is replaced without asking."""
    path = os.path.join(out_dir, 'ckpt.pt')
    if init_from == 'resume' or not os.path.exists(path) or overwrite:
        return
    try:
        if checkpoints.load_checkpoint(path, keys=('iter_num',))['iter_num'] == 0:
            print(f"note: {path} holds no training (iteration 0): this run replaces it")
            return
    except UserError:
        pass  # unreadable: whatever it is, it is not ours to replace unasked
    argv = [a for a in sys.argv[1:] if not a.startswith(('--init_from=', '--overwrite='))]
    command = shlex.join(['python', sys.argv[0], *argv])
    raise UserError(
        f"{path} holds an earlier run: continue it with {command}"
        " --init_from=resume, or start over with --overwrite=True (it is replaced at the new run's"
        " first save) or another --out_dir="
    )


def start_wandb(out_dir, project, name, config):
    import wandb  # imported here: it takes seconds, and only this needs it

    try:
        return wandb.init(project=project, name=name, config=config, dir=out_dir)
    except Exception as e:  # not logged in, no network, ...: wandb's own errors, of many kinds
        raise UserError(
            f"wandb did not start ({checkpoints.reason(e)}): log in with wandb login, set "
            "WANDB_MODE=offline, or leave out --wandb_log=True"
        ) from None


def wandb_name(key):
    """A log.jsonl key as wandb charts it: a split's metrics under the split, as nanoGPT names the
    losses ('train_loss' -> 'train/loss', 'hellaswag_acc' -> 'hellaswag/acc'); an iteration's own
    loss 'train/loss_step'."""
    if key == 'loss':
        return 'train/loss_step'
    split, _, name = key.partition('_')
    return f'{split}/{name}' if name and split in ('train', 'val', 'hellaswag') else key


def duration(seconds):
    """'45s', '7m05s' or '2h13m': a time to wait, as a person reads it."""
    s = round(seconds)
    return (
        f"{s}s"
        if s < 60
        else f"{s // 60}m{s % 60:02d}s"
        if s < 3600
        else f"{s // 3600}h{s // 60 % 60:02d}m"
    )


class RunLog:
    """A run's log: log(row, line) prints line and writes row (a dict with 'iter') to log.jsonl and
    to wandb (a started run, or None), so a new metric is one more key of a row. log.jsonl holds the
    rows of the run it resumes before iter_num (none when it starts fresh: later ones belong to
    iterations it is about to redo; lines cut short by a kill go too), then its own. Until commit(),
    at the run's first checkpoint, its rows wait in memory, so that a run that fails or stops before
    its first save leaves the log it found; from then on each row is appended as it comes."""

    def __init__(self, path, iter_num, wandb_run=None):
        def before(line):
            try:
                return json.loads(line)['iter'] < iter_num
            except (ValueError, KeyError, TypeError, RecursionError):
                return False

        self.path, self.unsaved, self.wandb = path, [], wandb_run
        if os.path.exists(path):
            with open(path, errors='replace') as f:
                self.unsaved = [line for line in f if before(line)]

    def __call__(self, row, line):
        print(line)
        if self.unsaved is None:
            self.write([json.dumps(row) + '\n'], 'a')
        else:
            self.unsaved.append(json.dumps(row) + '\n')
        if self.wandb:
            self.wandb.log({wandb_name(k): v for k, v in row.items()})

    def commit(self):
        """Write the rows kept in memory: the run's first checkpoint has just been written (the log
        goes with it), or the run ended without one (eval_only); a no-op after the first time."""
        if self.unsaved is not None:
            self.write(self.unsaved, 'w')
            self.unsaved = None

    def write(self, lines, mode):
        """Append lines, or write them as the whole file atomically (a temporary file renamed over
        it)."""
        path = self.path if mode == 'a' else self.path + '.tmp'
        try:
            with open(path, mode) as f:
                f.writelines(lines)
                f.flush()
                os.fsync(f.fileno())
            os.replace(path, self.path)
        except OSError as e:
            if mode == 'w' and os.path.exists(path):
                os.remove(path)
            raise UserError(
                f"cannot write the log {self.path} ({e.strerror}); the checkpoint beside it is "
                "intact"
            ) from None
