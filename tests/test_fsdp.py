"""FSDP2 on CPU (gloo) through torchrun: two processes train like one with the same global batch
(with and without accumulation, activation checkpointing and frozen layers; in bfloat16 as DDP
does), one checkpoint format that resumes under any parallelism bitwise, frozen layers that stay
put, a worker killed with SIGKILL that torchrun restarts and that resumes by itself, and what
torch.compile compiles."""

import json
import os
import re
import shutil
import signal
import subprocess
import time

import pytest
import torch

from conftest import ROOT, TORCHRUN, error_line, hermetic_env, read_log
from model import GPT, GPTConfig

# 12 iterations at a learning rate low enough that float summation order stays below 1e-5 in the
# loss; evals (and checkpoints) at iterations 0, 6 and 12
RUN = [
    '--max_iters=12',
    '--eval_interval=6',
    '--eval_iters=2',
    '--log_interval=1',
    '--dropout=0',
    '--learning_rate=3e-3',
    '--warmup_iters=2',
    '--lr_decay_iters=12',
]
TWO = ['--standalone', '--nproc_per_node=2']
NO_ACCUMULATION = ['--gradient_accumulation_steps=2']  # one micro-batch per process and iteration
# two micro-batches per process, the embeddings and Block 0 frozen
ACCUMULATION_FROZEN = ['--gradient_accumulation_steps=4', '--freeze_layers=1']


def run_dir(train, tmp_path_factory, name, *args, torchrun=None):
    out = tmp_path_factory.mktemp(name)
    train(*RUN, *args, f'--out_dir={out}', torchrun=torchrun)
    return out


@pytest.fixture(scope='module')
def single(train, tmp_path_factory):
    return run_dir(train, tmp_path_factory, 'single', *NO_ACCUMULATION)


@pytest.fixture(scope='module')
def single_frozen(train, tmp_path_factory):
    return run_dir(train, tmp_path_factory, 'single_frozen', *ACCUMULATION_FROZEN)


@pytest.fixture(scope='module')
def fsdp(train, tmp_path_factory):
    return run_dir(train, tmp_path_factory, 'fsdp', *NO_ACCUMULATION, '--fsdp=True', torchrun=TWO)


@pytest.fixture(scope='module')
def fsdp_frozen(train, tmp_path_factory):
    return run_dir(
        train,
        tmp_path_factory,
        'fsdp_frozen',
        *ACCUMULATION_FROZEN,
        '--fsdp=True',
        '--activation_checkpointing=True',
        torchrun=TWO,
    )


def ckpt(out_dir):
    return torch.load(os.path.join(out_dir, 'ckpt.pt'), weights_only=True)


def assert_same_losses(a, b):
    (rows, evals), (ref_rows, ref_evals) = read_log(a), read_log(b)
    assert sorted(rows) == sorted(ref_rows) == list(range(12))
    for it in rows:
        assert rows[it]['loss'] == pytest.approx(ref_rows[it]['loss'], abs=1e-5), it
    assert sorted(evals) == sorted(ref_evals) == [0, 6, 12]
    for it in evals:
        assert evals[it]['val_loss'] == pytest.approx(ref_evals[it]['val_loss'], abs=1e-5), it


def assert_same_state(a, b):
    """Bitwise-equal weights and optimizer state, in the same format."""
    assert a['iter_num'] == b['iter_num']
    assert a['model'].keys() == b['model'].keys()
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    assert a['optimizer']['param_groups'] == b['optimizer']['param_groups']
    assert a['optimizer']['state'].keys() == b['optimizer']['state'].keys()
    for p, state in a['optimizer']['state'].items():
        assert state.keys() == b['optimizer']['state'][p].keys()
        for k, v in state.items():
            assert torch.equal(v, b['optimizer']['state'][p][k]), (p, k)


def test_fsdp_matches_one_process(fsdp, single):
    assert_same_losses(fsdp, single)
    a, b = ckpt(fsdp), ckpt(single)
    # the same single-process checkpoint format: full tensors, optimizer state keyed by position
    assert a['model'].keys() == b['model'].keys()
    assert all(a['model'][k].shape == b['model'][k].shape for k in a['model'])
    assert a['optimizer']['param_groups'] == b['optimizer']['param_groups']
    assert a['optimizer']['state'].keys() == b['optimizer']['state'].keys()


