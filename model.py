"""
Full definition of a GPT Language Model, all of it in this single file.
Same classes, arguments and parameter names as nanoGPT, so its checkpoints and code keep working.
References:
1) the official GPT-2 TensorFlow implementation released by OpenAI:
https://github.com/openai/gpt-2/blob/master/src/model.py
2) huggingface/transformers PyTorch implementation:
https://github.com/huggingface/transformers/blob/main/src/transformers/models/gpt2/modeling_gpt2.py
The GELU follows the weights' origin (GPTConfig.gelu): the exact one, nanoGPT's, for models trained
from scratch and for nanoGPT's checkpoints; GPT-2's tanh approximation for OpenAI's weights and
models finetuned from them, so each computes the function it was trained as (docs/checkpoints.md).
"""

import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from nanogpt.muon import Float32Muon, MuonAdamW

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


class LayerNorm(nn.Module):
    """LayerNorm but with an optional bias. PyTorch doesn't support simply bias=False"""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, input):
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)


class KVCache:
    """Keys and values of one attention layer for the positions processed so far, so that
    generating a token costs one position instead of the whole context."""

    def __init__(self):
        self.k = self.v = None  # (B, nh, block_size, hs), allocated on first use
        self.pos = 0  # number of positions filled

    def append(self, k, v, block_size):
        B, nh, T, hs = k.shape
        if self.k is None:
            self.k = k.new_empty(B, nh, block_size, hs)
            self.v = v.new_empty(B, nh, block_size, hs)
        self.k[:, :, self.pos : self.pos + T] = k
        self.v[:, :, self.pos : self.pos + T] = v
        self.pos += T
        return self.k[:, :, : self.pos], self.v[:, :, : self.pos]  # (B, nh, pos, hs)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0  # GPT.__init__ raised a readable error already
        # key, query, value projections for all heads, but in a batch
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        # output projection
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        # regularization
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.block_size = config.block_size
        # flash attention through PyTorch's fused kernel; False selects the explicit masked
        # softmax below, which computes the same thing (the tests compare the two)
        self.flash = True

    def forward(self, x, kv_cache=None):
        B, T, C = x.size()  # batch size, sequence length, embedding dimensionality (n_embd)
        # calculate query, key, values for all heads in batch and move head forward to be the batch
        # dim
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        past = 0
        if kv_cache is not None:
            past = kv_cache.pos
            k, v = kv_cache.append(k, v, self.block_size)  # (B, nh, past + T, hs)
        # query i (at position past + i) may attend to keys 0 .. past + i. T is tested first so that
        # these stay plain bools: in compiled decoding (T == 1) past is a symbolic int, and a
        # symbolic is_causal would make SDPA break the graph
        prefix = T > 1 and past > 0  # several queries after cached keys: an explicit mask
        mask = None
        if prefix or not self.flash:
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
        if self.flash:
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=self.dropout if self.training else 0,
                is_causal=T > 1 and not prefix,
            )
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, past + T)
            att = att.masked_fill(~mask, float('-inf'))
            att = F.softmax(att, dim=-1)
            att = self.attn_dropout(att)
            y = att @ v  # (B, nh, T, past + T) x (B, nh, past + T, hs) -> (B, nh, T, hs)
        # re-assemble all head outputs side by side
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        # output projection
        y = self.resid_dropout(self.c_proj(y))
        return y


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # exact: nanoGPT's nn.GELU(); tanh: GPT-2's approximation ('gelu_new' in transformers)
        self.gelu = nn.GELU(approximate='tanh' if config.gelu == 'tanh' else 'none')
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        x = self.c_fc(x)  # (B, T, 4 * n_embd)
        x = self.gelu(x)
        x = self.c_proj(x)  # (B, T, n_embd)
        x = self.dropout(x)
        return x


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None):
        x = x + self.attn(self.ln_1(x), kv_cache)
        x = x + self.mlp(self.ln_2(x))
        return x


@dataclass
class GPTConfig:
    block_size: int = 1024
    # GPT-2 vocab_size of 50257, padded up to nearest multiple of 64 for efficiency
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    # True: bias in Linears and LayerNorms, like GPT-2. False: a bit better and faster
    bias: bool = True
    # 'exact' (nanoGPT's) or 'tanh' (GPT-2's); saved beside model_args, not in them, so that
    # nanoGPT's GPTConfig(**model_args) still reads our checkpoints (checkpoints.checkpoint_gelu)
    gelu: str = 'exact'


