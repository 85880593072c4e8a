"""
What train.py, sample.py and bench.py share, so it is written once: picking the device and dtype,
the autocast context, CUDA-only calls guarded by device type, torchrun's distributed setup, seeding
and RNG state, checkpoint files (atomic writes, safe and clearly-failing reads), and applying
activation checkpointing, torch.compile, FSDP2 or DDP to a model from outside it.

    device = pick_device(device)              # 'auto' -> cuda, else mps, else cpu
    dtype = pick_dtype(dtype, device)         # 'auto' -> bfloat16 / float16 on CUDA, float32 elsewhere
    ctx = autocast_context(device, dtype)     # `with ctx:` around forward passes
"""
import atexit
import contextlib
import datetime
import functools
import gc
import json
import math
import os
import random
import re
import subprocess
import sys
import time
import zipfile
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
        return 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
    kind = device_type(device)
    if kind == 'cuda' and not torch.cuda.is_available():
        raise UserError(f"device '{device}' requested but no CUDA GPU is available here; use --device=cpu (or auto)")
    if kind == 'mps' and not torch.backends.mps.is_available():
        raise UserError(f"device '{device}' requested but MPS is not available here; use --device=cpu (or auto)")
    if kind not in ('cuda', 'mps', 'cpu'):
        raise UserError(f"unknown device '{device}': use auto, cpu, cuda, cuda:N or mps")
    if kind == 'cuda' and device != 'cuda':
        # make cuda:N the current GPU, so that what uses the current one (the bfloat16 check, pinned
        # memory, torch.compile's kernels) uses it too
        try:
            index = torch.device(device).index
        except RuntimeError:
            raise UserError(f"unknown device '{device}': use auto, cpu, cuda, cuda:N or mps") from None
        if index >= torch.cuda.device_count():
            raise UserError(f"device '{device}' requested but this machine has {torch.cuda.device_count()} "
                            f"GPU(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        torch.cuda.set_device(index)
    return device


def pick_dtype(dtype, device, fsdp=False):
    """Resolve 'auto' to bfloat16 on GPUs that have it, float16 on older GPUs (use a GradScaler) and
    float32 on CPU and MPS; refuse a dtype the device (or FSDP) cannot train in. float16 on a CPU works
    (autocast and GradScaler('cpu')) but is slow: it is there to test the GPU's mixed-precision path."""
    kind = device_type(device)
    bf16_gpu = kind == 'cuda' and torch.cuda.is_bf16_supported(including_emulation=False)
    if dtype == 'auto':
        dtype = ('bfloat16' if bf16_gpu else 'float16') if kind == 'cuda' else 'float32'
    elif dtype not in DTYPES:
        raise UserError(f"unknown dtype '{dtype}': use auto, {', '.join(DTYPES)}")
    if fsdp and dtype == 'float16':
        # the GradScaler's skip-this-step decision would be taken on each rank's shard of the gradients alone
        raise UserError("fsdp with float16 is not supported (its loss scaling would need a sharded gradient "
                        "scaler); use --dtype=bfloat16 (a GPU from Ampere on) or --dtype=float32")
    if dtype == 'bfloat16' and kind == 'cuda' and not bf16_gpu:
        raise UserError(f"this GPU ({torch.cuda.get_device_name(device)}) has no bfloat16 support; "
                        "use --dtype=float16 (or auto)")
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


def inference_model(model, device, dtype):
    """model in eval mode on device with its weights in dtype, for sampling and evaluation without autocast.
    Under autocast, compiled decoding would convert every weight to dtype at every token: eager autocast
    caches its casts, a compiled graph cannot. Converted once, LayerNorms and the residual stream run in
    dtype too (the logits are upcast for sampling and the loss); training keeps float32 weights."""
    return model.eval().to(device=device, dtype=DTYPES[dtype])


def allow_tf32(device, allowed=True):
    """Let float32 matmuls and convolutions use TF32 tensor cores, or not (CUDA only; a no-op elsewhere)."""
    if device_type(device) == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = allowed
        torch.backends.cudnn.allow_tf32 = allowed


def to_device(x, device):
    """Move a CPU tensor to device; on CUDA through pinned memory and asynchronously, so the copy
    overlaps with the GPU's work."""
    if device_type(device) == 'cuda':
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def get_batch(data, starts, block_size, device):
    """Inputs x and targets y (B, T) from windows of block_size + 1 token ids of data (a uint16 memmap)
    starting at each of starts (B,), on device."""
    starts = starts.tolist()
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in starts])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in starts])
    return to_device(x, device), to_device(y, device)


