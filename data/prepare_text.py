"""
Prepare your own text for training: a .txt file, or a folder of them, becomes train.bin and val.bin
(uint16 token ids, the first 90% of the text and the last 10%) plus meta.pkl for the char tokenizer,
or bpe.json for a BPE trained here.

    python data/prepare_text.py --input=my_book.txt                   # -> data/my_book/, char-level
    python data/prepare_text.py --input=my_letters/ --tokenizer=gpt2  # GPT-2 BPE
    python data/prepare_text.py --input=my_book.txt --tokenizer=bpe --vocab_size=4096  # your own
    python train.py --dataset=my_book ...

A folder's .txt files (searched recursively) are documents, taken in sorted path order: joined
with a blank line between them (char, gpt2), or separated by the end-of-text token (bpe). The BPE
is learned from the train split only, so val stays unseen text. The whole text is held in memory
(the BPE's training streams it); for corpora of many hundreds of MB use
data/openwebtext/prepare.py --source=FOLDER, which streams. The shakespeare scripts reuse the
functions below, which is why they live in a module rather than inline.
"""

import contextlib
import glob
import json
import os
import pickle
import shutil
import sys
import urllib.request

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root
from configurator import ANY, OneOf, Range, UserError, check, configure
from nanogpt import bpe
from nanogpt.tokenizer import (
    ENDOFTEXT,
    RECORD,
    char_codec,
    char_meta,
    char_record,
    gpt2_encoding,
    gpt2_record,
    write_record,
)

# -----------------------------------------------------------------------------
input = ''  # a .txt file, or a folder of .txt files
# default: data/<input's name without .txt>, so that train.py --dataset=<that name> finds it
out_dir = ''
# 'char': the text's sorted set of characters (writes meta.pkl); 'gpt2': GPT-2 BPE; 'bpe': a
# byte-level BPE learned from the train split (writes bpe.json)
tokenizer = 'char'
vocab_size = 4096  # bpe only: its number of tokens, 257 (bytes + end-of-text) to 65,536
val_fraction = 0.1  # the last 10% of the text becomes val.bin, as in nanoGPT
# -----------------------------------------------------------------------------


def read_documents(path):
    """The documents (texts) of a .txt file (one) or of a folder of them, with one-line errors for
    every way that can fail."""
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "**", "*.txt"), recursive=True))
        if not files:
            raise UserError(f"no .txt files in the folder {path}")
        documents = [t for t in map(read_file, files) if t]
    else:
        documents = [read_file(path)]
    if not any(t.strip() for t in documents):
        raise UserError(f"input is empty (or only whitespace): {path}")
    return documents


def read_text(path):
    """The text of a .txt file or of a folder of them, joined with a blank line between files."""
    return "\n\n".join(read_documents(path))


def read_file(path):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise UserError(f"input not found: {path}") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if b"\0" in data:  # text files hold no NUL byte; binary files (images, archives) do
        raise UserError(
            f"{path} is a binary file, not text (a NUL byte at offset {data.index(0):,}); "
            "give a UTF-8 .txt file"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start:,}); "
            f"convert it first, e.g. iconv -f latin1 -t utf-8"
        ) from None
    # universal newlines, as nanoGPT's open(path, 'r') gives, so Windows files prepare the same
    return text.replace("\r\n", "\n").replace("\r", "\n")


def download_if_missing(url, path):
    """Download url to path unless it exists: into a temporary file first, so a failed download
    leaves nothing."""
    if os.path.exists(path):
        return
    print(f"downloading {url} to {path}")
    tmp = path + ".tmp"
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(tmp, "wb") as f:
            f.write(response.read())
        os.replace(tmp, path)
    except OSError as e:  # URLError, HTTPError and timeouts are all OSErrors
        reason = getattr(e, "reason", None) or e.strerror or e
        raise UserError(
            f"{path} is missing and downloading it failed ({reason}); "
            f"put input.txt there, or pass --input=/path/to/input.txt"
        ) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_out_dir(out_dir):
    """Fail now, not after an hour of tokenizing, when out_dir cannot be created or written."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".write_test_{os.getpid()}")
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to the output directory {out_dir}: {e.strerror}") from None


def check_free_space(folder, needed, what):
    """Fail up front, with the numbers, when folder's disk has less than `needed` bytes free."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise UserError(
            f"not enough free disk space in {folder} for {what}: needs ~{needed / 1e9:,.1f} GB "
            f"(estimate plus --reserve_gb), {free / 1e9:,.1f} GB free"
        )


