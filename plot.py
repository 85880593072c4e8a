"""
Plot training runs from their log.jsonl: train and val loss against iterations and against tokens,
learning rate, tokens/s and gradient norm (and HellaSwag acc_norm when it was evaluated), several
runs overlaid with their out_dir as the legend, into one PNG: by default loss.png in the first
run's out_dir (not the repository, where it would make every later run's commit '+dirty').
$ python plot.py out-shakespeare-char-cpu
$ python plot.py out-a out-b --out=compare.png
A last line cut short by a kill is skipped silently; any other line that is not JSON is skipped with
a one-line warning on stderr, so a damaged log still plots what it holds.
"""

import json
import os
import sys

import matplotlib

matplotlib.use('Agg')  # headless: no display needed
import matplotlib.pyplot as plt  # noqa: E402

from configurator import ANY, OutPath, UserError, check  # noqa: E402  (also prints UserError as one line)

# (title, x key, [(y key, rows, line style, legend suffix)]): rows 'train' are the logged iterations
# (loss: that iteration's batch), 'eval' the evaluations (val_loss: eval_iters batches of val.bin),
# each a marker: a run that evaluates a few times draws a few points, not a curve
PANELS = [
    (
        'loss vs iterations',
        'iter',
        [('loss', 'train', '-', ' train'), ('val_loss', 'eval', 'o--', ' val')],
    ),
    (
        'loss vs tokens',
        'tokens',
        [('loss', 'train', '-', ' train'), ('val_loss', 'eval', 'o--', ' val')],
    ),
    ('learning rate', 'iter', [('lr', 'train', '-', '')]),
    ('tokens/s', 'iter', [('tokens_per_s', 'train', '-', '')]),
    ('gradient norm (before clipping)', 'iter', [('grad_norm', 'train', '-', '')]),
    ('hellaswag acc_norm', 'iter', [('hellaswag_acc_norm', 'eval', 'o-', '')]),
]


def read_log(out_dir):
    """(training rows, eval rows) of out_dir/log.jsonl, as lists of dicts in file order."""
    path = os.path.join(out_dir, 'log.jsonl')
    if not os.path.isfile(path):
        raise UserError(f"{out_dir} has no log.jsonl: give the out_dir of a run of train.py")
    with open(path, encoding='utf-8', errors='replace') as f:
        lines = f.read().split('\n')
    rows, bad = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and 'iter' in row:
            rows.append(row)
        # the last line, with no newline after it, is a write cut short by a kill
        elif n < len(lines):
            bad.append(n)
    if bad:
        where = ', '.join(map(str, bad[:5])) + (' ...' if len(bad) > 5 else '')
        print(
            f"warning: {path}: skipped {len(bad)} line(s) that are not log rows (line {where})",
            file=sys.stderr,
        )
    if not rows:
        raise UserError(f"{path} has no logged rows yet")
    return [r for r in rows if 'loss' in r], [r for r in rows if 'val_loss' in r]


def plot(out_dirs):
    """A matplotlib Figure with one axis per panel (in PANELS' order); a run's lines are labelled
    with its
    out_dir, and ' train' or ' val' on the loss panels."""
    logs = {out_dir: read_log(out_dir) for out_dir in out_dirs}
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
    for ax, (title, x_key, series) in zip(axes.flat, PANELS):
        for i, (out_dir, (train_rows, eval_rows)) in enumerate(logs.items()):
            for y_key, which, style, suffix in series:
                rows = [
                    r
                    for r in (train_rows if which == 'train' else eval_rows)
                    if x_key in r and y_key in r
                ]
                if rows:
                    ax.plot(
                        [r[x_key] for r in rows],
                        [r[y_key] for r in rows],
                        style,
                        color=colors[i % len(colors)],
                        label=out_dir + suffix,
                        markersize=5,
                        linewidth=1,
                    )
        ax.set_title(title)
        ax.set_xlabel(x_key)
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.set_visible(False)  # e.g. no run evaluated HellaSwag
        if title.startswith('loss') and ax.lines:
            ax.set_ylabel('loss (solid: train, dashed: val)')
    fig.tight_layout()
    return fig


def check_settings(c):
    """The settings' allowed values, before anything is touched: out a file of a format matplotlib
    writes."""
    if not c['out_dirs']:
        raise UserError("usage: python plot.py OUT_DIR [OUT_DIR ...] [--out=FILE]")
    check(c, dict(out=OutPath(folder=False), out_dirs=ANY))
    formats = matplotlib.figure.Figure().canvas.get_supported_filetypes()
    if os.path.splitext(c['out'])[1][1:].lower() not in formats:
        raise UserError(
            "out must end in a format matplotlib writes "
            f"({', '.join('.' + f for f in sorted(formats))}), got {c['out']!r}"
        )


def main(args):
    out = ''  # '': loss.png in the first out_dir
    out_dirs = []
    for arg in args:
        if arg.startswith('--out='):
            out = arg[len('--out=') :]
        elif arg.startswith('-'):
            raise UserError(
                f"unknown option {arg}: usage: python plot.py OUT_DIR [OUT_DIR ...] [--out=FILE]"
            )
        else:
            out_dirs.append(arg)
    out = out or os.path.join(out_dirs[0] if out_dirs else '', 'loss.png')
    check_settings(dict(out=out, out_dirs=out_dirs))
    fig = plot(out_dirs)
    tmp = out + '.tmp'
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        fig.savefig(tmp, dpi=100, format=os.path.splitext(out)[1][1:].lower())
        os.replace(tmp, out)
    except OSError as e:  # e.g. a full disk
        raise UserError(
            f"cannot write {out} ({e.strerror}); a plot already there is as it was"
        ) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(out)


if __name__ == '__main__':
    main(sys.argv[1:])
