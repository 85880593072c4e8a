"""serve.py as a user runs it: the real server on a free local port, spoken to with the openai
client, raw HTTP and a headless Chromium, on a small checkpoint built here; its answers compared
with sample.py's."""

import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch

from conftest import ROOT, SHAKESPEARE, error_line, free_port, hermetic_env
from model import GPT, GPTConfig
from nanogpt.tokenizer import char_meta, char_record

PROMPTS = [
    'ROMEO:',
    'JULIET: O Romeo',
    'First Citizen:\nBefore we',
    'a',
    'What say you',
    'KING',
    'Thou art',
    'No',
]


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    """A 2-layer character model of tiny-shakespeare's 65 characters with random weights, drawn wide
    enough (std 0.1) that its most likely next character is clear: greedy text is varied and has no
    near-ties. Its block of 32 characters is shorter than the completions, so the server slides its
    window as sample.py does."""
    if not os.path.isfile(SHAKESPEARE):
        pytest.skip(f"{SHAKESPEARE} not found")
    with open(SHAKESPEARE, encoding='utf-8') as f:
        meta = char_meta(f.read())
    torch.manual_seed(0)
    model_args = dict(
        n_layer=2, n_head=2, n_embd=64, block_size=32, bias=False, vocab_size=65, dropout=0.0
    )
    model = GPT(GPTConfig(**model_args))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    out = tmp_path_factory.mktemp('out-serve')
    torch.save(
        {
            'model': model.state_dict(),
            'model_args': model_args,
            'iter_num': 0,
            'gelu': 'exact',
            'tokenizer': char_record(meta),
        },
        out / 'ckpt.pt',
    )
    return str(out)


def start_server(*args, timeout=120):
    """serve.py on a free port, once it answers /health: (process, base url)."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            os.path.join(ROOT, 'serve.py'),
            '--device=cpu',
            f'--port={port}',
            '--log_requests=False',
            *args,
        ],
        env=hermetic_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f'http://127.0.0.1:{port}'
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f'{url}/health', timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:  # not listening yet
            time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"serve.py did not answer /health: {proc.communicate()[1]}")


@pytest.fixture(scope='module')
def server(checkpoint):
    proc, url = start_server(f'--out_dir={checkpoint}', '--max_tokens_limit=500', '--max_batch=16')
    yield url
    proc.terminate()
    stderr = proc.communicate(timeout=30)[1]
    assert 'Traceback' not in stderr, stderr


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f'{server}/v1', api_key='unused', max_retries=0, timeout=60)


def sample_py(out_dir, prompt, max_new_tokens):
    """sample.py's greedy text (prompt included) for one prompt."""
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, 'sample.py'),
            f'--out_dir={out_dir}',
            '--device=cpu',
            f'--start={prompt}',
            '--num_samples=1',
            f'--max_new_tokens={max_new_tokens}',
            '--temperature=0',
        ],
        capture_output=True,
        text=True,
        env=hermetic_env(),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.removesuffix('\n---------------\n')


def complete(url, **body):
    response = httpx.post(f'{url}/v1/completions', json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def greedy(url, prompt, max_tokens):
    return complete(url, prompt=prompt, max_tokens=max_tokens, temperature=0)['choices'][0]['text']


def test_greedy_completion_equals_sample_py(server, client, checkpoint):
    prompt = PROMPTS[1]  # 15 characters and 60 more: the 32-character window slides twice
    reply = client.completions.create(
        model=os.path.basename(checkpoint), prompt=prompt, max_tokens=60, temperature=0, echo=True
    )
    assert reply.choices[0].text == sample_py(checkpoint, prompt, 60)
    assert reply.choices[0].finish_reason == 'length'
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt), 60)
    models = httpx.get(f'{server}/v1/models').json()
    assert [m['id'] for m in models['data']] == [os.path.basename(checkpoint)]
    assert httpx.get(f'{server}/health').json()['status'] == 'ok'


