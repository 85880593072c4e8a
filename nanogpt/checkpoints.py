"""
The files a model is read from and written to. A checkpoint (ckpt.pt, nanoGPT's format plus our
keys): writing it atomically, reading it safely (weights_only, memory-mapped) and checking it before
anything is built from it, building the GPT it holds (build_model: train.py, sample.py, eval.py and
serve.py alike, with its tokenizer for sample.py and serve.py), the compatibility patch for older
files and nanoGPT's (their GELU), and gathering a sharded (FSDP) model's and optimizer's state into
the full tensors a file holds, sharding it again on resume. A Hugging Face directory: checked before
transformers reads it.

A checkpoint keeps nanoGPT's model_args (the GPTConfig fields nanoGPT has, so its
GPTConfig(**model_args) reads our files) and every other GPTConfig field beside them, under its own
name: model_entries() writes them and build_model() reads them, so a new model option is a GPTConfig
field and a train.py setting, nothing here.
"""

import contextlib
import dataclasses
import json
import os
import sys
import zipfile

import torch
import torch.distributed as dist

from nanogpt import lora
from nanogpt import distributed, runtime
from nanogpt.tokenizer import check_record, check_same, load_tokenizer, pretrained_record
from configurator import ROOT, UserError
from model import GPT, GPTConfig

# the GPTConfig fields nanoGPT's GPTConfig has: a checkpoint's model_args holds exactly these
NANOGPT_ARGS = ('n_layer', 'n_head', 'n_embd', 'block_size', 'bias', 'vocab_size', 'dropout')


def save_checkpoint(checkpoint, path):
    """Write atomically: into a temporary file in the same directory, flushed and fsynced, then
    renamed over path. A crash at any moment leaves either the old file or the new one, never half;
    a failing disk (full, a quota, an I/O error) is one line that says so and what is intact."""
    tmp = path + '.tmp'
    try:
        with open(tmp, 'wb') as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path)  # make the rename itself durable
    # torch.save's writer says RuntimeError ("unexpected pos") for ENOSPC
    except (OSError, RuntimeError) as e:
        raise UserError(
            f"cannot write the checkpoint {path} ({reason(e)}); {intact(path)}"
        ) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def reason(e):
    """What went wrong, in a few words: the OS's, or the first line of the message."""
    return getattr(e, 'strerror', None) or (str(e).strip().splitlines() or [type(e).__name__])[0]


def intact(path):
    """What a failed write left: the file as it was before (an atomic write replaces it only when
    complete)."""
    return (
        f"{path} is intact, as before this write"
        if os.path.exists(path)
        else f"nothing was written to {path}"
    )


