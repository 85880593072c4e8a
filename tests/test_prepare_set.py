"""A prepare script replaces a data folder's files as one set. Interrupted at every point between
its writes (driven deterministically: the n-th rename or removal raises KeyboardInterrupt, as a
Ctrl-C there would), the folder holds the earlier set, the new set, or a mix that train.py refuses
in one line; it never trains on a mix. A mix made otherwise (files copied in, a prepare from before
the marker) is refused too."""

import os
import resource
import shutil
import subprocess
import sys

import pytest

from nanogpt import tokenizer
from configurator import UserError
from conftest import ROOT, SHAKESPEARE, error_line, hermetic_env

sys.path.insert(0, os.path.join(ROOT, 'data'))
import prepare_text  # noqa: E402

MIXED = "holds a mix of"


def contents(folder):
    """name -> bytes of every file in folder."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def snapshot(folder):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


@pytest.fixture(scope='module')
def texts():
    if not os.path.isfile(SHAKESPEARE):
        pytest.skip(f"{SHAKESPEARE} not found")
    text = open(SHAKESPEARE, encoding='utf-8').read()
    # the second has fewer characters: another vocabulary
    return text[:20000], text[20000:32000].lower()


def prepare(folder, text, kind, capsys):
    os.makedirs(folder, exist_ok=True)
    prepare_text.prepare(text, str(folder), kind)
    capsys.readouterr()


class Interrupt:
    """os.replace and os.remove, counted; the n-th call (from 0) raises KeyboardInterrupt instead of
    acting."""

    def __init__(self, monkeypatch, n):
        self.calls, self.n = 0, n
        for name in ('replace', 'remove'):
            real = getattr(os, name)
            monkeypatch.setattr(os, name, self.wrap(real))

    def wrap(self, real):
        def call(*args, **kwargs):
            self.calls += 1
            if self.calls - 1 == self.n:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        return call


@pytest.mark.parametrize('kind', ['char', 'gpt2'])
def test_interrupted_at_every_point_between_writes(tmp_path, monkeypatch, capsys, texts, kind):
    old_text, new_text = texts
    prepare(tmp_path / 'old', old_text, 'char', capsys)
    prepare(tmp_path / 'new', new_text, kind, capsys)
    old, new = contents(tmp_path / 'old'), contents(tmp_path / 'new')
    with monkeypatch.context() as m:  # how many renames and removals a whole replacement makes
        counter = Interrupt(m, -1)
        shutil.copytree(tmp_path / 'old', tmp_path / 'count')
        prepare(tmp_path / 'count', new_text, kind, capsys)
    assert contents(tmp_path / 'count') == new
    outcomes = []
    for n in range(counter.calls + 1):
        folder = tmp_path / f'interrupted_{n}'
        shutil.copytree(tmp_path / 'old', folder)
        with monkeypatch.context() as m:
            Interrupt(m, n)
            try:
                prepare(folder, new_text, kind, capsys)
            except KeyboardInterrupt:
                pass
        state = contents(folder)
        if state in (old, new):
            outcomes.append('old' if state == old else 'new')
            continue
        with pytest.raises(UserError, match=MIXED):
            tokenizer.data_tokenizer(str(folder))
        outcomes.append('refused')
    # the first call puts the marker in place, the last the new record; everything between is
    # refused
    assert outcomes == ['old'] + ['refused'] * (counter.calls - 1) + ['new'], outcomes


def test_train_refuses_a_mixed_folder_in_one_line(
    train_command, tmp_path, monkeypatch, capsys, texts
):
    old_text, new_text = texts
    prepare(tmp_path / 'old', old_text, 'char', capsys)
    prepare(tmp_path / 'new', new_text, 'char', capsys)
    # interrupted after the marker and train.bin; and a mix without a marker: the new .bin files
    # beside the old tokenizer.json and meta.pkl (what an interrupted prepare of before the marker
    # left)
    interrupted = tmp_path / 'interrupted'
    shutil.copytree(tmp_path / 'old', interrupted)
    with monkeypatch.context() as m:
        Interrupt(m, 2)
        with pytest.raises(KeyboardInterrupt):
            prepare(interrupted, new_text, 'char', capsys)
    copied = tmp_path / 'copied'
    shutil.copytree(tmp_path / 'old', copied)
    for name in ('train.bin', 'val.bin'):
        shutil.copy(tmp_path / 'new' / name, copied / name)
    for folder, message in [
        (
            interrupted,
            "holds a mix of two prepared sets: the prepare script that was replacing "
            "its files was interrupted; run it again",
        ),
        (
            copied,
            "holds a mix of prepared sets: train.bin has 10,800 tokens where tokenizer.json "
            "counted 18,000; prepare the data again",
        ),
    ]:
        before = snapshot(folder)
        out = tmp_path / f'out_{folder.name}'
        cmd = [
            a
            for a in train_command(f'--out_dir={out}', '--max_iters=2')
            if not a.startswith('--data_dir=')
        ]
        result = subprocess.run(
            [*cmd, f'--data_dir={folder}'], capture_output=True, text=True, env=hermetic_env()
        )
        assert error_line(result) == f"error: {folder} {message}"
        assert snapshot(folder) == before and not out.exists()


def test_full_disk_while_preparing_is_one_line(tmp_path, capsys, texts):
    from test_out_dir import small_tmpfs

    old_text, _ = texts
    disk = tmp_path / 'disk'
    # room for the earlier set (~40 kB of ids), not for a second
    mounted = small_tmpfs(disk, 80_000)
    try:
        prepare(disk / 'data', old_text, 'char', capsys)
        before = snapshot(disk / 'data')
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        # no file may grow past 50 kB instead (write() fails with EFBIG; Python ignores SIGXFSZ)
        if not mounted:
            resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, hard))
        try:
            with pytest.raises(UserError) as e:
                prepare(disk / 'data', old_text * 4, 'char', capsys)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        reason = 'No space left on device' if mounted else 'File too large'
        assert (
            str(e.value)
            == f"cannot write the output files in {disk / 'data'} ({reason}); the files there "
            "are as they were"
        )
        assert snapshot(disk / 'data') == before
    finally:
        if mounted:
            subprocess.run(['umount', str(disk)], check=True)