def synchronize(device):
    """Wait for the device's (a string or torch.device) queued work, for timing; a no-op on CPU."""
    kind = torch.device(device).type
    if kind == 'cuda':
        torch.cuda.synchronize(device)
    elif kind == 'mps':
        torch.mps.synchronize()


# dense (no sparsity) peaks from NVIDIA's datasheets, per GPU: (bfloat16/float16 tensor cores, float32), matched
# against torch.cuda.get_device_name() in this order, first match wins ('NVIDIA H100 80GB HBM3' is the SXM card).
# float32 is TF32's tensor-core peak, which float32 matmuls reach because train.py allows TF32; T4 and V100 have
# neither bfloat16 nor TF32, so theirs are the float16 and the plain float32 peaks
PEAK_FLOPS = (
    (r'H100.*(PCIe|PCI-E)', 756e12, 378e12), (r'H100.*NVL', 835e12, 418e12), (r'H100', 989e12, 495e12),
    (r'H200.*NVL', 835e12, 418e12), (r'H200', 989e12, 495e12),
    (r'A100', 312e12, 156e12),  # 40 GB and 80 GB, SXM and PCIe alike
    (r'L40S', 362e12, 183e12), (r'\bL4\b', 121e12, 60e12), (r'\bA10\b', 125e12, 62.5e12),  # not the A10G
    (r'\bT4\b', 65e12, 8.1e12),
    (r'V100S', 130e12, 16.4e12), (r'V100.*PCIE', 112e12, 14e12), (r'V100', 125e12, 15.7e12),  # V100 SXM2
)


def table_peak_flops(gpu_name, dtype='bfloat16'):
    """The PEAK_FLOPS entry for a GPU's name and a training dtype, or None for a GPU that is not in the table."""
    entry = next((entry for entry in PEAK_FLOPS if re.search(entry[0], gpu_name, re.IGNORECASE)), None)
    return entry and entry[2 if dtype == 'float32' else 1]


@functools.cache
def device_peak_flops(device, dtype='float32'):
    """Peak flops/s of a device ('cuda:0', 'cpu', ...) for training in dtype: the table above for known
    GPUs (its float32 column for float32, its bfloat16/float16 one otherwise); on other GPUs the measured
    throughput of 4096x4096 matmuls in dtype (the training runs its matmuls in it, and smaller ones leave a
    GPU's tensor cores half idle); on CPU and MPS that of 1024x1024 float32 matmuls (their bfloat16 is
    emulated or slower, and what they sustain is float32). The operands are constant, so measuring draws
    nothing from the random streams."""
    device = torch.device(device)
    if device.type == 'cuda':
        return table_peak_flops(torch.cuda.get_device_name(device), dtype) or matmul_flops(device, dtype, 4096)
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
    return k * 2 * n ** 3 / (time.perf_counter() - t0)


@functools.cache
def bfloat16_matmul_speed(device, n=256):
    """(bfloat16, float32) flops/s of an (n, n) @ (n, n) matmul on a CPU or MPS device, each the best of
    6 runs: a busy machine only ever adds time, so the best is the fairest comparison."""
    speeds = []
    for dtype in (torch.bfloat16, torch.float32):
        a = torch.full((n, n), 0.5, device=device, dtype=dtype)
        best = float('inf')
        for _ in range(6):
            t0 = time.perf_counter()
            a @ a
            synchronize(device)
            best = min(best, time.perf_counter() - t0)
        speeds.append(2 * n ** 3 / best)
    return tuple(speeds)


