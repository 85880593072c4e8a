"""The GPU path. What a CPU can check runs everywhere: the MFU table matched by GPU name and dtype,
cached decoding compiled without graph breaks and without weight conversions. The tests marked gpu
need a CUDA GPU and are skipped without one (see conftest.py); run them on a GPU machine with
`python -m pytest -q
-m gpu`."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from nanogpt import checkpoints
from nanogpt import runtime
from conftest import ROOT, error_line, hermetic_env, read_log
from test_eval import eval_equals_training_log
from test_eval import run as run_eval
from configurator import UserError
from model import GPT, GPTConfig
from nanogpt.runtime import device_peak_flops, matmul_flops, table_peak_flops

CUDA = ['--device=cuda', '--eval_iters=2', '--learning_rate=1e-2']


@pytest.mark.parametrize(
    'name, half, single',
    [
        ('NVIDIA A100-SXM4-40GB', 312e12, 156e12),
        ('NVIDIA A100-SXM4-80GB', 312e12, 156e12),
        ('NVIDIA A100 80GB PCIe', 312e12, 156e12),
        ('NVIDIA H100 80GB HBM3', 989e12, 495e12),
        ('NVIDIA H100 PCIe', 756e12, 378e12),
        ('NVIDIA H100 NVL', 835e12, 418e12),
        ('NVIDIA H200', 989e12, 495e12),
        ('NVIDIA H200 NVL', 835e12, 418e12),
        ('NVIDIA GH200 480GB', 989e12, 495e12),
        ('NVIDIA L4', 121e12, 60e12),
        ('NVIDIA L40S', 362e12, 183e12),
        ('NVIDIA A10', 125e12, 62.5e12),
        ('Tesla T4', 65e12, 8.1e12),
        ('Tesla V100-SXM2-16GB', 125e12, 15.7e12),
        ('Tesla V100-PCIE-32GB', 112e12, 14e12),
        ('Tesla V100S-PCIE-32GB', 130e12, 16.4e12),
        ('NVIDIA A10G', None, None),
        ('NVIDIA L40', None, None),
        ('NVIDIA GeForce RTX 4090', None, None),
        ('NVIDIA RTX A6000', None, None),
    ],
)
def test_peak_flops_table_matches_the_variant_and_dtype(name, half, single):
    # a float32 run's peak is TF32's (train.py allows it), or plain float32's on GPUs without TF32:
    # half or less of the bfloat16 peak, ~8x less on a T4
    assert table_peak_flops(name, 'bfloat16') == table_peak_flops(name, 'float16') == half
    assert table_peak_flops(name, 'float32') == single


def test_cached_decoding_compiles_without_graph_breaks():
    # Dynamo itself (the eager backend: no code generation, so this runs in a second): the cache
    # position turns symbolic after the first decoding steps, and nothing in the forward pass may
    # break on it
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=65, dropout=0.0)
    ).eval()
    prompt = torch.randint(65, (2, 5))
    expected = model.generate(prompt, 12, temperature=0)
    model.forward = torch.compile(model.forward, backend='eager')
    assert torch.equal(model.generate(prompt, 12, temperature=0), expected)
    assert dict(counters['graph_break']) == {}
    # prefill, decoding steps until the position is symbolic
    assert counters['stats']['unique_graphs'] <= 3


def test_compiled_decoding_in_bfloat16_converts_no_weights():
    # sample.py, eval.py and bench.py run the model in the inference dtype
    # (runtime.inference_model), not under autocast: eager autocast caches its weight casts, a
    # compiled graph cannot, so under autocast every decoding step converted every weight again.
    # Counted in the graphs AOTAutograd hands to the compiler
    from torch._dynamo.backends.common import aot_autograd

    casts = []

    def count(gm, example_inputs):
        casts.append(sum(node.target is torch.ops.aten._to_copy.default for node in gm.graph.nodes))
        return gm

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=65, dropout=0.0)
    )
    model = runtime.inference_model(model, 'cpu', 'bfloat16', cast=True)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters()) and not model.training
    prompt = torch.randint(65, (2, 5))
    expected = model.generate(prompt, 12, temperature=0)
    model.forward = torch.compile(model.forward, backend=aot_autograd(fw_compiler=count))
    assert torch.equal(model.generate(prompt, 12, temperature=0), expected)
    # under autocast, 22 in each graph of this model
    assert casts and all(n == 0 for n in casts), casts


# ---- on a CUDA GPU ----


@pytest.mark.gpu
@pytest.mark.parametrize('dtype', ['bfloat16', 'float16'])
def test_trains_compiled_in_mixed_precision(train, dtype, tmp_path):
    args = [
        *CUDA,
        '--compile=True',
        f'--dtype={dtype}',
        '--batch_size=16',
        '--max_iters=30',
        '--eval_interval=30',
        '--warmup_iters=0',
        f'--out_dir={tmp_path}',
    ]
    # T4, V100
    if dtype == 'bfloat16' and not torch.cuda.is_bf16_supported(including_emulation=False):
        assert 'has no bfloat16 support; use --dtype=float16' in error_line(
            train(*args, check=False)
        )
        return
    train(*args)
    rows, evals = read_log(tmp_path)
    assert sorted(rows) == list(range(30)) and all(math.isfinite(r['loss']) for r in rows.values())
    assert evals[30]['val_loss'] < evals[0]['val_loss'] - 0.3
    ckpt = checkpoints.load_checkpoint(
        str(tmp_path / 'ckpt.pt'), keys=('model', 'scaler', 'config')
    )
    assert ckpt['config']['dtype'] == dtype and ckpt['config']['compile'] is True
    assert not [k for k in ckpt['model'] if k.startswith('_orig_mod.')]
    assert (ckpt['scaler']['scale'] > 0) if dtype == 'float16' else ckpt['scaler'] == {}


# train.py under torch's sync debug mode, which warns at every operation that makes the host wait
# for the GPU
SYNC_DEBUG = (
    "import runpy, sys, warnings, torch; warnings.simplefilter('always'); "
    "torch.cuda.set_sync_debug_mode('warn'); sys.argv = sys.argv[1:]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


@pytest.mark.gpu
@pytest.mark.parametrize('compile', [False, True])  # True is CUDA's default
def test_one_host_sync_per_training_iteration(train_command, compile, tmp_path):
    # the same evaluations and checkpoint in both runs: only the iterations' syncs differ
    def syncs(iters):
        cmd = train_command(
            *CUDA,
            f'--compile={compile}',
            f'--max_iters={iters}',
            f'--eval_interval={iters}',
            f'--out_dir={tmp_path / str(iters)}',
        )
        result = subprocess.run(
            [sys.executable, '-c', SYNC_DEBUG, *cmd[1:]],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env=hermetic_env(),
            timeout=600,
        )
        assert result.returncode == 0, result.stderr
        return result.stderr.count('called a synchronizing CUDA operation')

    assert syncs(20) - syncs(10) == 10  # the stats read after each step is queued, nothing else


def losses(out_dir):
    rows, _ = read_log(out_dir)
    return [rows[it]['loss'] for it in sorted(rows)]


@pytest.mark.gpu
# with one GPU the all-reduce has nothing to average: one process would test nothing more
@pytest.mark.gpus(2)
def test_torchrun_with_nccl_on_every_gpu_matches_one_process(train, tmp_path):
    n = torch.cuda.device_count()
    # the same global batch: n micro-batches accumulated by one process, one on each of n processes
    args = [
        *CUDA,
        '--dtype=float32',
        '--dropout=0',
        '--max_iters=10',
        '--eval_interval=5',
        f'--gradient_accumulation_steps={n}',
    ]
    train(*args, f'--out_dir={tmp_path / "single"}')
    train(
        *args, f'--out_dir={tmp_path / "ddp"}', torchrun=['--standalone', f'--nproc_per_node={n}']
    )
    ckpt = checkpoints.load_checkpoint(str(tmp_path / 'ddp' / 'ckpt.pt'), keys=('config',))
    assert ckpt['config']['device'] == 'cuda:0'  # rank 0's own GPU (LOCAL_RANK), so nccl ran
    assert losses(tmp_path / 'ddp') == pytest.approx(losses(tmp_path / 'single'), abs=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_fsdp_over_nccl_on_every_gpu_matches_ddp(train, dtype, tmp_path):
    # every GPU here (one is enough for FSDP's CUDA mesh, its bfloat16 policy and its per-Block
    # torch.compile; two or more also shard). float32 runs eager: the same function summed in
    # another order, 1e-4 apart as DDP is from one process. bfloat16 runs compiled (CUDA's default)
    # and FSDP with activation checkpointing: FSDP's graphs are per attention and MLP, DDP's the
    # whole model, and inductor rounds each its own way, which bfloat16 makes visible; without
    # clipping (FSDP sums the norm over shards in another order)
    n = torch.cuda.device_count()
    args = [
        *CUDA,
        f'--dtype={dtype}',
        '--dropout=0',
        '--max_iters=10',
        '--eval_interval=10',
        '--grad_clip=0',
        f'--gradient_accumulation_steps={2 * n}',
        *(['--compile=False'] if dtype == 'float32' else []),
    ]
    torchrun = ['--standalone', f'--nproc_per_node={n}']
    # T4, V100
    if dtype == 'bfloat16' and not torch.cuda.is_bf16_supported(including_emulation=False):
        assert 'has no bfloat16 support' in error_line(train(*args, '--fsdp=True', check=False))
        return
    train(*args, f'--out_dir={tmp_path / "ddp"}', torchrun=torchrun)
    fsdp = ['--fsdp=True'] + (['--activation_checkpointing=True'] if dtype == 'bfloat16' else [])
    train(*args, *fsdp, f'--out_dir={tmp_path / "fsdp"}', torchrun=torchrun)
    tolerance = 1e-4 if dtype == 'float32' else 0.02
    assert losses(tmp_path / 'fsdp') == pytest.approx(losses(tmp_path / 'ddp'), abs=tolerance)


@pytest.mark.gpu
def test_compiled_with_activation_checkpointing_on_the_gpu(train, tmp_path):
    # torch.compile traces activation checkpointing as one of its own operators, recomputation
    # included
    args = [
        *CUDA,
        '--dtype=float32',
        '--dropout=0',
        '--compile=True',
        '--max_iters=10',
        '--eval_interval=10',
    ]
    train(*args, f'--out_dir={tmp_path / "plain"}')
    train(*args, '--activation_checkpointing=True', f'--out_dir={tmp_path / "checkpointed"}')
    assert losses(tmp_path / 'checkpointed') == pytest.approx(losses(tmp_path / 'plain'), abs=1e-3)


@pytest.mark.gpu
def test_resume_on_the_gpu_continues_the_same_run(train, tmp_path):
    # dropout draws from the CUDA generator: resuming must restore its state, or the masks (and
    # losses) differ
    args = [
        *CUDA,
        '--dtype=float32',
        '--dropout=0.1',
        '--eval_interval=10',
        '--warmup_iters=2',
        '--lr_decay_iters=20',
    ]
    train(*args, '--max_iters=20', f'--out_dir={tmp_path / "straight"}')
    train(*args, '--max_iters=10', f'--out_dir={tmp_path / "split"}')
    train(*args, '--max_iters=20', '--init_from=resume', f'--out_dir={tmp_path / "split"}')
    ckpt = checkpoints.load_checkpoint(str(tmp_path / 'split' / 'ckpt.pt'), keys=('rng_states',))
    assert len(ckpt['rng_states'][0]['cuda']) == torch.cuda.device_count()
    (rows, evals), (ref_rows, ref_evals) = (
        read_log(tmp_path / 'split'),
        read_log(tmp_path / 'straight'),
    )
    assert sorted(rows) == sorted(ref_rows) == list(range(20))
    for it in rows:
        assert rows[it]['loss'] == pytest.approx(ref_rows[it]['loss'], abs=1e-4), it
    assert evals[20]['val_loss'] == pytest.approx(ref_evals[20]['val_loss'], abs=1e-4)


@pytest.mark.gpu
def test_cached_and_uncached_greedy_generation_agree_on_the_gpu():
    torch.manual_seed(0)
    model = (
        GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=65, dropout=0.0))
        .cuda()
        .eval()
    )
    prompt = torch.randint(65, (3, 4), device='cuda')
    # up to block_size, where the two windows are the same
    cached = model.generate(prompt, 28, temperature=0)
    assert cached.shape == (3, 32) and cached.device.type == 'cuda'
    assert torch.equal(cached, model.generate(prompt, 28, temperature=0, use_cache=False))


@pytest.mark.gpu
@pytest.mark.parametrize('dtype', ['half', 'float32'])
def test_mfu_against_this_gpus_peak(train, dtype, tmp_path):
    if dtype == 'half':
        dtype = 'bfloat16' if torch.cuda.is_bf16_supported(including_emulation=False) else 'float16'
    # as train.py does: float32 matmuls on TF32 tensor cores where there are some
    runtime.allow_tf32('cuda')
    peak, entry = (
        device_peak_flops('cuda', dtype),
        table_peak_flops(torch.cuda.get_device_name(), dtype),
    )
    measured = matmul_flops('cuda', dtype, 4096)
    # the table's entry for this GPU and dtype: a datasheet peak, which real matmuls approach but
    # never pass
    if entry:
        assert peak == entry and 0.2 * peak < measured < peak, (
            torch.cuda.get_device_name(),
            dtype,
            measured,
            peak,
        )
    else:  # measured in the training dtype, so a second measurement agrees with it
        assert peak == pytest.approx(measured, rel=0.5)
    train(
        *CUDA, f'--dtype={dtype}', '--max_iters=12', '--eval_interval=12', f'--out_dir={tmp_path}'
    )
    rows, _ = read_log(tmp_path)
    mfus = [rows[it]['mfu'] for it in range(5, 12)]  # measured from the sixth iteration on
    assert all(0 < m < 1 for m in mfus), mfus


@pytest.mark.gpu
def test_device_index_selects_the_current_gpu():
    n = torch.cuda.device_count()
    with pytest.raises(UserError, match=f"this machine has {n} GPU"):
        runtime.pick_device(f'cuda:{n}')
    code = (
        f"import torch; from nanogpt import runtime; runtime.pick_device('cuda:{n - 1}'); "
        "print(torch.cuda.current_device())"
    )
    result = subprocess.run(
        [sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, env=hermetic_env()
    )
    assert result.stdout.strip() == str(n - 1), result.stderr


@pytest.mark.gpu
def test_eval_gives_the_training_logs_val_loss_on_the_gpu(train, tmp_path, shakespeare_char):
    # eval.py runs the float32 weights under autocast, as training's evaluation does
    dtype = 'bfloat16' if torch.cuda.is_bf16_supported(including_emulation=False) else 'float16'
    logged, evaluated = eval_equals_training_log(train, tmp_path, shakespeare_char, 'cuda', dtype)
    assert evaluated == pytest.approx(logged, rel=1e-5)
    # compiled (its forward, dynamic shapes) under autocast: fused kernels round a little otherwise
    out = tmp_path / 'out'
    run_eval(f'--out_dir={out}', '--device=cuda', f'--dtype={dtype}', '--compile=True')
    compiled = json.load(open(out / 'eval.json'))['results']['val']['loss']
    assert compiled == pytest.approx(logged, rel=2e-3)
    # and its float32 is float32 (TF32 off): the CPU's loss, to float rounding
    losses = {}
    for device in ('cpu', 'cuda'):
        run_eval(
            f'--out_dir={out}',
            f'--device={device}',
            '--dtype=float32',
            f'--out_json={tmp_path / device}.json',
        )
        losses[device] = json.load(open(f'{tmp_path / device}.json'))['results']['val']['loss']
    assert losses['cuda'] == pytest.approx(losses['cpu'], rel=1e-5)


@pytest.mark.gpu
def test_sample_compiled_has_no_graph_breaks(train, tmp_path):
    # a checkpoint, on the CPU
    train('--max_iters=5', '--eval_interval=5', '--eval_iters=1', f'--out_dir={tmp_path}')
    cmd = [
        sys.executable,
        os.path.join(ROOT, 'sample.py'),
        f'--out_dir={tmp_path}',
        '--device=cuda',
        '--compile=True',
        # 66 positions: the cache of 32 is rebuilt
        '--num_samples=2',
        '--max_new_tokens=60',
        '--start=ROMEO:',
    ]
    result = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=600,
        env=hermetic_env(TORCH_LOGS='graph_breaks,recompiles'),
    )
    assert result.returncode == 0, result.stderr
    assert 'Graph break' not in result.stderr, result.stderr
    # below Dynamo's limit
    assert len(re.findall(r'Recompiling function', result.stderr)) < 8, result.stderr
    assert result.stdout.count('ROMEO:') == 2


# ---- on a CUDA GPU: the numbers printed and the memory held (each test in its own tmp_path, any
# torchrun on a port of its own: `python -m pytest -q -m gpu -n 4` runs them side by side) ----

SMALL = ['--n_layer=4', '--n_head=4', '--n_embd=128', '--block_size=64', '--batch_size=8']


@pytest.mark.gpu
@pytest.mark.parametrize(
    'how', [[], ['--freeze_layers=3'], ['--lora_rank=8']], ids=['full', 'freeze', 'lora']
)
def test_mfu_counts_the_flops_that_run(train, how, tmp_path):
    # the flops behind the logged mfu (its first value is one iteration's: flops / time / peak)
    # against torch's FlopCounterMode over one forward+backward of the same model and batch: a
    # frozen weight gets no gradient, whose matmul does not run, and frozen lower Blocks no
    # backward at all
    from torch.utils.flop_counter import FlopCounterMode

    dtype = 'bfloat16' if torch.cuda.is_bf16_supported(including_emulation=False) else 'float16'
    train(
        *CUDA,
        *SMALL,
        *how,
        f'--dtype={dtype}',
        '--compile=False',
        '--max_iters=8',
        '--eval_interval=8',
        f'--out_dir={tmp_path}',
    )
    rows, _ = read_log(tmp_path)
    first = next(rows[it] for it in sorted(rows) if rows[it]['mfu'] >= 0)
    logged = first['mfu'] * device_peak_flops('cuda', dtype) * first['ms'] / 1000
    ckpt = checkpoints.load_checkpoint(str(tmp_path / 'ckpt.pt'), keys=('model_args', 'config'))
    model = GPT(GPTConfig(**ckpt['model_args'])).cuda()
    if ckpt['config']['freeze_layers']:
        model.freeze(ckpt['config']['freeze_layers'])
    c = ckpt['config']
    if c['lora_rank']:
        from nanogpt import lora

        settings = (c['lora_rank'], c['lora_alpha'], c['lora_dropout'], c['lora_targets'])
        lora.add_adapters(model, lora.settings(*settings, 'adamw', 0))
    x = torch.randint(ckpt['model_args']['vocab_size'], (8, 64), device='cuda')
    with FlopCounterMode(display=False) as counter:
        with runtime.autocast_context('cuda', dtype):
            _, loss = model(x, x)
        loss.backward()
    assert logged == pytest.approx(counter.get_total_flops(), rel=0.1), how


@pytest.mark.gpu
def test_ddp_gradients_are_its_buckets_on_the_gpu(tmp_path):
    # nccl, and the allocator: the micro-steps without gradient sync allocate no gradients beside
    # DDP's buckets (with the gradients freed after each step they would, every iteration)
    from test_train_ddp import assert_gradients_are_buckets

    allocated = assert_gradients_are_buckets('cuda:0', 'nccl', tmp_path)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65)
    gradients = 4 * sum(p.numel() for p in GPT(config).parameters())
    assert max(allocated) - min(allocated) < gradients / 2, allocated


def lora_run(train, out, *args, torchrun=None):
    """A LoRA run on the GPU from scratch, in float32 with TF32 allowed (train.py's default): its
    log's losses and its checkpoint (each tensor where it was saved from)."""
    train(
        *CUDA,
        *SMALL,
        '--lora_rank=8',
        '--dtype=float32',
        '--compile=False',
        '--dropout=0',
        '--max_iters=6',
        '--eval_interval=6',
        '--gradient_accumulation_steps=2',
        *args,
        f'--out_dir={out}',
        torchrun=torchrun,
    )
    return losses(out), torch.load(out / 'ckpt.pt', weights_only=True)


@pytest.mark.gpu
@pytest.mark.parametrize('parallelism', [['--fsdp=False'], ['--fsdp=True']], ids=['ddp', 'fsdp'])
def test_lora_merge_is_exact_whatever_the_parallelism(train, parallelism, tmp_path):
    # the merged weights are peft's merge on the CPU in float32 of the adapters and base weights
    # the checkpoint kept, bit for bit: no TF32 merge on the GPU; under DDP and FSDP (with LoRA)
    # the run is the single process's, up to summation order and TF32's rounding
    from test_finetune import assert_merged_by_peft

    single, ckpt = lora_run(train, tmp_path / 'single')
    assert_merged_by_peft(ckpt)
    n = torch.cuda.device_count()
    torchrun = ['--standalone', f'--nproc_per_node={n}']
    args = [*parallelism, f'--gradient_accumulation_steps={2 * n}']
    parallel, ckpt = lora_run(train, tmp_path / 'parallel', *args, torchrun=torchrun)
    assert_merged_by_peft(ckpt)
    assert parallel == pytest.approx(single, abs=5e-3)


@pytest.mark.gpu
def test_fsdp_reducing_only_after_the_last_micro_step_trains_alike(train, tmp_path):
    # --fsdp_reduce_every_micro_step=False keeps full gradients until the last micro-step, then
    # reduce-scatters them once: the same sums, in float32 and eager
    n = torch.cuda.device_count()
    args = [
        *CUDA,
        *SMALL,
        '--fsdp=True',
        '--dtype=float32',
        '--compile=False',
        '--dropout=0',
        '--max_iters=6',
        '--eval_interval=6',
        f'--gradient_accumulation_steps={4 * n}',
    ]
    runs = {}
    for every in (True, False):
        out = tmp_path / str(every)
        train(
            *args,
            f'--fsdp_reduce_every_micro_step={every}',
            f'--out_dir={out}',
            torchrun=['--standalone', f'--nproc_per_node={n}'],
        )
        runs[every] = losses(out)
    assert len(runs[True]) == 6 and runs[False] == pytest.approx(runs[True], abs=1e-4)