@contextlib.contextmanager
def atomic_outputs(paths, remove=()):
    """Yield a temporary path (same directory, '.tmp' added) for each final path, one of them the
    tokenizer record. Only when the block finishes are they fsynced and renamed onto the final
    names, and the files in `remove` deleted, as one set: first a marker replaces the record ("being
    replaced"), then the other files go into place, then the new record replaces the marker. An
    interruption at any point leaves the old set, the new set, or the marker, which train.py refuses
    in one line (tokenizer.data_tokenizer), never a mix it
    would train on. If the block fails or is interrupted the temporary files are deleted."""
    tmps = [p + ".tmp" for p in paths]
    record = next(p for p in paths if os.path.basename(p) == RECORD)
    folder = os.path.dirname(os.path.abspath(record))
    replacing = False
    try:
        yield tmps
        for tmp in tmps:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())  # the data is on disk before the rename makes it visible
        with open(record + ".marker", "w", encoding="utf-8") as f:
            json.dump(
                {"replacing": "a prepare script was replacing these files and was interrupted"}, f
            )
            f.flush()
            os.fsync(f.fileno())
        os.replace(record + ".marker", record)
        fsync_dir(folder)  # the marker is in place before any file of the new set is
        replacing = True
        for tmp, path in zip(tmps, paths):
            if path != record:
                os.replace(tmp, path)
        for path in remove:
            if os.path.exists(path):
                os.remove(path)
        fsync_dir(folder)
        os.replace(record + ".tmp", record)
        fsync_dir(folder)  # and the renames themselves survive a crash
    except OSError as e:  # e.g. disk full
        left = (
            "partly replaced, which train.py refuses: prepare again"
            if replacing
            else "as they were"
        )
        raise UserError(
            f"cannot write the output files in {folder} ({e.strerror or e}); the files there are "
            f"{left}"
        ) from None
    finally:
        for tmp in [*tmps, record + ".marker"]:
            if os.path.exists(tmp):
                os.remove(tmp)


def fsync_dir(folder):
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_outputs(out_dir, splits, meta=None, bpe_json=None):
    """Write each split (name -> token ids) as <name>.bin of uint16, the tokenizer record (GPT-2,
    the char vocabulary when meta is given, the BPE when bpe_json is) and meta.pkl or bpe.json
    when given."""
    extra = {"meta.pkl": meta, bpe.FILE: bpe_json}
    names = [f"{name}.bin" for name in splits] + [RECORD] + [n for n, v in extra.items() if v]
    # a meta.pkl left by an earlier char-level run would make train.py and sample.py use its
    # vocabulary; a bpe.json, which no record names any more, would only mislead
    stale = [os.path.join(out_dir, n) for n, v in extra.items() if not v]
    if bpe_json:  # the record names the file; the checkpoint will carry the JSON itself
        record = {k: v for k, v in bpe.make_record(bpe_json).items() if k != "json"}
        record["file"] = bpe.FILE
    else:
        record = char_record(meta) if meta is not None else gpt2_record()
    with atomic_outputs([os.path.join(out_dir, name) for name in names], remove=stale) as tmps:
        for tmp, ids in zip(tmps, splits.values()):
            with open(tmp, "wb") as f:
                # (ndarray.tofile loses the OS error)
                f.write(np.asarray(ids, dtype=np.uint16).tobytes())
        write_record(tmps[len(splits)], record, {name: len(ids) for name, ids in splits.items()})
        if meta is not None:
            with open(tmps[len(splits) + 1], "wb") as f:
                pickle.dump(meta, f)
        if bpe_json:
            with open(tmps[-1], "wb") as f:  # the bytes that the record's sha256 names
                f.write(bpe_json.encode("utf-8"))


def train_hint(out_dir):
    """How to point train.py at out_dir: by dataset name when it is a folder of data/, else by
    path."""
    data = os.path.dirname(os.path.abspath(__file__))
    name = os.path.basename(os.path.normpath(out_dir))
    where = (
        f"--dataset={name}"
        if os.path.dirname(os.path.abspath(out_dir)) == data
        else f"--data_dir={out_dir}"
    )
    return f"train on it with: python train.py {where}"


def split_documents(documents, val_fraction):
    """(train, val) lists of documents: the first 1 - val_fraction of their characters and the
    rest, the document at the boundary cut in two."""
    cut = int(sum(map(len, documents)) * (1 - val_fraction))
    for i, doc in enumerate(documents):
        if cut <= len(doc):
            return documents[:i] + [doc[:cut]], [doc[cut:]] + documents[i + 1 :]
        cut -= len(doc)


