"""runtime.py: device and dtype choices, RNG state that survives a weights_only checkpoint, atomic
checkpoint writes and clear failures when reading."""

import copy
import os
import random
import subprocess
import sys
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from nanogpt import checkpoints
from nanogpt import distributed, runtime
from configurator import ROOT, UserError
from model import GPT, GPTConfig


def test_device_and_dtype_defaults_on_this_machine():
    expected = (
        'cuda'
        if torch.cuda.is_available()
        else 'mps'
        if torch.backends.mps.is_available()
        else 'cpu'
    )
    assert runtime.pick_device('auto') == expected
    assert runtime.pick_dtype('auto', 'cpu') == 'float32'
    assert runtime.pick_dtype('bfloat16', 'cpu') == 'bfloat16'
    # slow, but the GPU's GradScaler path runs
    assert runtime.pick_dtype('float16', 'cpu') == 'float16'
    assert runtime.pick_compile(None, 'cpu') is False and runtime.pick_compile(True, 'cpu') is True


@pytest.mark.parametrize(
    'call, message',
    [
        (lambda: runtime.pick_device('tpu'), "unknown device 'tpu'"),
        (lambda: runtime.pick_dtype('float8', 'cpu'), "unknown dtype 'float8'"),
        (lambda: runtime.pick_compile('yes', 'cpu'), "compile must be True, False or None"),
    ],
)
def test_impossible_choices(call, message):
    with pytest.raises(UserError, match=message):
        call()


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has a GPU')
def test_cuda_without_gpu():
    with pytest.raises(UserError, match="no CUDA GPU is available"):
        runtime.pick_device('cuda:0')


def test_autocast_context():
    assert isinstance(runtime.autocast_context('cpu', 'float32'), nullcontext)
    with runtime.autocast_context('cpu', 'bfloat16'):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_setup_is_the_separate_calls():
    device, dtype, ctx = runtime.setup('auto', 'auto', seed=3)
    assert device == runtime.pick_device('auto') and dtype == runtime.pick_dtype('auto', device)
    expected = draws()
    runtime.seed_everything(3)
    assert draws() == expected  # every generator seeded
    device, dtype, ctx = runtime.setup('cpu', 'bfloat16')
    with ctx:
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with pytest.raises(UserError, match="unknown dtype 'float8'"):
        runtime.setup('cpu', 'float8')


def test_inference_model_for_evaluation_and_for_generation():
    # evaluation: the float32 weights in eval mode under autocast, the numbers of training's own
    # evaluation; generation: the weights cast to bfloat16 once, so its loss is rounded differently
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65, dropout=0.5)
    model = GPT(config)
    x = torch.randint(65, (2, 16))
    device, dtype, ctx = runtime.setup('cpu', 'bfloat16')
    with torch.no_grad(), ctx:
        expected = copy.deepcopy(model).eval()(x, x)[1]
    evaluating = runtime.inference_model(copy.deepcopy(model), device, dtype, compile=None)
    assert not evaluating.training and {p.dtype for p in evaluating.parameters()} == {torch.float32}
    assert 'forward' not in vars(evaluating)  # compile=None: not compiled on a CPU
    generating = runtime.inference_model(model, device, dtype, cast=True)
    assert not generating.training and {p.dtype for p in generating.parameters()} == {
        torch.bfloat16
    }
    with torch.no_grad():
        with ctx:
            assert torch.equal(evaluating(x, x)[1], expected)
        cast = generating(x, x)[1]
    assert cast.dtype == torch.float32 and cast != expected
    assert cast.item() == pytest.approx(expected.item(), rel=0.01)


def draws():
    return random.random(), np.random.rand(), np.random.randn(), torch.rand(3).tolist()


def test_rng_state_round_trip_through_weights_only_checkpoint(tmp_path):
    runtime.seed_everything(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    checkpoints.save_checkpoint({'rng': runtime.rng_state()}, str(tmp_path / 'rng.pt'))
    expected = draws()
    runtime.seed_everything(4)
    runtime.set_rng_state(torch.load(tmp_path / 'rng.pt', weights_only=True)['rng'])
    assert draws() == expected


def test_save_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / 'ckpt.pt')
    checkpoints.save_checkpoint({'iter_num': 1}, path)

    def crash(obj, f):  # half a file written, then the process dies
        f.write(b'PK\x03\x04 partial')
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, 'save', crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint({'iter_num': 2}, path)
    assert torch.load(path, weights_only=True) == {'iter_num': 1}
    assert os.listdir(tmp_path) == ['ckpt.pt']


def test_load_errors(tmp_path):
    with pytest.raises(
        UserError, match=f"no checkpoint at {tmp_path / 'ckpt.pt'}: train one first"
    ):
        checkpoints.load_checkpoint(str(tmp_path / 'ckpt.pt'))
    (tmp_path / 'empty.pt').write_bytes(b'')
    with pytest.raises(UserError, match='is truncated or corrupt'):
        checkpoints.load_checkpoint(str(tmp_path / 'empty.pt'))
    torch.save([1, 2], tmp_path / 'list.pt')
    with pytest.raises(UserError, match='is not a nanoGPT checkpoint: it has no model, model_args'):
        checkpoints.load_checkpoint(str(tmp_path / 'list.pt'))


def test_single_process_helpers():
    assert distributed.on_rank0(lambda: 42) == 42
    assert distributed.init_distributed('cpu') == (False, 0, 0, 1, 'cpu')  # no torchrun environment
    assert distributed.gather_to_rank0({'a': 1}) == [{'a': 1}]
    assert runtime.device_type('cuda:1') == 'cuda'


def test_checkpoints_are_memory_mapped(tmp_path):
    """Ours and nanoGPT's (a plain torch.save): the tensors load as views of the file, so rewriting
    the file's bytes in place shows through them; a copy in memory would keep the old values."""
    path = str(tmp_path / 'ckpt.pt')
    for save in (checkpoints.save_checkpoint, torch.save):
        save({'model': {'w': torch.zeros(4096)}, 'model_args': {'n_layer': 1}}, path)
        ckpt = checkpoints.load_checkpoint(path)
        torch.save(
            {'model': {'w': torch.ones(4096)}, 'model_args': {'n_layer': 1}},
            str(tmp_path / 'other.pt'),
        )
        # the same layout, other values: overwrite in place, same inode
        with open(path, 'r+b') as f:
            f.write((tmp_path / 'other.pt').read_bytes())
        assert torch.equal(ckpt['model']['w'], torch.ones(4096))
        assert ckpt['model_args'] == {'n_layer': 1}


def test_start_up_leaves_fsdp_unimported_and_exit_keeps_atexit(tmp_path):
    # sample.py and eval.py import runtime: FSDP and its state-dict helpers pull in DTensor (~0.6 s
    # of start-up) and are imported only where fsdp is used. exit_run() ends a single process
    # without the slow final garbage collection, but atexit handlers still run.
    marker = tmp_path / 'atexit-ran'
    code = (
        "import atexit, sys, model, eval\n"
        "from nanogpt import distributed, tokenizer, checkpoints, dataloader\n"
        "assert 'torch.distributed.fsdp' not in sys.modules, 'fsdp imported at start-up'\n"
        "assert 'torch.distributed.checkpoint' not in sys.modules,"
        " 'state-dict helpers imported at start-up'\n"
        "config = model.GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=4, vocab_size=8)\n"
        "assert not distributed.sharded(model.GPT(config))\n"
        f"atexit.register(lambda: open({str(marker)!r}, 'w').close())\n"
        "distributed.exit_run()\n"
    )
    result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert marker.exists()
