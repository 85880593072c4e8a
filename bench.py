"""
A much shorter version of train.py for benchmarking: `python bench.py` times training iterations of
GPT-2 124M; `--profile=True` writes a torch.profiler trace; `--mode=generate` times generation with
and without the KV cache; `--mode=speed` times the faithful path (eager, float32) against the fast
path (the --dtype and --compile given) on the same model and batches, in alternating blocks, and
prints the ratio of the medians; on CUDA the faithful path runs with TF32 off, so it really is
float32. `--mode=memory` counts the bytes of parameters, gradients and optimizer state after a step
in one process and, launched by torchrun, in each rank's FSDP shards, measures the peak memory of a
forward+backward with and without activation checkpointing, and under torchrun what each FSDP rank
holds between the micro-steps of gradient accumulation, reduce-scattering after every one or only
the last; and, for finetuning, the same bytes with freeze_layers and with LoRA adapters, then the
same arithmetic for GPT-2's sizes. Small shapes for a CPU: `python bench.py --n_layer=4 --n_head=4
--n_embd=128 --block_size=64 --batch_size=12 --dataset=shakespeare_char`.
"""

import gc
import os
import time
import warnings

import numpy as np
import torch
from torch.distributed.tensor import DTensor

from nanogpt import dataloader
from nanogpt import lora
from nanogpt import distributed, runtime
from configurator import (
    ANY,
    NON_NEGATIVE,
    POSITIVE,
    ROOT,
    SEED,
    OneOf,
    OutPath,
    UserError,
    check,
    configure,
)
from model import GPT, GPTConfig
from nanogpt.tokenizer import load_meta

# -----------------------------------------------------------------------------
# 'train': time forward+backward+update; 'generate': tokens/s with and without the KV cache;
mode = 'train'
# 'speed': the faithful path (eager, float32, no TF32) against --dtype/--compile, alternating blocks
# of iters; 'memory': bytes of parameters + gradients + optimizer state (per FSDP rank under
# torchrun), and the peak memory of a step with and without activation checkpointing, and finetuning
# with these:
freeze_layers = 0  # mode=memory: the lowest Blocks frozen; 0 = three quarters of them
# mode=memory: LoRA adapters of this rank on c_attn, c_proj and c_fc (train.py's default targets)
lora_rank = 8
batch_size = 12
block_size = 1024
n_layer = 12
n_head = 12
n_embd = 768
bias = False
# 'exact' (nanoGPT's, what train.py trains from scratch) or 'tanh' (GPT-2's, for its imports)
gelu = 'exact'
vocab_size = 0  # 0: the dataset's (from its meta.pkl) when real_data, else 50304 (GPT-2's, padded)
# batches from data/<dataset>/train.bin (when prepared), else one fixed random batch
real_data = True
dataset = 'openwebtext'
seed = 1337
device = 'auto'  # 'auto' (cuda, else mps, else cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
# 'auto' (bfloat16 or float16 on GPUs, float32 elsewhere), 'float32', 'bfloat16', 'float16'
dtype = 'auto'
compile = None  # use PyTorch 2.0 to compile the model to be faster; None: on CUDA only
profile = False  # use pytorch profiler, or just simple benchmarking?
burnin = 10  # iterations before timing starts (compilation, allocator warm-up)
iters = 20  # timed iterations (mode=speed: per block)
# mode=speed: timed blocks per path, alternating faithful and fast; the medians are compared
rounds = 5
max_new_tokens = 500  # mode=generate: tokens generated from a one-token prompt
accumulation = 4  # mode=memory under torchrun: micro-steps of FSDP's gradient accumulation
profile_dir = 'bench_log'  # where the profiler's TensorBoard trace goes
# -----------------------------------------------------------------------------
config = configure(globals())


def check_settings(c):
    """Each setting's allowed values (configurator.check: bools need none), then how they go
    together."""
    check(
        c,
        dict(
            mode=OneOf('train', 'generate', 'speed', 'memory'),
            batch_size=POSITIVE,
            block_size=POSITIVE,
            n_layer=POSITIVE,
            n_head=POSITIVE,
            n_embd=POSITIVE,
            gelu=OneOf('exact', 'tanh'),
            vocab_size=NON_NEGATIVE,
            dataset=ANY,
            seed=SEED,
            device=ANY,
            dtype=OneOf('auto', *runtime.DTYPES),
            compile=OneOf(None, True, False),
            burnin=NON_NEGATIVE,
            iters=POSITIVE,
            rounds=POSITIVE,
            max_new_tokens=POSITIVE,
            profile_dir=OutPath(folder=True),
            freeze_layers=NON_NEGATIVE,
            lora_rank=POSITIVE,
            accumulation=POSITIVE,
        ),
    )
    if c['n_embd'] % c['n_head']:
        raise UserError(f"n_embd ({c['n_embd']}) must be divisible by n_head ({c['n_head']})")