def init_distributed(device, timeout=600):
    """Join the process group when launched by torchrun (RANK, LOCAL_RANK, WORLD_SIZE in the
    environment): nccl with one GPU per process on CUDA, gloo on CPU. A collective that waits longer
    than timeout seconds for a peer (a lost node) fails, so torchrun can restart the group, instead of
    hanging. The group is destroyed at exit.
    Returns (ddp, rank, local_rank, world_size, device), device being this process's own GPU."""
    if 'RANK' not in os.environ:
        return False, 0, 0, 1, device
    rank, local_rank, world_size = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
    if device_type(device) == 'mps':
        raise UserError("distributed training on mps is not supported; use --device=cpu with torchrun")
    if device_type(device) == 'cuda':
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
        dist.init_process_group(backend='nccl', device_id=torch.device(device),
                                timeout=datetime.timedelta(seconds=timeout))
    else:
        dist.init_process_group(backend='gloo', timeout=datetime.timedelta(seconds=timeout))
    atexit.register(cleanup_distributed)
    return True, rank, local_rank, world_size, device


def exit_run():
    """End a run whose work is done and saved. A torchrun worker waits for every rank, destroys the process
    group and exits at once: with gloo (torch 2.13) a worker sometimes aborts in the interpreter's or C++'s
    teardown ("terminate called without an active exception", SIGABRT) after everything was saved, and
    torchrun then reports the finished job as failed, or restarts it. A single process only skips the
    slowest part of Python's shutdown: its garbage collector walks every object torch._dynamo created
    (each torch.optim optimizer imports it), ~0.5 s on a 2-core CPU, 3% of a short run; frozen objects
    are skipped, while atexit handlers still run and the OS takes the memory back."""
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
    """compute() run by rank 0 alone, its (picklable) result sent to every process; without a process
    group, compute(). For work that every rank would otherwise repeat, such as scanning a large file.
    Every process must call it."""
    if not (dist.is_available() and dist.is_initialized()):
        return compute()
    result = [compute() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(result, src=0)
    return result[0]


def clip_grad_norm(parameters, max_norm):
    """clip_grad_norm_'s return value, the gradients' total norm before clipping, as a 0-dim tensor (no host
    sync). Under FSDP it is a DTensor: full_tensor() makes it a plain one, collectively on every rank."""
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    return norm.full_tensor() if hasattr(norm, 'full_tensor') else norm

def restarted_with_checkpoint(ckpt_path):
    """Whether torchrun has restarted this job after a failure and rank 0 finds ckpt_path to continue
    from. Each node's torchrun counts its own restarts (a node restarted only because another failed
    counts none), so any process's count decides; every process must call it."""
    counts = gather_to_rank0(int(os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)))
    return on_rank0(lambda: max(counts) > 0 and os.path.exists(ckpt_path))


def shared_rendezvous_store():
    """True when torchrun may restart the workers (--max-restarts) and lets them share its rendezvous
    store: in torch 2.13 that store keeps the failed group's connection keys, and the restarted group
    can read them and fail to connect (seen with gloo; TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 avoids it)."""
    return int(os.environ.get('TORCHELASTIC_MAX_RESTARTS', 0)) > 0 and \
        os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True'


