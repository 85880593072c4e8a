"""
This training script can be run both on a single device (CPU, one GPU, Apple MPS) and
in distributed data parallel (DDP) mode through torchrun.

To run on a single device, example:
$ python train.py config/train_shakespeare_char_cpu.py

To run with DDP on 4 gpus on 1 node, example:
$ torchrun --standalone --nproc_per_node=4 train.py config/train_gpt2.py

To run with DDP on 4 gpus across 2 nodes, example:
- Run on the first (master) node with example IP 123.456.123.456:
$ torchrun --nproc_per_node=4 --nnodes=2 --node_rank=0 --master_addr=123.456.123.456 --master_port=1234 train.py
- Run on the worker node:
$ torchrun --nproc_per_node=4 --nnodes=2 --node_rank=1 --master_addr=123.456.123.456 --master_port=1234 train.py
(If your cluster does not have Infiniband interconnect prepend NCCL_IB_DISABLE=1)

To shard parameters, gradients and optimizer state over the processes (models too big for DDP), add
--fsdp=True; launched with torchrun --max-restarts=N, a job resumes by itself from its last
checkpoint after a failure (docs/scale.md).

A run writes out_dir/ckpt.pt (continue it with --init_from=resume) and out_dir/log.jsonl.
"""

import math
import os
import signal
import time

import configurator  # noqa: F401  first: from here on a Ctrl-C, during the slow imports too, is one quiet line
import torch

from nanogpt import checkpoints
from nanogpt import dataloader
from nanogpt import lora
from nanogpt import runtime
from nanogpt import tokenizer
from configurator import (
    ANY,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    SEED,
    OneOf,
    OutPath,
    Range,
    UserError,
    check,
    configure,
)
from eval import check_gpt2_tokenizer, hellaswag_score, load_hellaswag
from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
# default config values designed to train a gpt2 (124M) on OpenWebText
# I/O
out_dir = 'out'
eval_interval = 2000
log_interval = 1
eval_iters = 200
eval_only = False  # if True, script exits right after the first eval
always_save_checkpoint = True  # if True, always save a checkpoint after each eval
# stop after this many evals without a new best val loss, keeping the best checkpoint (0 = off)
early_stop_patience = 0
# also score HellaSwag at each eval (GPT-2 tokenizer only), sharded over the processes
eval_hellaswag = False
# a local HellaSwag .jsonl; '' = Rowan/hellaswag's validation split from the hub
hellaswag_path = ''
# 'scratch', 'resume' (out_dir/ckpt.pt), 'gpt2*', a Hugging Face dir, or a run's ckpt.pt/out_dir to
# start anew from
init_from = 'scratch'
# True: a new run may replace the one whose ckpt.pt is in out_dir (at its first save)
overwrite = False
# True: a Hugging Face directory may load pytorch_model.bin, a pickle that can run code
allow_unsafe_pickle = False
# also save a checkpoint every this many iterations, whatever the eval; 0: only at evals
checkpoint_interval = 0
# wandb logging
wandb_log = False  # disabled by default
wandb_project = 'owt'
wandb_run_name = 'gpt2'
# data
dataset = 'openwebtext'
# where train.bin, val.bin and meta.pkl are; '' means data/<dataset> in this repository
data_dir = ''
# global count over all processes, to simulate larger batch sizes
gradient_accumulation_steps = 5 * 8
batch_size = 12  # if gradient_accumulation_steps > 1, this is the micro-batch size
block_size = 1024
# 'random': windows drawn with replacement (nanoGPT); 'epoch': each window once per epoch
data_order = 'random'
# model
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0  # for pretraining 0 is good, for finetuning try 0.1+
bias = False  # do we use bias inside LayerNorm and Linear layers?
# adamw optimizer
learning_rate = 6e-4  # max learning rate
max_iters = 600000  # total number of training iterations
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip gradients at this value, or disable if == 0.0
# 'adamw' (nanoGPT's), or 'muon': Muon for the blocks' weight matrices, AdamW for the rest
optimizer = 'adamw'
# Muon's peak lr: its schedule is learning_rate's, times muon_learning_rate / learning_rate
muon_learning_rate = 0.02
muon_momentum = 0.95  # Muon's (Nesterov) momentum
muon_weight_decay = 0.0  # Muon's decoupled weight decay, per step lr * muon_weight_decay
# learning rate decay settings
decay_lr = True  # whether to decay the learning rate
warmup_iters = 2000  # how many steps to warm up for
lr_decay_iters = 600000  # should be ~= max_iters per Chinchilla
min_lr = 6e-5  # minimum learning rate, should be ~= learning_rate/10 per Chinchilla
# system
device = 'auto'  # 'auto' (cuda, else mps, else cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
# 'auto' (bfloat16, float16 on GPUs without it, float32 on cpu/mps), 'float32', 'bfloat16',
# 'float16'
dtype = 'auto'
compile = None  # use PyTorch 2.0 to compile the model to be faster; None: on CUDA only
# under torchrun, shard parameters, gradients and optimizer state (FSDP2) instead of DDP
fsdp = False
# FSDP: reduce-scatter gradients after each micro-step (memory), else only the last
fsdp_reduce_every_micro_step = True
# recompute each Block's activations in backward: less memory, ~1/3 more compute
activation_checkpointing = False
# finetune only above this: embeddings (so the tied lm_head) and the lowest N Blocks stay fixed
freeze_layers = 0
# LoRA: train rank-r adapters (peft) of lora_targets, every base weight frozen; 0 = off
# (docs/finetuning.md)
lora_rank = 0
lora_alpha = 16.0  # the adapters' output is scaled by lora_alpha / lora_rank
lora_dropout = 0.0  # dropout on the adapters' input
# the Blocks' nn.Linear layers that get adapters: c_attn, c_proj, c_fc, attn.c_proj, mlp.c_proj
lora_targets = 'c_attn,c_proj,c_fc'
# seconds a collective waits for a lost peer before failing (torchrun can then restart)
dist_timeout = 600
seed = 1337
# -----------------------------------------------------------------------------
config = configure(globals())  # config files and --key=value from the command line


