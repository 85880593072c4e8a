"""
nanoGPT's training loop, on one device (CPU, one GPU, Apple MPS) or on many through torchrun:
$ python train.py config/train_shakespeare_char_cpu.py
$ torchrun --standalone --nproc_per_node=4 train.py config/train_gpt2.py
Several nodes, NCCL, FSDP (--fsdp=True), restarts after a failure: docs/training.md, docs/scale.md.

A run writes out_dir/ckpt.pt (continue it with --init_from=resume) and out_dir/log.jsonl;
docs/training.md says what it prints, logs and saves, and what a Ctrl-C does.
"""

import math
import os
import time

import configurator  # noqa: F401  first: a Ctrl-C from here on, slow imports too, is one quiet line
import torch
from tqdm import tqdm

from nanogpt import checkpoints, dataloader, lora, outdir, runtime, tokenizer
from configurator import ANY, FRACTION, NON_NEGATIVE, POSITIVE, SEED, OneOf, OutPath, Range
from configurator import UserError, check, configure
from nanogpt.hellaswag import check_gpt2_tokenizer, hellaswag_score, load_hellaswag
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
    rules = dict(out_dir=OutPath(folder=True), data_order=OneOf('random', 'epoch'))
    rules.update(dict.fromkeys(('eval_interval', 'log_interval', 'eval_iters'), POSITIVE))
    rules.update(
        dict.fromkeys(('gradient_accumulation_steps', 'batch_size', 'block_size'), POSITIVE)
    )
    rules.update(dict.fromkeys(('n_layer', 'n_head', 'n_embd', 'dist_timeout'), POSITIVE))
    rules.update(dict.fromkeys(('early_stop_patience', 'checkpoint_interval'), NON_NEGATIVE))
    rules.update(dict.fromkeys(('learning_rate', 'max_iters', 'weight_decay'), NON_NEGATIVE))
    rules.update(dict.fromkeys(('grad_clip', 'warmup_iters', 'lr_decay_iters'), NON_NEGATIVE))
    rules.update(dict.fromkeys(('min_lr', 'muon_learning_rate', 'muon_weight_decay'), NON_NEGATIVE))
    rules.update(dict.fromkeys(('freeze_layers', 'lora_rank'), NON_NEGATIVE))
    rules.update(dict.fromkeys(('dropout', 'beta1', 'beta2', 'muon_momentum'), FRACTION))
    rules.update(dict.fromkeys(('hellaswag_path', 'init_from', 'wandb_project'), ANY))
    rules.update(dict.fromkeys(('wandb_run_name', 'dataset', 'data_dir', 'device'), ANY))
    rules.update(optimizer=OneOf('adamw', 'muon'), lora_targets=ANY, seed=SEED)
    rules.update(dtype=OneOf('auto', 'float32', 'bfloat16', 'float16'))
    rules.update(compile=OneOf(None, True, False), lora_alpha=Range(0, open_lo=True))
    rules.update(lora_dropout=FRACTION)
    check(c, rules)
    if c['early_stop_patience'] and c['checkpoint_interval']:
        raise UserError(
            "early_stop_patience keeps the best model in ckpt.pt and checkpoint_interval "
            "overwrites it: use one of them"
        )
    if c['optimizer'] == 'muon' and c['learning_rate'] <= 0:
        raise UserError(
            "optimizer muon needs learning_rate > 0 (Muon's schedule is scaled from it), "
            f"got {c['learning_rate']}"
        )
    if c['decay_lr'] and c['lr_decay_iters'] <= c['warmup_iters']:
        raise UserError(
            f"lr_decay_iters ({c['lr_decay_iters']}) must be greater than warmup_iters "
            f"({c['warmup_iters']}): the learning rate decays between them (or --decay_lr=False)"
        )
    if c['decay_lr'] and c['min_lr'] > c['learning_rate']:
        raise UserError(
            f"min_lr ({c['min_lr']}) must be at most learning_rate ({c['learning_rate']}): the "
            "learning rate decays from one to the other (or --decay_lr=False)"
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
        outdir.lock_out_dir(out_dir, wait=60 if restarted else 0),
        outdir.check_new_run(out_dir, init_from, overwrite),
    )
)
dtype = runtime.pick_dtype(dtype, device, fsdp)
compile = runtime.pick_compile(compile, device)
config.update(device=device, dtype=dtype, compile=compile)
device_type = runtime.device_type(device)
if gradient_accumulation_steps % world_size != 0:
    raise UserError(
        f"gradient_accumulation_steps ({gradient_accumulation_steps}) is the global count and "
        f"must be divisible by the number of processes ({world_size})"
    )