def parallelize(model, device, dtype, distributed, fsdp=False, activation_checkpointing=False, compile=False):
    """Apply, from outside the GPT and in torchtitan's order, what makes it train here: activation
    checkpointing of each Block, torch.compile, then data parallelism over the processes: FSDP2 or DDP.
    Without a process group fsdp is a no-op: one process has nothing to shard. compile: False, True
    (inductor) or another torch.compile backend (the tests count graphs with one).
    Under FSDP each Block's attention and MLP are one unit, gathered only while the Block runs, and the
    root keeps the embeddings (and so the tied lm_head) and every LayerNorm, gathered for the whole
    forward and backward. FSDP computes what autocast does under DDP: the matmul weights are gathered in
    the training dtype (autocast would cast them so anyway), the rest in float32, so the residual stream,
    the norms and the loss stay in float32; gradients are averaged in float32. The GPT is modified in
    place (under FSDP its parameters become DTensor shards, each rank holding 1/world_size of every
    tensor along dim 0); it stays what the optimizer steps and full_state() saves.
    Returns (model, train_model): what evaluation calls and what training calls."""
    compiler = compile and functools.partial(torch.compile, backend='inductor' if compile is True else compile)
    if activation_checkpointing:
        for block in model.transformer.h:
            # keep only the Block's input in forward and recompute its activations in backward (dropout
            # masks included: checkpoint restores the RNG); replacing forward on the instance, not wrapping
            # the module, keeps parameter names and checkpoint keys as they are
            block.forward = functools.partial(recompute, block.forward, use_reentrant=False)
    if fsdp and distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        # the run's own device: without a mesh fully_shard builds one on torch's accelerator, CUDA on any
        # machine that has a GPU, whatever --device says, and moves the weights there (pytorch#132471)
        mesh = init_device_mesh(device_type(device), (dist.get_world_size(),))
        # one policy per FSDP unit, so the LayerNorm gains and the embeddings are not rounded to bfloat16 as
        # the matmul weights are; autocast casts the matmuls' inputs, as without FSDP
        matmuls = MixedPrecisionPolicy(param_dtype=DTYPES[dtype], reduce_dtype=torch.float32, cast_forward_inputs=False)
        rest = MixedPrecisionPolicy(reduce_dtype=torch.float32)
        full = model.state_dict() if dist.get_rank() == 0 else {}  # CPU tensors
        for block in model.transformer.h:
            if compiler:
                # Dynamo does not trace FSDP's hooks, and a graph break in the root's loop over the Blocks
                # would make it skip the root's forward, and with activation checkpointing everything: so
                # compile what runs inside the hooks, and leave the root (embeddings, lm_head, loss) eager
                block.attn.forward, block.mlp.forward = compiler(block.attn.forward), compiler(block.mlp.forward)
            fully_shard([block.attn, block.mlp], mesh=mesh, mp_policy=matmuls)
        # each rank moves every full tensor to its device, then keeps its own shard and frees the rest
        fully_shard(model, mesh=mesh, mp_policy=rest)
        # every rank starts from rank 0's weights (as DDP does; seeded per rank, their random inits differ),
        # sent one tensor at a time, each rank keeping its shard
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        return model, model
    model.to(device)
    model = train_model = compiler(model) if compiler else model
    if distributed:
        train_model = DDP(model, device_ids=[torch.device(device).index] if device_type(device) == 'cuda' else None)
    return model, train_model


def set_gradient_sync(train_model, last_micro_step, fsdp_every_micro_step=True):
    """Whether this micro-step's backward averages the gradients over processes. DDP: only after the last
    micro-step of an iteration; before it they accumulate locally. FSDP: after every micro-step by default,
    a reduce-scatter each time, so that every rank only ever keeps its shard of the gradients; with
    fsdp_every_micro_step=False only after the last, each rank holding full-size float32 gradients until
    then, which costs most of FSDP's saving on memory for less communication (docs/scale.md)."""
    module = getattr(train_model, '_orig_mod', train_model)  # under torch.compile
    if isinstance(module, DDP):
        module.require_backward_grad_sync = last_micro_step
    elif sharded(module):
        module.set_requires_gradient_sync(last_micro_step or fsdp_every_micro_step)


def sharded(module):
    """Whether fully_shard made module an FSDPModule. FSDP and torch's state-dict helpers are imported only
    where they are used: they pull in DTensor, ~0.6 s of every run's start-up on a 2-core CPU (a third of
    a short CPU run's overhead against nanoGPT's), and nothing is an FSDPModule before they are imported."""
    fsdp = sys.modules.get('torch.distributed.fsdp')
    return fsdp is not None and isinstance(module, fsdp.FSDPModule)


def parameter_names(model, optimizer):
    """The name of each parameter of optimizer, in its param_groups order (a parameter's position there
    is its key in optimizer.state_dict())."""
    names = {p: name for name, p in model.named_parameters()}
    return [names[p] for group in optimizer.param_groups for p in group['params']]