# -----------------------------------------------------------------------------
# settings checks: every value is refused here, in one line, before anything is touched
def check_settings(c):
    """Each setting's allowed values (configurator.check: bools need none), then how they go
    together."""
    check(
        c,
        dict(
            out_dir=OutPath(folder=True),
            eval_interval=POSITIVE,
            log_interval=POSITIVE,
            eval_iters=POSITIVE,
            early_stop_patience=NON_NEGATIVE,
            hellaswag_path=ANY,
            init_from=ANY,
            checkpoint_interval=NON_NEGATIVE,
            wandb_project=ANY,
            wandb_run_name=ANY,
            dataset=ANY,
            data_dir=ANY,
            gradient_accumulation_steps=POSITIVE,
            batch_size=POSITIVE,
            block_size=POSITIVE,
            data_order=OneOf('random', 'epoch'),
            n_layer=POSITIVE,
            n_head=POSITIVE,
            n_embd=POSITIVE,
            dropout=FRACTION,
            learning_rate=NON_NEGATIVE,
            max_iters=NON_NEGATIVE,
            weight_decay=NON_NEGATIVE,
            beta1=FRACTION,
            beta2=FRACTION,
            grad_clip=NON_NEGATIVE,
            optimizer=OneOf('adamw', 'muon'),
            muon_learning_rate=NON_NEGATIVE,
            muon_momentum=FRACTION,
            muon_weight_decay=NON_NEGATIVE,
            warmup_iters=NON_NEGATIVE,
            lr_decay_iters=NON_NEGATIVE,
            min_lr=NON_NEGATIVE,
            device=ANY,
            dtype=OneOf('auto', 'float32', 'bfloat16', 'float16'),
            compile=OneOf(None, True, False),
            freeze_layers=NON_NEGATIVE,
            lora_rank=NON_NEGATIVE,
            lora_alpha=Range(0, open_lo=True),
            lora_dropout=FRACTION,
            lora_targets=ANY,
            dist_timeout=POSITIVE,
            seed=SEED,
        ),
    )
    if c['early_stop_patience'] and c['checkpoint_interval']:
        raise UserError(
            "early_stop_patience keeps the best model in ckpt.pt and checkpoint_interval overwrites it: "
            "use one of them"
        )
    if c['optimizer'] == 'muon' and c['learning_rate'] <= 0:
        raise UserError(
            f"optimizer muon needs learning_rate > 0 (Muon's schedule is scaled from it), got {c['learning_rate']}"
        )
    if c['decay_lr'] and c['lr_decay_iters'] <= c['warmup_iters']:
        raise UserError(
            f"lr_decay_iters ({c['lr_decay_iters']}) must be greater than warmup_iters ({c['warmup_iters']}): "
            "the learning rate decays between them (or --decay_lr=False)"
        )
    if c['decay_lr'] and c['min_lr'] > c['learning_rate']:
        raise UserError(
            f"min_lr ({c['min_lr']}) must be at most learning_rate ({c['learning_rate']}): the learning "
            "rate decays from one to the other (or --decay_lr=False)"
        )