def test_fsdp_with_accumulation_checkpointing_and_frozen_layers(fsdp_frozen, single_frozen):
    assert_same_losses(fsdp_frozen, single_frozen)
    torch.manual_seed(1337)  # train.py's seed on rank 0, whose weights every rank starts from
    initial = GPT(
        GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, bias=False, vocab_size=65)
    ).state_dict()
    for out in (single_frozen, fsdp_frozen):
        c = ckpt(out)
        frozen = [
            k
            for k in c['model']
            if k.startswith(
                ('transformer.wte.', 'transformer.wpe.', 'transformer.h.0.', 'lm_head.')
            )
        ]
        trained = [k for k in c['model'] if k not in frozen]
        assert len(frozen) == 2 + 6 + 1 and len(trained) == 6 + 1
        for k in frozen:
            assert torch.equal(c['model'][k], initial[k]), k
        for k in trained:
            assert not torch.equal(c['model'][k], initial[k]), k
        # optimizer state only for the trained tensors: 4 weight matrices, 3 LayerNorm gains
        assert [len(g['params']) for g in c['optimizer']['param_groups']] == [4, 3]
        assert len(c['optimizer']['state']) == 7


def test_resume_across_parallelism(train, fsdp, tmp_path):
    # DDP -> FSDP: resume and immediately re-save; the weights and optimizer state come back bitwise
    ddp, resumed = tmp_path / 'ddp', tmp_path / 'ddp_to_fsdp'
    train(*RUN, *NO_ACCUMULATION, '--max_iters=6', f'--out_dir={ddp}', torchrun=TWO)
    shutil.copytree(ddp, resumed)
    train(
        *RUN,
        *NO_ACCUMULATION,
        '--max_iters=6',
        '--init_from=resume',
        '--fsdp=True',
        f'--out_dir={resumed}',
        torchrun=TWO,
    )
    assert_same_state(ckpt(resumed), ckpt(ddp))
    # FSDP -> one process; there fsdp=True is a no-op (nothing to shard)
    resumed = tmp_path / 'fsdp_to_single'
    shutil.copytree(fsdp, resumed)
    result = train(
        *RUN, *NO_ACCUMULATION, '--init_from=resume', '--fsdp=True', f'--out_dir={resumed}'
    )
    assert 'saving checkpoint' in result.stdout
    assert_same_state(ckpt(resumed), ckpt(fsdp))


def worker_pids(pid):
    """The worker processes torchrun (pid) started, by rank."""
    with open(f'/proc/{pid}/task/{pid}/children') as f:
        children = [int(c) for c in f.read().split()]
    ranks = {}
    for child in children:
        with open(f'/proc/{child}/environ', 'rb') as f:
            env = dict(item.split(b'=', 1) for item in f.read().split(b'\0') if b'=' in item)
        ranks[int(env[b'RANK'])] = child
    return ranks


def test_sigkilled_worker_restarts_and_resumes(train_command, fsdp_frozen, tmp_path):
    # the fsdp_frozen run with a checkpoint every 2 iterations, under torchrun allowed to restart
    cmd = train_command(
        *RUN,
        *ACCUMULATION_FROZEN,
        '--fsdp=True',
        '--activation_checkpointing=True',
        '--checkpoint_interval=2',
        f'--out_dir={tmp_path}',
        torchrun=[*TWO, '--max-restarts=3'],
    )
    # torch 2.13's shared rendezvous store would hand the restarted group the dead group's addresses
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=hermetic_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE='1'),
    )
    deadline = time.time() + 120
    while not (tmp_path / 'ckpt.pt').exists():  # the first checkpoint, at iteration 2
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.005)
    os.kill(worker_pids(proc.pid)[1], signal.SIGKILL)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output
    # rank 0 of the restarted group resumed. (Rarely, with torch 2.13 and gloo, a worker of a
    # restarted group aborts in teardown after the run has finished, 'terminate called without an
    # active exception'; torchrun then restarts once more, and that group resumes at max_iters and
    # writes the same checkpoint again.)
    assert output.count('resuming training from') >= 1, output
    assert 'warning: a restart may fail' not in output
    assert_same_state(ckpt(tmp_path), ckpt(fsdp_frozen))
    rows, _ = read_log(tmp_path)
    ref_rows, _ = read_log(fsdp_frozen)
    assert [(r['iter'], r['loss']) for r in rows.values()] == [
        (r['iter'], r['loss']) for r in ref_rows.values()
    ]


