"""
nanoGPT's training loop, on one device (CPU, one GPU, Apple MPS) or on many through torchrun:
$ python train.py config/train_shakespeare_char_cpu.py
$ torchrun --standalone --nproc_per_node=4 train.py config/train_gpt2.py
It writes out_dir/ckpt.pt (--init_from=resume continues it) and out_dir/log.jsonl: docs/training.md.
"""

import math
import os
import time

import configurator  # noqa: F401  first: a Ctrl-C from here on, slow imports too, is one quiet line
import torch
from tqdm import tqdm

from nanogpt import checkpoints, dataloader, distributed, lora, outdir, runtime, tokenizer
from configurator import ANY, FRACTION, NON_NEGATIVE, POSITIVE, SEED, OneOf, OutPath, Range
from configurator import UserError, check, configure
from nanogpt.hellaswag import check_gpt2_tokenizer, hellaswag_score, load_hellaswag
from model import GPTConfig

# -----------------------------------------------------------------------------
# default config values designed to train a gpt2 (124M) on OpenWebText (docs/training.md: each one)
# I/O
out_dir = 'out'
eval_interval = 2000
log_interval = 1
eval_iters = 200
eval_only = False  # if True, script exits right after the first eval
always_save_checkpoint = True  # if True, always save a checkpoint after each eval
early_stop_patience = 0  # stop after this many evals without a new best val loss; 0 = off
eval_hellaswag = False  # also score HellaSwag at each eval (GPT-2 tokenizer only)
hellaswag_path = ''  # a local HellaSwag .jsonl; '' = the hub's validation split
init_from = 'scratch'  # 'scratch', 'resume', 'gpt2*', a Hugging Face dir, a run's ckpt.pt/out_dir
overwrite = False  # True: a new run may replace the one in out_dir (at its first save)
allow_unsafe_pickle = False  # True: a Hugging Face dir may load pytorch_model.bin (a pickle)
checkpoint_interval = 0  # also save every this many iterations, whatever the eval; 0 = off
# wandb logging
wandb_log = False  # disabled by default
wandb_project = 'owt'
wandb_run_name = 'gpt2'
# data
dataset = 'openwebtext'
data_dir = ''  # the folder of train.bin and val.bin; '' = data/<dataset>
gradient_accumulation_steps = 5 * 8  # over all processes, to simulate larger batch sizes
batch_size = 12  # if gradient_accumulation_steps > 1, this is the micro-batch size
block_size = 1024
data_order = 'random'  # 'random': drawn with replacement (nanoGPT); 'epoch': each window once
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
optimizer = 'adamw'  # 'adamw' (nanoGPT's), or 'muon' (docs/optimizers.md)
muon_learning_rate = 0.02  # Muon's peak lr (its schedule is learning_rate's, scaled)
muon_momentum = 0.95  # Muon's (Nesterov) momentum
muon_weight_decay = 0.0  # Muon's decoupled weight decay, per step lr * muon_weight_decay
# learning rate decay settings
decay_lr = True  # whether to decay the learning rate
warmup_iters = 2000  # how many steps to warm up for
lr_decay_iters = 600000  # should be ~= max_iters per Chinchilla
min_lr = 6e-5  # minimum learning rate, should be ~= learning_rate/10 per Chinchilla
# system
device = 'auto'  # 'auto' (cuda, else mps, else cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'  # 'auto', 'float32', 'bfloat16', 'float16'
compile = None  # use PyTorch 2.0 to compile the model to be faster; None: on CUDA only
fsdp = False  # under torchrun, shard the model and optimizer state (FSDP2) instead of DDP
fsdp_reduce_every_micro_step = True  # FSDP: reduce-scatter gradients every micro-step, or last
activation_checkpointing = False  # recompute activations in backward: less memory, more compute
freeze_layers = 0  # finetune only above the embeddings and the lowest N Blocks
lora_rank = 0  # LoRA: train rank-r adapters (peft), every base weight frozen; 0 = off
lora_alpha = 16.0  # the adapters' output is scaled by lora_alpha / lora_rank
lora_dropout = 0.0  # dropout on the adapters' input
lora_targets = 'c_attn,c_proj,c_fc'  # the Blocks' nn.Linear layers that get adapters
dist_timeout = 600  # seconds a collective waits for a lost peer before failing
seed = 1337
# -----------------------------------------------------------------------------
config = configure(globals())  # config files and --key=value from the command line


