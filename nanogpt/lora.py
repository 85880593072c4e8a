"""
LoRA (low-rank adapters, Hu et al. 2021) for the GPT, through Hugging Face's peft: each targeted
nn.Linear keeps its weight W frozen and learns y = W x + (B A x) * lora_alpha / lora_rank, with A
(rank, in) and B (out, rank) the only parameters that train. B starts at zero, so an adapted model
starts as the model.

A LoRA run's ckpt.pt stays a nanoGPT checkpoint: 'model' holds the merged weights W + B A * alpha /
rank under the plain GPT's names, which nanoGPT's sample.py, our sample.py, eval.py, export_hf and
init_from=<path> read as any other model. Resuming needs the unmerged weights bit for bit (W + delta
- delta is not W in floating point), so the checkpoint's 'lora' entry keeps the settings, the
adapters and the frozen weights of the adapted layers; only train.py's resume reads it.
"""

import torch

from configurator import UserError

# the GPT's nn.Linear layers an adapter can go on, as peft matches them (a suffix of the module's
# name); lm_head is left out: it is the token embedding (weight tying), which an adapter would untie
TARGETS = ('c_attn', 'c_proj', 'c_fc', 'attn.c_proj', 'mlp.c_proj')
ADAPTER = 'default'  # peft's name for the one adapter each layer holds


def settings(rank, alpha, dropout, targets, optimizer, freeze_layers):
    """train.py's LoRA settings as a checkpoint records them (None for rank 0), checked: UserError
    for targets it does not know and for what LoRA does not combine with (each value's range:
    train.py's check_settings)."""
    names = [t.strip() for t in targets.split(',') if t.strip()]
    if rank == 0:
        return None
    if optimizer != 'adamw':
        raise UserError(
            "LoRA adapters are trained with AdamW (Muon would orthogonalize rank-r matrices): "
            "use --optimizer=adamw"
        )
    if freeze_layers:
        raise UserError(
            "lora_rank freezes every base weight already, and freeze_layers has nothing left to "
            "do: use one of them"
        )
    if not names or any(t not in TARGETS for t in names):
        raise UserError(
            f"lora_targets must be a comma-separated list of {', '.join(TARGETS)}; got {targets!r}"
        )
    return dict(rank=rank, alpha=float(alpha), dropout=float(dropout), targets=sorted(set(names)))


def add_adapters(model, lora, checkpoint=None, verbose=False):
    """Put peft's LoRA layers (settings() of the run) into the GPT in place and freeze everything
    else; from a checkpoint being resumed, load the unmerged weights and the adapters it kept
    (resume_state()). peft.inject_adapter_in_model keeps the module tree of our GPT, so parameter
    names only gain a level: c_attn.weight becomes c_attn.base_layer.weight, beside
    c_attn.lora_A.default.weight and lora_B's."""
    # imported here: it takes seconds, and only LoRA needs it
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=lora['rank'],
        lora_alpha=lora['alpha'],
        lora_dropout=lora['dropout'],
        target_modules=lora['targets'],
        bias='none',
    )
    # also sets requires_grad=False on everything but the adapters
    inject_adapter_in_model(config, model)
    if checkpoint is not None:
        try:
            # strict: every weight and adapter, exactly
            model.load_state_dict(resume_state(checkpoint))
        except RuntimeError as e:
            raise UserError(
                f"the checkpoint's LoRA adapters do not fit the model: {str(e).splitlines()[0]}"
            ) from None
    if verbose:
        trainable, total = count_trainable(model)
        share = 100 * trainable / total
        print(f"lora: {trainable:,} trainable parameters of {total:,} ({share:.2f}%)")