check_settings(config)
lora_settings = lora.settings(
    lora_rank, lora_alpha, lora_dropout, lora_targets, optimizer, freeze_layers
)

# -----------------------------------------------------------------------------
# devices, precision and processes
ddp, rank, local_rank, world_size, device = runtime.init_distributed(
    runtime.pick_device(device), dist_timeout
)
master_process = rank == 0  # this process prints, logs and writes checkpoints
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
# by torchrun after a failure: continue from ckpt.pt
restarted = runtime.restarted_with_checkpoint(ckpt_path)
init_from = 'resume' if restarted else init_from
# one run at a time in out_dir (rank 0 locks it for the job), and a new run never replaces an
# earlier one unasked
runtime.check_on_rank0(
    lambda: (
        checkpoints.lock_out_dir(out_dir, wait=60 if restarted else 0),
        checkpoints.check_new_run(out_dir, init_from, overwrite),
    )
)
dtype = runtime.pick_dtype(dtype, device, fsdp)
compile = runtime.pick_compile(compile, device)
config.update(device=device, dtype=dtype, compile=compile)
device_type = runtime.device_type(device)
if gradient_accumulation_steps % world_size != 0:
    raise UserError(
        f"gradient_accumulation_steps ({gradient_accumulation_steps}) is the global count and must be "
        f"divisible by the number of processes ({world_size})"
    )
accum_steps = gradient_accumulation_steps // world_size  # micro-steps per process and iteration
if optimizer == 'muon' and dtype == 'float16':
    raise UserError(
        "optimizer muon with float16 is not supported: GradScaler skips an overflowed step without a host "
        "sync only for optimizers that take its overflow flag, which Muon does not (a second sync every "
        "iteration); use --dtype=bfloat16 (a GPU from Ampere on) or float32, or --optimizer=adamw"
    )
if optimizer == 'muon' and fsdp and ddp:
    raise UserError(
        "optimizer muon orthogonalizes whole weight matrices, which fsdp shards over the processes: "
        "use --optimizer=adamw with --fsdp=True, or muon with DDP (--fsdp=False)"
    )
if master_process:
    runtime.print_environment(device, dtype)
    print("config: " + ", ".join(f"{k}={v!r}" for k, v in config.items()))
    if runtime.shared_rendezvous_store():
        print(
            "warning: a restart may fail to reconnect; launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (docs/scale.md)"
        )
runtime.seed_everything(seed + rank)  # each rank its own dropout masks
runtime.allow_tf32(device)
ctx = runtime.autocast_context(device, dtype)
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))  # no-op unless float16

# -----------------------------------------------------------------------------
# data: token ids as uint16 in train.bin and val.bin
data_dir = dataloader.find_dataset(dataset, data_dir)
n_tokens = {
    split: dataloader.count_tokens(os.path.join(data_dir, f'{split}.bin'))
    for split in ('train', 'val')
}
meta_path = os.path.join(data_dir, 'meta.pkl')
# a char-level dataset's, from its meta.pkl; else None
meta_vocab_size = dataloader.meta_vocab_size(data_dir)
if meta_vocab_size and master_process:
    print(f"found vocab_size = {meta_vocab_size} (inside {data_dir})")
# what made the .bin files; None for older data folders
data_tokenizer = tokenizer.data_tokenizer(data_dir)
# the window starts of each iteration's global batch
sampler = dataloader.WindowSampler(data_order, seed)

