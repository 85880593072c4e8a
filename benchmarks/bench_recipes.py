"""
Whole-process wall time of two training commands, run alternately (A B A B ...) so that a shared
machine's changing load hits both alike: the ratio of the medians, and the median of each pair's
ratio (the two runs of a pair ran back to back, under much the same load); also the CPU time (user +
system) each process used.

    # our CPU recipe against nanoGPT's, both through our train.py
    python benchmarks/bench_recipes.py
    # our train.py against nanoGPT's own, on nanoGPT's recipe (prepare its data first)
    python benchmarks/bench_recipes.py --nanogpt_dir=path/to/nanoGPT --max_iters=300

The first prints each command's final val loss too: the recipe has to reach a lower loss in less
time.
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

# the repository's root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import ROOT, configure

# -----------------------------------------------------------------------------
pairs = 5  # alternating runs of each command; the medians are compared
# a checkout of nanoGPT: time its train.py against ours on its recipe (not our recipe)
nanogpt_dir = ''
max_iters = 2000  # iterations of nanoGPT's recipe
# -----------------------------------------------------------------------------
configure(globals())

# nanoGPT's README command for a CPU ("I only have a macbook"), on top of its
# config/train_shakespeare_char.py
NANOGPT_RECIPE = [
    'config/train_shakespeare_char.py',
    '--device=cpu',
    '--compile=False',
    '--eval_iters=20',
    '--log_interval=1',
    '--block_size=64',
    '--batch_size=12',
    '--n_layer=4',
    '--n_head=4',
    '--n_embd=128',
    f'--max_iters={max_iters}',
    f'--lr_decay_iters={max_iters}',
    '--dropout=0.0',
]
ours = [sys.executable, os.path.join(ROOT, 'train.py')]
if nanogpt_dir:
    commands = {
        'ours': (ours + NANOGPT_RECIPE, ROOT),
        'nanoGPT': ([sys.executable, 'train.py'] + NANOGPT_RECIPE, os.path.abspath(nanogpt_dir)),
    }
else:
    commands = {
        'recipe': (ours + ['config/train_shakespeare_char_cpu.py'], ROOT),
        "nanoGPT's recipe": (ours + NANOGPT_RECIPE, ROOT),
    }
print(f"load average {os.getloadavg()[0]:.2f} at the start")
times = {name: [] for name in commands}
cpu = {name: [] for name in commands}
losses = {}
with tempfile.TemporaryDirectory() as tmp:
    for i in range(pairs):
        for name, (command, cwd) in commands.items():
            out_dir = os.path.join(tmp, f'{i}-{len(times[name])}-{name[:4]}')
            t0, usage = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
            subprocess.run(
                command + [f'--out_dir={out_dir}'], cwd=cwd, check=True, stdout=subprocess.DEVNULL
            )
            times[name].append(time.perf_counter() - t0)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu[name].append(after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime)
            log = os.path.join(out_dir, 'log.jsonl')
            if os.path.exists(log):  # nanoGPT's train.py writes none
                with open(log) as f:
                    losses[name] = [
                        json.loads(line)['val_loss'] for line in f if 'val_loss' in line
                    ][-1]
            val = f", val loss {losses[name]:.4f}" if name in losses else ""
            print(f"{name}: {times[name][-1]:.1f} s, cpu {cpu[name][-1]:.1f} s{val}")
print(f"load average {os.getloadavg()[0]:.2f} at the end")
(a, ta), (b, tb) = ((name, statistics.median(t)) for name, t in times.items())
print(
    f"median wall time: {a} {ta:.1f} s, {b} {tb:.1f} s; {a} is {tb / ta:.2f}x as fast (ranges "
    f"{min(times[a]):.1f}-{max(times[a]):.1f} and {min(times[b]):.1f}-{max(times[b]):.1f} s)"
)
ratios = sorted(x / y for x, y in zip(times[b], times[a]))
print(
    f"per pair: {a} is {statistics.median(ratios):.2f}x as fast "
    f"(median of {len(ratios)} pairs, range "
    f"{ratios[0]:.2f}-{ratios[-1]:.2f})"
)
print(
    f"median cpu time: {a} {statistics.median(cpu[a]):.1f} s, {b} {statistics.median(cpu[b]):.1f} s"
)
