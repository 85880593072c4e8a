"""
Full definition of a GPT Language Model, all of it in this single file.
Same classes, arguments and parameter names as nanoGPT, so its checkpoints and code keep working.
References:
1) the official GPT-2 TensorFlow implementation released by OpenAI:
https://github.com/openai/gpt-2/blob/master/src/model.py
2) huggingface/transformers PyTorch implementation:
https://github.com/huggingface/transformers/blob/main/src/transformers/models/gpt2/modeling_gpt2.py
The GELU follows the weights' origin (GPTConfig.gelu, docs/checkpoints.md): nanoGPT's exact one
from scratch, GPT-2's tanh approximation for OpenAI's weights, as each was trained.
Training, sampling, evaluation and serving all run GPT.forward (decoding: nanogpt/generate.py).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


class LayerNorm(nn.Module):
    """LayerNorm but with an optional bias. PyTorch doesn't support simply bias=False"""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, input):
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)


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
        # PyTorch's fused attention; False: the explicit masked softmax (the tests compare the two)
        self.flash = True

    def forward(self, x, kv_cache=None):
        B, T, C = x.size()  # batch size, sequence length, embedding dimensionality (n_embd)
        # query, key, values for all heads in batch, and the head moved forward as a batch dim
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        mask = None
        if kv_cache is not None:
            K, V, pos = kv_cache  # this layer's (B, nh, block_size, hs) x2, x's positions (B, T)
            rows = torch.arange(B, device=x.device)[:, None]  # (B, 1): with pos, (B, T) places
            K[rows, :, pos] = k.transpose(1, 2)  # (B, T, nh, hs) into (B, nh, block_size, hs)
            V[rows, :, pos] = v.transpose(1, 2)
            k, v = K, V
            # a query at position p sees its row's keys 0..p: one shape, alone or batched
            mask = torch.arange(K.size(2), device=x.device) <= pos[:, None, :, None]  # (B,1,T,L)
        elif not self.flash:
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        if self.flash:
            dropout = self.dropout if self.training else 0
            y = F.scaled_dot_product_attention(q, k, v, mask, dropout, is_causal=mask is None)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, L)
            att = att.masked_fill(~mask, float('-inf'))
            att = F.softmax(att, dim=-1)
            att = self.attn_dropout(att)
            y = att @ v  # (B, nh, T, L) x (B, nh, L, hs) -> (B, nh, T, hs)
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
        # non_embedding: without the position embeddings (the token embeddings are lm_head's too)
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
        (B, 1, vocab_size), and loss None. kv_cache: a generate.KVCache of B rows; row b's tokens go
        after the kv_cache.lengths[b] positions it holds, and its length grows by T."""
        if idx.dtype not in (torch.long, torch.int32):
            raise TypeError(f"idx must be an integer tensor of token ids, got {idx.dtype}")
        b, t = idx.size()
        if t > self.config.block_size:
            block = self.config.block_size
            raise ValueError(f"Cannot forward sequence of length {t}, block size is only {block}")
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)  # shape (t)
        if kv_cache is not None:
            pos = kv_cache.lengths[:, None] + pos  # (b, t): each row at its own position

        # forward the GPT model itself
        tok_emb = self.transformer.wte(idx)  # token embeddings of shape (b, t, n_embd)
        pos_emb = self.transformer.wpe(pos)  # position embeddings of shape (t or (b, t), n_embd)
        x = self.transformer.drop(tok_emb + pos_emb)
        for i, block in enumerate(self.transformer.h):
            x = block(x, None if kv_cache is None else (kv_cache.k[i], kv_cache.v[i], pos))
        x = self.transformer.ln_f(x)
        if kv_cache is not None:
            kv_cache.lengths += t

        if targets is not None:
            # if we are given some desired targets also calculate the loss
            logits, loss = self.logits_and_loss(x, targets)
        else:
            # inference-time mini-optimization: only forward the lm_head on the very last position
            logits = self.lm_head(x[:, [-1], :])  # note: using list [-1] to preserve the time dim
            loss = None

        return logits, loss

    def logits_and_loss(self, x, targets):
        """x (B, T, n_embd) from ln_f -> logits (B, T, vocab_size) and their mean cross-entropy
        against targets (B, T). A method of its own so that distributed.parallelize can compile it
        where it cannot compile forward (under FSDP)."""
        logits = self.lm_head(x)
        # in float32 also for a model cast to bfloat16 (autocast does so itself)
        loss = F.cross_entropy(
            logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1
        )
        return logits, loss

    def load_state_dict(self, state_dict, strict=True, assign=False):
        # nanoGPT saves the torch.compile wrapper, whose keys all carry an '_orig_mod.' prefix
        state_dict = {k.removeprefix('_orig_mod.'): v for k, v in state_dict.items()}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def crop_block_size(self, block_size):
        # model surgery, e.g. to use GPT-2's weights (block size 1024) with a smaller block size
        if block_size > (old := self.config.block_size):  # a block can be cropped, not extended
            raise ValueError(f"block_size {block_size} is larger than the model's {old}")
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def freeze(self, n_blocks):
        """Stop training the token and position embeddings (lm_head too: weight tying) and the
        lowest n_blocks Blocks: no gradients, no optimizer state. The Blocks above, ln_f learn."""
        for module in (self.transformer.wte, self.transformer.wpe, *self.transformer.h[:n_blocks]):
            module.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, model_type, override_args=None, allow_unsafe_pickle=False):
        """OpenAI's GPT-2 ('gpt2' ... 'gpt2-xl') or a local Hugging Face directory: hf.py."""
        from nanogpt.hf import from_pretrained

        return from_pretrained(model_type, override_args, allow_unsafe_pickle)

    def export_hf(self, path, vocab_size=None, tokenizer=None):
        """Write this model as a Hugging Face GPT-2 directory: hf.py."""
        from nanogpt.hf import export_hf

        export_hf(self, path, vocab_size, tokenizer)

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
        muon_bf16: Newton-Schulz in bfloat16 (torch.optim.Muon), for devices whose bfloat16 matmuls
        are native; else in float32."""
        # start with all of the candidate parameters that require grad
        param_dict = {pn: p for pn, p in self.named_parameters() if p.requires_grad}
        # with muon, the blocks' matrices go to Muon; embeddings, gains and biases stay with AdamW
        names = [n for n, p in param_dict.items() if n.startswith('transformer.h.') and p.ndim == 2]
        muon_params = [param_dict.pop(n) for n in names] if muon is not None else []
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
            for name, group in (('decayed', decay_params), ('non-decayed', nodecay_params)):
                n = sum(p.numel() for p in group)
                print(f"num {name} parameter tensors: {len(group)}, with {n:,} parameters")
            print(f"using fused AdamW: {use_fused} ({device_type})")
        if muon is not None:
            from nanogpt.muon import Float32Muon, MuonAdamW

            # torch's Muon runs Newton-Schulz in bfloat16, ~100x slower where it is emulated (CPUs
            # without AVX-512 BF16 or AMX): the caller says which one to take
            kind = torch.optim.Muon if muon_bf16 else Float32Muon
            if verbose:
                n = sum(p.numel() for p in muon_params)
                print(f"muon for {len(muon_params)} matrices, {n:,} parameters: {kind.__name__}")
            muon_optimizer = kind(muon_params, nesterov=True, **muon)
            optimizer = MuonAdamW(muon_optimizer, optimizer, muon['lr'] / learning_rate)
        return optimizer

    def flops_per_token(self):
        """Matrix-product flops per token of a training step as autograd runs it: forward, 2 per
        weight and 4 T C per attention (PaLM, arxiv.org/abs/2204.02311); backward, as much for the
        inputs' gradients where a parameter below trains, and 2 per weight that trains."""
        T, C = self.config.block_size, self.config.n_embd
        forward = backward = 0
        trains_below = False  # does a parameter that gradients must reach lie before this module
        for m in self.modules():  # in the order of the forward pass, as GPT registers them
            if isinstance(m, CausalSelfAttention):  # q @ k^T and att @ v, on c_attn's outputs
                forward += 4 * T * C
                c_attn_trains = any(p.requires_grad for p in m.c_attn.parameters())
                backward += 8 * T * C if trains_below or c_attn_trains else 0
            if isinstance(m, nn.Linear):
                forward += 2 * m.weight.numel()
                backward += 2 * m.weight.numel() * (trains_below + m.weight.requires_grad)
            trains_below |= any(p.requires_grad for p in m.parameters(recurse=False))
        return forward + backward

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops):
        """model flops utilization: achieved flops over peak_flops (runtime.device_peak_flops)"""
        flops_per_iter = self.flops_per_token() * self.config.block_size * fwdbwd_per_iter
        return flops_per_iter / dt / peak_flops  # achieved flops per second over the peak

    def generate_tokens(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True):
        """Yield max_new_tokens new tokens (b, 1) after idx (b, t): generate.generate_tokens."""
        from nanogpt.generate import generate_tokens

        yield from generate_tokens(self, idx, max_new_tokens, temperature, top_k, use_cache)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True):
        """idx (b, t) and max_new_tokens more tokens (model.eval() first; temperature 0: greedy)"""
        new = list(self.generate_tokens(idx, max_new_tokens, temperature, top_k, use_cache))
        return torch.cat([idx] + new, dim=1)