# -----------------------------------------------------------------------------
# model: from scratch, from a checkpoint (resume, or the weights of another run) or from GPT-2's
# weights
iter_num = 0
best_val_loss = 1e9
model_args = dict(
    n_layer=n_layer,
    n_head=n_head,
    n_embd=n_embd,
    block_size=block_size,
    bias=bias,
    vocab_size=None,
    dropout=dropout,
)
shape_keys = ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'vocab_size')
checkpoint = None
try:
    if init_from == 'scratch':
        # a char-level dataset's vocab_size from meta.pkl, else GPT-2's 50257 padded up to 50304 for
        # efficiency
        model_args['vocab_size'] = meta_vocab_size or 50304
        model = GPT(GPTConfig(**model_args))
    elif init_from == 'resume' or checkpoints.checkpoint_file(init_from):
        # resume: out_dir/ckpt.pt and its loop state; a path: a run's (merged) weights only, for a
        # fresh run here
        source = ckpt_path if init_from == 'resume' else checkpoints.checkpoint_file(init_from)
        if master_process:
            print(
                f"resuming training from {out_dir}"
                if init_from == 'resume'
                else f"starting from the weights of {source}"
            )
        needed = (
            ('model', 'optimizer', 'model_args', 'iter_num')
            if init_from == 'resume'
            else ('model', 'model_args')
        )
        checkpoint = checkpoints.load_checkpoint(source, keys=needed)
        checkpoints.check_checkpoint(checkpoint, source)
        # the checkpoint fixes the model's shape; dropout comes from this run's config
        model_args.update({k: checkpoint['model_args'][k] for k in shape_keys})
        if init_from == 'resume':  # with settings that continue it: block_size, optimizer, LoRA
            checkpoints.check_resumable(checkpoint, ckpt_path, block_size, optimizer, lora_settings)
        model = GPT(GPTConfig(**model_args, gelu=checkpoints.checkpoint_gelu(checkpoint)))
        try:
            # nanoGPT's '_orig_mod.' prefixes are accepted
            model.load_state_dict(checkpoint['model'])
        except RuntimeError as e:
            raise UserError(
                f"{source} does not match its model_args: {str(e).splitlines()[0]}"
            ) from None
        if init_from == 'resume':
            iter_num = checkpoint['iter_num']
            # nanoGPT stores a tensor
            best_val_loss = float(checkpoint.get('best_val_loss', best_val_loss))
    else:  # 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' or a local Hugging Face directory
        model = checkpoints.load_pretrained(init_from, dropout, allow_unsafe_pickle)
        model_args.update({k: getattr(model.config, k) for k in shape_keys})
# e.g. n_embd not divisible by n_head, unknown or unreachable GPT-2 weights
except (ValueError, OSError) as e:
    raise UserError(str(e)) from None
if init_from != 'scratch':  # resuming or finetuning: the data must be in the model's own tokens
    trained_on = (
        checkpoint.get('tokenizer')
        if checkpoint is not None
        else tokenizer.pretrained_record(model.config)
    )
    tokenizer.check_same(
        trained_on, data_tokenizer, source if checkpoint is not None else init_from, data_dir
    )
    data_tokenizer = data_tokenizer or trained_on
if block_size < model.config.block_size:
    # model surgery, e.g. GPT-2's 1024 positions down to block_size
    model.crop_block_size(block_size)
    model_args['block_size'] = block_size
block_size = model_args['block_size']
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
dataloader.check_fits(data_dir, n_tokens, block_size, model_args['vocab_size'], meta_vocab_size)
if eval_hellaswag:
    check_gpt2_tokenizer(model_args['vocab_size'], meta_path, f"the dataset in {data_dir}")
    hellaswag_rows = load_hellaswag(hellaswag_path)
if not 0 <= freeze_layers <= model.config.n_layer:
    raise UserError(
        f"freeze_layers must be between 0 and n_layer ({model.config.n_layer}), got {freeze_layers}"
    )
if freeze_layers:
    model.freeze(freeze_layers)
# LoRA: peft's adapters in the targeted layers, the rest frozen; a resume restores them (lora.py)
if lora_rank:
    lora.add_adapters(
        model, lora_settings, checkpoint if init_from == 'resume' else None, verbose=master_process
    )
# what checkpoints save: no torch.compile or DDP wrappers, so no '_orig_mod.' prefixes
raw_model = model
if master_process and compile:
    print("compiling the model... (takes a ~minute)")
model, train_model = runtime.parallelize(
    raw_model, device, dtype, ddp, fsdp, activation_checkpointing, compile
)

