"""The GPU path. What a CPU can check runs everywhere: the MFU table matched by GPU name, cached decoding
compiled without graph breaks. The tests marked gpu need a CUDA GPU and are skipped without one (see
conftest.py); run them on a GPU machine with `python -m pytest -q -m gpu`."""
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import checkpoints
import runtime
from conftest import ROOT, error_line, hermetic_env, read_log
from configurator import UserError
from model import GPT, GPTConfig
from runtime import device_peak_flops, matmul_flops, table_peak_flops

CUDA = ['--device=cuda', '--eval_iters=2', '--learning_rate=1e-2']


@pytest.mark.parametrize('name, flops', [
    ('NVIDIA A100-SXM4-40GB', 312e12), ('NVIDIA A100-SXM4-80GB', 312e12), ('NVIDIA A100 80GB PCIe', 312e12),
    ('NVIDIA H100 80GB HBM3', 989e12), ('NVIDIA H100 PCIe', 756e12), ('NVIDIA H100 NVL', 835e12),
    ('NVIDIA H200', 989e12), ('NVIDIA H200 NVL', 835e12), ('NVIDIA GH200 480GB', 989e12),
    ('NVIDIA L4', 121e12), ('NVIDIA L40S', 362e12), ('NVIDIA A10', 125e12), ('Tesla T4', 65e12),
    ('Tesla V100-SXM2-16GB', 125e12), ('Tesla V100-PCIE-32GB', 112e12), ('Tesla V100S-PCIE-32GB', 130e12),
    ('NVIDIA A10G', None), ('NVIDIA L40', None), ('NVIDIA GeForce RTX 4090', None), ('NVIDIA RTX A6000', None),
])
def test_peak_flops_table_matches_the_variant(name, flops):
    assert table_peak_flops(name) == flops


def test_cached_decoding_compiles_without_graph_breaks():
    # Dynamo itself (the eager backend: no code generation, so this runs in a second): the cache position
    # turns symbolic after the first decoding steps, and nothing in the forward pass may break on it
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=65, dropout=0.0)).eval()
    prompt = torch.randint(65, (2, 5))
    expected = model.generate(prompt, 12, temperature=0)
    model.forward = torch.compile(model.forward, backend='eager')
    assert torch.equal(model.generate(prompt, 12, temperature=0), expected)
    assert dict(counters['graph_break']) == {}
    assert counters['stats']['unique_graphs'] <= 3  # prefill, decoding steps until the position is symbolic


# ---- on a CUDA GPU ----

@pytest.mark.gpu
@pytest.mark.parametrize('dtype', ['bfloat16', 'float16'])
def test_trains_compiled_in_mixed_precision(train, dtype, tmp_path):
    args = [*CUDA, '--compile=True', f'--dtype={dtype}', '--batch_size=16', '--max_iters=30', '--eval_interval=30',
            '--warmup_iters=0', f'--out_dir={tmp_path}']
    if dtype == 'bfloat16' and not torch.cuda.is_bf16_supported(including_emulation=False):  # T4, V100
        assert 'has no bfloat16 support; use --dtype=float16' in error_line(train(*args, check=False))
        return
    train(*args)
    rows, evals = read_log(tmp_path)
    assert sorted(rows) == list(range(30)) and all(math.isfinite(r['loss']) for r in rows.values())
    assert evals[30]['val_loss'] < evals[0]['val_loss'] - 0.3
    ckpt = checkpoints.load_checkpoint(str(tmp_path / 'ckpt.pt'), keys=('model', 'scaler', 'config'))
    assert ckpt['config']['dtype'] == dtype and ckpt['config']['compile'] is True
    assert not [k for k in ckpt['model'] if k.startswith('_orig_mod.')]
    assert (ckpt['scaler']['scale'] > 0) if dtype == 'float16' else ckpt['scaler'] == {}


# train.py under torch's sync debug mode, which warns at every operation that makes the host wait for the GPU
SYNC_DEBUG = ("import runpy, sys, warnings, torch; warnings.simplefilter('always'); "
              "torch.cuda.set_sync_debug_mode('warn'); sys.argv = sys.argv[1:]; "
              "runpy.run_path(sys.argv[0], run_name='__main__')")


@pytest.mark.gpu
def test_one_host_sync_per_training_iteration(train_command, tmp_path):
    def syncs(iters):  # the same evaluations and checkpoint in both runs: only the iterations' syncs differ
        cmd = train_command(*CUDA, f'--max_iters={iters}', f'--eval_interval={iters}',
                            f'--out_dir={tmp_path / str(iters)}')
        result = subprocess.run([sys.executable, '-c', SYNC_DEBUG, *cmd[1:]], cwd=ROOT, capture_output=True, text=True,
                                env=hermetic_env(), timeout=600)
        assert result.returncode == 0, result.stderr
        return result.stderr.count('called a synchronizing CUDA operation')
    assert syncs(20) - syncs(10) == 10  # the stats read after each step is queued, nothing else