def full_state(model, optimizer):
    """(model state dict, optimizer state dict) as a single process writes them: full tensors, and the
    optimizer state keyed by each parameter's position in optimizer.param_groups, so a checkpoint resumes
    under any parallelism and world size. Under FSDP the shards are gathered into CPU memory on rank 0
    (no GPU ever holds the full model) with torch's state-dict helpers; every rank must call it, and the
    others get ({}, {}). Works for any torch.optim.Optimizer."""
    if not sharded(model):
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    state = get_optimizer_state_dict(model, optimizer, options=options)  # {'state': {name: {...}}, ...}
    if dist.get_rank() != 0:
        return {}, {}
    index = {name: i for i, name in enumerate(parameter_names(model, optimizer))}
    # the hyperparameters are the same on every rank and unsharded: take them as torch writes them
    return model_state, {'state': {index[name]: s for name, s in state['state'].items()},
                         'param_groups': optimizer.state_dict()['param_groups']}


def load_optimizer_state(model, optimizer, state, path):
    """Load an optimizer state dict that full_state() wrote (in any parallelism and world size) into
    optimizer, sharding it under FSDP. Refuses state for other trainable parameters (another freeze_layers)
    or of other shapes: torch checks the groups' sizes, not the shapes of the moment buffers, which would
    only fail at the first step."""
    try:
        if 'muon' in state:  # muon.MuonAdamW's: one state dict for each of its two optimizers
            for part in ('muon', 'adamw'):
                load_optimizer_state(model, getattr(optimizer, part), state[part], path)
            return
        sizes = [len(group['params']) for group in optimizer.param_groups]
        if [len(group['params']) for group in state['param_groups']] != sizes:
            raise UserError(f"the checkpoint's optimizer state is for other trainable parameters than this run's "
                            f"({sizes} per group): was it trained with another freeze_layers?")
        params = [p for group in optimizer.param_groups for p in group['params']]  # full shapes, also under FSDP
        for i, saved in state['state'].items():
            for name, v in saved.items():
                if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != params[i].shape:
                    raise UserError(f"checkpoint {path}: the optimizer's {name} has shape {tuple(v.shape)} "
                                    f"for a parameter of shape {tuple(params[i].shape)}")
        if not sharded(model):
            optimizer.load_state_dict(state)  # moves its tensors to the parameters' device
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        names = parameter_names(model, optimizer)
        state = {'state': {names[i]: s for i, s in state['state'].items()},
                 'param_groups': [{**group, 'params': [names[i] for i in group['params']]}
                                  for group in state['param_groups']]}
        # every rank holds the full state (it read the checkpoint) and keeps its own shard of each tensor
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        for group, saved in zip(optimizer.param_groups, state['param_groups']):
            group.update((k, v) for k, v in saved.items() if k != 'params')  # as saved: it makes tuples lists
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"checkpoint {path}: the optimizer state does not fit the model ({reason})") from None


