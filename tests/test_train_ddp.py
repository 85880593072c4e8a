"""Distributed data parallel on CPU (gloo) through torchrun: the same global batch split over two
processes, on one node or on two "nodes" over loopback, trains exactly like one process that
accumulates gradients over the same micro-batches: the same losses, weights and optimizer state."""

import os
import subprocess

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from conftest import free_port, hermetic_env, read_log
from model import GPT, GPTConfig
from nanogpt import distributed

# global batch: 2 micro-batches of 4; an eval at iterations 0, 3 and 6
RUN = [
    '--gradient_accumulation_steps=2',
    '--max_iters=6',
    '--eval_interval=3',
    '--eval_iters=2',
    '--log_interval=1',
    '--dropout=0',
    '--learning_rate=1e-2',
    '--warmup_iters=2',
    '--lr_decay_iters=6',
]


@pytest.fixture(scope='module')
def single_process(train, tmp_path_factory):
    out = tmp_path_factory.mktemp('single')
    train(*RUN, f'--out_dir={out}')
    return out


def assert_same_run(out, reference):
    (rows, evals), (ref_rows, ref_evals) = read_log(out), read_log(reference)
    assert sorted(rows) == sorted(ref_rows) == list(range(6))
    for it in rows:
        assert rows[it]['loss'] == pytest.approx(ref_rows[it]['loss'], abs=1e-5), it
    assert sorted(evals) == sorted(ref_evals) == [0, 3, 6]
    for it in evals:
        assert evals[it]['val_loss'] == pytest.approx(ref_evals[it]['val_loss'], abs=1e-5), it
    # the weights and AdamW's moments too: Adam's update hardly changes when every gradient is
    # scaled (a sum over ranks instead of the mean, say), but its moments scale with them. Bitwise:
    # with two ranks the mean (g0 + g1) / 2 and the accumulated g0 / 2 + g1 / 2 round alike (halving
    # is exact)
    ckpt, ref = (
        torch.load(os.path.join(d, 'ckpt.pt'), weights_only=True) for d in (out, reference)
    )
    assert ckpt['iter_num'] == ref['iter_num'] == 6
    torch.testing.assert_close(ckpt['model'], ref['model'], rtol=0, atol=0)
    torch.testing.assert_close(
        ckpt['optimizer']['state'], ref['optimizer']['state'], rtol=0, atol=0
    )


def test_two_processes_match_one(train, single_process, tmp_path):
    result = train(*RUN, f'--out_dir={tmp_path}', torchrun=['--standalone', '--nproc_per_node=2'])
    assert result.stdout.count('config: ') == 1  # only rank 0 prints
    assert_same_run(tmp_path, single_process)


def test_two_nodes_over_loopback(train_command, single_process, tmp_path):
    port = free_port()
    procs = [
        subprocess.Popen(
            train_command(
                *RUN,
                f'--out_dir={tmp_path}',
                torchrun=[
                    '--nnodes=2',
                    f'--node_rank={node}',
                    '--nproc_per_node=1',
                    '--master_addr=127.0.0.1',
                    f'--master_port={port}',
                ],
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=hermetic_env(),
        )
        for node in (0, 1)
    ]
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 0, stdout + stderr
    assert_same_run(tmp_path, single_process)


def test_accumulation_steps_must_divide_by_world_size(train, tmp_path):
    result = train(
        '--gradient_accumulation_steps=3',
        f'--out_dir={tmp_path}',
        torchrun=['--standalone', '--nproc_per_node=2'],
        check=False,
    )
    assert result.returncode != 0
    message = (
        "error: gradient_accumulation_steps (3) is the global count and must be divisible by the "
        "number of processes (2)"
    )
    assert result.stderr.count(message) == 2  # one line from each process, no traceback of ours
    assert not (tmp_path / 'log.jsonl').exists()


def test_ddp_gradients_are_its_buckets(tmp_path):
    # DDP's all-reduce buckets hold the gradients themselves (gradient_as_bucket_view), not a copy:
    # from the second iteration on every gradient is a view into the one bucket of this small
    # model, through the micro-steps without gradient sync too (distributed.zero_grad keeps the
    # views), and the weights train as without DDP, bit for bit (one process: the mean is the
    # gradient)
    assert_gradients_are_buckets('cpu', 'gloo', tmp_path)


def assert_gradients_are_buckets(device, backend, tmp_path):
    """The check above in a process group of this process alone, on device (tests/test_gpu_path.py
    runs it on CUDA with nccl, and checks the allocator there); returns the DDP run's bytes
    allocated on the device (CUDA) after each micro-step, the first iteration's left out."""
    dist.init_process_group(
        backend, init_method=f'file://{tmp_path / "store"}', rank=0, world_size=1
    )
    try:
        runs = []
        for ddp in (False, True):
            torch.manual_seed(0)
            config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65)
            model, train_model = distributed.parallelize(GPT(config), device, 'float32', ddp)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
            data = torch.Generator().manual_seed(1)
            storages, allocated = [], []  # per micro-step: the gradients' tensors, CUDA's bytes
            for _ in range(3):
                for micro_step in range(2):
                    distributed.set_gradient_sync(train_model, micro_step == 1)
                    x = torch.randint(65, (2, 16), generator=data).to(device)
                    train_model(x, x)[1].backward()
                    storages.append(
                        len({p.grad.untyped_storage().data_ptr() for p in model.parameters()})
                    )
                    if device != 'cpu':
                        allocated.append(torch.cuda.memory_allocated(device))
                opt.step()
                distributed.zero_grad(opt, train_model)
            runs.append((train_model, storages, model.state_dict()))
        (plain, plain_storages, plain_weights), (ddp, ddp_storages, ddp_weights) = runs
        assert isinstance(ddp, DDP) and ddp.gradient_as_bucket_view
        assert all(n == len(list(plain.parameters())) for n in plain_storages)
        assert ddp_storages[2:] == [1] * 4, ddp_storages
        torch.testing.assert_close(ddp_weights, plain_weights, rtol=0, atol=0)
        return allocated[2:]
    finally:
        dist.destroy_process_group()