# -----------------------------------------------------------------------------
# settings checks: every value is refused here, in one line, before anything is touched
def check_settings(c):
    """Each setting's allowed values (bools need none), then how they go together: one line."""
    grouped = (
        (POSITIVE, 'eval_interval log_interval eval_iters gradient_accumulation_steps batch_size'),
        (POSITIVE, 'block_size n_layer n_head n_embd dist_timeout'),
        (NON_NEGATIVE, 'early_stop_patience checkpoint_interval learning_rate max_iters'),
        (NON_NEGATIVE, 'weight_decay grad_clip warmup_iters lr_decay_iters min_lr'),
        (NON_NEGATIVE, 'muon_learning_rate muon_weight_decay freeze_layers lora_rank'),
        (FRACTION, 'dropout beta1 beta2 muon_momentum lora_dropout'),
        (ANY, 'hellaswag_path init_from wandb_project wandb_run_name dataset data_dir device'),
    )
    rules = {name: rule for rule, names in grouped for name in names.split()}
    rules.update(out_dir=OutPath(folder=True), data_order=OneOf('random', 'epoch'), seed=SEED)
    rules.update(optimizer=OneOf('adamw', 'muon'), compile=OneOf(None, True, False))
    rules.update(dtype=OneOf('auto', 'float32', 'bfloat16', 'float16'))
    rules.update(lora_alpha=Range(0, open_lo=True), lora_targets=ANY)
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
device = runtime.pick_device(device)
ddp, rank, local_rank, world_size, device = distributed.init_distributed(device, dist_timeout)
master_process = rank == 0  # this process prints, logs and writes checkpoints
ckpt_path = os.path.join(out_dir, 'ckpt.pt')
restarted = distributed.restarted_with_checkpoint(ckpt_path)  # by torchrun: continue from ckpt.pt
init_from = 'resume' if restarted else init_from
# one run at a time in out_dir (rank 0 locks it for the job), and no new run over an earlier one
distributed.check_on_rank0(lambda: outdir.claim_out_dir(out_dir, init_from, overwrite, restarted))
dtype = runtime.pick_dtype(dtype, device, fsdp)
compile = runtime.pick_compile(compile, device)
config.update(device=device, dtype=dtype, compile=compile)
device_type = runtime.device_type(device)
distributed.check_resolved(gradient_accumulation_steps, world_size, optimizer, dtype, fsdp and ddp)
accum_steps = gradient_accumulation_steps // world_size  # micro-steps per process and iteration
if master_process:
    runtime.print_environment(device, dtype)
    distributed.warn_shared_rendezvous()  # torchrun's restarts may fail to reconnect: say how
runtime.seed_everything(seed + rank)  # each rank its own dropout masks
runtime.allow_tf32(device)
ctx = runtime.autocast_context(device, dtype)
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))  # no-op unless float16

# -----------------------------------------------------------------------------
# data: token ids as uint16 in train.bin and val.bin
data_dir = dataloader.find_dataset(dataset, data_dir)
bins = {split: os.path.join(data_dir, f'{split}.bin') for split in ('train', 'val')}
n_tokens = {split: dataloader.count_tokens(path) for split, path in bins.items()}
meta_path = os.path.join(data_dir, 'meta.pkl')
meta_vocab_size = dataloader.meta_vocab_size(data_dir)  # a char-level dataset's meta.pkl, else None
if meta_vocab_size and master_process:
    print(f"found vocab_size = {meta_vocab_size} (inside {meta_path})")
