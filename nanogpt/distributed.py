"""
torchrun's processes: the process group and the collectives the loop uses (one host sync per
iteration), DDP or FSDP2 and activation checkpointing applied to a model from outside it, the stop
signals every process obeys together, restarts after a failure, and the end of a run.
"""

import atexit
import datetime
import functools
import gc
import os
import signal
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint as recompute

from configurator import UserError
from nanogpt.runtime import DTYPES, device_type


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
