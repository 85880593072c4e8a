"""
Your own tokenizer: a byte-level BPE, as GPT-2's, learned from your text with Hugging Face
tokenizers and kept as its JSON. A data folder holds it as bpe.json, named by sha256 in the folder's
tokenizer.json; a checkpoint carries the JSON itself in its tokenizer record, so a model decodes
with no data folder around; export_hf writes it beside the weights for transformers.

    tok = train(texts, vocab_size)        # learned from an iterable of strings (streamed)
    record = make_record(tok.to_str())    # {'tokenizer': 'bpe', ..., 'sha256', 'json'}
    tok = tokenizer(record)               # the tokenizers.Tokenizer a record carries
    fast = hf_tokenizer(record, 1024)     # a transformers tokenizer, for model.export_hf
"""

import functools
import hashlib
import os

from tiktoken_ext.openai_public import ENDOFTEXT

from configurator import UserError

FILE = "bpe.json"  # the BPE itself (Hugging Face tokenizers' JSON), beside the data's record
FORMAT = 1  # the version of the bpe record; a record of a newer one is refused, naming it
MIN_VOCAB = 256 + 1  # the smallest BPE: the 256 byte values and <|endoftext|>, no merge
MAX_VOCAB = 2**16  # token ids are stored as uint16


def check_vocab_size(vocab_size):
    """Refuse a BPE vocabulary smaller than its alphabet or larger than uint16 token ids hold."""
    if type(vocab_size) is not int or not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise UserError(
            f"vocab_size must be from {MIN_VOCAB} (the 256 byte values plus {ENDOFTEXT}) to "
            f"{MAX_VOCAB:,} (what uint16 token ids hold), got {vocab_size!r}"
        )


def text_chunks(text, size=1 << 20):
    """text in pieces of about `size` characters, each cut where a non-space character meets a
    space: no piece of GPT-2's pre-tokenizing regex spans such a point (none ends in a space after
    a non-space), so encoding the pieces gives the ids of encoding the whole."""
    start = 0
    while len(text) - start > size:
        cut = start + size
        while cut > start and not (text[cut].isspace() and not text[cut - 1].isspace()):
            cut -= 1
        cut = cut if cut > start else start + size  # no such point: one long word, cut anyway
        yield text[start:cut]
        start = cut
    yield text[start:]


def train(texts, vocab_size):
    """A byte-level BPE of vocab_size tokens (fewer when the text has too few distinct pairs)
    learned from texts, an iterable of strings. The text is streamed: memory holds the counts of
    its distinct words, not the text. As GPT-2's: the text is split by GPT-2's regex, every byte is
    a token (any text round-trips, no unknown token) and <|endoftext|> is the last id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    check_vocab_size(vocab_size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's regex, bytes
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,  # the last id is <|endoftext|>, added after training
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens([ENDOFTEXT])
    return tok


def make_record(json_text):
    """The tokenizer record of a trained BPE, given as its JSON (Tokenizer.to_str()): what a
    checkpoint carries, the BPE itself included, named by its sha256."""
    tok = tokenizer({"json": json_text})
    return {
        "tokenizer": "bpe",
        "format": FORMAT,
        "vocab_size": tok.get_vocab_size(),
        "eot_token": tok.token_to_id(ENDOFTEXT),
        "sha256": hashlib.sha256(json_text.encode("utf-8")).hexdigest(),
        "json": json_text,
    }


def read_file(data_dir, record):
    """The text of a data folder's bpe.json, refused unless it is the file its record names by
    sha256 (damaged, edited by hand, or copied in from another folder)."""
    path = os.path.join(data_dir, FILE)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}); prepare the data again") from None
    if hashlib.sha256(data).hexdigest() != record.get("sha256"):
        raise UserError(
            f"{path} does not match the sha256 that its tokenizer record names: it was damaged "
            "or edited by hand; prepare the data again"
        )
    return data.decode("utf-8")


def check(record, where):
    """Raise UserError unless a bpe record is of a format this code reads, with its JSON matching
    its sha256 (where: what holds it, for the message)."""
    version = record.get("format")
    if type(version) is int and version > FORMAT:
        raise UserError(
            f"{where} holds a BPE tokenizer of format {version}, newer than this code reads "
            f"(format {FORMAT}): update this code to read it"
        )
    text = record.get("json")
    if (
        type(version) is not int
        or not isinstance(text, str)
        or hashlib.sha256(text.encode("utf-8")).hexdigest() != record.get("sha256")
    ):
        raise UserError(
            f"{where} is damaged or of a format this code does not know: its BPE tokenizer has "
            "no format version, or does not match its sha256"
        )


def tokenizer(record):
    """The tokenizers.Tokenizer a bpe record carries (read once per distinct tokenizer)."""
    return _from_json(record["json"])


@functools.lru_cache(maxsize=8)
def _from_json(json_text):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_str(json_text)
    except Exception as e:  # tokenizers raises a plain Exception for JSON it cannot read
        raise UserError(f"the BPE tokenizer cannot be read ({str(e)[:80]})") from None


def hf_tokenizer(record, block_size):
    """A bpe record's tokenizer as transformers' PreTrainedTokenizerFast, with <|endoftext|> its
    bos and eos: model.export_hf(path, tokenizer=...) saves it beside the weights
    (tokenizer.json, tokenizer_config.json), where AutoTokenizer loads it."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer(record),
        bos_token=ENDOFTEXT,
        eos_token=ENDOFTEXT,
        model_max_length=block_size,
        clean_up_tokenization_spaces=False,  # else ' ,' would decode as ','
    )