data_tokenizer = tokenizer.data_tokenizer(data_dir)  # what made the .bin files (None: older ones)
sampler = dataloader.WindowSampler(data_order, seed)  # where each global batch's windows start

# -----------------------------------------------------------------------------
# model: new, a checkpoint's (resume, or another run's weights) or GPT-2's, in the data's tokens,
# its lowest freeze_layers frozen (checkpoints.start_model); a new model option: GPTConfig + setting
model_args = {k: v for k, v in config.items() if k in GPTConfig.__dataclass_fields__}
model_args['vocab_size'] = meta_vocab_size or 50304  # GPT-2's 50257 padded up, for efficiency
model, checkpoint, iter_num, best_val_loss, data_tokenizer = checkpoints.start_model(
    init_from, model_args, config, lora_settings, data_tokenizer, data_dir, master_process
)
block_size = model.config.block_size  # at most the one asked for (start_model crops GPT-2's 1024)
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
dataloader.check_fits(data_dir, n_tokens, block_size, model.config.vocab_size, meta_vocab_size)
if eval_hellaswag:  # every rank scores its share of the items at each evaluation
    check_gpt2_tokenizer(model.config.vocab_size, meta_path, f"the dataset in {data_dir}")
    hellaswag_args = (load_hellaswag(hellaswag_path), device, ctx, batch_size, rank, world_size)
# the settings as this run uses them: a checkpoint's or GPT-2's shape replaces the ones asked for
config.update({k: getattr(model.config, k) for k in model_args if k in config})
if master_process:
    print(f"number of parameters: {model.get_num_params() / 1e6:.2f}M")
    print("config: " + ", ".join(f"{k}={v!r}" for k, v in config.items()))
if lora_rank:  # peft's adapters in the targeted layers, the rest frozen; a resume restores them
    lora.add_adapters(model, lora_settings, checkpoint, verbose=master_process)
raw_model = model  # what checkpoints save: no compile or DDP wrappers ('_orig_mod.' prefixes)
if master_process and compile:
    print("compiling the model... (takes a ~minute)")
model, train_model = distributed.parallelize(
    raw_model, device, dtype, ddp, fsdp, activation_checkpointing, compile
)

# -----------------------------------------------------------------------------
# optimizer (Muon's Newton-Schulz in bfloat16 where native), and the state a resume continues from
muon_bf16 = optimizer == 'muon' and runtime.bfloat16_native(device, verbose=master_process)
muon = dict(lr=muon_learning_rate, momentum=muon_momentum, weight_decay=muon_weight_decay)
muon = muon if optimizer == 'muon' else None  # None: nanoGPT's AdamW for every parameter
opt = raw_model.configure_optimizers(
    weight_decay, learning_rate, (beta1, beta2), device_type, master_process, muon, muon_bf16
)
# a resume: the optimizer, loss scaler and batch order as saved; the RNG states, restored last
rng_states = checkpoints.restore_state(
    checkpoint, raw_model, opt, scaler, sampler, ckpt_path, world_size, master_process
)
checkpoint = None  # free the memory
peak_flops = runtime.device_peak_flops(device, dtype)  # measured here: it skews no iteration


