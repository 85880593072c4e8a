"""
The machine a script runs on, and its processes: the device and dtype (autodetected, or as asked),
the autocast context, CUDA-only calls guarded by device type, the device's peak and measured matmul
flops, torchrun's process group and its collective helpers, applying activation checkpointing,
torch.compile, FSDP2 or DDP to a model from outside it, the random number generators' state, and the
line that says what produced a run's numbers.

    device = pick_device(device)           # 'auto' -> cuda, else mps, else cpu
    dtype = pick_dtype(dtype, device)      # 'auto' -> bfloat16 / float16 on CUDA, float32 elsewhere
    ctx = autocast_context(device, dtype)  # `with ctx:` around forward passes
    device, dtype, ctx = setup(device, dtype, seed)  # the three above, TF32 and the seeds at once
    model = inference_model(model, device, dtype, compile)  # for eval.py; cast=True to generate
"""

import atexit
import datetime
import functools
import gc
import os
import random
import re
import signal
import subprocess
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint as recompute

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


def init_distributed(device, timeout=600):
    """Join the process group when launched by torchrun (RANK, LOCAL_RANK, WORLD_SIZE in the
    environment): nccl with one GPU per process on CUDA, gloo on CPU. A collective that waits longer
    than timeout seconds for a peer (a lost node) fails, so torchrun can restart the group, instead
    of hanging. The group is destroyed at exit. Returns (ddp, rank, local_rank, world_size, device),
    device being this process's own GPU."""
    if 'RANK' not in os.environ:
        return False, 0, 0, 1, device
    rank, local_rank, world_size = (
        int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE')
    )
    if device_type(device) == 'mps':
        raise UserError(
            "distributed training on mps is not supported; use --device=cpu with torchrun"
        )
    if device_type(device) == 'cuda':
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
        dist.init_process_group(
            backend='nccl',
            device_id=torch.device(device),
            timeout=datetime.timedelta(seconds=timeout),
        )
    else:
        dist.init_process_group(backend='gloo', timeout=datetime.timedelta(seconds=timeout))
    atexit.register(cleanup_distributed)
    return True, rank, local_rank, world_size, device


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


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM (preemption), from now on noted instead of acted on at once:
    `name` is the last one received (None until then). A training loop looks at it between batches,
    so a stop ends the step or evaluation under way cleanly, and the run saves what it has."""

    def __init__(self):
        self.name = None
        signal.signal(signal.SIGINT, self.note)
        signal.signal(signal.SIGTERM, self.note)

    def note(self, signum, frame):
        self.name = signal.Signals(signum).name


def exit_run():
    """End a run whose work is done and saved. A torchrun worker waits for every rank, destroys the
    process group and exits at once: with gloo (torch 2.13) a worker sometimes aborts in the
    interpreter's or C++'s teardown ("terminate called without an active exception", SIGABRT)
    after everything was saved, and torchrun then reports the finished job as failed, or restarts
    it. A single process only skips the slowest part of Python's shutdown: its garbage collector
    walks every object torch._dynamo created (each torch.optim optimizer imports it; measured in
    docs/optimizers.md); frozen objects are skipped, while atexit handlers still run and the OS
    takes the memory back."""
    if not (dist.is_available() and dist.is_initialized()):
        gc.freeze()
        return
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def cleanup_distributed():
    """Destroy the process group if there is one (safe to call twice)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def gather_to_rank0(obj):
    """Collect one picklable object from every process: the list (indexed by rank) on rank 0, None
    on the others. Without a process group, [obj]. Every process must call it."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    objs = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, objs, dst=0)
    return objs


def on_rank0(compute):
    """compute() run by rank 0 alone, its (picklable) result sent to every process; without a
    process group, compute(). For work that every rank would otherwise repeat, such as scanning a
    large file. Every process must call it."""
    if not (dist.is_available() and dist.is_initialized()):
        return compute()
    result = [compute() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(result, src=0)
    return result[0]


def check_on_rank0(check):
    """Run check() on rank 0 alone (without a process group: here); a UserError it raises is raised
    on every process, so that they all stop together instead of waiting for rank 0 in the next
    collective."""

    def run():
        try:
            check()
        except UserError as e:
            return str(e)

    refused = on_rank0(run)
    if refused:
        raise UserError(refused)


def mean_over_ranks(values):
    """{name: 0-dim tensor on the device} -> {name: float}, each averaged over the processes, in one
    host sync: the values are stacked, all-reduced together and copied to the host once. Call it
    once all of an iteration's work is queued; every process must call it with the same names."""
    stacked = torch.stack([v.float() for v in values.values()])
    world_size = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stacked)  # a sum
        world_size = dist.get_world_size()
    return {name: v / world_size for name, v in zip(values, stacked.tolist())}


