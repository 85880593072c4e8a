"""
Benchmark data/openwebtext/prepare.py: throughput (tokens/s) and peak memory on synthetic local
corpora of a few sizes, to show that memory stays flat as the corpus grows. Not a test; run it by
hand:

    python data/openwebtext/bench_prepare.py                      # 100 MB and 250 MB corpora
    python data/openwebtext/bench_prepare.py --sizes_mb=1000 --num_proc=8
    python data/openwebtext/bench_prepare.py --corpus_format=archives  # the hub repository's layout

Each corpus is a folder of .jsonl files of documents (0.5-9 KB, like OpenWebText's) cut at random
from a real English text (tiny Shakespeare when found, else synthetic words), or with
--corpus_format=archives the same documents as .txt files in the hub repository's layout
(subsets/*.tar of .xz tars, 1,000 a .xz). prepare.py runs in a fresh process with an empty datasets
cache, offline. Peak memory is reported three ways: the largest single process's RSS (wait4's
rusage, children included, as /usr/bin/time -v shows it); the peak sum of PSS over the whole process
tree (main + datasets' worker processes), sampled every 0.1 s; and the anonymous part of that sum,
i.e. without pages of memory-mapped files, which the kernel can drop at any time.
"""

import io
import json
import lzma
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from configurator import configure

# -----------------------------------------------------------------------------
sizes_mb = None  # MB of text per corpus: --sizes_mb=1000 or --sizes_mb=100,250 (the default)
num_proc = os.cpu_count() or 1  # passed on to prepare.py
# cut into documents
base_text = os.path.join(ROOT, '..', 'shared', 'data', 'tinyshakespeare', 'input.txt')
# corpora, datasets cache and outputs (deleted)
work_dir = os.path.join(tempfile.gettempdir(), 'bench_prepare')
seed = 1337
# 'jsonl', or 'archives': OpenWebText's hub layout, read as the loading script reads it
corpus_format = 'jsonl'
# -----------------------------------------------------------------------------
configure(globals())


def base():
    for path in (base_text, os.path.join(ROOT, 'data', 'shakespeare_char', 'input.txt')):
        if os.path.exists(path):
            with open(path, encoding='utf-8') as f:
                return f.read()
    rng = random.Random(seed)  # synthetic fallback: Zipf-distributed pseudo-words in sentences
    words = [
        ''.join(rng.choice('etaoinshrdlucmfwypvbgk') for _ in range(rng.randint(1, 9)))
        for _ in range(5000)
    ]
    weights = [1 / (i + 1) for i in range(len(words))]
    sentences = (
        ' '.join(rng.choices(words, weights, k=rng.randint(4, 25))).capitalize() + '.'
        for _ in range(40000)
    )
    return '\n'.join(sentences)


def make_corpus(folder, size_mb, text):
    """Documents of 0.5-9 KB (4.75 KB on average, like OpenWebText) cut from random places in text,
    1,000 per .jsonl file, until size_mb MB of text is written."""
    rng = random.Random(seed)
    os.makedirs(folder)
    written, n_docs, f = 0, 0, None
    while written < size_mb * 1e6:
        if n_docs % 1000 == 0:
            if f:
                f.close()
            f = open(
                os.path.join(folder, f'part-{n_docs // 1000:05d}.jsonl'), 'w', encoding='utf-8'
            )
        length = rng.randint(500, 9000)
        start = rng.randrange(len(text) - length)
        f.write(json.dumps({'text': text[start : start + length]}) + '\n')
        written += length
        n_docs += 1
    f.close()
    if corpus_format == 'archives':
        to_archives(folder)
    return n_docs, written


def tar_add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def to_archives(folder):
    """Turn the .jsonl parts into subsets/urlsf_subsetNN.tar files (10 .xz a tar), each .xz a tar of
    one
    part's documents as .txt files, and delete the parts."""
    parts = sorted(p for p in os.listdir(folder) if p.endswith('.jsonl'))
    os.makedirs(os.path.join(folder, 'subsets'))
    for t in range(0, len(parts), 10):
        with tarfile.open(
            os.path.join(folder, 'subsets', f'urlsf_subset{t // 10:02d}.tar'), 'w'
        ) as outer:
            for part in parts[t : t + 10]:
                inner = io.BytesIO()
                with (
                    tarfile.open(fileobj=inner, mode='w') as tar,
                    open(os.path.join(folder, part)) as f,
                ):
                    for i, line in enumerate(f):
                        tar_add(tar, f'{i:07d}.txt', json.loads(line)['text'].encode())
                tar_add(
                    outer,
                    f'openwebtext/{part[:-6]}_data.xz',
                    lzma.compress(inner.getvalue(), preset=1),
                )
        for part in parts[t : t + 10]:
            os.remove(os.path.join(folder, part))


