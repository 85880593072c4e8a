"""
Continuous batching for serve.py: completions that arrive while others are generating join the
running batch at the next step and leave it when they finish. Each completion (a Row) has its own
slot in the key/value caches, position and random generator, so rows of different lengths share one
forward pass: the weights are applied to all rows at once, and attention masks each row to its own
length.

    engine = Engine(model, decode, eot, device, max_batch=16, max_waiting=256)
    engine.start()                       # a thread that runs the model
    engine.submit([Row(0, ids, seed, emit, max_tokens=16, ...)])   # emit(index, text, finish_reason, error)

A row is decoded with the same operations as sample.py's cached decoding (model.generate_tokens):
the prompt in one forward pass, then one position per step, and a cache rebuilt from the last
block_size // 2 tokens when it is full. Alone in the batch, a row computes bit for bit what
sample.py computes; batched, its matrix products run as one (B, C) x (C, N) product whose blocking
differs, and its attention is masked, so its logits differ in the last bits (docs/serve.md).
"""

import collections
import threading
import traceback

import torch
from torch.nn import functional as F

from model import KVCache


class Row:
    """One completion: its prompt and new tokens (lists of ids), sampling settings, random generator
    and
    KV caches (one per layer, None until its prompt is read)."""

    def __init__(self, index, prompt, seed, emit, max_tokens, temperature, top_p, top_k, stop):
        self.index, self.prompt, self.seed, self.emit = index, prompt, seed, emit
        self.max_tokens, self.temperature, self.top_p, self.top_k, self.stop = (
            max_tokens,
            temperature,
            top_p,
            top_k,
            stop,
        )
        self.new = []  # generated token ids
        self.shown = 0  # characters of the completion already emitted
        self.text, self.whole = '', 0  # the text of new[:whole], which ends with a whole character
        self.cache = self.generator = None
        self.slot = None  # its place in the engine's K and V
        self.done = self.cancelled = False


def attend(attn, x, caches, K, V, slots, pos, mask, contiguous):
    """CausalSelfAttention for one new position of each row, x (B, 1, C). Row b's keys and values
    are in slot slots[b] of K and V (max_batch, nh, block_size, hs), its new ones going to position
    pos[b]; mask (B, 1, 1, L) lets it see positions 0..pos[b] of the first L; contiguous: slots are
    0..B-1. A row alone runs
    the model's own cached step."""
    B, T, C = x.size()
    q, k, v = attn.c_attn(x).split(attn.n_embd, dim=2)  # one product for all rows
    # (B, nh, 1, hs)
    q, k, v = (a.view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2) for a in (q, k, v))
    if B == 1:
        y = F.scaled_dot_product_attention(q, *caches[0].append(k, v, attn.block_size))
    else:
        # (B, nh, hs) at each row's position
        K[slots, :, pos], V[slots, :, pos] = k[:, :, 0], v[:, :, 0]
        for cache in caches:
            cache.pos += 1
        L = mask.size(-1)
        if contiguous:  # the usual case: views, no copy
            keys, values = K[:B, :, :L], V[:B, :, :L]
        else:  # a row that joined or restarts this step reads its context alone and sits out
            keys, values = K[:, :, :L].index_select(0, slots), V[:, :, :L].index_select(0, slots)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (B, nh, 1, hs)
    y = y.transpose(1, 2).contiguous().view(B, T, C)
    return attn.resid_dropout(attn.c_proj(y))