def clip_grad_norm(parameters, max_norm):
    """clip_grad_norm_'s return value, the gradients' total norm before clipping, as a 0-dim tensor
    (no host
    sync). Under FSDP it is a DTensor: full_tensor() makes it a plain one, collectively on every
    rank."""
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    return norm.full_tensor() if hasattr(norm, 'full_tensor') else norm


def restarted_with_checkpoint(ckpt_path):
    """Whether torchrun has restarted this job after a failure and rank 0 finds ckpt_path to
    continue from. Each node's torchrun counts its own restarts (a node restarted only because
    another failed counts none), so any process's count decides; every process must call it."""
    counts = gather_to_rank0(int(os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)))
    return on_rank0(lambda: max(counts) > 0 and os.path.exists(ckpt_path))


def shared_rendezvous_store():
    """True when torchrun may restart the workers (--max-restarts) and lets them share its
    rendezvous store: in torch 2.13 that store keeps the failed group's connection keys, and the
    restarted group can read them and fail to connect (seen with gloo;
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 avoids it)."""
    return (
        int(os.environ.get('TORCHELASTIC_MAX_RESTARTS', 0)) > 0
        and os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True'
    )


def warn_shared_rendezvous():
    """train.py's warning, when shared_rendezvous_store() says a restart may fail to reconnect."""
    if shared_rendezvous_store():
        print(
            "warning: a restart may fail to reconnect; launch with "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (docs/scale.md)"
        )


def check_resolved(gradient_accumulation_steps, world_size, optimizer, dtype, fsdp):
    """train.py's checks that need the processes and the resolved dtype (the others: its
    check_settings), one line each, before any data or model is touched. fsdp: FSDP in use."""
    if gradient_accumulation_steps % world_size != 0:
        raise UserError(
            f"gradient_accumulation_steps ({gradient_accumulation_steps}) is the global count and "
            f"must be divisible by the number of processes ({world_size})"
        )
    if optimizer == 'muon' and dtype == 'float16':
        raise UserError(
            "optimizer muon with float16 is not supported: GradScaler skips an overflowed step "
            "without a host sync only for optimizers that take its overflow flag, which Muon does "
            "not (a second sync every iteration); use --dtype=bfloat16 (a GPU from Ampere on) or "
            "float32, or --optimizer=adamw"
        )
    if optimizer == 'muon' and fsdp:  # FSDP in use: under torchrun
        raise UserError(
            "optimizer muon orthogonalizes whole weight matrices, which fsdp shards over the "
            "processes: use --optimizer=adamw with --fsdp=True, or muon with DDP (--fsdp=False)"
        )


