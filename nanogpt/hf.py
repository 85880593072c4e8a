"""
GPT-2 in Hugging Face's format beside the model (as torchtitan's state-dict adapters): import of
OpenAI's weights or of a local Hugging Face directory (from_pretrained, which GPT.from_pretrained
calls) and export (export_hf). Both map the parameters name for name and refuse, in one line, a
model whose architecture changed: other parameter names (check_same_keys) or, with the same
weights, other logits (check_same_function).
"""

import os

import torch

import model as model_py

PRETRAINED = ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl')  # OpenAI's 124M, 350M, 774M, 1558M
# OpenAI's checkpoints use a "Conv1D" module, a Linear with its weight transposed: these are
# transposed on import and export
CONV1D_WEIGHTS = (
    'attn.c_attn.weight',
    'attn.c_proj.weight',
    'mlp.c_fc.weight',
    'mlp.c_proj.weight',
)
HF_GELU = {'gelu': 'exact', 'gelu_new': 'tanh', 'gelu_pytorch_tanh': 'tanh'}  # transformers' names


def check_same_keys(missing, unexpected, what):
    """Refuse a conversion between models whose parameters differ (a changed architecture): copying
    only the names both have would compute another function without a word."""
    if missing or unexpected:
        raise ValueError(
            f"this GPT's parameters differ from {what}: missing "
            f"{', '.join(missing[:4]) or 'none'}; unexpected {', '.join(unexpected[:4]) or 'none'} "
            "(a changed architecture: see docs/code.md)"
        )


@torch.no_grad()
def check_same_function(model, model_hf, vocab_size, what):
    """Refuse a conversion whose two models hold the same weights under the same names but compute
    other logits: a change that kept every parameter (RMSNorm for LayerNorm, say) but not the
    function."""
    # (1, T) fixed token ids
    idx = (torch.arange(min(8, model.config.block_size)) * 7919 % vocab_size)[None]
    modes = model.training, model_hf.training
    ours = model.eval()(idx.to(model.lm_head.weight.device), idx.to(model.lm_head.weight.device))[0]
    diff = (
        (
            ours[..., :vocab_size].float().cpu()
            - model_hf.float().eval()(idx).logits[..., :vocab_size]
        )
        .abs()
        .max()
    )
    model.train(modes[0]), model_hf.train(modes[1])
    if not diff <= 1e-3 * max(1.0, ours.abs().max().item()):
        raise ValueError(
            f"this GPT computes another function than {what} with the same weights (logits "
            f"differ by up to {diff:.3g}): a changed architecture, see docs/code.md"
        )


def from_pretrained(model_type, override_args=None, allow_unsafe_pickle=False):
    """Load OpenAI's GPT-2 weights ('gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl') through
    transformers, or any GPT-2 model saved in Hugging Face format in a local directory
    (config.json + weights), which is how to work offline. Only dropout can be overridden.
    Weights are read from safetensors only, unless allow_unsafe_pickle (see
    checkpoints.check_hf_dir)."""
    override_args = override_args or {}
    if any(k != 'dropout' for k in override_args):
        raise ValueError(
            f"only dropout can be overridden for a pretrained model, got {sorted(override_args)}"
        )
    if model_type not in PRETRAINED and not os.path.isdir(model_type):
        raise ValueError(
            f"unknown pretrained model '{model_type}': use one of {', '.join(PRETRAINED)} "
            "or a local directory holding a Hugging Face GPT-2 (config.json + model.safetensors)"
        )
    # imported here: it takes seconds, and only this needs it
    from transformers import GPT2LMHeadModel

    print(f"loading weights from pretrained gpt: {model_type}")
    # OpenAI's GPT-2 on the hub has model.safetensors too; None: safetensors if there, else the
    # pickle
    try:
        model_hf, info = GPT2LMHeadModel.from_pretrained(
            model_type,
            use_safetensors=None if allow_unsafe_pickle else True,
            output_loading_info=True,
        )
    except OSError as e:
        # the hub client's message runs over several lines
        reason = str(e).strip().splitlines()[0]
        if os.path.isdir(model_type):
            raise ValueError(f"cannot load {model_type} ({reason})") from None
        raise OSError(
            f"could not load '{model_type}' from the Hugging Face hub or its local cache "
            f"({reason}). Without network access, download it once elsewhere and point at the "
            "directory instead, e.g. init_from='/path/to/gpt2' (a directory with config.json and "
            "model.safetensors, as written by save_pretrained)"
        ) from None
    # a damaged weights file (safetensors' own error), shapes that disagree with config.json
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(
            f"cannot load the weights of {model_type} ({type(e).__name__}: {reason})"
        ) from None
    # transformers would fill these in at random
    if info['missing_keys'] or info['mismatched_keys']:
        names = sorted(info['missing_keys']) + sorted(str(k) for k in info['mismatched_keys'])
        raise ValueError(
            f"{model_type}: its weights do not fit its config.json ({len(names)} tensors missing "
            f"or of another shape, e.g. {names[0]})"
        )
    hf = model_hf.config
    if hf.activation_function not in HF_GELU:
        raise ValueError(
            f"{model_type}: activation_function '{hf.activation_function}' is not a GELU "
            f"this model has ({', '.join(HF_GELU)})"
        )
    config = model_py.GPTConfig(
        block_size=hf.n_positions,
        vocab_size=hf.vocab_size,
        n_layer=hf.n_layer,
        n_head=hf.n_head,
        n_embd=hf.n_embd,
        bias=True,
        dropout=override_args.get('dropout', 0.0),
        gelu=HF_GELU[hf.activation_function],
    )
    model = model_py.GPT(config)
    sd = model.state_dict()
    sd_hf = model_hf.state_dict()
    check_same_keys(
        [k for k in sd if k not in sd_hf],
        [k for k in sd_hf if k not in sd],
        f"{model_type}'s weights",
    )
    with torch.no_grad():
        for k in sd:
            w = sd_hf[k].t() if k.endswith(CONV1D_WEIGHTS) else sd_hf[k]
            if w.shape != sd[k].shape:
                raise ValueError(
                    f"{model_type}: {k} has shape {tuple(w.shape)}, expected {tuple(sd[k].shape)}"
                )
            sd[k].copy_(w)
    check_same_function(model, model_hf, hf.vocab_size, f"{model_type}'s weights")
    return model