def fsync_dir(path):
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path, keys=('model', 'model_args')):
    """Load a checkpoint (ours or nanoGPT's) to CPU with torch.load(weights_only=True), so loading
    neither runs code from the file nor fills the GPU. The tensors are memory-mapped from the file
    (mmap=True): pages are read when used and shared through the page cache, so 8 ranks resuming a
    large model do not each hold a private copy of the whole file in memory. Raises UserError if it
    is missing, truncated, corrupt, unsafe to load, or lacks any of `keys`."""
    if not os.path.isfile(path):
        raise UserError(
            f"no checkpoint at {path}: train one first (init_from='scratch'), "
            "or point --out_dir at the directory that holds ckpt.pt"
        )
    if not zipfile.is_zipfile(path):
        raise UserError(
            f"checkpoint {path} is truncated or corrupt (not a complete PyTorch file); "
            f"delete it, or restore it from a copy"
        )
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if 'Weights only load failed' in reason:
            raise UserError(
                f"checkpoint {path} holds pickled Python objects besides tensors and plain values, "
                "which are not loaded because loading them could run code"
            ) from None
        raise UserError(
            f"checkpoint {path} is corrupt ({reason}); delete it, or restore it from a copy"
        ) from None
    missing = [k for k in keys if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise UserError(f"{path} is not a nanoGPT checkpoint: it has no {', '.join(missing)}")
    return checkpoint


def check_checkpoint(checkpoint, path):
    """Check what train.py and sample.py take from a loaded checkpoint before anything is built from
    it, so a damaged or foreign file ends in one line at start-up, not in a traceback mid-run (or in
    a checkpoint saved over it). Keys that are absent are left to the caller (load_checkpoint's
    keys)."""

    def bad(what):
        return UserError(
            f"checkpoint {path} is damaged or of a format this code does not know: {what}"
        )

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
    if model is not None and not (
        isinstance(model, dict)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items())
    ):
        raise bad("model is not a state dict (parameter names -> tensors)")
    if 'iter_num' in checkpoint and (
        type(checkpoint['iter_num']) is not int or checkpoint['iter_num'] < 0
    ):
        raise bad(f"iter_num is {checkpoint['iter_num']!r}, not an int >= 0")
    best = checkpoint.get('best_val_loss', 0.0)  # nanoGPT stores a 0-d tensor
    if not (type(best) in (int, float) or isinstance(best, torch.Tensor) and best.numel() == 1):
        raise bad(f"best_val_loss is {best!r}, not a number")
    config = checkpoint.get('config', {})
    if not isinstance(config, dict) or not all(
        isinstance(config.get(k, ''), str) for k in ('dataset', 'data_dir')
    ):
        raise bad("config is not a dict with dataset and data_dir as strings")
    if checkpoint.get('tokenizer') is not None:  # tokenizer.data_tokenizer's dict
        check_record(checkpoint['tokenizer'], f"checkpoint {path}")
    # the loop state is checked by restoring it (into a throwaway generator; the global RNGs are put
    # back)
    try:
        # WindowSampler.get_state(): a generator's, or a dict
        sampler_state = checkpoint.get('sampler_state')
        if isinstance(sampler_state, dict):
            if (
                type(sampler_state.get('windows_drawn')) is not int
                or sampler_state['windows_drawn'] < 0
            ):
                raise ValueError("windows_drawn")
        elif sampler_state is not None:
            torch.Generator().set_state(sampler_state)
        if checkpoint.get('rng_states') is not None:
            saved = runtime.rng_state()
            try:
                for state in checkpoint['rng_states']:
                    runtime.set_rng_state(state)
            finally:
                runtime.set_rng_state(saved)
    except Exception as e:
        raise bad(f"its random state cannot be restored ({type(e).__name__})") from None


def checkpoint_gelu(checkpoint):
    """The GELU a checkpoint's weights were trained with (GPTConfig.gelu): its 'gelu' record.
    Without one, nanoGPT's checkpoints (no 'sampler_state') used the exact GELU, and older ones of
    ours the tanh GELU, which this code gave every model before the record existed."""
    if 'gelu' in checkpoint:
        return checkpoint['gelu']
    return 'tanh' if 'sampler_state' in checkpoint else 'exact'


def model_entries(config):
    """What a checkpoint saves of a GPTConfig: 'model_args' with nanoGPT's fields, and each of our
    other fields beside it under its own name (e.g. 'gelu')."""
    fields = dataclasses.asdict(config)
    ours = {k: v for k, v in fields.items() if k not in NANOGPT_ARGS}
    return {'model_args': {k: fields[k] for k in NANOGPT_ARGS}, **ours}


def build_model(checkpoint, path, dropout=None):
    """The GPT a loaded checkpoint holds (checked first), on CPU: its model_args, our GPTConfig
    fields beside them (a field the file predates takes its default; the GELU: checkpoint_gelu), its
    weights; dropout, if given, replaces the saved one. What does not fit is one line."""
    check_checkpoint(checkpoint, path)
    ours = {f.name for f in dataclasses.fields(GPTConfig)} - set(NANOGPT_ARGS)
    fields = {**checkpoint['model_args'], **{k: checkpoint[k] for k in ours if k in checkpoint}}
    fields.update(
        gelu=checkpoint_gelu(checkpoint), **({} if dropout is None else {'dropout': dropout})
    )
    try:
        model = GPT(GPTConfig(**fields))
        model.load_state_dict(checkpoint['model'])  # nanoGPT's '_orig_mod.' prefixes are accepted
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(
            f"{path} does not fit this code's GPT ({reason(e)}): a damaged file, or one of a "
            "format this code does not know"
        ) from None
    return model