def seed_everything(seed):
    """Seed python's random, numpy and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    """This process's RNG states (python, numpy, torch, cuda) as tensors and plain values, so a
    checkpoint holding them loads with torch.load(weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {'python': random.getstate(),
            'numpy': [name, keys.tolist(), pos, has_gauss, cached],
            'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


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


def save_checkpoint(checkpoint, path):
    """Write atomically: into a temporary file in the same directory, flushed and fsynced, then
    renamed over path. A crash at any moment leaves either the old file or the new one, never half."""
    tmp = path + '.tmp'
    try:
        with open(tmp, 'wb') as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_checkpoint(path, keys=('model', 'model_args')):
    """Load a checkpoint (ours or nanoGPT's) to CPU with torch.load(weights_only=True), so loading
    neither runs code from the file nor fills the GPU. The tensors are memory-mapped from the file
    (mmap=True): pages are read when used and shared through the page cache, so 8 ranks resuming a
    large model do not each hold a private copy of the whole file in memory. Raises UserError if it
    is missing, truncated, corrupt, unsafe to load, or lacks any of `keys`."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}: train one first (init_from='scratch'), "
                        "or point --out_dir at the directory that holds ckpt.pt")
    if not zipfile.is_zipfile(path):
        raise UserError(f"checkpoint {path} is truncated or corrupt (not a complete PyTorch file); "
                        f"delete it, or restore it from a copy")
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if 'Weights only load failed' in reason:
            raise UserError(f"checkpoint {path} holds pickled Python objects besides tensors and plain values, "
                            "which are not loaded because loading them could run code") from None
        raise UserError(f"checkpoint {path} is corrupt ({reason}); delete it, or restore it from a copy") from None
    missing = [k for k in keys if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise UserError(f"{path} is not a nanoGPT checkpoint: it has no {', '.join(missing)}")
    return checkpoint


def check_checkpoint(checkpoint, path):
    """Check what train.py and sample.py take from a loaded checkpoint before anything is built from it,
    so a damaged or foreign file ends in one line at start-up, not in a traceback mid-run (or in a
    checkpoint saved over it). Keys that are absent are left to the caller (load_checkpoint's keys)."""
    def bad(what):
        return UserError(f"checkpoint {path} is damaged or of a format this code does not know: {what}")
    args = checkpoint.get('model_args')
    if args is not None:
        if not isinstance(args, dict):
            raise bad("model_args is not a dict")
        for k in ('n_layer', 'n_head', 'n_embd', 'block_size', 'vocab_size'):
            if type(args.get(k)) is not int or args[k] <= 0:
                raise bad(f"model_args['{k}'] is {args.get(k)!r}, not a positive int")
        if type(args.get('bias')) is not bool:
            raise bad(f"model_args['bias'] is {args.get('bias')!r}, not True or False")
    model = checkpoint.get('model')
    if model is not None and not (isinstance(model, dict) and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items())):
        raise bad("model is not a state dict (parameter names -> tensors)")
    if 'iter_num' in checkpoint and (type(checkpoint['iter_num']) is not int or checkpoint['iter_num'] < 0):
        raise bad(f"iter_num is {checkpoint['iter_num']!r}, not an int >= 0")
    best = checkpoint.get('best_val_loss', 0.0)  # nanoGPT stores a 0-d tensor
    if not (type(best) in (int, float) or isinstance(best, torch.Tensor) and best.numel() == 1):
        raise bad(f"best_val_loss is {best!r}, not a number")
    config = checkpoint.get('config', {})
    if not isinstance(config, dict) or not all(isinstance(config.get(k, ''), str) for k in ('dataset', 'data_dir')):
        raise bad("config is not a dict with dataset and data_dir as strings")
    record = checkpoint.get('tokenizer')  # tokenizer.data_tokenizer's dict, or None
    if record is not None and not (isinstance(record, dict) and type(record.get('vocab_size')) is int and (
            record.get('tokenizer') == 'gpt2' or record.get('tokenizer') == 'char' and
            isinstance(record.get('chars'), str) and len(record['chars']) == record['vocab_size'])):
        raise bad("its tokenizer record is not a gpt2 or char record")
    # the loop state is checked by restoring it (into a throwaway generator; the global RNGs are put back)
    try:
        sampler_state = checkpoint.get('sampler_state')  # WindowSampler.get_state(): a generator's, or a dict
        if isinstance(sampler_state, dict):
            if type(sampler_state.get('windows_drawn')) is not int or sampler_state['windows_drawn'] < 0:
                raise ValueError("windows_drawn")
        elif sampler_state is not None:
            torch.Generator().set_state(sampler_state)
        if checkpoint.get('rng_states') is not None:
            saved = rng_state()
            try:
                for state in checkpoint['rng_states']:
                    set_rng_state(state)
            finally:
                set_rng_state(saved)
    except Exception as e:
        raise bad(f"its random state cannot be restored ({type(e).__name__})") from None


def truncate_log(path, iter_num):
    """Keep only the rows of a log.jsonl (if there is one) of iterations before iter_num: later ones belong
    to iterations that a resumed run is about to redo (none when starting fresh). Lines that are not
    our rows, or were cut short by a kill, go too."""
    def before(line):
        try:
            return json.loads(line)['iter'] < iter_num
        except (ValueError, KeyError, TypeError, RecursionError):
            return False
    lines = []
    if os.path.exists(path):
        with open(path, errors='replace') as f:
            lines = [line for line in f if before(line)]
    with open(path, 'w') as f:
        f.writelines(lines)


def append_row(path, row):
    """Append one JSON object (dict) as a line of a log.jsonl."""
    with open(path, 'a') as f:
        f.write(json.dumps(row) + '\n')


def count_tokens(path):
    """The number of uint16 token ids in a prepared .bin file. A file that is empty or of odd byte
    length is damaged (cut short, or not token ids at all) and is refused here rather than by numpy."""
    try:
        with open(path, 'rb') as f:
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if size == 0 or size % 2:
        raise UserError(f"{path} is damaged: {'it is empty' if size == 0 else f'{size:,} bytes is an odd length'} "
                        "for uint16 token ids; prepare the dataset again")
    return size // 2


def load_model(init_from, out_dir, allow_unsafe_pickle=False):
    """The model sample.py and eval.py run: out_dir/ckpt.pt (init_from='resume'), OpenAI's GPT-2 or a local
    Hugging Face directory, on CPU. Returns (model, source) where source says where the model came from
    and what reads its text: 'what' (for messages), 'data_dir' and 'meta_path' of the data it was trained
    on (None when unknown) and 'record', the tokenizer record train.py stored (None when there is none)."""
    from model import GPT, GPTConfig  # here, not at the top: train.py imports runtime before model
    if init_from != 'resume':
        try:
            with contextlib.redirect_stdout(sys.stderr):  # a script's stdout is for its results
                model = GPT.from_pretrained(init_from, dict(dropout=0.0), allow_unsafe_pickle)
        except (ValueError, OSError) as e:
            raise UserError(str(e)) from None
        return model, dict(what=init_from, data_dir=None, meta_path=None, record=None)
    path = os.path.join(out_dir, 'ckpt.pt')
    checkpoint = load_checkpoint(path)
    check_checkpoint(checkpoint, path)
    try:
        model = GPT(GPTConfig(**checkpoint['model_args'], gelu=checkpoint_gelu(checkpoint)))
        model.load_state_dict(checkpoint['model'])
    except (TypeError, ValueError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0]
        raise UserError(f"{path} is a checkpoint of a format this code does not know ({reason})") from None
    # a character-level dataset's vocabulary is in its meta.pkl (our train.py records where the data was)
    train_config = checkpoint.get('config', {})
    data_dir = meta_path = None
    if 'dataset' in train_config:
        data_dir = train_config.get('data_dir') or os.path.join(ROOT, 'data', train_config['dataset'])
        meta_path = os.path.join(data_dir, 'meta.pkl')
    return model, dict(what=f"{path} (iter {checkpoint.get('iter_num')})", data_dir=data_dir, meta_path=meta_path,
                       record=checkpoint.get('tokenizer'))


def checkpoint_gelu(checkpoint):
    """The GELU a checkpoint's weights were trained with (GPTConfig.gelu): its 'gelu' record. Without
    one, nanoGPT's checkpoints (no 'sampler_state') used the exact GELU, and older ones of ours the
    tanh GELU, which this code gave every model before the record existed."""
    if 'gelu' in checkpoint:
        return checkpoint['gelu']
    return 'tanh' if 'sampler_state' in checkpoint else 'exact'


def git_commit():
    """The repository's commit (short hash, '+dirty' with uncommitted changes), or None outside git."""
    def git(*args):
        return subprocess.run(['git', '-C', ROOT, *args], capture_output=True, text=True, timeout=10)
    try:
        head = git('rev-parse', '--short', 'HEAD')
        if head.returncode != 0:
            return None
        return head.stdout.strip() + ('+dirty' if git('status', '--porcelain').stdout.strip() else '')
    except (OSError, subprocess.SubprocessError):
        return None


def print_environment(device, dtype):
    """One line saying what produced this run's numbers: versions, device, dtype, code version."""
    name = torch.cuda.get_device_name(device) if device_type(device) == 'cuda' else device
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, device {name}, dtype {dtype}, "
          f"threads {torch.get_num_threads()}, commit {git_commit() or 'unknown'}")


class WindowSampler:
    """The window starts of each iteration's global batch, drawn the same way by every rank (each takes
    its own rows), so the data depends on the seed and not on the number of processes.
    'random': nanoGPT's uniform draws with replacement from a seeded torch generator.
    'epoch': every start 0..n_windows-1 once per epoch, in an order shuffled afresh each epoch from
    (seed, epoch). That order is a keyed permutation computed on the fly (a Feistel network, see
    shuffled), so nothing of size n_windows (~9e9 for OpenWebText) is ever held in memory, and the
    state is one number: how many windows have been drawn."""

    def __init__(self, order, seed):
        if order not in ('random', 'epoch'):
            raise UserError(f"data_order must be 'random' or 'epoch', not '{order}'")
        self.order, self.seed = order, seed
        self.generator = torch.Generator().manual_seed(seed)
        self.drawn = 0  # windows drawn so far ('epoch'), over all epochs
        # the state before the latest draw is the one to checkpoint: the batch drawn last (prefetched) is not
        # trained on yet, so a resumed run must draw it again
        self.state_to_save = self.get_state()

    def draw(self, n_windows, shape):
        """Window starts in [0, n_windows) as a LongTensor of `shape` (the global batch's rows, batch_size)."""
        self.state_to_save = self.get_state()
        if self.order == 'random':
            return torch.randint(n_windows, shape, generator=self.generator)
        position = self.drawn + np.arange(math.prod(shape), dtype=np.int64)  # (rows * batch_size,)
        self.drawn += math.prod(shape)
        epoch, index = position // n_windows, position % n_windows
        starts = np.empty_like(position)
        for e in np.unique(epoch):  # a batch may straddle two epochs
            starts[epoch == e] = shuffled(index[epoch == e], n_windows, (self.seed, int(e)))
        return torch.from_numpy(starts).view(shape)

    def epoch(self, state, n_windows):
        """The epoch (0-based) of the last window drawn before `state` was taken; None for 'random'."""
        return None if self.order == 'random' else max(state['windows_drawn'] - 1, 0) // n_windows

    def get_state(self):
        """For the checkpoint: the generator's state ('random', as before), or the count of windows drawn."""
        if self.order == 'random':
            return self.generator.get_state()
        return {'data_order': 'epoch', 'windows_drawn': self.drawn}

    def set_state(self, state):
        saved = 'epoch' if isinstance(state, dict) else 'random'
        if saved != self.order:
            raise UserError(f"the checkpoint was trained with data_order='{saved}'; resume it with "
                            f"--data_order={saved} (or start a new run in another out_dir)")
        if self.order == 'random':
            self.generator.set_state(state)
        else:
            self.drawn = int(state['windows_drawn'])


def train_batches(path, n_windows, sampler, shape, rows, block_size, device):
    """This rank's micro-batches (x, y), each (batch_size, block_size), forever: every iteration's global
    batch of window starts, `shape` (gradient_accumulation_steps, batch_size), is drawn from sampler the same
    way on every rank, and this rank trains its `rows` (a slice) of it, so the data depends on the seed,
    not on how many processes share the work."""
    while True:
        for starts in sampler.draw(n_windows, shape)[rows]:
            # a new memmap every time: one kept open holds on to its pages and memory grows
            yield get_batch(np.memmap(path, dtype=np.uint16, mode='r'), starts, block_size, device)


def shuffled(index, n, key, rounds=4):
    """The keyed permutation of range(n) at positions `index` (int64 array): a Feistel network on the
    smallest even number of bits that covers n, a bijection on [0, 2**bits); values that land at n or
    above are pushed through it again ("cycle walking") until they fall below n, which keeps it a
    bijection on [0, n). The round keys come from `key` (seed, epoch) through numpy's SeedSequence."""
    half = max(1, (int(n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    keys = np.random.SeedSequence(list(key)).generate_state(rounds, dtype=np.uint64)

    def permute(x):
        left, right = x >> np.uint64(half), x & mask
        for k in keys:
            z = right ^ k  # splitmix64's finalizer as the round function
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            left, right = right, left ^ ((z ^ (z >> np.uint64(31))) & mask)
        return (left << np.uint64(half)) | right

    with np.errstate(over='ignore'):  # the multiplications wrap modulo 2**64 on purpose
        out = permute(index.astype(np.uint64))
        walk = out >= n
        while walk.any():
            out[walk] = permute(out[walk])
            walk = out >= n
    return out.astype(np.int64)