def test_stream_yields_the_same_text(server, client):
    args = dict(
        model=client.models.list().data[0].id,
        prompt=PROMPTS[:2],
        max_tokens=40,
        n=2,
        seed=3,
        temperature=0.9,
    )
    whole = client.completions.create(**args)
    texts, finishes = [''] * 4, [None] * 4
    for chunk in client.completions.create(**args, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            finishes[choice.index] = choice.finish_reason or finishes[choice.index]
    assert texts == [c.text for c in whole.choices] and finishes == ['length'] * 4
    # raw server-sent events: one JSON chunk per event, the usage last when asked for, then [DONE]
    with httpx.stream(
        'POST',
        f'{server}/v1/completions',
        json=dict(
            prompt='ROMEO:',
            max_tokens=5,
            stream=True,
            temperature=0,
            stream_options={'include_usage': True},
        ),
        timeout=60,
    ) as response:
        assert response.headers['content-type'].startswith('text/event-stream')
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == 'data: [DONE]'
    chunks = [json.loads(e.removeprefix('data: ')) for e in events[:-1]]
    assert ''.join(c['choices'][0]['text'] for c in chunks[:-1]) == greedy(server, 'ROMEO:', 5)
    assert chunks[-1]['usage'] == dict(prompt_tokens=6, completion_tokens=5, total_tokens=11)


def test_n_with_a_seed_is_reproducible(client):
    def texts(seed):
        reply = client.completions.create(
            model=client.models.list().data[0].id,
            prompt='ROMEO:',
            max_tokens=30,
            n=3,
            seed=seed,
            top_p=0.9,
            extra_body={'top_k': 20},
        )
        return [c.text for c in reply.choices]

    first = texts(5)
    assert len(first) == 3 and len(set(first)) == 3  # each choice draws its own
    assert texts(5) == first
    assert texts(6) != first


def test_stop_string_ends_the_completion(server, client):
    full = greedy(server, PROMPTS[0], 60)
    stop = full[20:23]
    for stream in (False, True):
        body = dict(
            prompt=PROMPTS[0], max_tokens=60, temperature=0, stop=[stop, '\x00never'], stream=stream
        )
        if stream:
            with httpx.stream(
                'POST', f'{server}/v1/completions', json=body, timeout=60
            ) as response:
                chunks = [
                    json.loads(line[6:])
                    for line in response.iter_lines()
                    if line.startswith('data: {')
                ]
            text = ''.join(c['choices'][0]['text'] for c in chunks)
            finish = chunks[-1]['choices'][0]['finish_reason']
        else:
            choice = complete(server, **body)['choices'][0]
            text, finish = choice['text'], choice['finish_reason']
        assert (text, finish) == (full[: full.index(stop)], 'stop')


def test_batched_completions_equal_each_served_alone(server):
    alone = [greedy(server, p, 50) for p in PROMPTS]
    # one request of 8 prompts of different lengths: decoded together from the first step
    batched = complete(server, prompt=PROMPTS, max_tokens=50, temperature=0)['choices']
    assert [c['text'] for c in batched] == alone
    # a request that arrives while another is generating joins its batch: the two take fewer steps
    # than in turn
    long_alone = greedy(server, PROMPTS[0], 500)
    before = httpx.get(f'{server}/health').json()['steps']
    with httpx.stream(
        'POST',
        f'{server}/v1/completions',
        timeout=60,
        json=dict(prompt=PROMPTS[0], max_tokens=500, temperature=0, stream=True),
    ) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line)
        joined = greedy(server, PROMPTS[1], 50)
        text = ''.join(
            json.loads(line[6:])['choices'][0]['text']
            for line in [first, *lines]
            if line.startswith('data: {')
        )
    steps = httpx.get(f'{server}/health').json()['steps'] - before
    assert (text, joined) == (long_alone, alone[1])
    assert steps < 500 + 50


def test_a_client_that_goes_away_frees_its_place(server):
    before = httpx.get(f'{server}/health').json()
    with httpx.stream(
        'POST',
        f'{server}/v1/completions',
        timeout=60,
        json=dict(prompt='ROMEO:', max_tokens=500, stream=True),
    ) as response:
        next(line for line in response.iter_lines() if line)  # one token, then hang up
    deadline = time.monotonic() + 60
    while (health := httpx.get(f'{server}/health').json())[
        'active'
    ] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert health['active'] == 0 and health['completed'] == before['completed']
    assert health['steps'] - before['steps'] < 500


BAD = [  # (body, status, the field named, a fragment of the message)
    (b'{"prompt": "ROMEO:", "max_tokens": ', 400, None, 'not valid JSON'),
    (b'["ROMEO:"]', 400, None, 'must be a JSON object'),
    (dict(prompt='ROMEO:', max_tokenz=5), 400, 'max_tokenz', 'unknown field'),
    (dict(prompt='ROMEO:', max_tokens=0), 400, 'max_tokens', 'at least 1'),
    (dict(prompt='ROMEO:', max_tokens=501), 400, 'max_tokens', 'at most 500'),
    (dict(prompt='ROMEO:', max_tokens='5'), 400, 'max_tokens', 'must be an integer'),
    (dict(prompt='ROMEO:', temperature=-1), 400, 'temperature', 'at least 0'),
    (dict(prompt='ROMEO:', top_p=0), 400, 'top_p', 'greater than 0'),
    (dict(prompt='ROMEO:', n=17), 400, 'n', 'at most 16'),
    (dict(prompt=['ROMEO:'] * 9, n=2), 400, 'n', 'send several requests'),
    (dict(prompt='x' * 33), 400, 'prompt', 'at most 32'),
    (dict(prompt='hello ☃ world'), 400, 'prompt', "'☃'"),
    (dict(prompt=''), 400, 'prompt', 'empty'),
    (dict(prompt=[70]), 400, 'prompt', 'outside'),
    (dict(max_tokens=5), 400, 'prompt', 'required'),
    (dict(prompt='ROMEO:', stop=['a', 'b', 'c', 'd', 'e']), 400, 'stop', 'up to 4'),
    (dict(prompt='ROMEO:', stream='yes'), 400, 'stream', 'true or false'),
    (dict(prompt='ROMEO:', logprobs=2), 400, 'logprobs', 'not supported'),
    (dict(prompt='ROMEO:', model='gpt-4'), 404, 'model', 'not served here'),
]