def restore_state(checkpoint, model, optimizer, scaler, sampler, path, world_size, verbose):
    """Put a resumed run's optimizer, loss scaler and batch order back as checkpoint has them (None:
    not a resume, nothing to do), and return the processes' saved random states: None, with a note,
    when there is none for each of world_size processes (nanoGPT's, or another count)."""
    if checkpoint is None:
        return None
    load_optimizer_state(model, optimizer, checkpoint['optimizer'], path)
    if scaler.is_enabled() and checkpoint.get('scaler'):
        scaler.load_state_dict(checkpoint['scaler'])
    if 'sampler_state' in checkpoint:
        sampler.set_state(checkpoint['sampler_state'])
    rng_states = checkpoint.get('rng_states')
    if len(rng_states or ()) == world_size:
        return rng_states
    if verbose:
        print(
            "note: the checkpoint has no random state for this number of processes (from nanoGPT, "
            "or another world size): dropout masks will differ from an uninterrupted run"
        )
    return None


def checkpoint_file(init_from):
    """The ckpt.pt that init_from names when it is a path (the file itself, or an out_dir holding
    one), or None for a GPT-2 name or a Hugging Face directory (config.json). A path that holds
    neither is refused."""
    if os.path.isfile(init_from):
        return init_from
    if os.path.isfile(os.path.join(init_from, 'ckpt.pt')):
        return os.path.join(init_from, 'ckpt.pt')
    if (
        os.path.isdir(init_from)
        and not os.path.exists(os.path.join(init_from, 'config.json'))
        or (not os.path.exists(init_from) and (os.sep in init_from or init_from.endswith('.pt')))
    ):
        raise UserError(
            f"init_from={init_from}: no checkpoint there; give a ckpt.pt, the out_dir of a run "
            "(holding ckpt.pt) or a Hugging Face directory (config.json + model.safetensors)"
        )
    return None


def check_hf_dir(path, allow_unsafe_pickle=False):
    """Raise ValueError unless path is a Hugging Face GPT-2 directory we load: config.json a JSON
    object (of model_type gpt2, if it says), weights in safetensors, which hold only tensors. A
    pytorch_model.bin is a pickle, and unpickling can run code, so it is loaded only on request."""
    config_path = os.path.join(path, 'config.json')
    try:
        with open(config_path, 'rb') as f:
            hf_config = json.loads(f.read())
    except OSError as e:
        raise ValueError(
            f"{path} is not a Hugging Face model directory: cannot read {config_path} "
            f"({e.strerror})"
        ) from None
    except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"{config_path} is not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(hf_config, dict) or hf_config.get('model_type', 'gpt2') != 'gpt2':
        kind = (
            hf_config.get('model_type') if isinstance(hf_config, dict) else type(hf_config).__name__
        )
        raise ValueError(f"{config_path} does not describe a GPT-2 model (model_type {kind!r})")
    files = set(os.listdir(path))
    if files & {'model.safetensors', 'model.safetensors.index.json'}:
        return
    if not files & {'pytorch_model.bin', 'pytorch_model.bin.index.json'}:
        raise ValueError(f"{path} has no weights: expected model.safetensors next to config.json")
    if not allow_unsafe_pickle:
        raise ValueError(
            f"{path} holds its weights only as pytorch_model.bin, a pickle, which is not loaded "
            "because loading a pickle can run code; if you trust it, convert it once with "
            "python -c \"from transformers import GPT2LMHeadModel as M; "
            f"M.from_pretrained({path!r}, use_safetensors=False).save_pretrained({path!r})\" "
            "(writes model.safetensors), or load it as it is with --allow_unsafe_pickle=True"
        )