check_settings(config)
device, dtype, ctx = runtime.setup(device, dtype, seed)
compile = runtime.pick_compile(compile, device)
if mode == 'memory':
    if runtime.device_type(device) == 'mps':
        raise UserError(
            "--mode=memory measures on cuda (the allocator's statistics) or cpu (the profiler's)"
        )
    # under torchrun each process takes its own GPU
    ddp, rank, _, world_size, device = distributed.init_distributed(device)
runtime.print_environment(device, dtype)

# data: a prepared dataset when there is one (its vocabulary too), else random tokens
data_dir = os.path.join(ROOT, 'data', dataset)
data_path = os.path.join(data_dir, 'train.bin')
meta_path = os.path.join(data_dir, 'meta.pkl')
if not vocab_size:
    vocab_size = (
        load_meta(meta_path)['vocab_size'] if real_data and os.path.exists(meta_path) else 50304
    )
real_data = real_data and os.path.exists(data_path)
print(f"data: {data_path if real_data else 'a fixed random batch'}, vocab_size {vocab_size}")
if real_data:
    # which also refuses a file np.memmap cannot map
    if dataloader.count_tokens(data_path) <= block_size:
        raise UserError(
            f"{data_path} has too few tokens for block_size {block_size}: "
            "use a smaller --block_size"
        )
    data = np.memmap(data_path, dtype=np.uint16, mode='r')


def get_batch():
    if real_data:
        return dataloader.get_batch(
            data, torch.randint(len(data) - block_size, (batch_size,)), block_size, device
        )
    return fixed_x, fixed_y


fixed_x = torch.randint(vocab_size, (batch_size, block_size), device=device)
fixed_y = torch.randint(vocab_size, (batch_size, block_size), device=device)

# model init
gptconf = GPTConfig(
    block_size=block_size,
    n_layer=n_layer,
    n_head=n_head,
    n_embd=n_embd,
    dropout=0,
    bias=bias,
    vocab_size=vocab_size,
    gelu=gelu,
)
model = GPT(gptconf)
model.to(device)
print(f"number of parameters: {model.get_num_params() / 1e6:.2f}M")

if mode == 'generate':
    # as sample.py: its weights in dtype, no autocast, compiled as sample.py compiles
    model = runtime.inference_model(model, device, dtype, compile, cast=True)
    # one-token prompt, as sample.py's default; the same seed for both so they draw alike
    prompt = torch.zeros((1, 1), dtype=torch.long, device=device)
    rates = {}
    for use_cache in (True, False):
        torch.manual_seed(seed)
        with torch.no_grad():
            # warm-up: the whole generation once, so that with compile every graph (prefill, the
            # steps before the cache position turns symbolic, the cache rebuild) is compiled before
            # timing
            model.generate(prompt, max_new_tokens, use_cache=use_cache)
            runtime.synchronize(device)
            t0 = time.perf_counter()
            model.generate(prompt, max_new_tokens, use_cache=use_cache)
            runtime.synchronize(device)
        rates[use_cache] = max_new_tokens / (time.perf_counter() - t0)
        print(f"{'with' if use_cache else 'without'} KV cache: {rates[use_cache]:.1f} tokens/s")
    print(
        f"KV cache speedup: {rates[True] / rates[False]:.1f}x ({max_new_tokens} new tokens, "
        f"block_size {block_size}, {n_layer} layers, {n_embd} wide, compile={compile})"
    )
    raise SystemExit(0)


def forward_backward(net):
    X, Y = get_batch()
    with ctx:
        _, loss = net(X, Y)
    loss.backward()


def step_memory(net, optimizer):
    """One training step, then the bytes of this process's parameters, gradients and optimizer
    state, counted from the tensors themselves (a DTensor by its local shard, the tied weight
    once)."""
    forward_backward(net)
    optimizer.step()

    def nbytes(tensors):
        return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors)

    params = list(net.parameters())
    return {
        'parameters': nbytes(params),
        'gradients': nbytes(p.grad for p in params if p.grad is not None),
        'optimizer state': nbytes(
            v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)
        ),
    }


