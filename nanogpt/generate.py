"""
Generation on top of GPT.forward, for sample.py (GPT.generate) and serve.py (batching.Engine):
the key/value cache that forward reads and extends, the start of a row's window, and the one
sampling function (temperature, top_k, top_p; per-row settings and random generators for serving).

A row's context is read in two calls of the same forward: all its tokens but the last fill the
cache (start), then each step feeds one token per row at the row's own position. When a row's cache
is full (block_size positions) it starts over from its last block_size // 2 tokens, so the model
keeps going with half a block of context instead of recomputing a whole block per token.
"""

import torch
from torch.nn import functional as F


class KVCache:
    """Keys and values of every layer, k and v (n_layer, rows, nh, block_size, hs), for `rows`
    sequences, and how many positions each holds, lengths (rows,): what GPT.forward reads and
    extends. The caller keeps each row within block_size (see window)."""

    def __init__(self, k, v, lengths):
        self.k, self.v, self.lengths = k, v, lengths

    @classmethod
    def empty(cls, config, rows, device, dtype=torch.float32):
        hs = config.n_embd // config.n_head
        # zeros: a masked key must still hold a number (0 x NaN is NaN)
        shape = (config.n_layer, rows, config.n_head, config.block_size, hs)
        k, v = (torch.zeros(shape, dtype=dtype, device=device) for _ in 'kv')
        return cls(k, v, torch.zeros(rows, dtype=torch.long, device=device))

    def rows(self, start, stop):
        """Rows start..stop-1 as a cache of their own: views, so what forward writes lands here."""
        return KVCache(self.k[:, start:stop], self.v[:, start:stop], self.lengths[start:stop])


def window(started, block_size):
    """How many of its last tokens a row's cache starts from: block_size the first time,
    block_size // 2 when the cache is full and it starts over."""
    return block_size // 2 if started else block_size


def start(model, cache, idx):
    """Start the cache's rows over from idx (B, T): its first T - 1 tokens go into the cache, and
    the last one (B, 1), returned, is what the next step feeds."""
    cache.lengths.zero_()
    if idx.size(1) > 1:
        model(idx[:, :-1], kv_cache=cache)
    return idx[:, -1:]


def sample(logits, temperature=1.0, top_k=None, top_p=1.0, generators=None):
    """The next token of each row, (B, 1), from logits (B, V), drawn on their device (nothing
    waits for it): scale by temperature, keep the top_k most likely tokens, softmax, keep the most
    likely tokens whose probabilities add up to top_p, draw; nanoGPT's order, top_p after top_k.
    Each setting is a number or a (B, 1) tensor of per-row values; temperature 0 takes the most
    likely token, top_k None or 0 keeps all. generators: one torch.Generator per row, None for a
    greedy row, so that a row's draws depend on its own seed only; else torch's global generator
    draws for all rows at once (sample.py)."""
    logits = logits.float()  # also from a bfloat16 model
    greedy = logits.argmax(dim=-1, keepdim=True)
    per_row = torch.is_tensor(temperature)
    if (generators is not None and not any(generators)) or (not per_row and temperature == 0):
        return greedy  # no row draws
    # a greedy row's logits are divided by 1: its draw is not taken
    logits = logits / (torch.where(temperature > 0, temperature, 1) if per_row else temperature)
    if torch.is_tensor(top_k):  # per row: the k-th largest logit of each, none cut for 0
        k = torch.where(top_k > 0, top_k.clamp(max=logits.size(-1)), logits.size(-1)) - 1
        logits[logits < logits.sort(dim=-1, descending=True).values.gather(-1, k)] = -float('Inf')
    elif top_k:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float('Inf')
    probs = F.softmax(logits, dim=-1)
    if torch.is_tensor(top_p) or top_p < 1:
        # nucleus: keep the most likely tokens until their probabilities add up to top_p
        ranked, order = probs.sort(dim=-1, descending=True)
        ranked[(ranked.cumsum(dim=-1) - ranked >= top_p) & (top_p < 1)] = 0
        probs = torch.zeros_like(probs).scatter(-1, order, ranked)
    if generators is None:
        draws = torch.multinomial(probs, num_samples=1)
    else:  # one draw per sampled row, each from its own generator
        draws = greedy.clone()
        for b, generator in enumerate(generators):
            if generator is not None:
                draws[b] = torch.multinomial(probs[b], num_samples=1, generator=generator)
    return torch.where(temperature == 0, greedy, draws) if per_row else draws


@torch.no_grad()
def generate_tokens(model, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True):
    """Yield max_new_tokens new tokens, each a (b, 1) tensor, continuing idx (b, t). Without the
    cache this is nanoGPT's loop: the whole (cropped) context is run for every token. With it, each
    step runs one position per row against the cached keys and values."""
    if max_new_tokens > 0 and idx.size(1) == 0:
        raise ValueError("generate needs at least one token of context to start from")
    block_size = model.config.block_size
    weight = model.lm_head.weight
    cache = (
        KVCache.empty(model.config, idx.size(0), idx.device, weight.dtype) if use_cache else None
    )
    length = None  # positions in the cache (all rows alike), None before the first step
    for _ in range(max_new_tokens):
        if not use_cache:
            # if the sequence context is growing too long we must crop it at block_size
            logits, _ = model(idx[:, -block_size:])
        else:
            if length in (None, block_size):  # the first step, or the cache is full
                context = idx[:, -window(length is not None, block_size) :]
                x, length = start(model, cache, context), context.size(1) - 1
            logits, _ = model(x, kv_cache=cache)
            length += 1
        x = sample(logits[:, -1, :], temperature, top_k)
        idx = torch.cat((idx, x), dim=1)
        yield x