def check_hub(repo_id, repo_type='model', local='--init_from=DIR (written by save_pretrained)'):
    """Before a model or data set is fetched from the Hugging Face hub, one attempt to reach it (a
    HEAD request, no retries): the hub's client retries a failed connection for about a minute.
    Unreachable, raise one line that says how to work offline, with the cache (HF_HUB_OFFLINE=1,
    which skips this check) or `local`, the script's own offline alternative."""
    # imported here: only the hub's models and data sets need them
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache

    if constants.is_offline_mode():
        return
    filename = 'config.json' if repo_type == 'model' else 'README.md'
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, filename, repo_type=repo_type))
    except httpx2.TransportError as e:  # no network, no DNS, a timeout; not an HTTP error status
        cached = isinstance(try_to_load_from_cache(repo_id, filename, repo_type=repo_type), str)
        raise UserError(
            f"cannot reach the Hugging Face hub for {repo_id} ({reason(e)}); to work offline, run "
            f"with HF_HUB_OFFLINE=1 ({repo_id} is {'' if cached else 'not '}in the cache, "
            f"{constants.HF_HUB_CACHE}) or use {local}"
        ) from None
    except Exception:  # the hub answered (e.g. 404 for an unknown name): the loader says what
        pass


def load_pretrained(init_from, dropout=0.0, allow_unsafe_pickle=False):
    """OpenAI's GPT-2 ('gpt2', 'gpt2-medium', ...) or a local Hugging Face directory, checked first,
    as a GPT on CPU (GPT.from_pretrained). Raises ValueError or OSError, which the scripts print as
    one line."""
    if os.path.isdir(init_from):
        check_hf_dir(init_from, allow_unsafe_pickle)
    else:
        check_hub(init_from)
    return GPT.from_pretrained(init_from, dict(dropout=dropout), allow_unsafe_pickle)


def check_resumable(checkpoint, path, block_size, optimizer, lora_settings):
    """Refuse, before anything is built, to resume a checkpoint with settings that would not
    continue it: a smaller block_size (cropping would leave its optimizer state the wrong shape),
    another optimizer, other LoRA settings (lora.check_resume)."""
    trained = checkpoint['model_args']['block_size']
    if block_size < trained:
        raise UserError(
            f"{path} was trained with block_size {trained}: resume it with --block_size={trained}, "
            f"or start a new run from its weights on shorter blocks with --init_from={path}"
        )
    trained_with = checkpoint.get('config', {}).get('optimizer', 'adamw')  # nanoGPT's: AdamW
    if trained_with != optimizer:
        raise UserError(
            f"{path} was trained with optimizer {trained_with}: "
            f"resume it with --optimizer={trained_with}"
        )
    lora.check_resume(checkpoint, lora_settings, path)


def start_model(init_from, model_args, settings, lora_settings, data_record, data_dir, verbose):
    """train.py's model, on CPU: from scratch (model_args), resumed from out_dir/ckpt.pt, a new run
    from the weights in a run's ckpt.pt (the checkpoint fixes the model; dropout is this run's), or
    GPT-2 / a Hugging Face dir; then cropped to block_size and frozen below freeze_layers. settings:
    train.py's (out_dir, dropout, allow_unsafe_pickle, block_size, freeze_layers, and optimizer,
    which with lora_settings a resume must continue). A model trained on other tokens than the
    data's (data_record, of data_dir) is refused. Returns (model, the checkpoint a resume continues
    (else None), iter_num, best_val_loss, the tokenizer record: the data's, else the model's)."""
    out_dir, dropout = settings['out_dir'], settings['dropout']
    checkpoint, iter_num, best_val_loss, source, trained_on = None, 0, 1e9, None, None
    try:
        if init_from == 'scratch':
            model = GPT(GPTConfig(**model_args))
        elif init_from == 'resume' or checkpoint_file(init_from):
            # resume: out_dir/ckpt.pt and its loop state; a path: a run's (merged) weights only
            resume = init_from == 'resume'
            source = os.path.join(out_dir, 'ckpt.pt') if resume else checkpoint_file(init_from)
            if verbose and resume:
                print(f"resuming training from {out_dir}")
            elif verbose:
                print(f"starting from the weights of {source}")
            resume_keys = ('model', 'optimizer', 'model_args', 'iter_num')
            checkpoint = load_checkpoint(source, resume_keys if resume else ('model', 'model_args'))
            model = build_model(checkpoint, source, dropout)
            if resume:
                check_resumable(
                    checkpoint, source, settings['block_size'], settings['optimizer'], lora_settings
                )
                iter_num = checkpoint['iter_num']
                # nanoGPT stores a tensor
                best_val_loss = float(checkpoint.get('best_val_loss', best_val_loss))
            trained_on = checkpoint.get('tokenizer')
        else:  # 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' or a local Hugging Face directory
            model = load_pretrained(init_from, dropout, settings['allow_unsafe_pickle'])
            source, trained_on = init_from, pretrained_record(model.config)
    # e.g. n_embd not divisible by n_head, unknown or unreachable GPT-2 weights
    except (ValueError, OSError) as e:
        raise UserError(str(e)) from None
    check_same(trained_on, data_record, source, data_dir)  # the data in the model's own tokens
    if settings['block_size'] < model.config.block_size:
        model.crop_block_size(settings['block_size'])  # model surgery, e.g. GPT-2's 1024 positions
    freeze_layers, n_layer = settings['freeze_layers'], model.config.n_layer
    if not 0 <= freeze_layers <= n_layer:
        raise UserError(
            f"freeze_layers must be between 0 and n_layer ({n_layer}), got {freeze_layers}"
        )
    if freeze_layers:
        model.freeze(freeze_layers)
    checkpoint = checkpoint if init_from == 'resume' else None
    return model, checkpoint, iter_num, best_val_loss, data_record or trained_on