def parallelize(
    model, device, dtype, distributed, fsdp=False, activation_checkpointing=False, compile=False
):
    """Apply, from outside the GPT and in torchtitan's order, what makes it train here: activation
    checkpointing of each Block, torch.compile, then data parallelism over the processes: FSDP2 or
    DDP. Without a process group fsdp is a no-op: one process has nothing to shard. compile: False,
    True (inductor) or another torch.compile backend (the tests count graphs with one). Under FSDP
    each Block's attention and MLP are one unit, gathered only while the Block runs, and the root
    keeps the embeddings (and so the tied lm_head) and every LayerNorm, gathered for the whole
    forward and backward. FSDP computes what autocast does under DDP: the matmul weights are
    gathered in the training dtype (autocast would cast them so anyway), the rest in float32, so the
    residual stream, the norms and the loss stay in float32; gradients are averaged in float32. The
    GPT is modified in place (under FSDP its parameters become DTensor shards, each rank holding
    1/world_size of every tensor along dim 0); it stays what the optimizer steps and full_state()
    saves. Returns (model, train_model): what evaluation calls and what training calls."""
    compiler = compile and functools.partial(
        torch.compile, backend='inductor' if compile is True else compile
    )
    if activation_checkpointing:
        for block in model.transformer.h:
            # keep only the Block's input in forward and recompute its activations in backward
            # (dropout masks included: checkpoint restores the RNG); replacing forward on the
            # instance, not wrapping the module, keeps parameter names and checkpoint keys as they
            # are
            block.forward = functools.partial(recompute, block.forward, use_reentrant=False)
    if fsdp and distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # the run's own device: without a mesh fully_shard builds one on torch's accelerator, CUDA
        # on any machine that has a GPU, whatever --device says, and moves the weights there
        # (pytorch#132471)
        mesh = init_device_mesh(device_type(device), (dist.get_world_size(),))
        # one policy per FSDP unit, so the LayerNorm gains and the embeddings are not rounded to
        # bfloat16 as the matmul weights are; autocast casts the matmuls' inputs, as without FSDP
        matmuls = MixedPrecisionPolicy(
            param_dtype=DTYPES[dtype], reduce_dtype=torch.float32, cast_forward_inputs=False
        )
        rest = MixedPrecisionPolicy(reduce_dtype=torch.float32)
        full = model.state_dict() if dist.get_rank() == 0 else {}  # CPU tensors
        if compiler:
            # Dynamo does not trace FSDP's hooks, and a graph break in the root's loop over the
            # Blocks would make it skip the root's forward, and with activation checkpointing
            # everything: so compile what runs inside the hooks, and of the root the lm_head and
            # the loss (eager, the logits' float32 copy and log-softmax would be held apart); the
            # embeddings, LayerNorms and residual adds run eager
            model.logits_and_loss = compiler(model.logits_and_loss)
        for block in model.transformer.h:
            if compiler:
                block.attn.forward, block.mlp.forward = (
                    compiler(block.attn.forward),
                    compiler(block.mlp.forward),
                )
            fully_shard([block.attn, block.mlp], mesh=mesh, mp_policy=matmuls)
        # each rank moves every full tensor to its device, then keeps its own shard and frees the
        # rest
        fully_shard(model, mesh=mesh, mp_policy=rest)
        # every rank starts from rank 0's weights (as DDP does; seeded per rank, their random inits
        # differ), sent one tensor at a time, each rank keeping its shard
        set_model_state_dict(
            model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        )
        return model, model
    model.to(device)
    model = train_model = compiler(model) if compiler else model
    if distributed:
        # the gradients are views into DDP's all-reduce buckets, not a second copy of them beside
        # the buckets (4 bytes per parameter); they stay views only if zero_grad keeps them
        train_model = DDP(
            model,
            device_ids=[torch.device(device).index] if device_type(device) == 'cuda' else None,
            gradient_as_bucket_view=True,
        )
    return model, train_model


def set_gradient_sync(train_model, last_micro_step, fsdp_every_micro_step=True):
    """Whether this micro-step's backward averages the gradients over processes. DDP: only after the
    last micro-step of an iteration; before it they accumulate locally. FSDP: after every micro-step
    by default, a reduce-scatter each time, so that every rank only ever keeps its shard of the
    gradients; with fsdp_every_micro_step=False only after the last, each rank holding full-size
    float32 gradients until then, which costs most of FSDP's saving on memory for less communication
    (docs/scale.md)."""
    module = getattr(train_model, '_orig_mod', train_model)  # under torch.compile
    if isinstance(module, DDP):
        module.require_backward_grad_sync = last_micro_step
    elif sharded(module):
        module.set_requires_gradient_sync(last_micro_step or fsdp_every_micro_step)


def zero_grad(optimizer, train_model):
    """Reset the gradients after an optimizer step: freed (set to None), except under DDP, where
    they are views into its all-reduce buckets (gradient_as_bucket_view) and are zeroed in place:
    set to None, the next backward without gradient sync (gradient accumulation) would allocate a
    second copy of them beside the buckets."""
    module = getattr(train_model, '_orig_mod', train_model)  # under torch.compile
    optimizer.zero_grad(set_to_none=not isinstance(module, DDP))


def sharded(module):
    """Whether fully_shard made module an FSDPModule. FSDP and torch's state-dict helpers are
    imported only where they are used: they pull in DTensor, a large part of a short CPU run's
    start-up (measured in docs/optimizers.md), and nothing is an FSDPModule before they are
    imported."""
    fsdp = sys.modules.get('torch.distributed.fsdp')
    return fsdp is not None and isinstance(module, fsdp.FSDPModule)


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
