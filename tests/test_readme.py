"""Every command in the sh blocks of README.md and then docs/*.md runs, in their order, in a copy of
the repository: on the real tiny-Shakespeare text, with a tiny model appended to each training
command (the GPU recipes run on CPU processes), a tiny local GPT-2 in Hugging Face format standing
in for OpenAI's weights, and a small local corpus standing in for OpenWebText. The install and test
commands are what .ci/run itself runs."""

import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import httpx
import pytest

from conftest import copy_code, ROOT, SHAKESPEARE, TORCHRUN, free_port, hermetic_env

RUN_BY_CI = ('python3 -m venv', 'python -m pytest')  # .ci/run runs these itself
TINY_MODEL = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--block_size=32', '--batch_size=4']
TINY_TRAIN = [
    *TINY_MODEL,
    '--gradient_accumulation_steps=4',
    '--max_iters=4',
    '--lr_decay_iters=4',
    '--warmup_iters=1',
    '--eval_interval=2',
    '--eval_iters=2',
    '--log_interval=1',
    '--device=cpu',
    '--dtype=float32',
    '--compile=False',
]


def readme_commands():
    """Each command of the sh blocks (a line, split at '&&') of README.md, then of docs/*.md,
    comments
    and CI's own removed."""
    docs = sorted(glob.glob(os.path.join(ROOT, 'docs', '*.md')))
    commands = []
    for path in [os.path.join(ROOT, 'README.md'), *docs]:
        text = open(path, encoding='utf-8').read()
        for block in re.findall(r'```sh\n(.*?)```', text, flags=re.S):
            for line in block.splitlines():
                line = re.sub(r'\s+#.*$', '', line).strip()
                if line and not line.startswith(('#', *RUN_BY_CI)):
                    commands += [part.strip() for part in line.split('&&')]
    return commands


def effective(argv):
    """What an adapted command does: its other arguments in order and the last value of each
    --key=value (later ones override earlier ones), so commands that differ only in what the tiny
    model overrides
    are the same."""
    is_option = [a.startswith('--') and '=' in a for a in argv]
    # the last value of a key wins
    options = dict(a.split('=', 1) for a, o in zip(argv, is_option) if o)
    return tuple(a for a, o in zip(argv, is_option) if not o), tuple(sorted(options.items()))


def adapt(command, hf_dir, corpus, fineweb, hellaswag):
    """The command as run here: argv, the environment variables it sets (VAR=value before the
    command),
    and which node of a two-node launch it is (or None)."""
    argv = shlex.split(command)
    env = {}
    while re.fullmatch(r'[A-Z_][A-Z0-9_]*=.*', argv[0]):
        key, value = argv.pop(0).split('=', 1)
        env[key] = value
    if argv[0] == 'torchrun':
        argv = [TORCHRUN] + [
            re.sub(r'--nproc_per_node=\d+', '--nproc_per_node=2', a) for a in argv[1:]
        ]
    elif argv[0] == 'python':
        argv[0] = sys.executable
    # None: curl, python -c
    script = next((os.path.basename(a) for a in argv if a.endswith('.py')), None)
    argv = [
        f'--init_from={hf_dir}'
        if a.startswith('--init_from=')
        and a != '--init_from=resume'
        and
        # out-*: a run of an earlier command
        not a.startswith('--init_from=out-')
        else a
        for a in argv
    ]
    if script == 'train.py':
        argv += TINY_TRAIN
        if '--init_from=resume' not in argv:
            # each command is an example on its own: a new run may replace what an earlier command
            # trained in the same out_dir (which train.py refuses unless asked: docs/checkpoints.md)
            argv.append('--overwrite=True')
        if '--init_from=resume' in argv:
            argv += ['--max_iters=6', '--lr_decay_iters=6']
        if 'finetune' in command and not any(a.startswith('--init_from=') for a in argv):
            argv.append(f'--init_from={hf_dir}')  # the config's gpt2-xl
        # of the tiny model's 2
        argv = [re.sub(r'--freeze_layers=\d+', '--freeze_layers=1', a) for a in argv]
    elif script == 'sample.py':
        argv += ['--device=cpu', '--num_samples=1', '--max_new_tokens=5']
    elif script == 'bench.py':
        argv += [*TINY_MODEL, '--device=cpu', '--burnin=1', '--iters=2', '--max_new_tokens=10']
    elif script == 'serve.py':
        argv += ['--device=cpu']
    elif script == 'bench_serve.py':
        argv += [
            '--rounds=1',
            '--max_tokens=5',
            '--clients=2',
            '--load_requests=4',
            '--load_clients=2',
        ]
    elif script == 'eval.py':
        argv += ['--device=cpu', f'--hellaswag_path={hellaswag}']
    elif command.startswith('python data/openwebtext/prepare.py'):
        argv += [f'--source={corpus}', '--num_proc=2']
    elif command.startswith('python data/fineweb_edu/prepare.py'):
        argv += [f'--source={fineweb}']
    node = re.search(r'--node_rank=(\d)', command)
    if node:
        argv = [a.replace('10.0.0.1', '127.0.0.1') for a in argv]
    return argv, env, node and int(node.group(1))


def start_server(argv, cwd, env):
    """serve.py started with argv on a free port, once it answers: (process, port)."""
    port = free_port()
    proc = subprocess.Popen(
        [*argv, f'--port={port}'],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            httpx.get(f'http://127.0.0.1:{port}/health', timeout=1)
            return proc, port
        except httpx.TransportError:
            time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"{' '.join(argv)} did not answer: {proc.communicate()[1][-3000:]}")