# -----------------------------------------------------------------------------
# optimizer, and the rest of the state a resumed run continues from
# Muon's Newton-Schulz in bfloat16 only where the device runs it natively
muon_bf16 = optimizer == 'muon' and runtime.bfloat16_native(device, verbose=master_process)
muon = dict(lr=muon_learning_rate, momentum=muon_momentum, weight_decay=muon_weight_decay)
opt = raw_model.configure_optimizers(
    weight_decay,
    learning_rate,
    (beta1, beta2),
    device_type,
    verbose=master_process,
    muon=muon if optimizer == 'muon' else None,
    muon_bf16=muon_bf16,
)
rng_states = None
if init_from == 'resume':
    checkpoints.load_optimizer_state(raw_model, opt, checkpoint['optimizer'], ckpt_path)
    if scaler.is_enabled() and checkpoint.get('scaler'):
        scaler.load_state_dict(checkpoint['scaler'])
    if 'sampler_state' in checkpoint:
        sampler.set_state(checkpoint['sampler_state'])
    rng_states = checkpoint.get('rng_states')
    if len(rng_states or ()) != world_size and master_process:
        print(
            "note: the checkpoint has no random state for this number of processes (from nanoGPT, or another "
            "world size): dropout masks will differ from an uninterrupted run"
        )
checkpoint = None  # free the memory
# measured once, before the loop, so it skews no iteration's timing
peak_flops = runtime.device_peak_flops(device, dtype)


@torch.no_grad()
def estimate_loss():
    """Mean loss over eval_iters batches of each split, in eval mode (None: a stop signal ended it).
    Their batches
    come from their own generator, reseeded every time: evaluations compare like with like, shift no
    stream."""
    out = {}
    model.eval()
    for split in ('train', 'val'):
        generator = torch.Generator().manual_seed(seed)
        ix = torch.randint(
            n_tokens[split] - block_size, (eval_iters, batch_size), generator=generator
        )
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            # a stop signal (on any rank: they stop together, FSDP's forward needs them all) ends it
            # within a batch
            if runtime.mean_over_ranks(
                dict(stop=torch.tensor(float(stop_signal is not None), device=device))
            )['stop']:
                return None
            # (B, T) each
            X, Y = dataloader.get_batch(
                dataloader.split_tokens(data_dir, split), ix[k], block_size, device
            )
            with ctx:
                logits, loss = model(X, Y)
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    model.train()
    return out