def live_bytes():
    """Bytes of the tensors this process holds: the CUDA allocator's count, or on CPU, whose
    allocator keeps none (and whose profiler misses what gloo's threads free), the distinct storages
    of every tensor the garbage collector tracks, gradients included (FSDP keeps unsharded ones on
    its own objects)."""
    if runtime.device_type(device) == 'cuda':
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    gc.collect()
    storages = {}
    with warnings.catch_warnings():  # touching some of torch's deprecated objects warns
        warnings.simplefilter('ignore')
        objects = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in objects:
        if not isinstance(obj, DTensor):  # a DTensor's local shard is counted
            for t in (obj, obj.grad):
                if t is not None and not isinstance(t, DTensor):
                    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def peak_memory(run):
    """Peak bytes allocated while run() runs above what was allocated before it: the CUDA
    allocator's statistics, or on CPU the profiler's record of each operator's allocations and
    frees."""
    if runtime.device_type(device) == 'cuda':
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        return torch.cuda.max_memory_allocated(device) - before
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        run()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        # what the operator itself allocated minus what it freed
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


if mode == 'memory':
    mib = 2**20
    opt_args = dict(
        weight_decay=1e-2,
        learning_rate=1e-4,
        betas=(0.9, 0.95),
        device_type=runtime.device_type(device),
        verbose=False,
    )
    sizes = {'one process': step_memory(model, model.configure_optimizers(**opt_args))}
    one = sum(sizes['one process'].values())
    if ddp:
        sharded = GPT(gptconf)
        sharded.load_state_dict(model.state_dict())
        distributed.parallelize(sharded, device, dtype, ddp, fsdp=True)
        per_rank = distributed.gather_to_rank0(
            step_memory(sharded, sharded.configure_optimizers(**opt_args))
        )
        for r, size in enumerate(per_rank or []):  # None on ranks other than 0
            sizes[f'FSDP rank {r} of {world_size}'] = size
    for name, size in sizes.items():
        total = sum(size.values())
        if rank == 0:
            print(
                f"{name}: "
                + ", ".join(f"{k} {v / mib:.2f} MiB" for k, v in size.items())
                + f", total {total / mib:.2f} MiB ({total / one:.3f}x one process)"
            )
    # activation checkpointing keeps each Block's input instead of all its intermediate activations
    peaks = {}
    for checkpointing in (False, True):
        net = GPT(gptconf)
        distributed.parallelize(net, device, dtype, False, activation_checkpointing=checkpointing)
        peaks[checkpointing] = peak_memory(lambda: forward_backward(net))
    if rank == 0:
        print(
            f"peak memory of forward+backward, batch {batch_size} x {block_size}: "
            f"without activation checkpointing {peaks[False] / mib:.2f} MiB, "
            f"with {peaks[True] / mib:.2f} MiB ({peaks[True] / peaks[False]:.2f}x)"
        )
    # what bfloat16 autocast holds beside the training state, against docs/scale.md's arithmetic
    # (measured with saved-tensor hooks and the profiler at several small sizes): a bfloat16 copy of
    # every matmul weight (2 bytes each), and per token 36 bytes per unit of n_embd in each Block
    # (3.6 with activation checkpointing: the Block's float32 input), 10 per vocabulary entry (the
    # logits, their float32 log-softmax and its gradient) and 17 per unit of n_embd outside the
    # Blocks. The peak of an eager forward+backward once the gradients exist (a step after the
    # first under DDP, whose buckets hold them, or a micro-step after the first)
    if rank == 0 and runtime.bfloat16_native(device):
        half = runtime.autocast_context(device, 'bfloat16')
        matmul_weights = n_layer * 12 * n_embd**2 + vocab_size * n_embd
        tokens = batch_size * block_size
        for checkpointing, per_block in ((False, 36), (True, 3.6)):
            net = GPT(gptconf).to(device)
            distributed.parallelize(
                net, device, 'bfloat16', False, activation_checkpointing=checkpointing
            )

            def half_step():
                X, Y = get_batch()
                with half:
                    _, loss = net(X, Y)  # the logits stay alive through backward, as in train.py
                loss.backward()

            half_step()
            held = peak_memory(half_step)
            paper = 2 * matmul_weights + tokens * (
                per_block * n_layer * n_embd + 10 * vocab_size + 17 * n_embd
            )
            print(
                f"bfloat16 autocast, batch {batch_size} x {block_size}, activation checkpointing "
                f"{checkpointing}: peak of forward+backward {held / mib:.2f} MiB, arithmetic "
                f"{paper / mib:.2f} MiB ({held / paper:.3f}x), of which weight copies "
                f"{2 * matmul_weights / mib:.2f} MiB"
            )
    # FSDP with gradient accumulation: reduce-scatter after every micro-step, or only the last
    if ddp:
        held = {}
        for every in (True, False):
            net = GPT(gptconf)
            distributed.parallelize(net, device, dtype, ddp, fsdp=True)
            before, most = live_bytes(), 0
            # the gradients each rank holds until the last one
            for micro_step in range(accumulation - 1):
                distributed.set_gradient_sync(net, False, every)
                forward_backward(net)
                most = max(most, live_bytes() - before)
            held[every] = distributed.gather_to_rank0(most)
            del net
        for r in range(world_size if rank == 0 else 0):
            print(
                f"FSDP rank {r} of {world_size}, memory held between {accumulation} micro-steps: "
                f"reduce-scatter after every micro-step {held[True][r] / mib:.2f} MiB, "
                f"only after the last {held[False][r] / mib:.2f} MiB "
                f"({held[False][r] / held[True][r]:.2f}x)"
            )
    # finetuning in one process: all weights, the top Blocks only, or LoRA adapters (train.py's
    # settings)
    adapters = lora.settings(lora_rank, 2.0 * lora_rank, 0.0, 'c_attn,c_proj,c_fc', 'adamw', 0)

    def finetuned(config, how):
        net = GPT(config)
        if how == 'freeze_layers':
            net.freeze(freeze_layers or config.n_layer * 3 // 4)
        elif how == 'lora':
            lora.add_adapters(net, adapters)
        return net

    def arithmetic(net):
        """float32 weights (4 bytes each), and for each trainable one a gradient (4) and AdamW's
        moments (8)."""
        trainable, total = lora.count_trainable(net)
        return 4 * total + 12 * trainable, trainable, total

    hows = ('full', 'freeze_layers', 'lora')
    for how in hows:
        net = finetuned(gptconf, how).to(device)
        size = step_memory(net, net.configure_optimizers(**opt_args))
        expected, trainable, total = arithmetic(net)
        if rank == 0:
            print(
                f"finetuning, {how}: {trainable:,} of {total:,} parameters trainable "
                f"({100 * trainable / total:.2f}%); "
                + ", ".join(f"{k} {v / mib:.2f} MiB" for k, v in size.items())
                + f", total "
                f"{sum(size.values()) / mib:.2f} MiB (arithmetic: {expected / mib:.2f} MiB)"
            )
    if rank == 0:
        print(
            "the same arithmetic for GPT-2's shapes (meta tensors), GiB per process; "
            f"freeze_layers: the lowest 3/4 of the Blocks; LoRA rank {lora_rank}:"
        )
        for name, (layers, width) in dict(
            gpt2=(12, 768), gpt2_medium=(24, 1024), gpt2_large=(36, 1280), gpt2_xl=(48, 1600)
        ).items():
            config = GPTConfig(
                n_layer=layers,
                n_head=width // 64,
                n_embd=width,
                block_size=1024,
                vocab_size=50257,
                bias=True,
                gelu='tanh',
            )
            with torch.device('meta'):
                sizes = {how: arithmetic(finetuned(config, how)) for how in hows}
            print(
                f"{name}: "
                + ", ".join(
                    f"{how} {b / 2**30:.1f} GiB ({t / n:.2%} trainable)"
                    for how, (b, t, n) in sizes.items()
                )
            )
    raise SystemExit(0)


def time_blocks(paths):
    """Alternate timed blocks of `iters` training steps over the paths (name -> step function),
    `rounds`
    each, after `burnin` untimed steps each; the machine may be shared and noisy, so report
    medians."""
    times = {name: [] for name in paths}
    for name, step in paths.items():
        for _ in range(burnin):
            step()
    for _ in range(rounds):
        for name, step in paths.items():
            runtime.synchronize(device)
            t0 = time.perf_counter()
            for _ in range(iters):
                loss = step()
            loss.item()
            runtime.synchronize(device)
            times[name].append((time.perf_counter() - t0) / iters)
    return {name: float(np.median(ts)) for name, ts in times.items()}


def make_step(net, optimizer, context, tf32=True):
    def step():
        # a global switch, set for each path's own steps (a no-op off CUDA)
        runtime.allow_tf32(device, tf32)
        X, Y = get_batch()
        with context:
            _, loss = net(X, Y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


if mode == 'speed':
    # two copies of the same initial model; the faithful one is eager float32, the fast one uses
    # --dtype/--compile
    kind = runtime.device_type(device)
    fast_model = GPT(gptconf).to(device)
    fast_model.load_state_dict(model.state_dict())
    opt_args = dict(
        weight_decay=1e-2, learning_rate=1e-4, betas=(0.9, 0.95), device_type=kind, verbose=False
    )
    faithful_ctx = runtime.autocast_context(device, 'float32')  # a no-op
    paths = {
        'faithful': make_step(
            model, model.configure_optimizers(**opt_args), faithful_ctx, tf32=False
        ),
        'fast': make_step(
            torch.compile(fast_model) if compile else fast_model,
            fast_model.configure_optimizers(**opt_args),
            ctx,
        ),
    }
    dt = time_blocks(paths)
    tokens = batch_size * block_size
    print(
        f"faithful (eager, float32, no TF32): {dt['faithful'] * 1000:.2f}ms/iter, "
        f"{tokens / dt['faithful']:,.0f} tokens/s"
    )
    print(
        f"fast (compile={compile}, {dtype}, {torch.get_num_threads()} threads): "
        f"{dt['fast'] * 1000:.2f}ms/iter, "
        f"{tokens / dt['fast']:,.0f} tokens/s"
    )
    print(
        f"training speedup: {dt['faithful'] / dt['fast']:.2f}x "
        f"(medians of {rounds} alternating blocks of "
        f"{iters} iterations, batch {batch_size} x {block_size}, {n_layer} layers, {n_embd} wide)"
    )
    raise SystemExit(0)

optimizer = model.configure_optimizers(
    weight_decay=1e-2,
    learning_rate=1e-4,
    betas=(0.9, 0.95),
    device_type=runtime.device_type(device),
)
if compile:
    print("Compiling model...")
    model = torch.compile(model)  # pytorch 2.0

train_step = make_step(model, optimizer, ctx)


if profile:
    # useful docs on pytorch profiler:
    # - tutorial https://pytorch.org/tutorials/intermediate/tensorboard_profiler_tutorial.html
    # - api https://pytorch.org/docs/stable/profiler.html#torch.profiler.profile
    wait, warmup, active = 5, 5, 5
    num_steps = wait + warmup + active
    activities = [torch.profiler.ProfilerActivity.CPU]
    if runtime.device_type(device) == 'cuda':
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(
        activities=activities,
        schedule=torch.profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=1),
        on_trace_ready=torch.profiler.tensorboard_trace_handler(profile_dir),
        record_shapes=False,
        profile_memory=False,
        with_stack=False,  # incurs an additional overhead, disable if not needed
        with_flops=True,
        with_modules=False,  # only for torchscript models atm
    ) as prof:
        for k in range(num_steps):
            loss = train_step()
            lossf = loss.item()
            print(f"{k}/{num_steps} loss: {lossf:.4f}")
            prof.step()  # notify the profiler at end of each step
    sort_by = (
        'self_cuda_time_total' if runtime.device_type(device) == 'cuda' else 'self_cpu_time_total'
    )
    print(prof.key_averages().table(sort_by=sort_by, row_limit=20))
    print(
        f"trace written to {os.path.abspath(profile_dir)} "
        f"(view with: tensorboard --logdir {profile_dir})"
    )
else:
    # simple benchmarking
    runtime.synchronize(device)
    for stage, num_steps in enumerate([burnin, iters]):  # burnin, then benchmark
        t0 = time.perf_counter()
        for k in range(num_steps):
            loss = train_step()
        runtime.synchronize(device)  # one host sync per stage, not per step
        dt = time.perf_counter() - t0
        if stage == 1:
            lossf = loss.item()
            tokens_per_s = num_steps * batch_size * block_size / dt
            mfu = model.estimate_mfu(
                batch_size * 1 * num_steps, dt, runtime.device_peak_flops(device, dtype)
            )
            print(
                f"time per iteration: {dt / num_steps * 1000:.2f}ms, {tokens_per_s:,.0f} tokens/s, "
                f"MFU: {mfu * 100:.2f}%, loss {lossf:.4f}"
            )