@pytest.fixture
def sandbox(tmp_path):
    """A copy of the repository's code, the real text where the Shakespeare scripts look for it, a
    tiny GPT-2 in Hugging Face format, a small corpus of documents, and the user's own text."""
    if not os.path.isfile(SHAKESPEARE):
        if os.environ.get('CI') == 'true':
            pytest.fail(f"{SHAKESPEARE} is missing: CI needs ../shared/data beside the checkout")
        pytest.skip(f"{SHAKESPEARE} not found")
    repo = tmp_path / 'repo'
    copy_code(repo, 'input.txt')
    for name in ('shakespeare_char', 'shakespeare'):
        shutil.copy(SHAKESPEARE, repo / 'data' / name / 'input.txt')
    text = open(SHAKESPEARE, encoding='utf-8').read()
    (repo / 'my_book.txt').write_text(text[:200_000], encoding='utf-8')
    (repo / 'my_letters').mkdir()
    for i in range(3):
        (repo / 'my_letters' / f'{i}.txt').write_text(
            text[i * 100_000 : (i + 1) * 100_000], encoding='utf-8'
        )
    corpus = tmp_path / 'corpus'
    corpus.mkdir()
    paragraphs = text.split('\n\n')
    for i in range(0, 3000, 10):  # 300 documents
        (corpus / f'{i:05d}.txt').write_text('\n\n'.join(paragraphs[i : i + 10]), encoding='utf-8')
    fineweb = tmp_path / 'fineweb' / 'sample' / '10BT'  # FineWeb-Edu's layout and columns
    fineweb.mkdir(parents=True)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({'text': paragraphs[:3000], 'id': [str(i) for i in range(3000)]}),
        fineweb / '000_00000.parquet',
    )
    hellaswag = tmp_path / 'hellaswag.jsonl'  # HellaSwag's fields, for eval.py without the hub
    hellaswag.write_text(
        ''.join(
            json.dumps(
                dict(
                    ind=i,
                    activity_label='Shakespeare',
                    ctx_a=paragraphs[i][:80],
                    ctx_b='then',
                    ctx=paragraphs[i][:80] + ' then',
                    endings=[paragraphs[i + k][:40] for k in range(1, 5)],
                    split='val',
                    split_type='indomain',
                    label=i % 4,
                    source_id=f's{i}',
                )
            )
            + '\n'
            for i in range(8)
        ),
        encoding='utf-8',
    )
    hf_dir = tmp_path / 'gpt2-local'
    subprocess.run(
        [
            sys.executable,
            '-c',
            (
                "import sys, torch; from transformers import GPT2Config, GPT2LMHeadModel; "
                "torch.manual_seed(0); GPT2LMHeadModel(GPT2Config(vocab_size=50257, "
                "n_positions=64, n_embd=32, n_layer=2, n_head=2))"
                ".save_pretrained(sys.argv[1])"
            ),
            str(hf_dir),
        ],
        check=True,
        capture_output=True,
        env=hermetic_env(),
    )
    return repo, str(hf_dir), str(corpus), str(tmp_path / 'fineweb'), str(hellaswag)


@pytest.mark.architecture
def test_every_readme_command_runs(sandbox):
    repo, *inputs = sandbox
    env = hermetic_env(WANDB_DIR=str(repo))
    ran, seen, port, first_node, server = [], set(), free_port(), None, None
    for command in readme_commands():
        argv, extra_env, node = adapt(command, *inputs)
        if effective(argv) in seen:
            # the same once adapted: a step shown twice, GPT-2 sizes that all become the tiny one,
            continue
            # or settings (max_iters, ...) that the tiny model overrides
        seen.add(effective(argv))
        argv = [a.replace('29500', str(port)) for a in argv]
        if server:  # the commands after `python serve.py` talk to it, on its port
            argv = [a.replace('127.0.0.1:8000', f'127.0.0.1:{server[1]}') for a in argv]
        # a server runs until the next one starts or the commands end
        if 'serve.py' in map(os.path.basename, argv):
            if server:
                server[0].terminate()
                server[0].wait(timeout=60)
            server = start_server(argv, repo, {**env, **extra_env})
            ran.append(command)
            continue
        if node == 0:  # the first node of a two-node launch waits for the second
            first_node = subprocess.Popen(
                argv,
                cwd=repo,
                env={**env, **extra_env},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            ran.append(command)
            continue
        t0 = time.time()
        shell = ' > ' in command  # a redirection: echo "ROMEO:" > prompt.txt
        result = subprocess.run(
            command if shell else argv,
            shell=shell,
            cwd=repo,
            env={**env, **extra_env},
            capture_output=True,
            text=True,
            timeout=300,
        )
        print(f"{time.time() - t0:5.1f}s {command}")
        assert result.returncode == 0, (
            f"{command}\n{' '.join(argv)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
        if node == 1:
            output, _ = first_node.communicate(timeout=120)
            assert first_node.returncode == 0, f"node 0 of: {command}\n{output[-3000:]}"
            assert 'step 4: train loss' in output  # rank 0 of node 0 evaluated and printed
        ran.append(command)
    if server:
        server[0].terminate()
        assert 'Traceback' not in server[0].communicate(timeout=60)[1]
    # the commands did what the README says they do
    assert (repo / 'data' / 'shakespeare_char' / 'meta.pkl').exists()
    assert (repo / 'data' / 'openwebtext' / 'val.bin').exists()
    assert (repo / 'data' / 'my_book' / 'train.bin').exists() and (
        repo / 'data' / 'my_letters' / 'val.bin'
    ).exists()
    for out_dir in (
        'out-shakespeare-char-cpu',
        'out-shakespeare-char',
        'out-shakespeare',
        'out-my-book',
        'out-my-letters',
    ):
        assert (repo / out_dir / 'ckpt.pt').exists(), out_dir
    assert any((repo / 'bench_log').iterdir())
    assert len(ran) >= 20, ran
