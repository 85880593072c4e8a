"""
The machine a script runs on: the device and dtype (autodetected, or as asked), the autocast
context, the one setup call every script makes and a model readied to run, CUDA-only calls guarded
by device type, the device's peak and measured matmul flops, the random number generators' state,
and the line that says what produced a run's numbers. Its processes (torchrun, DDP, FSDP, stop
signals): distributed.py.

    device = pick_device(device)           # 'auto' -> cuda, else mps, else cpu
    dtype = pick_dtype(dtype, device)      # 'auto' -> bfloat16 / float16 on CUDA, float32 elsewhere
    ctx = autocast_context(device, dtype)  # `with ctx:` around forward passes
    device, dtype, ctx = setup(device, dtype, seed)  # the three above, TF32 and the seeds at once
    model = inference_model(model, device, dtype, compile)  # for eval.py; cast=True to generate
"""

import functools
import random
import re
import subprocess
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch

from configurator import ROOT, UserError

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


def device_type(device):
    """'cuda:1' -> 'cuda'; the part of a device string that torch.autocast and friends want."""
    return device.split(':')[0]


def pick_device(device='auto'):
    """Resolve 'auto' to cuda, else mps, else cpu; check that an explicit choice exists here."""
    if device == 'auto':
        return (
            'cuda'
            if torch.cuda.is_available()
            else 'mps'
            if torch.backends.mps.is_available()
            else 'cpu'
        )
    kind = device_type(device)
    if kind == 'cuda' and not torch.cuda.is_available():
        raise UserError(
            f"device '{device}' requested but no CUDA GPU is available here; "
            "use --device=cpu (or auto)"
        )
    if kind == 'mps' and not torch.backends.mps.is_available():
        raise UserError(
            f"device '{device}' requested but MPS is not available here; use --device=cpu (or auto)"
        )
    if kind not in ('cuda', 'mps', 'cpu'):
        raise UserError(f"unknown device '{device}': use auto, cpu, cuda, cuda:N or mps")
    if kind == 'cuda' and device != 'cuda':
        # make cuda:N the current GPU, so that what uses the current one (the bfloat16 check, pinned
        # memory, torch.compile's kernels) uses it too
        try:
            index = torch.device(device).index
        except RuntimeError:
            raise UserError(
                f"unknown device '{device}': use auto, cpu, cuda, cuda:N or mps"
            ) from None
        if index >= torch.cuda.device_count():
            raise UserError(
                f"device '{device}' requested but this machine has {torch.cuda.device_count()} "
                f"GPU(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
        torch.cuda.set_device(index)
    return device


def pick_dtype(dtype, device, fsdp=False):
    """Resolve 'auto' to bfloat16 on GPUs that have it, float16 on older GPUs (use a GradScaler) and
    float32 on CPU and MPS; refuse a dtype the device (or FSDP) cannot train in. float16 on a CPU
    works
    (autocast and GradScaler('cpu')) but is slow: it is there to test the GPU's mixed-precision
    path."""
    kind = device_type(device)
    bf16_gpu = kind == 'cuda' and torch.cuda.is_bf16_supported(including_emulation=False)
    if dtype == 'auto':
        dtype = ('bfloat16' if bf16_gpu else 'float16') if kind == 'cuda' else 'float32'
    elif dtype not in DTYPES:
        raise UserError(f"unknown dtype '{dtype}': use auto, {', '.join(DTYPES)}")
    if fsdp and dtype == 'float16':
        # the GradScaler's skip-this-step decision would be taken on each rank's shard of the
        # gradients alone
        raise UserError(
            "fsdp with float16 is not supported (its loss scaling would need a sharded gradient "
            "scaler); use --dtype=bfloat16 (a GPU from Ampere on) or --dtype=float32"
        )
    if dtype == 'bfloat16' and kind == 'cuda' and not bf16_gpu:
        raise UserError(
            f"this GPU ({torch.cuda.get_device_name(device)}) has no bfloat16 support; "
            "use --dtype=float16 (or auto)"
        )
    return dtype


def pick_compile(compile, device):
    """torch.compile by default (compile=None) only on CUDA, where it works and pays off."""
    if compile not in (None, True, False):
        raise UserError(f"compile must be True, False or None (automatic), got {compile!r}")
    return device_type(device) == 'cuda' if compile is None else compile


def autocast_context(device, dtype):
    """The mixed-precision context for forward passes: a no-op for float32."""
    if dtype == 'float32':
        return nullcontext()
    return torch.autocast(device_type=device_type(device), dtype=DTYPES[dtype])


def setup(device='auto', dtype='auto', seed=None, tf32=True):
    """What every script does first (nanochat's compute_init): the device and dtype resolved and
    checked, TF32 allowed for CUDA's float32 matmuls or not (tf32=False: float32 is float32), every
    random generator seeded (seed None: left as they are), and the autocast context that forward
    passes run in. Returns (device, dtype, ctx)."""
    device = pick_device(device)
    dtype = pick_dtype(dtype, device)
    allow_tf32(device, tf32)
    if seed is not None:
        seed_everything(seed)
    return device, dtype, autocast_context(device, dtype)


def inference_model(model, device, dtype, compile=False, cast=False):
    """model in eval mode on device, ready for evaluation (cast=False) or generation (cast=True).
    Evaluation keeps the float32 weights, to be run under autocast_context(device, dtype): what
    training's evaluation computes, and nanoGPT's (matmuls in dtype; LayerNorms, the residual
    stream, softmax and the loss in float32), so eval.py gives the training log's val loss.
    Generation converts the weights to dtype once and runs without autocast, so LayerNorms and the
    residual stream run in dtype too, and the logits are upcast to float32 for sampling: faster to
    decode compiled, as eager autocast caches its weight casts but a compiled graph cannot, and
    under autocast would convert every weight at every token.
    compile (None: on CUDA only): torch.compile the forward pass, which generate() calls too, so the
    model stays a GPT (its config, generate, state_dict keys); with dynamic shapes, as decoding's
    rows and cache positions change from step to step and evaluation's lengths from batch to batch.
    """
    model = model.eval().to(device=device, dtype=DTYPES[dtype] if cast else torch.float32)
    if pick_compile(compile, device):
        model.forward = torch.compile(model.forward, dynamic=True)
    return model


def allow_tf32(device, allowed=True):
    """Let float32 matmuls and convolutions use TF32 tensor cores, or not (CUDA only; a no-op
    elsewhere)."""
    if device_type(device) == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = allowed
        torch.backends.cudnn.allow_tf32 = allowed


def to_device(x, device):
    """Move a CPU tensor to device; on CUDA through pinned memory and asynchronously, so the copy
    overlaps with the GPU's work."""
    if device_type(device) == 'cuda':
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def synchronize(device):
    """Wait for the device's (a string or torch.device) queued work, for timing; a no-op on CPU."""
    kind = torch.device(device).type
    if kind == 'cuda':
        torch.cuda.synchronize(device)
    elif kind == 'mps':
        torch.mps.synchronize()


# dense (no sparsity) peaks from NVIDIA's datasheets, per GPU: (bfloat16/float16 tensor cores,
# float32), matched against torch.cuda.get_device_name() in this order, first match wins ('NVIDIA
# H100 80GB HBM3' is the SXM card). float32 is TF32's tensor-core peak, which float32 matmuls reach
# because train.py allows TF32; T4 and V100 have neither bfloat16 nor TF32, so theirs are the
# float16 and the plain float32 peaks
PEAK_FLOPS = (
    (r'H100.*(PCIe|PCI-E)', 756e12, 378e12),
    (r'H100.*NVL', 835e12, 418e12),
    (r'H100', 989e12, 495e12),
    (r'H200.*NVL', 835e12, 418e12),
    (r'H200', 989e12, 495e12),
    (r'A100', 312e12, 156e12),  # 40 GB and 80 GB, SXM and PCIe alike
    # not the A10G
    (r'L40S', 362e12, 183e12),
    (r'\bL4\b', 121e12, 60e12),
    (r'\bA10\b', 125e12, 62.5e12),
    (r'\bT4\b', 65e12, 8.1e12),
    # V100 SXM2
    (r'V100S', 130e12, 16.4e12),
    (r'V100.*PCIE', 112e12, 14e12),
    (r'V100', 125e12, 15.7e12),
)


def table_peak_flops(gpu_name, dtype='bfloat16'):
    """The PEAK_FLOPS entry for a GPU's name and a training dtype, or None for a GPU that is not in
    the table."""
    entry = next(
        (entry for entry in PEAK_FLOPS if re.search(entry[0], gpu_name, re.IGNORECASE)), None
    )
    return entry and entry[2 if dtype == 'float32' else 1]


@functools.cache
def device_peak_flops(device, dtype='float32'):
    """Peak flops/s of a device ('cuda:0', 'cpu', ...) for training in dtype: the table above for
    known GPUs (its float32 column for float32, its bfloat16/float16 one otherwise); on other GPUs
    the measured throughput of 4096x4096 matmuls in dtype (the training runs its matmuls in it, and
    smaller ones leave a GPU's tensor cores half idle); on CPU and MPS that of 1024x1024 float32
    matmuls (their bfloat16 is emulated or slower, and what they sustain is float32). The operands
    are constant, so measuring draws nothing from the random streams."""
    device = torch.device(device)
    if device.type == 'cuda':
        return table_peak_flops(torch.cuda.get_device_name(device), dtype) or matmul_flops(
            device, dtype, 4096
        )
    return matmul_flops(device, 'float32', 1024)


def matmul_flops(device, dtype, n):
    """Measured flops/s of (n, n) @ (n, n) matmuls in dtype on device, over at least 0.05 s."""
    a = torch.full((n, n), 0.5, device=device, dtype=getattr(torch, dtype))
    a @ a  # warm up
    synchronize(device)
    k, t0 = 0, time.perf_counter()
    while k < 4 or time.perf_counter() - t0 < 0.05:
        a @ a
        k += 1
    synchronize(device)
    return k * 2 * n**3 / (time.perf_counter() - t0)


@functools.cache
def bfloat16_matmul_speed(device, n=256):
    """(bfloat16, float32) flops/s of an (n, n) @ (n, n) matmul on a CPU or MPS device, each the
    best of 6 runs: a busy machine only ever adds time, so the best is the fairest comparison."""
    speeds = []
    for dtype in (torch.bfloat16, torch.float32):
        a = torch.full((n, n), 0.5, device=device, dtype=dtype)
        best = float('inf')
        for _ in range(6):
            t0 = time.perf_counter()
            a @ a
            synchronize(device)
            best = min(best, time.perf_counter() - t0)
        speeds.append(2 * n**3 / best)
    return tuple(speeds)


def bfloat16_native(device, verbose=False):
    """Whether device runs bfloat16 matmuls natively (verbose: and say why we think so). A GPU says
    so itself; elsewhere it is measured: CPUs without AVX-512 BF16 or AMX emulate them at ~1% of
    float32's speed, those with it run them at ~2x, so "at least half as fast" separates the two
    even on a busy machine."""
    if device_type(device) == 'cuda':
        native, why = (
            torch.cuda.is_bf16_supported(including_emulation=False),
            torch.cuda.get_device_name(device),
        )
    else:
        bf16, fp32 = bfloat16_matmul_speed(device)
        native, why = (
            2 * bf16 >= fp32,
            f"256x256 matmuls: {bf16 / 1e9:.1f} GFLOP/s bfloat16, {fp32 / 1e9:.1f} float32",
        )
    if verbose:
        print(f"bfloat16 matmuls are {'native' if native else 'emulated'} on {device} ({why})")
    return native


@torch.no_grad()
def forward_seconds(model, block_size, ctx):
    """Seconds a forward pass with the loss takes for one row of block_size tokens, in eval mode,
    timed after a first pass (which allocates); it draws nothing from the random streams."""
    x = torch.zeros((1, block_size), dtype=torch.long, device=next(model.parameters()).device)
    model.eval()
    with ctx:
        model(x, x)
        synchronize(x.device)
        t0 = time.perf_counter()
        model(x, x)
        synchronize(x.device)
    model.train()
    return time.perf_counter() - t0


def seed_everything(seed):
    """Seed python's random, numpy and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    """This process's RNG states (python, numpy, torch, cuda) as tensors and plain values, so a
    checkpoint holding them loads with torch.load(weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        'python': random.getstate(),
        'numpy': [name, keys.tolist(), pos, has_gauss, cached],
        'torch': torch.get_rng_state(),
        'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state):
    """Restore what rng_state() returned. CUDA states are restored only on a machine with the same
    number of GPUs."""
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state['torch'])
    if torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])


def git_commit():
    """The repository's commit (short hash, '+dirty' with uncommitted changes), or None outside
    git."""

    def git(*args):
        return subprocess.run(
            ['git', '-C', ROOT, *args], capture_output=True, text=True, timeout=10
        )

    try:
        head = git('rev-parse', '--short', 'HEAD')
        if head.returncode != 0:
            return None
        return head.stdout.strip() + (
            '+dirty' if git('status', '--porcelain').stdout.strip() else ''
        )
    except (OSError, subprocess.SubprocessError):
        return None


def print_environment(device, dtype):
    """One line saying what produced this run's numbers: versions, device, dtype, code version."""
    name = torch.cuda.get_device_name(device) if device_type(device) == 'cuda' else device
    print(
        f"python {sys.version.split()[0]}, torch {torch.__version__}, device {name}, "
        f"dtype {dtype}, threads {torch.get_num_threads()}, commit {git_commit() or 'unknown'}"
    )