def decode_step(model, rows, K, V, device):
    """Logits (B, vocab_size) of the next token of each row (in slot row.slot of the layers' K and
    V),
    feeding its last token at its own position: GPT.forward and Block.forward for one position per
    row."""
    idx = torch.tensor([[row.new[-1]] for row in rows], device=device)  # (B, 1)
    slots = torch.tensor([row.slot for row in rows], device=device)  # (B,), increasing
    contiguous = rows[-1].slot == len(rows) - 1
    pos = torch.tensor([row.cache[0].pos for row in rows], device=device)  # (B,)
    longest = max(row.cache[0].pos for row in rows) + 1
    mask = torch.arange(longest, device=device) <= pos[:, None, None, None]  # (B, 1, 1, L)
    t = model.transformer
    x = t.drop(t.wte(idx) + t.wpe(pos[:, None]))  # (B, 1, C)
    for i, block in enumerate(t.h):
        x = x + attend(
            block.attn,
            block.ln_1(x),
            [row.cache[i] for row in rows],
            K[i],
            V[i],
            slots,
            pos,
            mask,
            contiguous,
        )
        x = x + block.mlp(block.ln_2(x))
    return model.lm_head(t.ln_f(x))[:, -1, :]


def sample(row, logits):
    """A token drawn from logits (1, vocab_size) with the row's temperature, top_k and top_p, as
    sample.py
    draws it (scale, keep the top_k, softmax, multinomial), top_p applied after top_k."""
    logits = logits / row.temperature
    if row.top_k:
        v, _ = torch.topk(logits, min(row.top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float('Inf')
    probs = F.softmax(logits, dim=-1)
    if row.top_p < 1:
        # nucleus: keep the most likely tokens until their probabilities add up to top_p
        ranked, order = probs.sort(dim=-1, descending=True)
        ranked[ranked.cumsum(dim=-1) - ranked >= row.top_p] = 0
        probs = torch.zeros_like(probs).scatter(-1, order, ranked)
    return torch.multinomial(probs, num_samples=1, generator=row.generator).item()


def held_back(text, stops):
    """How many characters at the end of text to hold back: a character still being decoded (BPE)
    and the
    longest ending that may be the start of a stop string."""
    end = len(text.rstrip('\ufffd'))
    hold = 0
    for s in stops:
        hold = max(
            [hold] + [k for k in range(1, min(len(s) - 1, end) + 1) if text[end - k : end] == s[:k]]
        )
    return len(text) - end + hold


class Engine:
    """The model's thread: admits waiting rows into the batch, decodes one token of every active row
    per
    step, and reports text to each row's emit as it becomes final."""

    def __init__(self, model, decode, eot, device, max_batch, max_waiting):
        self.model, self.decode, self.eot, self.device = model, decode, eot, device
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.block_size = model.config.block_size
        self.lock = threading.Condition()
        self.waiting = collections.deque()
        self.active = []
        self.steps = self.largest_batch = self.completed = 0
        # per layer (max_batch, nh, block_size, hs): slot b holds row b's keys, values
        self.K = self.V = None

    def start(self):
        threading.Thread(target=self.run, name='engine', daemon=True).start()

    def submit(self, rows):
        """Queue rows for decoding; False (nothing queued) when that would exceed max_waiting."""
        with self.lock:
            if len(self.waiting) + len(self.active) + len(rows) > self.max_batch + self.max_waiting:
                return False
            self.waiting.extend(rows)
            self.lock.notify()
        return True

    def cancel(self, rows):
        """Stop rows whose request went away: they leave the batch at the next step."""
        for row in rows:
            row.cancelled = True

    def stats(self):
        with self.lock:
            return dict(
                active=len(self.active),
                waiting=len(self.waiting),
                steps=self.steps,
                largest_batch=self.largest_batch,
                completed=self.completed,
            )

    def run(self):
        while True:
            with self.lock:
                while not self.waiting and not self.active:
                    self.lock.wait()
                self.active = [row for row in self.active if not row.cancelled]
                self.compact()
                while self.waiting and len(self.active) < self.max_batch:
                    row = self.waiting.popleft()
                    if not row.cancelled:
                        row.slot = len(self.active)
                        self.active.append(row)
            try:
                with torch.no_grad():
                    self.step()
            # e.g. out of memory: fail these requests, keep serving the next ones
            except Exception as e:
                traceback.print_exc()
                for row in self.active:
                    row.emit(row.index, '', 'error', f"generation failed: {type(e).__name__}: {e}")
                self.active = []

    def compact(self):
        """Move the rows down to slots 0..B-1 after others left, so that a step reads K and V as
        views."""
        for b, row in enumerate(self.active):
            # b < row.slot: slot b is free, its row has left or moved down already
            if row.slot != b:
                for i, cache in enumerate(row.cache or []):
                    self.K[i][b, :, : cache.pos] = self.K[i][row.slot, :, : cache.pos]
                    self.V[i][b, :, : cache.pos] = self.V[i][row.slot, :, : cache.pos]
                row.slot = b
                self.point(row)

    def point(self, row):
        """Make the row's caches views of its slot in K and V."""
        for i, cache in enumerate(row.cache or []):
            cache.k, cache.v = (
                self.K[i][row.slot : row.slot + 1],
                self.V[i][row.slot : row.slot + 1],
            )

    def allocate(self):
        """K and V for max_batch rows, zeros (a masked position must hold a number: 0 x NaN is
        NaN)."""
        attn = self.model.transformer.h[0].attn
        dtype = attn.c_attn.weight.dtype  # runtime.inference_model's
        shape = (self.max_batch, attn.n_head, self.block_size, attn.n_embd // attn.n_head)
        self.K, self.V = (
            [torch.zeros(shape, dtype=dtype, device=self.device) for _ in self.model.transformer.h]
            for _ in range(2)
        )

    def step(self):
        """One new token for every active row: a row without a cache (new, or its cache is full)
        reads its
        context alone, as sample.py does; the others advance together in one decode_step."""
        fresh = [
            row for row in self.active if row.cache is None or row.cache[0].pos == self.block_size
        ]
        for row in fresh:
            keep = self.block_size if row.cache is None else self.block_size // 2
            if row.generator is None:
                row.generator = torch.Generator(device=self.device).manual_seed(row.seed)
            if self.K is None:
                self.allocate()
            row.cache = [KVCache() for _ in self.model.transformer.h]
            self.point(row)
            idx = torch.tensor([(row.prompt + row.new)[-keep:]], device=self.device)  # (1, T)
            logits, _ = self.model(idx, kv_cache=row.cache)
            self.pick([row], logits[:, -1, :])
        rows = [row for row in self.active if row not in fresh]
        if rows:
            self.pick(rows, decode_step(self.model, rows, self.K, self.V, self.device))
        with self.lock:
            self.steps += 1
            self.largest_batch = max(self.largest_batch, len(rows))
            self.active = [row for row in self.active if not row.done]

    def pick(self, rows, logits):
        """The next token of each row from its logits (B, vocab_size): the most likely one at
        temperature 0."""
        logits = logits.float()  # as sample.py's, also from a bfloat16 model
        # GPT-2's tokens end with <|endoftext|>: a padded vocabulary's rest is never drawn
        if self.eot is not None:
            logits = logits[:, : self.eot + 1]
        greedy = logits.argmax(dim=-1).tolist()
        for b, row in enumerate(rows):
            self.accept(row, greedy[b] if row.temperature == 0 else sample(row, logits[b : b + 1]))

    def accept(self, row, token):
        """Add a token to a row and emit the text that is now final; finish the row at a stop
        string, at
        GPT-2's <|endoftext|> or after max_tokens tokens."""
        finish = None
        if token == self.eot:
            finish = 'stop'
        else:
            row.new.append(token)
        # decoded from the last point where the text was whole (a BPE character can span tokens)
        tail = self.decode(row.new[row.whole :])
        text = row.text + tail
        if not tail.endswith('\ufffd'):
            row.text, row.whole = text, len(row.new)
        hits = [i for i in (text.find(s) for s in row.stop) if i >= 0]
        if hits:
            text, finish = text[: min(hits)], 'stop'
        elif finish is None and len(row.new) == row.max_tokens:
            finish = 'length'
        end = len(text) if finish else max(row.shown, len(text) - held_back(text, row.stop))
        if end > row.shown or finish:
            row.emit(row.index, text[row.shown : end], finish)
            row.shown = end
        if finish:
            row.done = True
            self.completed += 1