@torch.no_grad()
def estimate_loss():
    """Mean loss over eval_iters batches of each split (None: a stop signal ended it), drawn from
    their own generator reseeded every time: evaluations compare like with like, shift no stream."""
    out = {}
    model.eval()
    quiet = None if master_process else True  # None: the bar shows when stderr is a terminal
    with tqdm(total=2 * eval_iters, desc='eval', leave=False, disable=quiet) as bar:
        for split in ('train', 'val'):
            g = torch.Generator().manual_seed(seed)
            ix = torch.randint(n_tokens[split] - block_size, (eval_iters, batch_size), generator=g)
            losses = torch.zeros(eval_iters)
            for k in range(eval_iters):
                # a stop signal on any rank ends it on all (FSDP's forward needs them all)
                stop_flag = torch.tensor(float(stop.name is not None))
                if distributed.mean_over_ranks(dict(stop=stop_flag))['stop']:
                    return None
                tokens = dataloader.split_tokens(data_dir, split)
                X, Y = dataloader.get_batch(tokens, ix[k], block_size, device)  # (B, T) each
                with ctx:
                    logits, loss = model(X, Y)
                losses[k] = loss.item()
                bar.update()
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
    """The save policy (a stop signal saves after any training step): every checkpoint_interval
    iterations this run trained; after an evaluation with a new best val loss, or any with
    always_save_checkpoint (not when early stopping keeps the best), except at iteration 0 (nothing
    trained yet: nanoGPT's rule) and with eval_only. A resume's first evaluation saves the state it
    began with again, in today's format (resuming converts a checkpoint across parallelisms)."""
    interval = (
        checkpoint_interval > 0 and iter_num % checkpoint_interval == 0 and local_iter_num > 0
    )
    every_eval = always_save_checkpoint and not early_stop_patience
    return interval or evaluated and iter_num > 0 and not eval_only and (improved or every_eval)


def save_checkpoint():
    """Every rank takes part (FSDP gathers the shards, each its RNG state); rank 0 writes."""
    rng_states = distributed.gather_to_rank0(runtime.rng_state())
    model_state, opt_state = checkpoints.full_state(raw_model, opt)
    if not master_process:
        return
    # nanoGPT's keys (our GPTConfig fields beside model_args), the tokenizer, what resuming needs
    checkpoint = checkpoints.training_checkpoint(raw_model, model_state, opt_state, lora_settings)
    checkpoint.update(iter_num=iter_num, best_val_loss=best_val_loss, config=config)
    checkpoint['tokenizer'] = data_tokenizer
    checkpoint.update(rng_states=rng_states, sampler_state=sampler.state_to_save)
    checkpoint.update(scaler=scaler.state_dict())
    print(f"saving checkpoint to {out_dir}")
    checkpoints.save_checkpoint(checkpoint, ckpt_path)
    log.commit()  # at the first save, the log kept in memory until now


# -----------------------------------------------------------------------------
# logging: log(row, line) prints line, writes row to log.jsonl (in memory until the first save) and
# wandb; stop signals (Ctrl-C, SIGTERM) end the step or evaluation under way, save, and exit
if master_process:
    wandb_run = wandb_log and outdir.start_wandb(out_dir, wandb_project, wandb_run_name, config)
    log = outdir.RunLog(os.path.join(out_dir, 'log.jsonl'), iter_num, wandb_run)
    print(f"tokens per iteration will be: {tokens_per_iter:,}")
stop = distributed.StopSignals()
if device_type == 'cpu' and not compile:  # an evaluation can take minutes there: say so first
    eval_s = 2 * eval_iters * batch_size * runtime.forward_seconds(model, block_size, ctx)
    if eval_s > 60 and master_process:
        print(outdir.eval_note(eval_s, eval_iters, batch_size, block_size))

# -----------------------------------------------------------------------------
# training loop
evals_since_best = 0  # for early stopping
if rng_states:  # last: nothing above draws from the restored streams
    runtime.set_rng_state(rng_states[rank])