def max_loss_difference(a, b):
    (rows, _), (ref_rows, _) = read_log(a), read_log(b)
    assert sorted(rows) == sorted(ref_rows)
    return max(abs(rows[it]['loss'] - ref_rows[it]['loss']) for it in rows)


def test_fsdp_in_bfloat16_trains_like_ddp(train, tmp_path):
    # FSDP is a memory choice, not a numerics one: in bfloat16 it computes what autocast computes
    # under DDP (matmuls in bfloat16; the residual stream, norms and loss in float32). Without
    # gradient clipping, whose norm FSDP sums over shards in another order (a difference of its own,
    # which float32 shows too)
    args = [
        *RUN,
        *NO_ACCUMULATION,
        '--dtype=bfloat16',
        '--n_embd=64',
        '--max_iters=40',
        '--eval_interval=40',
        '--lr_decay_iters=40',
        '--grad_clip=0',
    ]
    for name, extra, torchrun in (
        ('single', [], None),
        ('ddp', [], TWO),
        ('fsdp', ['--fsdp=True'], TWO),
    ):
        train(*args, *extra, f'--out_dir={tmp_path / name}', torchrun=torchrun)
    ddp = max_loss_difference(tmp_path / 'ddp', tmp_path / 'single')
    assert max_loss_difference(tmp_path / 'fsdp', tmp_path / 'single') <= 3 * ddp + 0.005


# what torch.compile makes of the FSDP model, counted with a backend that runs Dynamo's graphs as
# they are
COMPILE_PROBE = """
import json, sys
import torch, torch.distributed as dist
import torch.nn.functional as F
from torch._dynamo.utils import counters
from nanogpt import distributed, runtime
from model import GPT, GPTConfig
dist.init_process_group('gloo')
linears = [0]  # Linear layers run inside compiled graphs

root_ops = [0]  # the root's embeddings and cross-entropy in compiled graphs

def backend(gm, example_inputs):
    n = sum(node.target is torch._C._nn.linear for node in gm.graph.nodes)
    root_ops[0] += sum(node.target in (F.embedding, F.cross_entropy) for node in gm.graph.nodes)
    def run(*args):
        linears[0] += n
        return gm.forward(*args)
    return run

result = {}
for checkpointing in (False, True):
    losses = {}
    for compile in (False, backend):
        torch._dynamo.reset()
        counters.clear()
        root_ops[0] = 0
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=3, n_head=2, n_embd=32, block_size=16, vocab_size=65,
                              dropout=0.0))
        distributed.parallelize(model, 'cpu', 'float32', True, fsdp=True,
                            activation_checkpointing=checkpointing, compile=compile)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        data = torch.Generator().manual_seed(1)
        forwards, losses[bool(compile)] = [], []
        for _ in range(3):
            linears[0] = 0
            x = torch.randint(65, (2, 16), generator=data)
            _, loss = model(x, x)
            forwards.append(linears[0])
            losses[bool(compile)].append(loss.item())
            loss.backward()
            opt.step()
            opt.zero_grad()
    result[checkpointing] = dict(forwards=forwards, graphs=counters['stats']['unique_graphs'],
                                 breaks=sum(counters['graph_break'].values()),
                                 root=root_ops[0], same_losses=losses[True] == losses[False])
with open(f'rank{dist.get_rank()}.json', 'w') as f:
    json.dump(result, f)
dist.destroy_process_group()
"""