def test_bad_requests_get_openai_errors_and_the_server_keeps_answering(server, client):
    for body, status, param, fragment in BAD:
        if isinstance(body, bytes):
            response = httpx.post(
                f'{server}/v1/completions',
                content=body,
                timeout=60,
                headers={'Content-Type': 'application/json'},
            )
        else:
            response = httpx.post(f'{server}/v1/completions', json=body, timeout=60)
        assert response.status_code == status, (body, response.text)
        error = response.json()['error']
        assert set(error) == {'message', 'type', 'param', 'code'} and error['param'] == param, error
        assert fragment in error['message'] and 'Traceback' not in error['message'], error
    assert httpx.get(f'{server}/v2/nothing').json()['error']['message'].startswith('Not Found')
    with pytest.raises(openai.BadRequestError, match='at least 1'):
        client.completions.create(
            model=client.models.list().data[0].id, prompt='ROMEO:', max_tokens=0
        )
    assert greedy(server, 'ROMEO:', 5) == greedy(server, 'ROMEO:', 60)[:5]


def test_page_in_a_real_browser(server, tmp_path):
    if not (shutil.which('chromium') and shutil.which('chromedriver')):
        pytest.skip("needs Debian's chromium and chromium-driver (README.md, Tests)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    for arg in (
        '--headless=new',
        '--no-sandbox',
        '--disable-dev-shm-usage',
        '--window-size=1000,800',
    ):
        options.add_argument(arg)
    options.binary_location = shutil.which('chromium') or '/usr/bin/chromium'
    driver = webdriver.Chrome(
        service=Service(shutil.which('chromedriver') or '/usr/bin/chromedriver'), options=options
    )
    try:
        driver.get(server + '/')
        # sized for a phone's screen; the prompt's limit shown before anything is sent
        assert driver.find_element(By.CSS_SELECTOR, 'meta[name=viewport]')
        WebDriverWait(driver, 60).until(
            lambda d: 'up to 32 tokens' in d.find_element(By.ID, 'context').text
        )
        for field, value in (
            ('prompt', 'JULIET: O Romeo'),
            ('max_tokens', '40'),
            ('temperature', '0'),
        ):
            box = driver.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        driver.find_element(By.ID, 'generate').click()
        WebDriverWait(driver, 60).until(
            lambda d: d.find_element(By.ID, 'status').text.startswith('done')
        )
        shown = driver.execute_script("return document.getElementById('completion').textContent")
        driver.save_screenshot(str(tmp_path / 'serve-page.png'))
        print(f"screenshot: {tmp_path / 'serve-page.png'}")
        assert shown == greedy(server, 'JULIET: O Romeo', 40)
        assert 'done: 40 tokens' in driver.find_element(By.ID, 'status').text
    finally:
        driver.quit()


def rss_mb(pid):
    with open(f'/proc/{pid}/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('VmRSS:')) / 1024


def test_load_200_requests_from_16_clients(server):
    url, pid = server, httpx.get(f'{server}/health').json()['pid']

    def request(i):
        body = dict(
            prompt=PROMPTS[i % 8], max_tokens=5 + i % 20, temperature=0.8, seed=i, stream=i % 3 == 0
        )
        if not body['stream']:
            return complete(url, **body)['usage']['completion_tokens']
        with httpx.stream('POST', f'{url}/v1/completions', json=body, timeout=60) as response:
            assert response.status_code == 200
            # one event per character, then [DONE]
            return sum(bool(line) for line in response.iter_lines()) - 1

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(request, range(16)))  # warm-up: the allocator's pools reach their size
        before, t0 = rss_mb(pid), time.monotonic()
        completed = httpx.get(f'{url}/health').json()['completed']
        tokens = list(pool.map(request, range(200), timeout=120))
        after, dt = rss_mb(pid), time.monotonic() - t0
    print(
        f"200 requests from 16 clients in {dt:.1f}s; server RSS {before:.0f} MB before, "
        f"{after:.0f} MB after"
    )
    assert tokens == [5 + i % 20 for i in range(200)]  # all answered, each in full
    health = httpx.get(f'{url}/health').json()
    assert (health['completed'] - completed, health['active'], health['waiting']) == (200, 0, 0)
    assert health['largest_batch'] > 1
    assert after - before < 20, (before, after)


def test_start_up_errors_are_one_line(tmp_path):
    def run(*args):
        return subprocess.run(
            [sys.executable, os.path.join(ROOT, 'serve.py'), '--device=cpu', *args],
            capture_output=True,
            text=True,
            env=hermetic_env(),
            timeout=120,
        )

    assert 'no checkpoint at' in error_line(run(f'--out_dir={tmp_path}', '--max_batch=2'))
    assert 'max_batch must be at least 1, got 0' in error_line(
        run(f'--out_dir={tmp_path}', '--max_batch=0')
    )
