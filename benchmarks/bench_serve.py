"""
Measure serve.py: throughput of concurrent clients decoded together against the same requests one at
a time, one request alone against sample.py's cached decoding, and a load of many requests
(docs/serve.md).
    $ python bench_serve.py --out_dir=out-shakespeare-char-cpu
Starts serve.py on a free port, alternates baseline and candidate for `rounds` rounds and prints
medians and ratios; checks that every batched greedy completion equals the same request served
alone.
"""

import concurrent.futures
import os
import re
import socket
import statistics
import subprocess
import sys
import time

import httpx

# the repository's root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import ROOT, UserError, configure

# -----------------------------------------------------------------------------
init_from = 'resume'  # as in sample.py and serve.py
out_dir = 'out-shakespeare-char-cpu'
device = 'cpu'
clients = 8  # concurrent clients in the throughput comparison, each with its own prompt
max_tokens = 200  # tokens per completion (greedy)
rounds = 3  # alternating rounds of each comparison; medians are printed
load_requests = 200  # the load test: this many requests ...
load_clients = 16  # ... from this many concurrent clients
# -----------------------------------------------------------------------------
configure(globals())
PROMPTS = [
    'ROMEO:',
    'JULIET:\nO Romeo, Romeo',
    'First Citizen:\nBefore we',
    'KING HENRY',
    'What say you',
    'Thou art',
    'To be, or not',
    'MENENIUS:\nI tell you',
]


def check_settings():
    for name, value in (
        ('clients', clients),
        ('max_tokens', max_tokens),
        ('rounds', rounds),
        ('load_requests', load_requests),
        ('load_clients', load_clients),
    ):
        if value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}")


def start_server():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            'serve.py',
            f'--init_from={init_from}',
            f'--out_dir={out_dir}',
            f'--device={device}',
            f'--port={port}',
            f'--max_batch={max(clients, load_clients)}',
            f'--max_tokens_limit={max_tokens}',
            '--log_requests=False',
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f'http://127.0.0.1:{port}'
    while proc.poll() is None:
        try:
            httpx.get(f'{url}/health', timeout=1)
            return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    raise UserError(f"serve.py did not start: {proc.stderr.read().strip()}")


# one client for every request, as an application keeps one: httpx.post() would build a client (and
# its SSL context) per call, which costs the benchmark's process more than the server takes to
# answer a short request
CLIENT = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=max(clients, load_clients)))


def complete(url, prompt, tokens=max_tokens, temperature=0, **extra):
    response = CLIENT.post(
        f'{url}/v1/completions',
        json=dict(prompt=prompt, max_tokens=tokens, temperature=temperature, **extra),
    )
    if response.status_code != 200:
        raise UserError(f"the server answered {response.status_code}: {response.text}")
    return response.json()


def timed(run):
    t0 = time.perf_counter()
    result = run()
    return result, time.perf_counter() - t0


def sample_py_speed(prompt):
    """sample.py's own tokens/s (its timing excludes loading) for one greedy sample of max_tokens
    tokens."""
    result = subprocess.run(
        [
            sys.executable,
            'sample.py',
            f'--init_from={init_from}',
            f'--out_dir={out_dir}',
            f'--device={device}',
            f'--start={prompt}',
            '--num_samples=1',
            '--temperature=0',
            f'--max_new_tokens={max_tokens}',
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    match = re.search(r'\(([\d.]+) tokens/s\)', result.stderr)
    if result.returncode != 0 or not match:
        raise UserError(f"sample.py failed: {result.stderr.strip()}")
    return float(match.group(1)), result.stdout.removesuffix('\n---------------\n')


def rss_mb(pid):
    with open(f'/proc/{pid}/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('VmRSS:')) / 1024


def main():
    check_settings()
    proc, url = start_server()
    try:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(clients)]
        complete(url, prompts[0], min(8, max_tokens))  # warm-up
        alone_texts, speeds, pool = (
            None,
            {'one at a time': [], 'together': []},
            concurrent.futures.ThreadPoolExecutor(max(clients, load_clients)),
        )
        for r in range(rounds):
            order = ['one at a time', 'together'] if r % 2 == 0 else ['together', 'one at a time']
            for way in order:
                if way == 'one at a time':
                    replies, dt = timed(lambda: [complete(url, p) for p in prompts])
                else:
                    replies, dt = timed(lambda: list(pool.map(lambda p: complete(url, p), prompts)))
                texts = [reply['choices'][0]['text'] for reply in replies]
                tokens = sum(reply['usage']['completion_tokens'] for reply in replies)
                speeds[way].append(tokens / dt)
                print(
                    f"round {r + 1}, {clients} requests {way}: {tokens} tokens in {dt:.2f}s "
                    f"({tokens / dt:.0f} tokens/s)"
                )
                if way == 'one at a time':
                    alone_texts = alone_texts or texts
                if texts != alone_texts:
                    raise UserError(
                        f"a greedy completion changed between runs ({way}): batching changed the "
                        "output"
                    )
        base, batched = (statistics.median(speeds[w]) for w in ('one at a time', 'together'))
        print(
            f"throughput, median of {rounds}: one at a time {base:.0f} tokens/s, {clients} "
            f"together {batched:.0f} "
            f"tokens/s: {batched / base:.2f}x; every batched completion equals the same request "
            "served alone"
        )
        print(f"largest batch decoded: {httpx.get(f'{url}/health').json()['largest_batch']}")

        server, sample, latency = [], [], []
        # one request alone against sample.py (in turn, so they do not compete)
        for r in range(rounds):
            latency.append(timed(lambda: complete(url, prompts[0], 1))[1])
            reply, dt = timed(lambda: complete(url, prompts[0]))
            server.append(reply['usage']['completion_tokens'] / dt)
            speed, text = sample_py_speed(prompts[0])
            sample.append(speed)
            if prompts[0] + reply['choices'][0]['text'] != text:
                raise UserError("the server's greedy completion differs from sample.py's")
            print(
                f"round {r + 1}, one request: serve.py {server[-1]:.0f} tokens/s (HTTP included), "
                f"sample.py {sample[-1]:.0f} tokens/s"
            )
        print(
            f"one request alone, median of {rounds}: serve.py {statistics.median(server):.0f} "
            "tokens/s, sample.py "
            f"{statistics.median(sample):.0f} tokens/s: "
            f"{statistics.median(server) / statistics.median(sample):.2f}x; "
            f"a request of 1 token takes {statistics.median(latency) * 1000:.0f} ms (HTTP, prompt, "
            "hand-offs)"
        )

        def request(i):
            reply = complete(
                url, PROMPTS[i % len(PROMPTS)], 1 + i % max_tokens, temperature=0.8, seed=i
            )
            return reply['usage']['completion_tokens'] == 1 + i % max_tokens

        pid = httpx.get(f'{url}/health').json()['pid']
        before = rss_mb(pid)
        answered, dt = timed(
            lambda: list(
                concurrent.futures.ThreadPoolExecutor(load_clients).map(
                    request, range(load_requests)
                )
            )
        )
        after = rss_mb(pid)
        health = httpx.get(f'{url}/health').json()
        print(
            f"load: {load_requests} requests from {load_clients} clients in {dt:.1f}s, "
            f"{sum(answered)} answered in "
            f"full, {health['active'] + health['waiting']} left in the server; server RSS "
            f"{before:.0f} MB before, "
            f"{after:.0f} MB after"
        )
        pool.shutdown()
    finally:
        proc.terminate()
        proc.wait(timeout=60)


if __name__ == '__main__':
    main()