def tree_pss(pid):
    """(total, anonymous) proportional set size in bytes of pid and all its descendants, from /proc.
    PSS splits pages shared between processes (such as those a forked worker shares with its parent)
    among them, so the sum over processes counts each page once, unlike a sum of RSS."""
    children = {}
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                with open(f'/proc/{entry}/stat') as f:
                    ppid = int(f.read().rsplit(')', 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                pass  # the process ended meanwhile
    total = anon = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            with open(f'/proc/{p}/smaps_rollup') as f:
                fields = dict(line.split(':', 1) for line in f if ':' in line)
            total += int(fields['Pss'].split()[0]) * 1024
            anon += int(fields['Pss_Anon'].split()[0]) * 1024
        except (OSError, KeyError):
            pass
    return total, anon


def run(size_mb, text):
    folder = os.path.join(work_dir, f'{size_mb}mb')
    shutil.rmtree(folder, ignore_errors=True)
    t0 = time.time()
    n_docs, n_chars = make_corpus(os.path.join(folder, 'corpus'), size_mb, text)
    print(
        f"\n{size_mb} MB corpus: {n_docs:,} documents, {n_chars:,} characters "
        f"(made in {time.time() - t0:.0f}s)",
        flush=True,
    )
    env = dict(
        os.environ,
        HF_DATASETS_CACHE=os.path.join(folder, 'hf_cache'),
        HF_DATASETS_OFFLINE='1',
        HF_HUB_OFFLINE='1',
    )
    command = [
        sys.executable,
        os.path.join(ROOT, 'data', 'openwebtext', 'prepare.py'),
        f'--source={folder}/corpus',
        f'--out_dir={folder}/out',
        f'--num_proc={num_proc}',
    ]
    peak_total = peak_anon = 0
    t0 = time.time()
    with open(os.path.join(folder, 'stderr.txt'), 'w+') as log:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log)
        while True:
            # wait4 gives this child's own rusage: its ru_maxrss (KB) is the largest of it and its
            # children
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            total, anon = tree_pss(proc.pid)
            peak_total, peak_anon = max(peak_total, total), max(peak_anon, anon)
            time.sleep(0.1)
        seconds = time.time() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            log.seek(0)
            sys.exit(f"prepare.py failed:\n{log.read()[-2000:]}")
    tokens = sum(
        os.path.getsize(os.path.join(folder, 'out', f'{s}.bin')) // 2 for s in ('train', 'val')
    )
    row = dict(
        size_mb=size_mb,
        documents=n_docs,
        tokens=tokens,
        seconds=round(seconds, 1),
        tokens_per_s=round(tokens / seconds),
        mb_per_s=round(n_chars / 1e6 / seconds, 2),
        largest_process_mb=round(usage.ru_maxrss / 1024),
        tree_peak_pss_mb=round(peak_total / 2**20),
        tree_peak_anon_mb=round(peak_anon / 2**20),
    )
    print(row, flush=True)
    shutil.rmtree(folder)
    return row


text = base()
print(f"base text: {len(text):,} characters; num_proc={num_proc}; cpus={os.cpu_count()}")
sizes = (100, 250) if sizes_mb is None else sizes_mb if isinstance(sizes_mb, tuple) else (sizes_mb,)
rows = [run(int(size), text) for size in sizes]
print(
    "\n| corpus | documents | tokens | time | tokens/s | largest process (RSS) "
    "| whole process tree (PSS), of which anonymous |"
)
print("|---|---|---|---|---|---|---|")
for r in rows:
    print(
        f"| {r['size_mb']} MB | {r['documents']:,} | {r['tokens']:,} | {r['seconds']} s "
        f"| {r['tokens_per_s']:,} | "
        f"{r['largest_process_mb']} MB | {r['tree_peak_pss_mb']} MB ({r['tree_peak_anon_mb']} MB) |"
    )