def test_fsdp_compiles_every_block(tmp_path):
    # with and without activation checkpointing: every Block's four Linear layers and lm_head run
    # compiled in every forward, in three graphs (attention and MLP, shared by all Blocks, and
    # lm_head with the loss) and without graph breaks, and 3 SGD steps log the same losses as
    # without torch.compile. Of the root, only the loss's graph holds an operator (the
    # cross-entropy): the embeddings run eager (docs/scale.md says why)
    script = tmp_path / 'probe.py'
    script.write_text(COMPILE_PROBE)
    result = subprocess.run(
        [TORCHRUN, *TWO, str(script)],
        capture_output=True,
        text=True,
        timeout=240,
        env=hermetic_env(PYTHONPATH=ROOT),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for rank in (0, 1):
        for checkpointing, counts in json.loads(
            (tmp_path / f'rank{rank}.json').read_text()
        ).items():
            assert counts == dict(
                forwards=[4 * 3 + 1] * 3, graphs=3, breaks=0, root=1, same_losses=True
            ), checkpointing


@pytest.mark.parametrize(
    'args, message',
    [
        (['--freeze_layers=3'], "error: freeze_layers must be between 0 and n_layer (2), got 3"),
        (['--fsdp=True', '--dtype=float16'], "error: fsdp with float16 is not supported"),
    ],
)
def test_bad_input(train, tmp_path, args, message):
    (tmp_path / 'log.jsonl').write_text('{"iter": 0}\n')
    assert error_line(train(*args, f'--out_dir={tmp_path}', check=False)).startswith(message)
    assert (
        sorted(os.listdir(tmp_path)) == ['log.jsonl']
        and (tmp_path / 'log.jsonl').read_text() == '{"iter": 0}\n'
    )


def test_resume_with_other_frozen_layers_is_refused(train, fsdp, tmp_path):
    shutil.copytree(fsdp, tmp_path, dirs_exist_ok=True)
    before = (tmp_path / 'ckpt.pt').read_bytes()
    line = error_line(
        train(*RUN, '--init_from=resume', '--freeze_layers=1', f'--out_dir={tmp_path}', check=False)
    )
    assert "optimizer state is for other trainable parameters" in line and "freeze_layers" in line
    assert (tmp_path / 'ckpt.pt').read_bytes() == before


def test_memory_script(tmp_path):
    # bench.py counts the real tensors: each of 2 FSDP ranks holds about half of one process's
    # parameters, gradients and AdamW state; activation checkpointing lowers the peak memory of
    # forward+backward
    result = subprocess.run(
        [
            TORCHRUN,
            *TWO,
            os.path.join(ROOT, 'bench.py'),
            '--mode=memory',
            '--n_layer=4',
            '--n_head=4',
            '--n_embd=64',
            '--block_size=64',
            '--batch_size=8',
            '--real_data=False',
            '--vocab_size=256',
            '--device=cpu',
            '--compile=False',
        ],
        capture_output=True,
        text=True,
        env=hermetic_env(),
        cwd=tmp_path,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = {line.split(':')[0]: line for line in result.stdout.splitlines()}
    one = float(re.search(r'total ([\d.]+) MiB', lines['one process']).group(1))
    assert one > 0
    for rank in (0, 1):
        ratio = float(
            re.search(r'\(([\d.]+)x one process\)', lines[f'FSDP rank {rank} of 2']).group(1)
        )
        assert 0.45 <= ratio <= 0.55
    without, with_ = map(
        float,
        re.search(
            r'without activation checkpointing ([\d.]+) MiB, with ([\d.]+) MiB', result.stdout
        ).groups(),
    )
    assert with_ < 0.7 * without
    # with gradient accumulation, reduce-scattering after every micro-step keeps only each rank's
    # shard of the gradients between micro-steps, where syncing only after the last keeps them whole
    for rank in (0, 1):
        every, last = map(
            float,
            re.search(
                rf'FSDP rank {rank} of 2, memory held between 4 micro-steps: reduce-scatter '
                r'after every micro-step ([\d.]+) MiB, only after the last ([\d.]+) MiB',
                result.stdout,
            ).groups(),
        )
        assert last == pytest.approx(2 * every, rel=0.05)
