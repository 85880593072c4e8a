"""plot.py draws exactly the logged values, survives a log cut short by a kill, refuses a missing
log in one line."""

import json
import os
import shutil
import subprocess
import sys

import matplotlib.image
import pytest

from conftest import ROOT, error_line, hermetic_env, read_log

sys.path.insert(0, ROOT)
import plot  # noqa: E402


def plot_command(*args, cwd):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, 'plot.py'), *args],
        capture_output=True,
        text=True,
        env=hermetic_env(),
        cwd=cwd,
        timeout=120,
    )


def lines_of(fig, title):
    ax = next(ax for ax in fig.axes if ax.get_title() == title)
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines}


@pytest.fixture(scope='module')
def two_runs(train_command, tmp_path_factory):
    """Two short real runs with different learning rates, side by side."""
    tmp = tmp_path_factory.mktemp('runs')
    procs = [
        subprocess.Popen(
            train_command(
                f'--out_dir={name}',
                '--max_iters=12',
                '--eval_interval=4',
                '--eval_iters=2',
                '--log_interval=2',
                f'--learning_rate={lr}',
            ),
            cwd=tmp,
            env=hermetic_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, lr in (('run-a', 1e-3), ('run-b', 1e-2))
    ]
    for p in procs:
        output, _ = p.communicate(timeout=240)
        assert p.returncode == 0, output
    return tmp


def test_lines_hold_the_logged_values(two_runs, monkeypatch):
    monkeypatch.chdir(two_runs)
    fig = plot.plot(['run-a', 'run-b'])
    for run in ('run-a', 'run-b'):
        rows, evals = read_log(two_runs / run)
        train_rows, eval_rows = list(rows.values()), list(evals.values())
        assert len(train_rows) == 6 and len(eval_rows) == 4
        loss = lines_of(fig, 'loss vs iterations')
        assert loss[f'{run} train'] == (
            [r['iter'] for r in train_rows],
            [r['loss'] for r in train_rows],
        )
        assert loss[f'{run} val'] == (
            [r['iter'] for r in eval_rows],
            [r['val_loss'] for r in eval_rows],
        )
        by_tokens = lines_of(fig, 'loss vs tokens')
        assert by_tokens[f'{run} train'] == (
            [r['tokens'] for r in train_rows],
            [r['loss'] for r in train_rows],
        )
        # batch 4 x block 32
        assert by_tokens[f'{run} val'][0] == [r['iter'] * 4 * 32 for r in eval_rows]
        for title, key in (
            ('learning rate', 'lr'),
            ('tokens/s', 'tokens_per_s'),
            ('gradient norm (before clipping)', 'grad_norm'),
        ):
            assert lines_of(fig, title)[run] == (
                [r['iter'] for r in train_rows],
                [r[key] for r in train_rows],
            )
    assert not next(ax for ax in fig.axes if ax.get_title() == 'hellaswag acc_norm').get_visible()
    # the command line: one PNG, by default loss.png in the first run's out_dir (nothing written
    # where it runs), its path printed
    result = plot_command('run-a', 'run-b', cwd=two_runs)
    png = os.path.join('run-a', 'loss.png')
    assert result.returncode == 0 and result.stdout.strip() == png and result.stderr == '', (
        result.stderr
    )
    assert not (two_runs / 'loss.png').exists()
    image = matplotlib.image.imread(two_runs / png)
    assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0


def test_killed_log_still_plots_and_bad_input(two_runs, tmp_path):
    killed = tmp_path / 'killed'
    shutil.copytree(two_runs / 'run-a', killed)
    log = killed / 'log.jsonl'
    text = log.read_text()
    # a write cut short by a kill: no newline, half a row
    log.write_text(text + text.splitlines()[-1][:25])
    out = tmp_path / 'plots' / 'killed.png'
    result = plot_command(str(killed), f'--out={out}', cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == str(out) and result.stderr == '', (
        result.stderr
    )
    assert matplotlib.image.imread(out).shape[2] in (3, 4)
    rows = [json.loads(line) for line in text.splitlines()]
    train_rows = [r for r in rows if 'loss' in r]
    assert lines_of(plot.plot([str(killed)]), 'loss vs iterations')[f'{killed} train'][1] == [
        r['loss'] for r in train_rows
    ]
    # a damaged line in the middle: skipped with a one-line warning
    lines = text.splitlines(keepends=True)
    log.write_text(''.join(lines[:3] + ['{"iter": 4, "lo\n'] + lines[3:]))
    result = plot_command(str(killed), f'--out={out}', cwd=tmp_path)
    assert result.returncode == 0
    assert (
        result.stderr.strip() == f"warning: {log}: skipped 1 line(s) that are not log rows (line 4)"
    )
    # an out_dir without log.jsonl, and no out_dir at all
    (tmp_path / 'empty').mkdir()
    assert (
        error_line(plot_command(str(tmp_path / 'empty'), str(killed), cwd=tmp_path))
        == f"error: {tmp_path / 'empty'} has no log.jsonl: give the out_dir of a run of train.py"
    )
    assert 'usage: python plot.py OUT_DIR' in error_line(plot_command(cwd=tmp_path))