def split_state(state_dict, lora):
    """From an adapted model's full state dict (on rank 0 under FSDP: checkpoints.full_state):
    ('model', 'lora') of a checkpoint. 'model' has the plain GPT's names with each adapted weight
    merged; 'lora' keeps the settings, the adapters and the unmerged weights, all that
    resume_state() needs to rebuild the adapted model exactly. The merge is peft's
    LoraLayer.get_delta_weight for an nn.Linear (B @ A * alpha / rank, added to W) done here on the
    state dict, not by peft's merge on the modules: under FSDP the modules hold shards, and the full
    tensors exist only in the state dict gathered for saving. It runs on the CPU in float32, one
    layer at a time, wherever the tensors are: on a GPU the matmul would run in TF32 (train.py
    allows it) and the merged weights would be a second full copy there, and one process, DDP and
    FSDP (whose gathered state is on the CPU already) would write different weights. It equals
    peft's merge on the CPU bit for bit (tests/test_finetune.py)."""
    scaling = lora['alpha'] / lora['rank']
    suffix = f'.lora_A.{ADAPTER}.weight'
    adapted = [k.removesuffix(suffix) for k in state_dict if k.endswith(suffix)]
    model, adapters, base = {}, {}, {}
    for k, v in state_dict.items():
        if '.lora_' in k:
            adapters[k] = v
        elif '.base_layer.' not in k:
            model[k] = v
    for name in adapted:
        w = state_dict[f'{name}.base_layer.weight']  # (out, in)
        # (rank, in), (out, rank)
        a, b = (state_dict[f'{name}.lora_{x}.{ADAPTER}.weight'].cpu() for x in 'AB')
        base[f'{name}.weight'] = w
        model[f'{name}.weight'] = w.cpu() + (b @ a) * scaling
        if f'{name}.base_layer.bias' in state_dict:  # an adapter leaves the bias as it is
            model[f'{name}.bias'] = state_dict[f'{name}.base_layer.bias']
    return model, dict(lora, base=base, adapters=adapters)


def resume_state(checkpoint):
    """The adapted model's state dict from a checkpoint that split_state() wrote: its unmerged
    weights and
    adapters under peft's names, the rest from 'model'."""
    saved = checkpoint['lora']
    state = {}
    for k, v in checkpoint['model'].items():
        name = k.rsplit('.', 1)[0]
        adapted = f'{name}.lora_A.{ADAPTER}.weight' in saved['adapters']
        state[k.replace(name, name + '.base_layer', 1) if adapted else k] = saved['base'].get(k, v)
    return {**state, **saved['adapters']}


def check_resume(checkpoint, lora, path):
    """Refuse (UserError) to resume a LoRA checkpoint with other LoRA settings, or without LoRA, and
    the reverse:
    the optimizer state belongs to the parameters that were training."""
    saved = checkpoint.get('lora')
    if saved is not None and not (
        isinstance(saved, dict)
        and all(
            isinstance(saved.get(k), dict)
            and all(isinstance(v, torch.Tensor) for v in saved[k].values())
            for k in ('base', 'adapters')
        )
        and type(saved.get('rank')) is int
        and isinstance(saved.get('targets'), list)
        and all(type(saved.get(k)) is float for k in ('alpha', 'dropout'))
    ):
        raise UserError(
            f"checkpoint {path} is damaged: its 'lora' entry is not LoRA settings, adapters "
            "and weights"
        )
    saved = saved and {k: saved[k] for k in ('rank', 'alpha', 'dropout', 'targets')}
    if saved != lora:

        def describe(s):
            return (
                (
                    f"lora_rank={s['rank']}, lora_alpha={s['alpha']:g}, "
                    f"lora_dropout={s['dropout']:g}, lora_targets={','.join(s['targets'])}"
                )
                if s
                else "lora_rank=0"
            )

        raise UserError(
            f"{path} was trained with {describe(saved)}, this run asks for {describe(lora)}: "
            f"resume it with its settings, or start a new run from its weights with "
            f"--init_from={path}"
        )


def count_trainable(model):
    """(trainable parameters, all parameters) of a model, each tensor counted once (the tied lm_head
    too)."""
    params = list(model.parameters())  # unique tensors
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