def check_same_keys(missing, unexpected, what):
    """Refuse a conversion between models whose parameters differ (a changed architecture): copying
    only
    the names both have would compute another function without a word."""
    if missing or unexpected:
        raise ValueError(
            f"this GPT's parameters differ from {what}: missing {', '.join(missing[:4]) or 'none'}; "
            f"unexpected {', '.join(unexpected[:4]) or 'none'} (a changed architecture: see docs/code.md)"
        )


@torch.no_grad()
def check_same_function(model, model_hf, vocab_size, what):
    """Refuse a conversion whose two models hold the same weights under the same names but compute
    other
    logits: a change that kept every parameter (RMSNorm for LayerNorm, say) but not the function."""
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
            f"this GPT computes another function than {what} with the same weights (logits differ by "
            f"up to {diff:.3g}): a changed architecture, see docs/code.md"
        )


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.n_embd % config.n_head != 0:
            raise ValueError(
                f"n_embd ({config.n_embd}) must be divisible by n_head ({config.n_head})"
            )
        if config.gelu not in ('exact', 'tanh'):
            raise ValueError(f"gelu must be 'exact' or 'tanh', got {config.gelu!r}")
        self.config = config

        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying: the token embedding and the output projection share one matrix
        self.transformer.wte.weight = self.lm_head.weight

        # init all weights
        self.apply(self._init_weights)
        # apply special scaled init to the residual projections, per GPT-2 paper
        for pn, p in self.named_parameters():
            if pn.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def get_num_params(self, non_embedding=True):
        # non_embedding leaves out the position embeddings; the token embeddings stay in because
        # they are shared with lm_head, where they count as weights of the final layer
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, kv_cache=None):
        """idx: (B, T) token ids. With targets (B, T): logits (B, T, vocab_size) and the mean
        cross-entropy (targets of -1 are ignored). Without: logits of the last position only,
        (B, 1, vocab_size), and loss None. kv_cache: a list of one KVCache per layer, holding
        the positions before idx (see generate)."""
        if idx.dtype not in (torch.long, torch.int32):
            raise TypeError(
                f"idx must be an integer tensor of token ids (torch.long), got {idx.dtype}"
            )
        b, t = idx.size()
        past = 0 if kv_cache is None else kv_cache[0].pos
        if past + t > self.config.block_size:
            raise ValueError(
                f"Cannot forward sequence of length {past + t}, "
                f"block size is only {self.config.block_size}"
            )
        pos = torch.arange(past, past + t, dtype=torch.long, device=idx.device)  # shape (t)

        # forward the GPT model itself
        tok_emb = self.transformer.wte(idx)  # token embeddings of shape (b, t, n_embd)
        pos_emb = self.transformer.wpe(pos)  # position embeddings of shape (t, n_embd)
        x = self.transformer.drop(tok_emb + pos_emb)
        for i, block in enumerate(self.transformer.h):
            x = block(x, None if kv_cache is None else kv_cache[i])
        x = self.transformer.ln_f(x)

        if targets is not None:
            # if we are given some desired targets also calculate the loss
            logits = self.lm_head(x)
            # in float32 also for a model run in bfloat16 (runtime.inference_model); autocast does
            # so itself
            loss = F.cross_entropy(
                logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1
            )
        else:
            # inference-time mini-optimization: only forward the lm_head on the very last position
            logits = self.lm_head(x[:, [-1], :])  # note: using list [-1] to preserve the time dim
            loss = None

        return logits, loss

    def load_state_dict(self, state_dict, strict=True, assign=False):
        # nanoGPT saves the torch.compile wrapper, whose keys all carry an '_orig_mod.' prefix
        state_dict = {k.removeprefix('_orig_mod.'): v for k, v in state_dict.items()}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def crop_block_size(self, block_size):
        # model surgery, e.g. to use GPT-2's weights (block size 1024) with a smaller block size
        if block_size > self.config.block_size:
            raise ValueError(
                f"block_size {block_size} is larger than the model's {self.config.block_size}; "
                "a block size can only be cropped, not extended"
            )
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])
        for block in self.transformer.h:
            block.attn.block_size = block_size

    def freeze(self, n_blocks):
        """Stop training the token and position embeddings and the lowest n_blocks Blocks: they get
        no gradients, and configure_optimizers (which takes only parameters that require grad) gives
        them no optimizer state. lm_head.weight is the same tensor as wte.weight (weight tying), so
        the output layer is frozen too: the model keeps reading its logits off the pretrained token
        embeddings, and
        only the Blocks above n_blocks and ln_f learn."""
        for module in (self.transformer.wte, self.transformer.wpe, *self.transformer.h[:n_blocks]):
            module.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, model_type, override_args=None, allow_unsafe_pickle=False):
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
                f"could not load '{model_type}' from the Hugging Face hub or its local cache ({reason}). "
                "Without network access, download it once elsewhere and point at the directory "
                "instead, e.g. init_from='/path/to/gpt2' (a directory with config.json and "
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
        config = GPTConfig(
            block_size=hf.n_positions,
            vocab_size=hf.vocab_size,
            n_layer=hf.n_layer,
            n_head=hf.n_head,
            n_embd=hf.n_embd,
            bias=True,
            dropout=override_args.get('dropout', 0.0),
            gelu=HF_GELU[hf.activation_function],
        )
        model = GPT(config)
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

    def export_hf(self, path, vocab_size=None, tokenizer=None):
        """Write this model as a Hugging Face GPT-2 directory (config.json + model.safetensors)
        that transformers.GPT2LMHeadModel.from_pretrained(path) loads with the same logits.
        A padded vocabulary (e.g. 50304 = 50257 rounded up to a multiple of 64) is exported whole
        by default, so the logits match row for row; pass vocab_size=50257 to keep only GPT-2's
        real tokens (the padding rows never occur in the data, so nothing is lost). A model
        without biases is exported with zero biases, which computes exactly the same function,
        and the GELU as transformers names it: 'gelu' (exact) or 'gelu_new' (tanh). With
        tokenizer (a transformers tokenizer: nanogpt.bpe.hf_tokenizer of ckpt.pt's 'tokenizer'), it
        is saved beside the weights, its end-of-text token the model's bos and eos."""
        from transformers import GPT2Config, GPT2LMHeadModel

        c = self.config
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
        sd, sd_hf = self.state_dict(), model_hf.state_dict()
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
        check_same_function(self, model_hf, vocab_size, "GPT-2's format")
        model_hf.save_pretrained(path)
        if tokenizer is not None:  # AutoTokenizer.from_pretrained(path) reads the model's text
            tokenizer.save_pretrained(path)

    def configure_optimizers(
        self,
        weight_decay,
        learning_rate,
        betas,
        device_type,
        verbose=True,
        muon=None,
        muon_bf16=False,
    ):
        """AdamW for all parameters (nanoGPT), or with muon=dict(lr=, momentum=, weight_decay=):
        Muon for the blocks' weight matrices and AdamW for the rest, as one muon.MuonAdamW.
        muon_bf16: Newton-Schulz in
        bfloat16 (torch.optim.Muon), for devices whose bfloat16 matmuls are native; else in float32.
        """
        # start with all of the candidate parameters that require grad
        param_dict = {pn: p for pn, p in self.named_parameters() if p.requires_grad}
        if muon is not None:
            # the attention and MLP matrices of the blocks (all 2-D) go to Muon; the embeddings (the
            # token embedding is also lm_head), the LayerNorm gains and the biases stay with AdamW
            muon_params = [
                p for n, p in param_dict.items() if n.startswith('transformer.h.') and p.dim() == 2
            ]
            param_dict = {
                n: p
                for n, p in param_dict.items()
                if not (n.startswith('transformer.h.') and p.dim() == 2)
            }
        # create optim groups. Any parameters that is 2D will be weight decayed, otherwise no.
        # i.e. all weight tensors in matmuls + embeddings decay, all biases and layernorms don't.
        decay_params = [p for n, p in param_dict.items() if p.dim() >= 2]
        nodecay_params = [p for n, p in param_dict.items() if p.dim() < 2]
        optim_groups = [
            {'params': decay_params, 'weight_decay': weight_decay},
            {'params': nodecay_params, 'weight_decay': 0.0},
        ]
        # the fused kernel does the whole update in one pass; torch has it for cuda, cpu and mps
        try:
            optimizer = torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas, fused=True)
            use_fused = True
        except (RuntimeError, TypeError):
            optimizer = torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas)
            use_fused = False
        if verbose:
            num_decay = sum(p.numel() for p in decay_params)
            num_nodecay = sum(p.numel() for p in nodecay_params)
            print(
                f"num decayed parameter tensors: {len(decay_params)}, with {num_decay:,} parameters"
            )
            print(
                f"num non-decayed parameter tensors: {len(nodecay_params)}, with {num_nodecay:,} parameters"
            )
            print(f"using fused AdamW: {use_fused} ({device_type})")
        if muon is not None:
            # torch's Muon runs Newton-Schulz in bfloat16: where bfloat16 matmuls are emulated (CPUs
            # without AVX-512 BF16 or AMX) that is ~100x slower, so the caller says (muon_bf16)
            # which one to take
            muon_optimizer = (torch.optim.Muon if muon_bf16 else Float32Muon)(
                muon_params, nesterov=True, **muon
            )
            if verbose:
                path = (
                    'torch.optim.Muon, Newton-Schulz in bfloat16'
                    if muon_bf16
                    else 'Float32Muon, Newton-Schulz in float32'
                )
                print(
                    f"muon for {len(muon_params)} matrices with {sum(p.numel() for p in muon_params):,} parameters: {path}"
                )
            optimizer = MuonAdamW(muon_optimizer, optimizer, muon['lr'] / learning_rate)
        return optimizer

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops):
        """model flops utilization (MFU): achieved flops over peak_flops, the device's peak flops/s
        (the caller measures or looks it up: runtime.device_peak_flops)."""
        # first estimate the number of flops we do per iteration.
        # see PaLM paper Appendix B as ref: https://arxiv.org/abs/2204.02311
        N = self.get_num_params()
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        flops_per_token = 6 * N + 12 * L * H * Q * T
        flops_per_iter = flops_per_token * T * fwdbwd_per_iter
        return flops_per_iter / dt / peak_flops  # achieved flops per second over the peak

    @torch.no_grad()
    def generate_tokens(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True):
        """Yield max_new_tokens new tokens, each a (b, 1) tensor, continuing idx (b, t).
        Without the cache this is nanoGPT's loop: the whole (cropped) context is run for every
        token. With it, each step runs one position against the cached keys and values. When the
        cache is full (block_size positions) it is rebuilt from the last block_size // 2 tokens, so
        the
        model keeps going with half a block of context instead of recomputing a whole block per
        token."""
        if max_new_tokens > 0 and idx.size(1) == 0:
            raise ValueError("generate needs at least one token of context to start from")
        block_size = self.config.block_size
        cache = None
        for _ in range(max_new_tokens):
            if not use_cache:
                # if the sequence context is growing too long we must crop it at block_size
                logits, _ = self(idx if idx.size(1) <= block_size else idx[:, -block_size:])
            elif cache is None or cache[0].pos == block_size:
                keep = block_size if cache is None else block_size // 2
                cache = [KVCache() for _ in self.transformer.h]
                logits, _ = self(idx[:, -keep:], kv_cache=cache)
            else:
                logits, _ = self(idx[:, -1:], kv_cache=cache)
            # (b, vocab_size), in float32 also from a bfloat16 model
            logits = logits[:, -1, :].float()
            if temperature == 0:
                idx_next = logits.argmax(dim=-1, keepdim=True)  # greedy
            else:
                # pluck the logits at the final step and scale by desired temperature
                logits = logits / temperature
                # optionally crop the logits to only the top k options
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float('Inf')
                # apply softmax to convert logits to (normalized) probabilities
                probs = F.softmax(logits, dim=-1)
                idx_next = torch.multinomial(probs, num_samples=1)  # (b, 1)
            idx = torch.cat((idx, idx_next), dim=1)
            yield idx_next

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True):
        """Complete idx (b, t) with max_new_tokens tokens, feeding each prediction back in.
        Call model.eval() first. temperature=0 picks the most likely token (greedy)."""
        new = list(self.generate_tokens(idx, max_new_tokens, temperature, top_k, use_cache))
        return torch.cat([idx] + new, dim=1)