def bpe_splits(documents, val_fraction, vocab_size):
    """The BPE learned from the train split's documents, and both splits' token ids, with the
    end-of-text token between documents. Returns (bpe.json's text, {'train': ids, 'val': ids})."""
    parts = dict(zip(("train", "val"), split_documents(documents, val_fraction)))
    chunks = (c for doc in parts["train"] for c in bpe.text_chunks(doc))
    tok = bpe.train(chunks, vocab_size)
    print(f"vocab size: {tok.get_vocab_size():,}")
    if tok.get_vocab_size() < vocab_size:
        print(f"(the train split has too few distinct pairs of tokens for {vocab_size:,})")
    tok.encode_special_tokens = True  # '<|endoftext|>' written in the text is just text
    splits = {}
    for name, docs in parts.items():
        ids = []
        for i, doc in enumerate(d for d in docs if d):
            ids += [tok.token_to_id(ENDOFTEXT)] if i else []
            for enc in tok.encode_batch_fast(list(bpe.text_chunks(doc)), add_special_tokens=False):
                ids += enc.ids
        splits[name] = ids
    tok.encode_special_tokens = False  # a prompt's '<|endoftext|>' is the token, as with GPT-2
    return tok.to_str(), splits


def prepare(text, out_dir, tokenizer="char", val_fraction=0.1, vocab_size=4096):
    """Split text (a string, or a list of documents; first 1 - val_fraction for train), tokenize
    both parts and write them to out_dir. Returns {'train': n_tokens, 'val': n_tokens}."""
    if tokenizer not in ("char", "gpt2", "bpe"):
        raise UserError(f"--tokenizer must be 'char', 'gpt2' or 'bpe', not '{tokenizer}'")
    if not 0 < val_fraction < 1:
        raise UserError(f"--val_fraction must be between 0 and 1, not {val_fraction}")
    documents = [text] if isinstance(text, str) else text
    text = "\n\n".join(documents)
    print(f"length of dataset in characters: {len(text):,}")
    n = len(text)
    parts = {
        "train": text[: int(n * (1 - val_fraction))],
        "val": text[int(n * (1 - val_fraction)) :],
    }
    meta = bpe_json = None
    if tokenizer == "bpe":
        bpe_json, splits = bpe_splits(documents, val_fraction, vocab_size)
    elif tokenizer == "char":
        meta = char_meta(text)
        print(f"vocab size: {meta['vocab_size']:,}")
        encode, _ = char_codec(meta)
    else:
        # ordinary: '<|endoftext|>' in the text is just text
        encode = gpt2_encoding().encode_ordinary
    if tokenizer != "bpe":
        splits = {name: encode(part) for name, part in parts.items()}
    for name, ids in splits.items():
        if not ids:
            raise UserError(f"the text is too short: its {name} split is empty")
        print(f"{name} has {len(ids):,} tokens")
    write_outputs(out_dir, splits, meta, bpe_json)
    written = [f"{name}.bin" for name in splits] + [RECORD]
    written += ["meta.pkl"] if meta else [bpe.FILE] if bpe_json else []
    print(f"wrote {', '.join(written)} to {out_dir}")
    return {name: len(ids) for name, ids in splits.items()}


# val_fraction, test_size: each split gets some
FRACTION_OF_TEXT = Range(0, 1, open_lo=True, open_hi=True)


def check_settings(c):
    """Each setting's allowed values (configurator.check), before anything is touched."""
    check(
        c,
        dict(
            input=ANY,
            out_dir=ANY,
            tokenizer=OneOf("char", "gpt2", "bpe"),
            vocab_size=ANY,
            val_fraction=FRACTION_OF_TEXT,
        ),
    )
    if c["tokenizer"] == "bpe":
        bpe.check_vocab_size(c["vocab_size"])
    if not c["input"]:
        raise UserError(
            "say which text to prepare: --input=path/to/file.txt (or a folder of .txt files)"
        )


if __name__ == "__main__":
    check_settings(configure(globals()))
    if not out_dir:
        name = os.path.splitext(os.path.basename(os.path.normpath(input)))[0]
        out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
    check_out_dir(out_dir)
    prepare(read_documents(input), out_dir, tokenizer, val_fraction, vocab_size)
    print(train_hint(out_dir))