def training_checkpoint(model, model_state, optimizer_state, lora_settings):
    """A checkpoint's model part, as train.py saves it: nanoGPT's 'model', 'optimizer' and
    'model_args', and our GPTConfig fields beside them (model_entries). With LoRA, 'model' gets the
    merged weights (what sample.py reads) and 'lora' what resuming needs (lora.split_state)."""
    checkpoint = dict(optimizer=optimizer_state, **model_entries(model.config))
    if lora_settings:
        model_state, checkpoint['lora'] = lora.split_state(model_state, lora_settings)
    return dict(model=model_state, **checkpoint)


def load_model(init_from, out_dir, allow_unsafe_pickle=False):
    """The model sample.py and eval.py run: out_dir/ckpt.pt (init_from='resume'), OpenAI's GPT-2 or
    a local Hugging Face directory, on CPU. Returns (model, source) where source says where the
    model came from and what reads its text: 'what' (for messages), 'data_dir' and 'meta_path' of
    the data it was trained on (None when unknown) and 'record', the tokenizer record train.py
    stored (None when there is none)."""
    if init_from != 'resume':
        try:
            with contextlib.redirect_stdout(sys.stderr):  # a script's stdout is for its results
                model = load_pretrained(init_from, 0.0, allow_unsafe_pickle)
        except (ValueError, OSError) as e:
            raise UserError(str(e)) from None
        return model, dict(what=init_from, data_dir=None, meta_path=None, record=None)
    path = os.path.join(out_dir, 'ckpt.pt')
    checkpoint = load_checkpoint(path)
    model = build_model(checkpoint, path)
    # a character-level dataset's vocabulary is in its meta.pkl (our train.py records where the data
    # was)
    train_config = checkpoint.get('config', {})
    data_dir = meta_path = None
    if 'dataset' in train_config:
        data_dir = train_config.get('data_dir') or os.path.join(
            ROOT, 'data', train_config['dataset']
        )
        meta_path = os.path.join(data_dir, 'meta.pkl')
    return model, dict(
        what=f"{path} (iter {checkpoint.get('iter_num')})",
        data_dir=data_dir,
        meta_path=meta_path,
        record=checkpoint.get('tokenizer'),
    )