def get_lr(it):
    """Linear warmup to learning_rate, cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # coeff ranges 0..1
    return min_lr + coeff * (learning_rate - min_lr)


def save_due(evaluated, improved):
    """The save policy (a stop signal saves whatever it says): every checkpoint_interval iterations,
    and after an evaluation that found a new best val loss or, with always_save_checkpoint, after
    every evaluation; never the state a run started from, nor with eval_only. With early stopping
    only a new best is saved,
    so the checkpoint left is the best one."""
    interval = (
        checkpoint_interval > 0 and iter_num % checkpoint_interval == 0 and local_iter_num > 0
    )
    return (
        interval
        or evaluated
        and iter_num > 0
        and not eval_only
        and (improved or always_save_checkpoint and not early_stop_patience)
    )


def save_checkpoint():
    """Every rank takes part (FSDP gathers the shards, each rank adds its RNG state); rank 0
    writes."""
    rng_states = runtime.gather_to_rank0(runtime.rng_state())
    model_state, optimizer_state = checkpoints.full_state(raw_model, opt)
    if not master_process:
        return
    # 'model' gets the merged weights (what sample.py reads), 'lora' what resuming needs
    if lora_rank:
        model_state, lora_state = lora.split_state(model_state, lora_settings)
    checkpoint = {
        'model': model_state,
        'optimizer': optimizer_state,
        'model_args': model_args,
        'iter_num': iter_num,
        'best_val_loss': best_val_loss,
        'config': config,
        # beyond nanoGPT's keys: the model's GELU and tokenizer, and what continuing
        # exactly needs
        'gelu': raw_model.config.gelu,
        'tokenizer': data_tokenizer,
        'rng_states': rng_states,
        'sampler_state': sampler.state_to_save,
        'scaler': scaler.state_dict(),
        **({'lora': lora_state} if lora_rank else {}),
    }
    print(f"saving checkpoint to {out_dir}")
    checkpoints.save_checkpoint(checkpoint, ckpt_path)
    run_log.commit()  # at the first save, the log kept in memory until now


# -----------------------------------------------------------------------------
# logging (one JSON object per line of log.jsonl for every logged and evaluated iteration, to plot
# runs without wandb; kept in memory until the first save, so a run that ends before it leaves
# out_dir as it was) and stop signals
run_log = (
    checkpoints.RunLog(os.path.join(out_dir, 'log.jsonl'), iter_num) if master_process else None
)
log = run_log.append if master_process else None
if master_process:
    print(f"tokens per iteration will be: {tokens_per_iter:,}")
    if wandb_log:
        import wandb

        try:
            wandb.init(project=wandb_project, name=wandb_run_name, config=config, dir=out_dir)
        except Exception as e:  # not logged in, no network, ...: wandb's own errors, of many kinds
            raise UserError(
                f"wandb did not start ({checkpoints.reason(e)}): log in with wandb login, set "
                "WANDB_MODE=offline, or leave out --wandb_log=True"
            ) from None

# SIGINT (Ctrl-C) or SIGTERM (preemption): finish the current step, save a checkpoint, exit
stop_signal = None


def request_stop(signum, frame):
    global stop_signal
    stop_signal = signal.Signals(signum).name


def save_and_stop():
    save_checkpoint()
    if master_process:
        print(
            f"{stop_signal or 'a stop signal'} received: saved a checkpoint at iter {iter_num} to {ckpt_path}; "
            "continue with --init_from=resume"
        )


signal.signal(signal.SIGINT, request_stop)
signal.signal(signal.SIGTERM, request_stop)

# -----------------------------------------------------------------------------
# training loop
evals_since_best = 0  # for early stopping
if rng_states and len(rng_states) == world_size:
    # last, so nothing above draws from the restored streams
    runtime.set_rng_state(rng_states[rank])
# this rank's micro-batches of each global batch
my_rows = slice(rank * accum_steps, (rank + 1) * accum_steps)
batches = dataloader.train_batches(
    data_dir,
    n_tokens['train'] - block_size,
    sampler,
    (gradient_accumulation_steps, batch_size),
    my_rows,
    block_size,
    device,
)
X, Y = next(batches)  # fetch the very first batch
t_start = t0 = time.time()
local_iter_num = 0  # number of iterations in the lifetime of this process
running_mfu = -1.0
while True:
    # determine and set the learning rate for this iteration
    lr = get_lr(iter_num) if decay_lr else learning_rate
    for param_group in opt.param_groups:
        # Muon's groups have their own peak
        param_group['lr'] = lr * param_group.get('lr_scale', 1.0)

    # once in a while: evaluate the loss on train/val sets (and HellaSwag)
    evaluated = improved = False
    if iter_num % eval_interval == 0 or iter_num == max_iters or eval_only:
        losses = estimate_loss()  # on every rank: FSDP's forward needs them all
        # stopped by a signal: save the state this iteration started from (eval_only: none)
        if losses is None:
            if not eval_only:
                save_and_stop()
            break
        losses = runtime.on_rank0(lambda: losses)  # and all of them act on rank 0's numbers
        hellaswag = {}
        if eval_hellaswag:  # every rank scores its share
            hellaswag = hellaswag_score(
                model, hellaswag_rows, device, ctx, batch_size, rank, world_size
            )
        if master_process:
            print(
                f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
            )
            if hellaswag:
                print(
                    f"step {iter_num}: hellaswag acc {hellaswag['acc']:.4f}, acc_norm {hellaswag['acc_norm']:.4f}"
                )
            log(
                dict(
                    iter=iter_num,
                    train_loss=losses['train'],
                    val_loss=losses['val'],
                    val_bpb=tokenizer.val_bits_per_byte(losses['val'], data_dir, data_tokenizer),
                    lr=lr,
                    tokens=iter_num * tokens_per_iter,
                    **{f'hellaswag_{k}': v for k, v in hellaswag.items()},
                )
            )
            if wandb_log:
                wandb.log(
                    {
                        "iter": iter_num,
                        "train/loss": losses['train'],
                        "val/loss": losses['val'],
                        "lr": lr,
                        "mfu": running_mfu * 100,
                        **{f"hellaswag/{k}": v for k, v in hellaswag.items()},
                    }
                )
        evaluated, improved = True, losses['val'] < best_val_loss
        best_val_loss = min(best_val_loss, losses['val'])
        evals_since_best = 0 if improved else evals_since_best + 1
    if save_due(evaluated, improved):
        save_checkpoint()
    if early_stop_patience and evals_since_best >= early_stop_patience:
        if master_process:
            print(
                f"early stopping at iter {iter_num}: no new best val loss in {early_stop_patience} evals; "
                f"{ckpt_path} holds the best model (val loss {best_val_loss:.4f})"
            )
        break
    if iter_num >= max_iters or eval_only:
        break

    # the training step: forward backward update, with gradient accumulation to simulate larger
    # batch size
    loss_sum = torch.zeros((), device=device)
    for micro_step in range(accum_steps):
        # DDP averages the gradients over ranks only after the last micro-step; FSDP by default
        # after each
        runtime.set_gradient_sync(
            train_model, micro_step == accum_steps - 1, fsdp_reduce_every_micro_step
        )
        with ctx:
            logits, loss = train_model(X, Y)  # logits (B, T, vocab_size), loss a scalar
            loss = loss / accum_steps  # scale the loss to account for gradient accumulation
        loss_sum += loss.detach()
        # immediately async prefetch next batch while model is doing the forward pass on the GPU
        X, Y = next(batches)
        # backward pass, with gradient scaling if training in fp16
        scaler.scale(loss).backward()
    # clip the gradient; its norm before clipping is logged, so it is measured even without clipping
    scaler.unscale_(opt)  # a no-op unless float16
    # a tensor: no host sync here
    grad_norm = runtime.clip_grad_norm(model.parameters(), grad_clip or math.inf)
    # step the optimizer and scaler if training in fp16 (it skips steps whose gradients overflowed)
    scaler.step(opt)
    scaler.update()
    # flush the gradients as soon as we can, no need for this memory anymore
    opt.zero_grad(set_to_none=True)
    # the iteration's one host sync, once its whole step is queued. To log another number, add it
    # here as a 0-dim tensor on the device: it is averaged over the ranks and logged under its name
    # (docs/code.md). 'stop' is whether any rank was asked to stop, so that all of them stop at the
    # same iteration.
    stats = runtime.mean_over_ranks(
        dict(
            loss=loss_sum,
            grad_norm=grad_norm,
            stop=torch.full_like(loss_sum, stop_signal is not None),
        )
    )
    stopping = stats.pop('stop') > 0
    # checked before anything can be saved: checkpoints are written below
    if not math.isfinite(stats['loss']):
        raise UserError(
            f"loss is {stats['loss']} at iter {iter_num}: training diverged (try a lower learning_rate); "
            f"the last checkpoint in {out_dir}, if any, is untouched"
        )

    # timing and logging
    t1 = time.time()
    dt = t1 - t0
    t0 = t1
    if iter_num % log_interval == 0 and master_process:
        if local_iter_num >= 5:  # let the training loop settle a bit
            mfu = raw_model.estimate_mfu(batch_size * accum_steps, dt, peak_flops)
            running_mfu = mfu if running_mfu == -1.0 else 0.9 * running_mfu + 0.1 * mfu
        # None for data_order='random'
        epoch = sampler.epoch(sampler.state_to_save, n_tokens['train'] - block_size)
        row = dict(
            iter=iter_num,
            **stats,
            lr=lr,
            ms=dt * 1000,
            tokens_per_s=tokens_per_iter / dt,
            mfu=running_mfu,
            tokens=iter_num * tokens_per_iter,
            **({} if epoch is None else {'epoch': epoch}),
        )
        # measured from the 6th iteration
        mfu_text = f"{running_mfu * 100:.2f}%" if running_mfu >= 0 else "n/a"
        print(
            f"iter {iter_num}: loss {row['loss']:.4f}, lr {lr:.3e}, time {row['ms']:.2f}ms, "
            f"{row['tokens_per_s']:,.0f} tok/s, mfu {mfu_text}"
            + ("" if epoch is None else f", epoch {epoch}")
        )
        log(row)
        if wandb_log:
            wandb.log(
                {
                    "iter": iter_num,
                    "train/loss_step": stats['loss'],
                    "lr": lr,
                    **{k: v for k, v in stats.items() if k != 'loss'},
                }
            )
    iter_num += 1
    local_iter_num += 1

    if stopping:
        save_and_stop()
        break

if master_process:
    run_log.commit()  # a run that ended without saving (eval_only) writes its log too
    print(
        f"done: {local_iter_num} iterations in {time.time() - t_start:.1f} s, best val loss {best_val_loss:.4f}"
    )
    if wandb_log:
        wandb.finish()
runtime.exit_run()  # quickly: the run is saved
