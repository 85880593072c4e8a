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
import datetime
import functools
import os
import random
import subprocess
import sys
import zipfile
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
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
    return device


def pick_dtype(dtype, device, fsdp=False):
    """Resolve 'auto' to bfloat16 on GPUs that have it, float16 on older GPUs (use a GradScaler) and
    float32 on CPU and MPS; refuse a dtype the device (or FSDP) cannot train in."""
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
    if dtype == 'float16' and kind == 'cpu':
        raise UserError("dtype float16 is not supported on cpu; use --dtype=bfloat16 or float32 (or auto)")
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


def allow_tf32(device):
    """Let float32 matmuls and convolutions use TF32 tensor cores (CUDA only; a no-op elsewhere)."""
    if device_type(device) == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


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
    """Wait for the device's queued work (for timing); a no-op on CPU."""
    if device_type(device) == 'cuda':
        torch.cuda.synchronize(device)
    elif device_type(device) == 'mps':
        torch.mps.synchronize()


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


def from_rank0(obj):
    """Rank 0's picklable obj on every process (obj itself without a process group), so that all of
    them take the same decision. Every process must call it."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    objs = [obj]
    dist.broadcast_object_list(objs, src=0)
    return objs[0]


def restarted_with_checkpoint(ckpt_path):
    """Whether torchrun has restarted this job after a failure and rank 0 finds ckpt_path to continue
    from. Each node's torchrun counts its own restarts (a node restarted only because another failed
    counts none), so any process's count decides; every process must call it."""
    counts = gather_to_rank0(int(os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)))
    return from_rank0(counts is not None and max(counts) > 0 and os.path.exists(ckpt_path))


def shared_rendezvous_store():
    """True when torchrun may restart the workers (--max-restarts) and lets them share its rendezvous
    store: in torch 2.13 that store keeps the failed group's connection keys, and the restarted group
    can read them and fail to connect (seen with gloo; TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 avoids it)."""
    return int(os.environ.get('TORCHELASTIC_MAX_RESTARTS', 0)) > 0 and \
        os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True'


def parallelize(model, device, dtype, distributed, fsdp=False, activation_checkpointing=False, compile=False):
    """Apply, from outside the GPT and in torchtitan's order, what makes it train here: activation
    checkpointing of each Block, torch.compile, then data parallelism over the processes: FSDP2
    (fully_shard on each Block, then on the root, which keeps the embeddings, ln_f and the tied
    lm_head) or DDP. Without a process group fsdp is a no-op: one process has nothing to shard.
    The GPT is modified in place (under FSDP its parameters become DTensor shards, each rank holding
    1/world_size of every tensor along dim 0); it stays what the optimizer steps and full_state()
    saves. Returns (model, train_model): what evaluation calls and what training calls."""
    if activation_checkpointing:
        for block in model.transformer.h:
            # keep only the Block's input in forward and recompute its activations in backward (dropout
            # masks included: checkpoint restores the RNG); replacing forward on the instance, not wrapping
            # the module, keeps parameter names and checkpoint keys as they are
            block.forward = functools.partial(recompute, block.forward, use_reentrant=False)
    if fsdp and distributed:
        # compute in the training dtype, average gradients in float32 (a no-op when training in float32)
        mp_policy = MixedPrecisionPolicy(param_dtype=DTYPES[dtype], reduce_dtype=torch.float32)
        full = model.state_dict() if dist.get_rank() == 0 else {}  # CPU tensors
        for block in model.transformer.h:
            fully_shard(block, mp_policy=mp_policy)  # a Block's weights are gathered only while it runs
        fully_shard(model, mp_policy=mp_policy)  # moves each rank's shards (and only them) to its device
        # every rank starts from rank 0's weights (as DDP does; seeded per rank, their random inits differ),
        # sent one tensor at a time, each rank keeping its shard
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    else:
        model.to(device)
    model = train_model = torch.compile(model) if compile else model
    if distributed and not fsdp:
        train_model = DDP(model, device_ids=[torch.device(device).index] if device_type(device) == 'cuda' else None)
    return model, train_model


def set_gradient_sync(train_model, sync):
    """Whether this micro-step's backward averages the gradients over processes (DDP, FSDP). Before the
    last micro-step of an iteration they accumulate locally (under FSDP: unsharded, at full size)."""
    module = getattr(train_model, '_orig_mod', train_model)  # under torch.compile
    if isinstance(module, DDP):
        module.require_backward_grad_sync = sync
    elif isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(sync)


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
    if not isinstance(model, FSDPModule):
        return model.state_dict(), optimizer.state_dict()
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    state = get_optimizer_state_dict(model, optimizer, options=options)  # {'state': {name: {...}}, ...}
    if dist.get_rank() != 0:
        return {}, {}
    index = {name: i for i, name in enumerate(parameter_names(model, optimizer))}
    # the hyperparameters are the same on every rank and unsharded: take them as torch writes them
    return model_state, {'state': {index[name]: s for name, s in state['state'].items()},
                         'param_groups': optimizer.state_dict()['param_groups']}


def load_optimizer_state(model, optimizer, state):
    """Load an optimizer state dict that full_state() wrote (in any parallelism and world size) into
    optimizer, sharding it under FSDP. Refuses one for other trainable parameters (another freeze_layers)."""
    sizes = [len(group['params']) for group in optimizer.param_groups]
    if [len(group['params']) for group in state['param_groups']] != sizes:
        raise UserError(f"the checkpoint's optimizer state is for other trainable parameters than this run's "
                        f"({sizes} per group): was it trained with another freeze_layers?")
    if not isinstance(model, FSDPModule):
        optimizer.load_state_dict(state)  # moves its tensors to the parameters' device
        return
    names = parameter_names(model, optimizer)
    state = {'state': {names[i]: s for i, s in state['state'].items()},
             'param_groups': [{**group, 'params': [names[i] for i in group['params']]} for group in state['param_groups']]}
    # every rank holds the full state (it read the checkpoint) and keeps its own shard of each tensor
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    for group, saved in zip(optimizer.param_groups, state['param_groups']):
        group.update((k, v) for k, v in saved.items() if k != 'params')  # as saved: it makes tuples lists


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
    neither runs code from the file nor fills the GPU. Raises UserError if it is missing, truncated,
    corrupt, unsafe to load, or lacks any of `keys`."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}: train one first (init_from='scratch'), "
                        "or point --out_dir at the directory that holds ckpt.pt")
    if not zipfile.is_zipfile(path):
        raise UserError(f"checkpoint {path} is truncated or corrupt (not a complete PyTorch file); "
                        f"delete it, or restore it from a copy")
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
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