def load_model_and_tokenizer(init_from, out_dir, allow_unsafe_pickle=False):
    """load_model's model and the tokenizer its text is read with, as sample.py and serve.py run
    them: (model, encode, decode, source). A character-level model whose meta.pkl is gone is
    refused: GPT-2's tokenizer would read its text wrong."""
    model, source = load_model(init_from, out_dir, allow_unsafe_pickle)
    meta_path, record, vocab_size = source['meta_path'], source['record'], model.config.vocab_size
    if vocab_size < 50257 and not record and not (meta_path and os.path.exists(meta_path)):
        raise UserError(
            f"this model has a {vocab_size}-token vocabulary but its meta.pkl was not found "
            f"(looked for {meta_path}); prepare that dataset again with its data/<name>/prepare.py"
        )
    encode, decode = load_tokenizer(meta_path, record, vocab_size)
    return model, encode, decode, source


def parameter_names(model, optimizer):
    """The name of each parameter of optimizer, in its param_groups order (a parameter's position
    there is its key in optimizer.state_dict())."""
    names = {p: name for name, p in model.named_parameters()}
    return [names[p] for group in optimizer.param_groups for p in group['params']]


def full_state(model, optimizer):
    """(model state dict, optimizer state dict) as a single process writes them: full tensors, and
    the optimizer state keyed by each parameter's position in optimizer.param_groups, so a
    checkpoint resumes under any parallelism and world size. Under FSDP the shards are gathered into
    CPU memory on rank 0 (no GPU ever holds the full model) with torch's state-dict helpers; every
    rank must call it, and the others get ({}, {}). Works for any torch.optim.Optimizer."""
    if not distributed.sharded(model):
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    # {'state': {name: {...}}, ...}
    state = get_optimizer_state_dict(model, optimizer, options=options)
    if dist.get_rank() != 0:
        return {}, {}
    index = {name: i for i, name in enumerate(parameter_names(model, optimizer))}
    # the hyperparameters are the same on every rank and unsharded: take them as torch writes them
    return model_state, {
        'state': {index[name]: s for name, s in state['state'].items()},
        'param_groups': optimizer.state_dict()['param_groups'],
    }


def load_optimizer_state(model, optimizer, state, path):
    """Load an optimizer state dict that full_state() wrote (in any parallelism and world size) into
    optimizer, sharding it under FSDP. Refuses state for other trainable parameters (another
    freeze_layers) or of other shapes: torch checks the groups' sizes, not the shapes of the moment
    buffers, which would only fail at the first step."""
    try:
        if 'muon' in state:  # muon.MuonAdamW's: one state dict for each of its two optimizers
            for part in ('muon', 'adamw'):
                load_optimizer_state(model, getattr(optimizer, part), state[part], path)
            return
        sizes = [len(group['params']) for group in optimizer.param_groups]
        if [len(group['params']) for group in state['param_groups']] != sizes:
            raise UserError(
                "the checkpoint's optimizer state is for other trainable parameters than this "
                f"run's ({sizes} per group): was it trained with another freeze_layers? To "
                f"finetune its weights with other settings, start a new run with --init_from={path}"
            )
        # full shapes, also under FSDP
        params = [p for group in optimizer.param_groups for p in group['params']]
        for i, saved in state['state'].items():
            for name, v in saved.items():
                if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != params[i].shape:
                    raise UserError(
                        f"checkpoint {path}: the optimizer's {name} has shape {tuple(v.shape)} "
                        f"for a parameter of shape {tuple(params[i].shape)}"
                    )
        if not distributed.sharded(model):
            optimizer.load_state_dict(state)  # moves its tensors to the parameters' device
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        names = parameter_names(model, optimizer)
        state = {
            'state': {names[i]: s for i, s in state['state'].items()},
            'param_groups': [
                {**group, 'params': [names[i] for i in group['params']]}
                for group in state['param_groups']
            ],
        }
        # every rank holds the full state (it read the checkpoint) and keeps its own shard of each
        # tensor
        set_optimizer_state_dict(
            model, optimizer, state, options=StateDictOptions(full_state_dict=True)
        )
        for group, saved in zip(optimizer.param_groups, state['param_groups']):
            # as saved: it makes tuples lists
            group.update((k, v) for k, v in saved.items() if k != 'params')
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(
            f"checkpoint {path}: the optimizer state does not fit the model ({reason})"
        ) from None
