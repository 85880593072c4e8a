"""
A prepared dataset and the batches drawn from it: finding and checking a dataset folder (train.bin
and val.bin, uint16 token ids), counting its tokens, checking them against a model's vocabulary, the
order in which training windows are drawn (nanoGPT's random draws, or each window once per epoch)
and the batches (x, y) made from them.
"""

import glob
import math
import os

import numpy as np
import torch

from nanogpt import distributed, runtime
from configurator import ROOT, UserError
from nanogpt.tokenizer import data_tokenizer, load_meta


def find_dataset(dataset, data_dir=''):
    """The folder that holds a prepared dataset's train.bin and val.bin: data_dir if given, else
    data/<dataset> of this repository. Refuses, naming the datasets there or the command that
    prepares the missing files."""
    if not data_dir:
        data_dir = os.path.join(ROOT, 'data', dataset)
        if not os.path.isdir(data_dir):
            known = sorted(
                os.path.basename(os.path.dirname(p))
                for p in glob.glob(os.path.join(ROOT, 'data', '*', 'prepare.py'))
            )
            raise UserError(
                f"unknown dataset '{dataset}': the datasets are the folders of data/ "
                f"({', '.join(known)}), "
                "or point --data_dir at a folder with train.bin and val.bin"
            )
    for split in ('train', 'val'):
        if not os.path.isfile(os.path.join(data_dir, f'{split}.bin')):
            prepare = os.path.join(ROOT, 'data', dataset, 'prepare.py')
            if not os.path.exists(prepare):  # a folder of the user's own text
                prepare = (
                    os.path.join(ROOT, 'data', 'prepare_text.py')
                    + f" --input=<your text> --out_dir={data_dir}"
                )
            raise UserError(
                f"{split}.bin not found in {data_dir}: prepare the dataset first with "
                f"python {prepare}"
            )
    return data_dir


def count_tokens(path):
    """The number of uint16 token ids in a prepared .bin file. A file that is empty or of odd byte
    length is damaged (cut short, or not token ids at all) and is refused here rather than by
    numpy."""
    try:
        with open(path, 'rb') as f:
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if size == 0 or size % 2:
        raise UserError(
            f"{path} is damaged: "
            f"{'it is empty' if size == 0 else f'{size:,} bytes is an odd length'} "
            "for uint16 token ids; prepare the dataset again"
        )
    return size // 2


def split_tokens(data_dir, split):
    """data_dir/<split>.bin's token ids, a read-only uint16 memmap. Make a new one for each use: a
    memmap
    kept open holds on to the pages it has read, and memory grows."""
    return np.memmap(os.path.join(data_dir, f'{split}.bin'), dtype=np.uint16, mode='r')


def meta_vocab_size(data_dir):
    """The vocabulary size a character-level dataset's meta.pkl records (all training needs of it),
    or a BPE's trained for the dataset, or None."""
    path = os.path.join(data_dir, 'meta.pkl')
    if os.path.exists(path):
        return load_meta(path)['vocab_size']
    record = data_tokenizer(data_dir)
    return record['vocab_size'] if record and record['tokenizer'] == 'bpe' else None


def check_fits(data_dir, n_tokens, block_size, vocab_size, meta_vocab_size=None):
    """Refuse data that a model of block_size and vocab_size cannot train on: a vocabulary
    (meta.pkl's, a BPE's) of another size, a split of no more than block_size tokens, or a token id
    it has no embedding for (which would crash mid-training). Rank 0 scans the files, the others
    wait for its answer."""
    if meta_vocab_size and vocab_size != meta_vocab_size:
        raise UserError(
            f"the model's vocab_size is {vocab_size} but the data's (in {data_dir}) is "
            f"{meta_vocab_size}: they were made for different vocabularies"
        )
    for split, n in n_tokens.items():
        if n <= block_size:  # the hint fits both splits
            raise UserError(
                f"{split}.bin has {n} tokens, too few for block_size {block_size}: use "
                f"--block_size={min(n_tokens.values()) - 1} or less"
            )
        top = distributed.on_rank0(
            lambda: max(
                int(split_tokens(data_dir, split)[i : i + 2**26].max()) for i in range(0, n, 2**26)
            )
        )
        if top >= vocab_size:
            raise UserError(
                f"{split}.bin holds token id {top} but the model's vocab_size is {vocab_size}: "
                "the data was prepared for another vocabulary"
            )


def get_batch(data, starts, block_size, device):
    """Inputs x and targets y (B, T) from windows of block_size + 1 token ids of data (a uint16
    memmap)
    starting at each of starts (B,), on device."""
    starts = starts.tolist()
    x = torch.stack([torch.from_numpy(data[i : i + block_size].astype(np.int64)) for i in starts])
    y = torch.stack(
        [torch.from_numpy(data[i + 1 : i + 1 + block_size].astype(np.int64)) for i in starts]
    )
    return runtime.to_device(x, device), runtime.to_device(y, device)