def export_hf(model, path, vocab_size=None, tokenizer=None):
    """Write this model as a Hugging Face GPT-2 directory (config.json + model.safetensors)
    that transformers.GPT2LMHeadModel.from_pretrained(path) loads with the same logits.
    A padded vocabulary (e.g. 50304 = 50257 rounded up to a multiple of 64) is exported whole
    by default, so the logits match row for row; pass vocab_size=50257 to keep only GPT-2's
    real tokens (the padding rows never occur in the data, so nothing is lost). A model
    without biases is exported with zero biases, which computes exactly the same function,
    and the GELU as transformers names it: 'gelu' (exact) or 'gelu_new' (tanh). With tokenizer
    (a transformers tokenizer: bpe.hf_tokenizer of ckpt.pt's 'tokenizer'), it is saved beside the
    weights, its end-of-text token the model's bos and eos."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    vocab_size = vocab_size or c.vocab_size
    if vocab_size > c.vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is larger than the model's {c.vocab_size}")
    hf_config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=c.block_size,
        n_embd=c.n_embd,
        n_layer=c.n_layer,
        n_head=c.n_head,
        activation_function='gelu_new' if c.gelu == 'tanh' else 'gelu',
        resid_pdrop=c.dropout,
        embd_pdrop=c.dropout,
        attn_pdrop=c.dropout,
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id if tokenizer is not None else 50256,
        eos_token_id=tokenizer.eos_token_id if tokenizer is not None else 50256,
    )
    model_hf = GPT2LMHeadModel(hf_config)
    sd, sd_hf = model.state_dict(), model_hf.state_dict()
    zero_bias = [
        k
        for k in sd_hf
        if not c.bias and k.endswith('.bias') and k.replace('.bias', '.weight') in sd
    ]
    check_same_keys(
        [k for k in sd_hf if k not in sd and k not in zero_bias],
        [k for k in sd if k not in sd_hf],
        "GPT-2's format",
    )
    with torch.no_grad():
        for k, v in sd_hf.items():
            if k in zero_bias:
                v.zero_()
                continue
            w = sd[k].t() if k.endswith(CONV1D_WEIGHTS) else sd[k]
            w = w[:vocab_size] if k in ('transformer.wte.weight', 'lm_head.weight') else w
            if w.shape != v.shape:
                raise ValueError(
                    f"GPT-2's format: {k} has shape {tuple(v.shape)}, this model's {tuple(w.shape)}"
                )
            v.copy_(w)
    check_same_function(model, model_hf, vocab_size, "GPT-2's format")
    model_hf.save_pretrained(path)
    if tokenizer is not None:  # AutoTokenizer.from_pretrained(path) reads the model's text
        tokenizer.save_pretrained(path)