accum_steps = gradient_accumulation_steps // world_size  # micro-steps per process and iteration
if optimizer == 'muon' and dtype == 'float16':
    raise UserError(
        "optimizer muon with float16 is not supported: GradScaler skips an overflowed step "
        "without a host sync only for optimizers that take its overflow flag, which Muon does not "
        "(a second sync every iteration); use --dtype=bfloat16 (a GPU from Ampere on) or float32, "
        "or --optimizer=adamw"
    )
if optimizer == 'muon' and fsdp and ddp:
    raise UserError(
        "optimizer muon orthogonalizes whole weight matrices, which fsdp shards over the "
        "processes: use --optimizer=adamw with --fsdp=True, or muon with DDP (--fsdp=False)"
    )
if master_process:
    runtime.print_environment(device, dtype)
    if runtime.shared_rendezvous_store():
        print(
            "warning: a restart may fail to reconnect; launch with "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (docs/scale.md)"
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
    print(f"found vocab_size = {meta_vocab_size} (inside {meta_path})")
# what made the .bin files; None for older data folders
data_tokenizer = tokenizer.data_tokenizer(data_dir)
# the window starts of each iteration's global batch
sampler = dataloader.WindowSampler(data_order, seed)

# -----------------------------------------------------------------------------
# model: from scratch, from a checkpoint (resume, or the weights of another run) or from GPT-2's
# weights. A new model option is a GPTConfig field and a setting of the same name: a new model takes
# the setting (model_args below), and checkpoints keep it beside nanoGPT's model_args
iter_num = 0
best_val_loss = 1e9
model_args = {k: v for k, v in config.items() if k in GPTConfig.__dataclass_fields__}
model_args['vocab_size'] = meta_vocab_size or 50304  # GPT-2's 50257 padded up, for efficiency
checkpoint = None
try:
    if init_from == 'scratch':
        model = GPT(GPTConfig(**model_args))
    elif init_from == 'resume' or checkpoints.checkpoint_file(init_from):
        # resume: out_dir/ckpt.pt and its loop state; a path: a run's (merged) weights only, for a
        # fresh run here. The checkpoint fixes the model; dropout comes from this run's settings
        source = ckpt_path if init_from == 'resume' else checkpoints.checkpoint_file(init_from)
        if master_process:
            print(
                f"resuming training from {out_dir}"
                if init_from == 'resume'
                else f"starting from the weights of {source}"
            )
        resume = ('model', 'optimizer', 'model_args', 'iter_num')
        keys = resume if init_from == 'resume' else ('model', 'model_args')
        checkpoint = checkpoints.load_checkpoint(source, keys=keys)
        model = checkpoints.build_model(checkpoint, source, dropout)
        if init_from == 'resume':  # with settings that continue it: block_size, optimizer, LoRA
            checkpoints.check_resumable(checkpoint, ckpt_path, block_size, optimizer, lora_settings)
            iter_num = checkpoint['iter_num']
            # nanoGPT stores a tensor
            best_val_loss = float(checkpoint.get('best_val_loss', best_val_loss))
    else:  # 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' or a local Hugging Face directory
        model = checkpoints.load_pretrained(init_from, dropout, allow_unsafe_pickle)
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
    model.crop_block_size(block_size)  # model surgery, e.g. GPT-2's 1024 positions down
block_size = model.config.block_size
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
dataloader.check_fits(data_dir, n_tokens, block_size, model.config.vocab_size, meta_vocab_size)
if eval_hellaswag:
    check_gpt2_tokenizer(model.config.vocab_size, meta_path, f"the dataset in {data_dir}")
    hellaswag_rows = load_hellaswag(hellaswag_path)
if not 0 <= freeze_layers <= model.config.n_layer:
    raise UserError(
        f"freeze_layers must be between 0 and n_layer ({model.config.n_layer}), got {freeze_layers}"
    )
# the settings as this run uses them: a checkpoint's or GPT-2's shape replaces the ones asked for
config.update({k: getattr(model.config, k) for k in model_args if k in config})
if master_process:
    print(f"number of parameters: {model.get_num_params() / 1e6:.2f}M")
    print("config: " + ", ".join(f"{k}={v!r}" for k, v in config.items()))
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
    rng_states = checkpoints.restore_state(checkpoint, raw_model, opt, scaler, sampler, ckpt_path)
    if len(rng_states or ()) != world_size and master_process:
        print(
            "note: the checkpoint has no random state for this number of processes (from nanoGPT, "
            "or another world size): dropout masks will differ from an uninterrupted run"
        )
checkpoint = None  # free the memory
# measured once, before the loop, so it skews no iteration's timing
peak_flops = runtime.device_peak_flops(device, dtype)


@torch.no_grad()
def estimate_loss():
    """Mean loss over eval_iters batches of each split, in eval mode (None: a stop signal ended it).
    Their batches come from their own generator, reseeded every time: evaluations compare like with
    like, shift no stream. A progress bar on stderr, when it is a terminal."""
    out = {}
    model.eval()
    bar = tqdm(
        total=2 * eval_iters, desc='eval', leave=False, disable=None if master_process else True
    )
    for split in ('train', 'val'):
        generator = torch.Generator().manual_seed(seed)
        ix = torch.randint(
            n_tokens[split] - block_size, (eval_iters, batch_size), generator=generator
        )
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            # a stop signal (on any rank: they stop together, FSDP's forward needs them all) ends it
            # within a batch
            asked = runtime.mean_over_ranks(dict(stop=torch.tensor(float(stop.name is not None))))
            if asked['stop']:
                bar.close()
                return None
            # (B, T) each
            X, Y = dataloader.get_batch(
                dataloader.split_tokens(data_dir, split), ix[k], block_size, device
            )
            with ctx:
                logits, loss = model(X, Y)
            losses[k] = loss.item()
            bar.update()
        out[split] = losses.mean().item()
    bar.close()
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
    """The save policy (a stop signal saves after any training step): every checkpoint_interval
    iterations, and after an evaluation that found a new best val loss or, with
    always_save_checkpoint, after every evaluation; never the state this run started from, nor with
    eval_only. With early stopping only a new best is saved, so the checkpoint left is the best."""
    if local_iter_num == 0 or eval_only:
        return False
    interval = checkpoint_interval > 0 and iter_num % checkpoint_interval == 0
    return (
        interval or evaluated and (improved or always_save_checkpoint and not early_stop_patience)
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
        'iter_num': iter_num,
        'best_val_loss': best_val_loss,
        'config': config,
        # 'model_args' (nanoGPT's) and our GPTConfig fields beside it, e.g. 'gelu'
        **checkpoints.model_entries(raw_model.config),
        # beyond nanoGPT's keys: the tokenizer, and what continuing exactly needs
        'tokenizer': data_tokenizer,
        'rng_states': rng_states,
        'sampler_state': sampler.state_to_save,
        'scaler': scaler.state_dict(),
        **({'lora': lora_state} if lora_rank else {}),
    }
    print(f"saving checkpoint to {out_dir}")
    checkpoints.save_checkpoint(checkpoint, ckpt_path)
    log.commit()  # at the first save, the log kept in memory until now


# -----------------------------------------------------------------------------
# logging: log(row, line) prints line and writes row to log.jsonl (kept in memory until the first
# save) and to wandb; and stop signals: SIGINT (Ctrl-C) or SIGTERM (preemption) ends the step or
# evaluation under way, saves a checkpoint if this run has trained, and exits
if master_process:
    wandb_run = wandb_log and outdir.start_wandb(out_dir, wandb_project, wandb_run_name, config)
    log = outdir.RunLog(os.path.join(out_dir, 'log.jsonl'), iter_num, wandb_run)
    print(f"tokens per iteration will be: {tokens_per_iter:,}")
stop = runtime.StopSignals()
# on a CPU an evaluation can take minutes: say so before the first one, timed on one row of a batch
if device_type == 'cpu' and not compile:
    eval_s = 2 * eval_iters * batch_size * runtime.forward_seconds(model, block_size, ctx)
    if eval_s > 60 and master_process:
        print(
            f"note: each evaluation will take about {outdir.duration(eval_s)} on this CPU "
            f"({2 * eval_iters} batches of {batch_size}x{block_size}); a run that suits a CPU: "
            "python train.py config/train_shakespeare_char_cpu.py, or fewer --eval_iters"
        )

# -----------------------------------------------------------------------------
# training loop
evals_since_best = 0  # for early stopping
if rng_states and len(rng_states) == world_size:
    # last, so nothing above draws from the restored streams
    runtime.set_rng_state(rng_states[rank])
# this rank's micro-batches of each global batch
my_rows = slice(rank * accum_steps, (rank + 1) * accum_steps)
batch_shape, n_windows = (gradient_accumulation_steps, batch_size), n_tokens['train'] - block_size
batches = dataloader.train_batches(
    data_dir, n_windows, sampler, batch_shape, my_rows, block_size, device
)
X, Y = next(batches)  # fetch the very first batch
t_start = t0 = time.time()
local_iter_num = 0  # number of iterations in the lifetime of this process
running_mfu = -1.0
stopped = False  # by a signal, on every rank at the same point
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
        if losses is None:  # stopped by a signal: the state this iteration started from is saved
            stopped = True
            break
        losses = runtime.on_rank0(lambda: losses)  # and all of them act on rank 0's numbers
        hellaswag = {}
        if eval_hellaswag:  # every rank scores its share
            hellaswag = hellaswag_score(
                model, hellaswag_rows, device, ctx, batch_size, rank, world_size
            )
        if master_process:
            # a new metric is one more entry here: printed, in log.jsonl and in wandb
            scores = dict(train_loss=losses['train'], val_loss=losses['val'])
            scores['val_bpb'] = tokenizer.val_bits_per_byte(losses['val'], data_dir, data_tokenizer)
            scores.update({f'hellaswag_{k}': v for k, v in hellaswag.items()})
            text = [f"{k.replace('_', ' ')} {v:.4f}" for k, v in scores.items() if type(v) is float]
            row = dict(iter=iter_num, **scores, lr=lr, tokens=iter_num * tokens_per_iter)
            log(row, f"step {iter_num}: {', '.join(text)}")
        evaluated, improved = True, losses['val'] < best_val_loss
        best_val_loss = min(best_val_loss, losses['val'])
        evals_since_best = 0 if improved else evals_since_best + 1
    if save_due(evaluated, improved):
        save_checkpoint()
    if early_stop_patience and evals_since_best >= early_stop_patience:
        if master_process:
            print(
                f"early stopping at iter {iter_num}: no new best val loss in {early_stop_patience} "
                f"evals; {ckpt_path} holds the best model (val loss {best_val_loss:.4f})"
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
    # reset the gradients: freed, or under DDP zeroed in its buckets (runtime.zero_grad)
    runtime.zero_grad(opt, train_model)
    # the iteration's one host sync, once its whole step is queued. To log another number, add it
    # here as a 0-dim tensor on the device: it is averaged over the ranks and logged under its name.
    # 'stop' is whether any rank was asked to stop, so that all of them stop at the same iteration
    stop_flag = torch.full_like(loss_sum, stop.name is not None)
    stats = runtime.mean_over_ranks(dict(loss=loss_sum, grad_norm=grad_norm, stop=stop_flag))
    stopped = stats.pop('stop') > 0
    # checked before anything can be saved: checkpoints are written below
    if not math.isfinite(stats['loss']):
        raise UserError(
            f"loss is {stats['loss']} at iter {iter_num}: training diverged (try a lower "
            f"learning_rate); the last checkpoint in {out_dir}, if any, is untouched"
        )

    # timing and logging
    t1 = time.time()
    dt = t1 - t0
    t0 = t1
    if local_iter_num == 0:
        t_first = t1  # the pace, for the time left, is measured from the first iteration's end
    if iter_num % log_interval == 0 and master_process:
        if local_iter_num >= 5:  # let the training loop settle a bit
            mfu = raw_model.estimate_mfu(batch_size * accum_steps, dt, peak_flops)
            running_mfu = mfu if running_mfu == -1.0 else 0.9 * running_mfu + 0.1 * mfu
        # None for data_order='random'
        epoch = sampler.epoch(sampler.state_to_save, n_windows)
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
        left = (
            (t1 - t_first) / local_iter_num * (max_iters - iter_num - 1) if local_iter_num else None
        )
        log(
            row,
            f"iter {iter_num}: loss {row['loss']:.4f}, lr {lr:.3e}, time {row['ms']:.2f}ms, "
            f"{row['tokens_per_s']:,.0f} tok/s, mfu {mfu_text}"
            + ("" if epoch is None else f", epoch {epoch}")
            + f", {100 * (iter_num + 1) / max_iters:.0f}% done"
            + ("" if left is None else f", {outdir.duration(left)} left"),
        )
    iter_num += 1
    local_iter_num += 1
    if stopped:
        break

# a stop signal: save what this run has trained (every rank takes part), nothing if it has not
if stopped and local_iter_num and not eval_only:
    save_checkpoint()
if master_process:
    if stopped:
        print(
            f"{stop.name or 'a stop signal'} received: "
            + (
                f"saved a checkpoint at iter {iter_num} to {ckpt_path}; continue with "
                "--init_from=resume"
                if local_iter_num and not eval_only
                else f"stopped before the first training step; nothing saved, {out_dir} as it was"
            )
        )
    else:
        log.commit()  # a run that ended without saving (eval_only) writes its log too
    print(
        f"done: {local_iter_num} iterations in {time.time() - t_start:.1f} s"
        + (f", best val loss {best_val_loss:.4f}" if best_val_loss < 1e9 else "")
    )
    if wandb_log:
        wandb_run.finish()
runtime.exit_run()  # quickly: the run is saved