class WindowSampler:
    """The window starts of each iteration's global batch, drawn the same way by every rank (each
    takes its own rows), so the data depends on the seed and not on the number of processes.
    'random': nanoGPT's uniform draws with replacement from a seeded torch generator.
    'epoch': every start 0..n_windows-1 once per epoch, in an order shuffled afresh each epoch from
    (seed, epoch). That order is a keyed permutation computed on the fly (a Feistel network, see
    shuffled), so nothing of size n_windows (~9e9 for OpenWebText) is ever held in memory, and the
    state is one number: how many windows have been drawn."""

    def __init__(self, order, seed):
        if order not in ('random', 'epoch'):
            raise UserError(f"data_order must be 'random' or 'epoch', not '{order}'")
        self.order, self.seed = order, seed
        self.generator = torch.Generator().manual_seed(seed)
        self.drawn = 0  # windows drawn so far ('epoch'), over all epochs
        # the state before the latest draw is the one to checkpoint: the batch drawn last
        # (prefetched) is not trained on yet, so a resumed run must draw it again
        self.state_to_save = self.get_state()

    def draw(self, n_windows, shape):
        """Window starts in [0, n_windows) as a LongTensor of `shape` (the global batch's rows,
        batch_size)."""
        self.state_to_save = self.get_state()
        if self.order == 'random':
            return torch.randint(n_windows, shape, generator=self.generator)
        position = self.drawn + np.arange(math.prod(shape), dtype=np.int64)  # (rows * batch_size,)
        self.drawn += math.prod(shape)
        epoch, index = position // n_windows, position % n_windows
        starts = np.empty_like(position)
        for e in np.unique(epoch):  # a batch may straddle two epochs
            starts[epoch == e] = shuffled(index[epoch == e], n_windows, (self.seed, int(e)))
        return torch.from_numpy(starts).view(shape)

    def epoch(self, state, n_windows):
        """The epoch (0-based) of the last window drawn before `state` was taken; None for
        'random'."""
        return None if self.order == 'random' else max(state['windows_drawn'] - 1, 0) // n_windows

    def get_state(self):
        """For the checkpoint: the generator's state ('random', as before), or the count of windows
        drawn."""
        if self.order == 'random':
            return self.generator.get_state()
        return {'data_order': 'epoch', 'windows_drawn': self.drawn}

    def set_state(self, state):
        saved = 'epoch' if isinstance(state, dict) else 'random'
        if saved != self.order:
            raise UserError(
                f"the checkpoint was trained with data_order='{saved}'; resume it with "
                f"--data_order={saved} (or start a new run in another out_dir)"
            )
        if self.order == 'random':
            self.generator.set_state(state)
        else:
            self.drawn = int(state['windows_drawn'])


def train_batches(data_dir, n_windows, sampler, shape, rows, block_size, device):
    """This rank's micro-batches (x, y), each (batch_size, block_size), forever: every iteration's
    global batch of window starts, `shape` (gradient_accumulation_steps, batch_size), is drawn from
    sampler the same way on every rank, and this rank trains its `rows` (a slice) of it, so the data
    depends on the seed, not on how many processes share the work."""
    while True:
        for starts in sampler.draw(n_windows, shape)[rows]:
            yield get_batch(split_tokens(data_dir, 'train'), starts, block_size, device)


def shuffled(index, n, key, rounds=4):
    """The keyed permutation of range(n) at positions `index` (int64 array): a Feistel network on
    the smallest even number of bits that covers n, a bijection on [0, 2**bits); values that land at
    n or above are pushed through it again ("cycle walking") until they fall below n, which keeps it
    a bijection on [0, n). The round keys come from `key` (seed, epoch) through numpy's
    SeedSequence."""
    half = max(1, (int(n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    keys = np.random.SeedSequence(list(key)).generate_state(rounds, dtype=np.uint64)

    def permute(x):
        left, right = x >> np.uint64(half), x & mask
        for k in keys:
            z = right ^ k  # splitmix64's finalizer as the round function
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            left, right = right, left ^ ((z ^ (z >> np.uint64(31))) & mask)
        return (left << np.uint64(half)) | right

    with np.errstate(over='ignore'):  # the multiplications wrap modulo 2**64 on purpose
        out = permute(index.astype(np.uint64))
        walk = out >= n
        while walk.any():
            out[walk] = permute(out[walk])
            walk = out >= n
    return out.astype(np.int64)
