"""
Your own BPE (nanogpt/bpe.py) measured: its training time and peak memory on text files of a given
size (built from tiny Shakespeare, every copy perturbed, and streamed from disk), its encoding
throughput against tiktoken's GPT-2 on the same text, its compression (UTF-8 bytes per token) on
tiny Shakespeare's val split at a few vocabulary sizes against GPT-2's and characters', and the
quality of the same small model trained with each tokenizer, in bits per byte of the val split.

    python benchmarks/bench_tokenizer.py --part=train --mb=10      # training time, peak memory
    python benchmarks/bench_tokenizer.py --part=encode             # throughput against tiktoken
    python benchmarks/bench_tokenizer.py --part=compression
    python benchmarks/bench_tokenizer.py --part=quality --tokenizers=char,gpt2,bpe
"""

import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time

# the repository's root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import ANY, ROOT, OneOf, POSITIVE, check, configure
from nanogpt import bpe
from nanogpt.tokenizer import char_meta, gpt2_encoding

# -----------------------------------------------------------------------------
# the tiny Shakespeare text
input = os.path.join(ROOT, '..', 'shared', 'data', 'tinyshakespeare', 'input.txt')
part = 'train'  # 'train', 'encode', 'compression' or 'quality'
mb = 10  # train and encode: the size of the text, in MB
vocab_size = 4096  # train, encode: the BPE's vocabulary
vocab_sizes = '512,1024,2048,4096,8192'  # compression: the BPE's sizes compared
quality_vocab_size = 1024  # quality: the BPE's size
tokenizers = 'char,gpt2,bpe'  # quality: the tokenizers compared, a run each
rounds = 3  # encode: alternate A/B rounds (medians)
# quality: config/train_shakespeare_char_cpu.py for each tokenizer, with fewer iterations and
# smaller batches (GPT-2's 50,304-token output layer makes each step ~20x the char model's)
max_iters = 100
batch_size = 8
# quality: bits per byte (eval.py) on the first val_chars characters of the val split, the same text
# for every tokenizer
val_chars = 20000
# -----------------------------------------------------------------------------
config = configure(globals())
check(
    config,
    dict(
        input=ANY,
        part=OneOf('train', 'encode', 'compression', 'quality'),
        mb=POSITIVE,
        vocab_size=POSITIVE,
        vocab_sizes=ANY,
        quality_vocab_size=POSITIVE,
        rounds=POSITIVE,
        tokenizers=ANY,
        max_iters=POSITIVE,
        batch_size=POSITIVE,
        val_chars=POSITIVE,
    ),
)
text = open(input, encoding='utf-8').read()


def big_file(folder, mb):
    """A file of ~mb MB: copies of the text, each with 1 word in 20 given a random suffix, so that
    the number of distinct words grows with the size as in real text."""
    path = os.path.join(folder, f'{mb}mb.txt')
    rng, words = random.Random(0), text.split(' ')
    with open(path, 'w', encoding='utf-8') as f:
        while f.tell() < mb * 1e6:
            f.write(
                ' '.join(w + str(rng.randrange(1000)) if rng.random() < 0.05 else w for w in words)
            )
    return path


def stream(path):
    """The file's text in pieces of ~1 MB of whole lines, read as they are needed."""
    with open(path, encoding='utf-8') as f:
        for lines in iter(lambda: f.readlines(1 << 20), []):
            yield ''.join(lines)


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