@pytest.mark.gpu
def test_torchrun_with_nccl_matches_one_process(train, tmp_path):
    args = [*CUDA, '--dtype=float32', '--dropout=0', '--max_iters=10', '--eval_interval=5']
    train(*args, f'--out_dir={tmp_path / "single"}')
    train(*args, f'--out_dir={tmp_path / "ddp"}', torchrun=['--standalone', '--nproc_per_node=1'])
    ckpt = checkpoints.load_checkpoint(str(tmp_path / 'ddp' / 'ckpt.pt'), keys=('config',))
    assert ckpt['config']['device'] == 'cuda:0'  # the process group's own GPU (LOCAL_RANK), so nccl ran
    (rows, evals), (ref_rows, ref_evals) = read_log(tmp_path / 'ddp'), read_log(tmp_path / 'single')
    assert sorted(rows) == sorted(ref_rows) == list(range(10)) and sorted(evals) == [0, 5, 10]
    for it in rows:
        assert rows[it]['loss'] == pytest.approx(ref_rows[it]['loss'], abs=1e-4), it


@pytest.mark.gpu
def test_resume_on_the_gpu_continues_the_same_run(train, tmp_path):
    # dropout draws from the CUDA generator: resuming must restore its state, or the masks (and losses) differ
    args = [*CUDA, '--dtype=float32', '--dropout=0.1', '--eval_interval=10', '--warmup_iters=2', '--lr_decay_iters=20']
    train(*args, '--max_iters=20', f'--out_dir={tmp_path / "straight"}')
    train(*args, '--max_iters=10', f'--out_dir={tmp_path / "split"}')
    train(*args, '--max_iters=20', '--init_from=resume', f'--out_dir={tmp_path / "split"}')
    ckpt = checkpoints.load_checkpoint(str(tmp_path / 'split' / 'ckpt.pt'), keys=('rng_states',))
    assert len(ckpt['rng_states'][0]['cuda']) == torch.cuda.device_count()
    (rows, evals), (ref_rows, ref_evals) = read_log(tmp_path / 'split'), read_log(tmp_path / 'straight')
    assert sorted(rows) == sorted(ref_rows) == list(range(20))
    for it in rows:
        assert rows[it]['loss'] == pytest.approx(ref_rows[it]['loss'], abs=1e-4), it
    assert evals[20]['val_loss'] == pytest.approx(ref_evals[20]['val_loss'], abs=1e-4)


@pytest.mark.gpu
def test_cached_and_uncached_greedy_generation_agree_on_the_gpu():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=65, dropout=0.0)).cuda().eval()
    prompt = torch.randint(65, (3, 4), device='cuda')
    cached = model.generate(prompt, 28, temperature=0)  # up to block_size, where the two windows are the same
    assert cached.shape == (3, 32) and cached.device.type == 'cuda'
    assert torch.equal(cached, model.generate(prompt, 28, temperature=0, use_cache=False))


@pytest.mark.gpu
def test_mfu_against_this_gpus_peak(train, tmp_path):
    dtype = 'bfloat16' if torch.cuda.is_bf16_supported(including_emulation=False) else 'float16'
    peak, entry = device_peak_flops('cuda', dtype), table_peak_flops(torch.cuda.get_device_name())
    measured = matmul_flops('cuda', dtype, 4096)
    if entry:  # the table's entry for this GPU: a datasheet peak, which real matmuls approach but never pass
        assert peak == entry and 0.2 * peak < measured < peak, (torch.cuda.get_device_name(), measured, peak)
    else:  # measured in the training dtype, so a second measurement agrees with it
        assert peak == pytest.approx(measured, rel=0.5)
    train(*CUDA, f'--dtype={dtype}', '--max_iters=12', '--eval_interval=12', f'--out_dir={tmp_path}')
    rows, _ = read_log(tmp_path)
    mfus = [rows[it]['mfu'] for it in range(5, 12)]  # measured from the sixth iteration on
    assert all(0 < m < 1 for m in mfus), mfus


@pytest.mark.gpu
def test_device_index_selects_the_current_gpu():
    n = torch.cuda.device_count()
    with pytest.raises(UserError, match=f"this machine has {n} GPU"):
        runtime.pick_device(f'cuda:{n}')
    code = f"import runtime, torch; runtime.pick_device('cuda:{n - 1}'); print(torch.cuda.current_device())"
    result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, env=hermetic_env())
    assert result.stdout.strip() == str(n - 1), result.stderr


@pytest.mark.gpu
def test_sample_compiled_has_no_graph_breaks(train, tmp_path):
    train('--max_iters=5', '--eval_interval=5', '--eval_iters=1', f'--out_dir={tmp_path}')  # a checkpoint, on the CPU
    cmd = [sys.executable, os.path.join(ROOT, 'sample.py'), f'--out_dir={tmp_path}', '--device=cuda', '--compile=True',
           '--num_samples=2', '--max_new_tokens=60', '--start=ROMEO:']  # 66 positions: the cache of 32 is rebuilt
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                            env=hermetic_env(TORCH_LOGS='graph_breaks,recompiles'))
    assert result.returncode == 0, result.stderr
    assert 'Graph break' not in result.stderr, result.stderr
    assert len(re.findall(r'Recompiling function', result.stderr)) < 8, result.stderr  # below Dynamo's limit
    assert result.stdout.count('ROMEO:') == 2
