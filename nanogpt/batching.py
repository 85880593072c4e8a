"""
Continuous batching for serve.py: completions that arrive while others are generating join the
running batch at the next step and leave it when they finish. Each completion (a Row) has its own
slot in one KVCache of max_batch rows, its own position there and its own random generator.

    engine = Engine(model, decode, eot, device, max_batch=16, max_waiting=256)
    engine.start()                       # a thread that runs the model
    engine.submit([Row(0, ids, seed, emit, max_tokens=16, ...)])
    # emit(index, text, finish_reason, error) is called on the engine's thread

The model work is nanogpt/generate.py's, as sample.py's: a row's context is read by start
(GPT.forward on its slot alone), then every step is one GPT.forward of all max_batch slots, one
token each at its own position, and one generate.sample of the next tokens with each row's
settings and generator. The step has one shape whatever the number of rows (free slots run too and
are thrown away), so a row's tokens do not depend on the other requests, and one transfer brings
the step's tokens to the host. The engine itself only admits and retires rows, streams text and
ends it at stop strings (docs/serve.md).
"""

import collections
import threading
import traceback

import torch

from nanogpt.generate import KVCache, sample, start, window


class Row:
    """One completion: its prompt and new tokens (lists of ids), sampling settings and random
    seed, its slot in the engine's cache and the positions it holds there (None until its context
    is read)."""

    def __init__(self, index, prompt, seed, emit, max_tokens, temperature, top_p, top_k, stop):
        self.index, self.prompt, self.seed, self.emit = index, prompt, seed, emit
        self.max_tokens, self.stop = max_tokens, stop
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.new = []  # generated token ids
        self.shown = 0  # characters of the completion already emitted
        self.text, self.whole = '', 0  # the text of new[:whole], which ends with a whole character
        self.slot = self.length = None
        self.done = self.cancelled = False


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
    """The model's thread: admits waiting rows into free slots, decodes one token of every slot per
    step, and reports text to each row's emit as it becomes final."""

    def __init__(self, model, decode, eot, device, max_batch, max_waiting):
        self.model, self.decode, self.eot, self.device = model, decode, eot, device
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.block_size = model.config.block_size
        self.lock = threading.Condition()
        self.waiting = collections.deque()
        self.slots = [None] * max_batch  # the row in each slot, None for a free one
        self.steps = self.largest_batch = self.completed = 0
        # per slot, on the device: the token the next step feeds, whether a row is there (a free
        # slot's length goes back to 0), the sampling settings; and its random generator
        self.tokens = torch.zeros(max_batch, 1, dtype=torch.long, device=device)
        self.live = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.temperature = torch.zeros(max_batch, 1, device=device)
        self.top_k = torch.zeros(max_batch, 1, dtype=torch.long, device=device)
        self.top_p = torch.ones(max_batch, 1, device=device)
        self.generators = [None] * max_batch  # None: a greedy row or a free slot
        # a KVCache of max_batch rows, in the dtype of runtime.inference_model's weights
        dtype = model.lm_head.weight.dtype
        self.cache = KVCache.empty(model.config, max_batch, device, dtype)

    @property
    def active(self):
        return [row for row in self.slots if row is not None]

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
                self.admit()
            try:
                with torch.no_grad():
                    self.step()
            # e.g. out of memory: fail these requests, keep serving the next ones
            except Exception as e:
                traceback.print_exc()
                for row in self.active:
                    row.emit(row.index, '', 'error', f"generation failed: {type(e).__name__}: {e}")
                    self.free(row)

    def admit(self):
        """Free the slots of cancelled rows; put waiting rows into free slots, with their sampling
        settings (writes on the device, nothing waits for them)."""
        for row in self.active:
            if row.cancelled:
                self.free(row)
        while self.waiting and len(self.active) < self.max_batch:
            row = self.waiting.popleft()
            if row.cancelled:
                continue
            s = row.slot = self.slots.index(None)
            self.slots[s] = row
            self.live[s], self.temperature[s], self.top_p[s] = 1, row.temperature, row.top_p
            self.top_k[s] = row.top_k
            if row.temperature > 0:
                self.generators[s] = torch.Generator(self.device).manual_seed(row.seed)

    def free(self, row):
        """Give the row's slot back: empty, it feeds positions 0 until a row takes it."""
        self.slots[row.slot], self.generators[row.slot] = None, None
        self.live[row.slot] = self.cache.lengths[row.slot] = 0

    def step(self):
        """One new token for every row: a row without context in its slot (new, or its slot is
        full) reads it first; then one forward pass and one draw for all slots."""
        rows = self.active
        for row in rows:
            if row.length in (None, self.block_size):
                context = (row.prompt + row.new)[-window(row.length is not None, self.block_size) :]
                idx = torch.tensor([context], device=self.device)  # (1, T)
                cache = self.cache.rows(row.slot, row.slot + 1)
                self.tokens[row.slot] = start(self.model, cache, idx)[0]
                row.length = len(context) - 1
        logits, _ = self.model(self.tokens, kv_cache=self.cache)  # (max_batch, 1, vocab_size)
        self.cache.lengths.mul_(self.live)  # a free slot stays empty
        # GPT-2's tokens end with <|endoftext|>: a padded vocabulary's rest is never drawn
        logits = logits[:, -1, : None if self.eot is None else self.eot + 1]
        self.tokens = sample(logits, self.temperature, self.top_k, self.top_p, self.generators)
        tokens = self.tokens[:, 0].tolist()  # the step's one wait for the device
        for row in rows:
            row.length += 1
            self.accept(row, tokens[row.slot])
            if row.done:
                self.free(row)
        with self.lock:
            self.steps += 1
            self.largest_batch = max(self.largest_batch, len(rows))

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