with tempfile.TemporaryDirectory() as tmp:
    if part == 'train':
        path = big_file(tmp, mb)
        before = peak_rss_mb()  # the interpreter and the libraries, before training
        t0 = time.perf_counter()
        tok = bpe.train(stream(path), vocab_size)
        dt = time.perf_counter() - t0
        print(
            f"train {os.path.getsize(path) / 1e6:.0f} MB, vocab {tok.get_vocab_size()}: {dt:.1f} s "
            f"({os.path.getsize(path) / 1e6 / dt:.2f} MB/s), peak RSS {peak_rss_mb():.0f} MB "
            f"({before:.0f} MB before training)"
        )
    elif part == 'encode':
        path = big_file(tmp, mb)
        tok = bpe.train(stream(path), vocab_size)
        chunks = [c for t in stream(path) for c in bpe.text_chunks(t, 1 << 16)]
        enc, size = gpt2_encoding(), os.path.getsize(path) / 1e6
        ours, theirs = [], []
        for _ in range(rounds):  # alternate, so that load on the machine hits both alike
            t0 = time.perf_counter()
            n_ours = sum(len(e.ids) for e in tok.encode_batch_fast(chunks))
            ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            n_gpt2 = sum(map(len, enc.encode_ordinary_batch(chunks, num_threads=os.cpu_count())))
            theirs.append(time.perf_counter() - t0)
        a, b = statistics.median(ours), statistics.median(theirs)
        print(
            f"encode {size:.0f} MB ({len(chunks)} pieces, both batched over {os.cpu_count()} "
            f"threads): our BPE {vocab_size} {size / a:.1f} MB/s ({n_ours:,} tokens), tiktoken "
            f"GPT-2 {size / b:.1f} MB/s ({n_gpt2:,} tokens): {b / a:.2f}x tiktoken's speed"
        )
    elif part == 'compression':
        train, val = text[: int(len(text) * 0.9)], text[int(len(text) * 0.9) :]
        n_bytes = len(val.encode('utf-8'))
        rows = [('characters', char_meta(text)['vocab_size'], len(val))]
        rows.append(('GPT-2', 50257, len(gpt2_encoding().encode_ordinary(val))))
        for v in map(int, vocab_sizes.split(',')):
            tok = bpe.train(bpe.text_chunks(train), v)
            rows.append((f'BPE {v}', tok.get_vocab_size(), len(tok.encode(val).ids)))
        print(f"tiny Shakespeare val split: {n_bytes:,} bytes")
        for name, v, n in rows:
            print(f"{name:>12}: vocab {v:>6,}, {n:>7,} tokens, {n_bytes / n:.2f} bytes per token")
    else:  # quality: the CPU recipe's model and budget, on each tokenizer's data

        def run(*args):
            result = subprocess.run(
                [sys.executable, *args], cwd=ROOT, capture_output=True, text=True
            )
            assert result.returncode == 0, result.stderr
            return result.stdout

        prepare = os.path.join(ROOT, 'data', 'prepare_text.py')
        val_text = os.path.join(tmp, 'val.txt')
        with open(val_text, 'w', encoding='utf-8') as f:
            f.write(text[int(len(text) * 0.9) :][:val_chars])
        for name in tokenizers.split(','):
            data, out = os.path.join(tmp, name), os.path.join(tmp, f'out-{name}')
            run(prepare, f'--input={input}', f'--out_dir={data}', f'--tokenizer={name}',
                f'--vocab_size={quality_vocab_size}')  # fmt: skip
            t0 = time.perf_counter()
            run(
                'train.py',
                'config/train_shakespeare_char_cpu.py',
                f'--data_dir={data}',
                f'--out_dir={out}',
                f'--max_iters={max_iters}',
                f'--batch_size={batch_size}',
                f'--lr_decay_iters={max_iters}',
                f'--eval_interval={max_iters}',
                '--eval_iters=5',
            )
            dt = time.perf_counter() - t0
            run('eval.py', f'--out_dir={out}', '--device=cpu', f'--val_path={val_text}')
            with open(os.path.join(out, 'eval.json')) as f:
                r = json.load(f)['results']['val']
            label = name + (str(quality_vocab_size) if name == 'bpe' else '')
            print(
                f"{label:>7}: {max_iters} iterations of {batch_size}x64 tokens in {dt:.0f} s, "
                f"val loss {r['loss']:.4f} per token, {r['bpb']:.4f} bits per byte (the first "
                f"{val_chars:,} characters of the val split)",
                flush=True,
            )