shape = (gradient_accumulation_steps, batch_size)  # each global batch, in micro-batches
rows = slice(rank * accum_steps, (rank + 1) * accum_steps)  # this rank's micro-batches
n_windows = n_tokens['train'] - block_size  # where a window of train.bin can start
batches = dataloader.train_batches(data_dir, n_windows, sampler, shape, rows, block_size, device)
X, Y = next(batches)  # fetch the very first batch
t_start = t0 = time.time()
local_iter_num = 0  # number of iterations in the lifetime of this process
running_mfu = -1.0
stopped = False  # by a signal, on every rank at the same point
while True:
    # determine and set the learning rate for this iteration
    lr = get_lr(iter_num) if decay_lr else learning_rate
    for param_group in opt.param_groups:
        param_group['lr'] = lr * param_group.get('lr_scale', 1.0)  # Muon's: their own peak
    # once in a while: evaluate the loss on train/val sets (and HellaSwag)
    evaluated = improved = False
    if iter_num % eval_interval == 0 or iter_num == max_iters or eval_only:
        losses = estimate_loss()  # on every rank: FSDP's forward needs them all
        if losses is None:  # stopped by a signal: the state this iteration started from is saved
            stopped = True
            break
        losses = distributed.on_rank0(lambda: losses)  # and all of them act on rank 0's numbers
        hellaswag = hellaswag_score(model, *hellaswag_args) if eval_hellaswag else {}
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
            print(outdir.early_stop_note(iter_num, early_stop_patience, ckpt_path, best_val_loss))
        break
    if iter_num >= max_iters or eval_only:
        break
    # the training step: forward backward update, with gradient accumulation for a larger batch
    loss_sum = torch.zeros((), device=device)
    for micro_step in range(accum_steps):
        # DDP averages the gradients over ranks after the last micro-step only; FSDP after each
        last = micro_step == accum_steps - 1
        distributed.set_gradient_sync(train_model, last, fsdp_reduce_every_micro_step)
        with ctx:
            logits, loss = train_model(X, Y)  # logits (B, T, vocab_size), loss a scalar
            loss = loss / accum_steps  # scale the loss to account for gradient accumulation
        loss_sum += loss.detach()
        # immediately async prefetch next batch while model is doing the forward pass on the GPU
        X, Y = next(batches)
        # backward pass, with gradient scaling if training in fp16
        scaler.scale(loss).backward()
    # clip the gradient; its norm before clipping (a tensor: no host sync) is logged, even unclipped
    scaler.unscale_(opt)  # a no-op unless float16
    grad_norm = distributed.clip_grad_norm(model.parameters(), grad_clip or math.inf)
    # step the optimizer and scaler if training in fp16 (it skips steps whose gradients overflowed)
    scaler.step(opt)
    scaler.update()
    distributed.zero_grad(opt, train_model)  # freed, or under DDP zeroed in its buckets
    # the iteration's one host sync, its step queued: each 0-dim tensor here is averaged and logged
    stop_flag = torch.full_like(loss_sum, stop.name is not None)  # any rank asked: all stop here
    stats = distributed.mean_over_ranks(dict(loss=loss_sum, grad_norm=grad_norm, stop=stop_flag))
    stopped = stats.pop('stop') > 0
    if not math.isfinite(stats['loss']):  # checked before anything can be saved (below)
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
        row = dict(iter=iter_num, **stats, lr=lr, ms=dt * 1000, tokens_per_s=tokens_per_iter / dt)
        row.update(mfu=running_mfu, tokens=iter_num * tokens_per_iter)  # mfu -1: not measured yet
        epoch = sampler.epoch(sampler.state_to_save, n_windows)  # None for data_order='random'
        row.update({} if epoch is None else {'epoch': epoch})
        log(row, outdir.iteration_line(row, max_iters, t1 - t_first, local_iter_num))
    iter_num += 1
    local_iter_num += 1
    if stopped:
        break

# a stop signal: save what this run has trained (every rank takes part), nothing if it has not
saved = stopped and local_iter_num > 0 and not eval_only
if saved:
    save_checkpoint()
if master_process:
    if stopped:
        print(outdir.stop_note(stop.name, saved, iter_num, ckpt_path, out_dir))
    else:
        log.commit()  # a run that ended without saving (eval_only) writes its log too
    best = f", best val loss {best_val_loss:.4f}" if best_val_loss < 1e9 else ""
    print(f"done: {local_iter_num} iterations in {time.time() - t_start:.1f} s{best}")
    if wandb_log:
        wandb_run.finish()
distributed.exit_run()  # quickly: the run is saved
