"""Your own tokenizer: a byte-level BPE trained by data/prepare_text.py --tokenizer=bpe. Unicode
round-trips in several scripts; one tiny model trained on a BPE dataset gives the same greedy text
through sample.py (streamed or not), serve.py (streamed, with a stop string) and transformers'
pipeline on its export, with no data folder around; eval.py's bits per byte against a direct
computation for char, GPT-2 and BPE models; the refusals of mismatched and damaged tokenizers."""

import json
import math
import os
import shutil
import subprocess
import sys

import httpx
import numpy as np
import pytest
import torch
from torch.nn import functional as F

from conftest import ROOT, SHAKESPEARE, TINY, error_line, hermetic_env, read_log
from test_serve import start_server

sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "data"))
import prepare_text  # noqa: E402
from configurator import UserError  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from nanogpt import bpe, checkpoints, tokenizer  # noqa: E402

# each script has characters of several UTF-8 lengths: 2 (accents, Cyrillic), 3 (Bengali, CJK), 4
POEM = [
    "Élan, café, naïve façade — ça va.",
    "Привет, мир! Как дела сегодня?",
    "আমার সোনার বাংলা, আমি তোমায় ভালোবাসি।",
    "春眠不觉晓，处处闻啼鸟。夜来风雨声。",
    "emoji: 🤖🎉 and 👩‍👩‍👧 family 🇧🇩",
]
UNSEEN = [
    "Ñandú über Œuvre — ﬁ ligature ½",
    "Съешь же ещё этих мягких французских булок",
    "কখনো দেখিনি এমন অক্ষর: ঋ ঌ ৠ",
    "龍鳳呈祥，魑魅魍魉，𠜎𠜱𠝹",
    "🦄🧬🫠 new emoji, a ZWJ 🧑‍🚀 and a flag 🏴‍☠️",
    "ภาษาไทย العربية 한국어 עברית",
    "\x00\x01 control \x7f and <|endoftext|> written out",
    "",
]


def run(script, *args, check=True):
    cmd = [sys.executable, os.path.join(ROOT, script), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env=hermetic_env(), timeout=240)
    assert not check or result.returncode == 0, result.stdout + result.stderr
    return result


def poem_text(n):
    """The poem's lines, numbered, n times over: a text a tiny model learns by heart."""
    return "".join(f"{i % 10} {line}\n" for i in range(n) for line in POEM)


def test_round_trip_in_several_scripts_with_unseen_text():
    tok = bpe.train(iter([poem_text(20)]), 400)
    assert tok.get_vocab_size() == 400 and tok.token_to_id(bpe.ENDOFTEXT) == 399
    record = bpe.make_record(tok.to_str())
    encode, decode = tokenizer.load_tokenizer(record=record)
    for text in POEM + UNSEEN:
        ids = encode(text)
        assert decode(ids) == text
        # no unknown token: the tokens spell every byte of the text (<|endoftext|> counts none)
        n_bytes = len(text.replace(bpe.ENDOFTEXT, "").encode("utf-8"))
        assert tokenizer.token_bytes(record)[ids].sum() == n_bytes
    # an unseen character is spelled by its bytes, a token each: its first token alone is no text
    ids = encode("𠜎")
    assert len(ids) == 4 and decode(ids[:1]) == "\ufffd"
    # '<|endoftext|>' in a prompt is the end-of-text token, as with GPT-2
    assert encode("a<|endoftext|>b")[1] == 399


def test_chunks_encode_as_the_whole_text():
    text = open(SHAKESPEARE, encoding="utf-8").read()[:200_000] + poem_text(50)
    tok = bpe.train(iter([text]), 1000)
    chunks = list(bpe.text_chunks(text, size=1000))
    assert "".join(chunks) == text and len(chunks) > 100
    ids = [i for e in tok.encode_batch_fast(chunks) for i in e.ids]
    assert ids == tok.encode(text).ids


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained on the poem with a 320-token BPE (few merges: characters split over
    tokens), its data folder then moved away: everything after reads the checkpoint alone."""
    tmp = tmp_path_factory.mktemp("bpe")
    data, out = tmp / "data", tmp / "out"
    os.makedirs(data)
    prepare_text.prepare(poem_text(60), str(data), "bpe", vocab_size=320)
    args = [f"--data_dir={data}", *TINY, "--n_embd=64", "--block_size=64", "--batch_size=8",
            "--max_iters=150", "--eval_interval=150", "--eval_iters=2", "--learning_rate=1e-2",
            "--warmup_iters=0", "--lr_decay_iters=150", f"--out_dir={out}"]  # fmt: skip
    run("train.py", *args)
    moved = tmp / "data-elsewhere"
    shutil.move(data, moved)
    return dict(out=str(out), data=str(moved), args=args)


def sample(out, prompt, n, stream=False):
    result = run("sample.py", f"--out_dir={out}", "--device=cpu", f"--start={prompt}",
                 "--num_samples=1", f"--max_new_tokens={n}", "--temperature=0",
                 f"--stream={stream}")  # fmt: skip
    assert "decoding with the checkpoint's tokenizer: bpe (320 tokens, sha256" in result.stderr
    return result.stdout.removesuffix("\n---------------\n")


def test_same_greedy_text_through_sample_serve_and_transformers(trained, tmp_path):
    out, prompt, n = trained["out"], "3 Привет", 50
    text = sample(out, prompt, n)
    assert sample(out, prompt, n, stream=True) == text
    # the model learned its poem, whose characters span tokens: streaming held their bytes back
    assert "আমার সোনার বাংলা" in text
    checkpoint = checkpoints.load_checkpoint(os.path.join(out, "ckpt.pt"))
    encode, decode = tokenizer.load_tokenizer(record=checkpoint["tokenizer"])
    ids = encode(text)[len(encode(prompt)) :]
    assert any(decode(ids[k : k + 1]).endswith("\ufffd") for k in range(len(ids)))

    proc, url = start_server(f"--out_dir={out}")
    try:
        completion = text[len(prompt) :]
        stop = completion[25:28]
        body = dict(prompt=prompt, max_tokens=n, temperature=0, stream=True, stop=[stop])
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            chunks = [json.loads(line[6:]) for line in response.iter_lines() if "{" in line]
        assert (
            "".join(c["choices"][0]["text"] for c in chunks) == completion[: completion.index(stop)]
        )
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        assert not any("\ufffd" in c["choices"][0]["text"] for c in chunks)
    finally:
        proc.terminate()
        proc.communicate(timeout=30)

    from transformers import pipeline

    model = GPT(GPTConfig(**checkpoint["model_args"], gelu=checkpoints.checkpoint_gelu(checkpoint)))
    model.load_state_dict(checkpoint["model"])
    block_size = model.config.block_size
    model.export_hf(str(tmp_path), tokenizer=bpe.hf_tokenizer(checkpoint["tokenizer"], block_size))
    pipe = pipeline("text-generation", model=str(tmp_path), device="cpu")
    generated = pipe(prompt, max_new_tokens=n, do_sample=False, return_full_text=False)
    assert generated[0]["generated_text"] == completion


def bpb_by_hand(model, ids, size_in_bytes):
    """Bits per byte of ids's non-overlapping windows (as eval.py's), token by token;
    size_in_bytes(token ids) is the number of bytes they spell."""
    T = model.config.block_size
    nats, targets = 0.0, []
    with torch.no_grad():
        for s in range(0, len(ids) - T, T):
            x, y = torch.tensor([ids[s : s + T]]), torch.tensor(ids[s + 1 : s + T + 1])
            logits, _ = model(x, torch.tensor([ids[s + 1 : s + T + 1]]))
            nats += F.cross_entropy(logits[0], y, reduction="sum").item()
            targets += ids[s + 1 : s + T + 1]
    return nats / (math.log(2) * size_in_bytes(targets))


@pytest.mark.parametrize("kind", ["char", "gpt2"])
def test_eval_bits_per_byte_equals_a_direct_computation(tmp_path, kind):
    text = open(SHAKESPEARE, encoding="utf-8").read()[:3000] + "Ünïcödé, 中文 and 🤖.\n"
    record = tokenizer.char_record(tokenizer.char_meta(text)) if kind == "char" else None
    record = record or tokenizer.gpt2_record()
    torch.manual_seed(0)
    vocab = record["vocab_size"] if kind == "char" else 50304
    args = dict(n_layer=1, n_head=2, n_embd=32, block_size=32, bias=False, vocab_size=vocab)
    model = GPT(GPTConfig(**args, dropout=0.0)).eval()
    torch.save(dict(model=model.state_dict(), model_args=args, iter_num=0, gelu="exact",
                    tokenizer=record), tmp_path / "ckpt.pt")  # fmt: skip
    (tmp_path / "val.txt").write_text(text, encoding="utf-8")
    run("eval.py", f"--out_dir={tmp_path}", f"--val_path={tmp_path / 'val.txt'}", "--device=cpu")
    result = json.loads((tmp_path / "eval.json").read_text())["results"]["val"]
    encode, decode = tokenizer.load_tokenizer(record=record)
    if kind == "char":
        size = lambda ids: len(decode(ids).encode("utf-8"))  # noqa: E731
    else:  # windows may begin or end inside a character: count the bytes themselves
        size = lambda ids: len(tokenizer.gpt2_encoding().decode_bytes(ids))  # noqa: E731
    assert result["bpb"] == pytest.approx(bpb_by_hand(model, encode(text), size), rel=1e-5)


def test_eval_and_train_log_bits_per_byte_of_the_bpe_model(trained):
    out, data = trained["out"], trained["data"]
    run(
        "eval.py", f"--out_dir={out}", f"--val_path={os.path.join(data, 'val.bin')}", "--device=cpu"
    )
    result = json.loads(open(os.path.join(out, "eval.json")).read())["results"]["val"]
    checkpoint = checkpoints.load_checkpoint(os.path.join(out, "ckpt.pt"))
    model = GPT(GPTConfig(**checkpoint["model_args"], gelu=checkpoints.checkpoint_gelu(checkpoint)))
    model.load_state_dict(checkpoint["model"])
    _, decode = tokenizer.load_tokenizer(record=checkpoint["tokenizer"])
    val = np.fromfile(os.path.join(data, "val.bin"), dtype=np.uint16).tolist()
    # the bytes of byte-level tokens, through GPT-2's byte <-> character map in transformers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    tok = bpe.tokenizer(checkpoint["tokenizer"])
    size = lambda ids: len(bytes(byte_of[c] for i in ids for c in tok.id_to_token(i)))  # noqa: E731
    assert result["bpb"] == pytest.approx(bpb_by_hand(model.eval(), val, size), rel=1e-5)
    # train.py's estimate: its val loss over the val split's mean bytes per token
    row = read_log(out)[1][150]
    n_bytes = len(decode(val).encode("utf-8"))
    assert row["val_bpb"] == pytest.approx(row["val_loss"] * len(val) / n_bytes / math.log(2))


def test_mismatched_and_damaged_tokenizers_are_refused(trained, tmp_path):
    out, args = trained["out"], trained["args"]
    # data of another BPE: train.py refuses to resume on it, naming both tokenizers
    other = str(tmp_path)
    prepare_text.prepare(poem_text(60), other, "bpe", vocab_size=300)
    resume = [a for a in args if not a.startswith(("--data_dir", "--out_dir"))]
    resume += ["--init_from=resume", f"--out_dir={out}", f"--data_dir={other}", "--max_iters=151"]
    line = error_line(run("train.py", *resume, check=False))
    assert "uses the tokenizer bpe (320 tokens, sha256" in line
    assert "was made by bpe (300 tokens, sha256" in line
    # a bpe.json edited by hand no longer matches the sha256 of its record
    path = tmp_path / bpe.FILE
    path.write_text(path.read_text(encoding="utf-8").replace('"Ġ"', '"Ġ "', 1), encoding="utf-8")
    with pytest.raises(UserError, match="bpe.json does not match the sha256 .* edited by hand"):
        tokenizer.data_tokenizer(other)
    # a checkpoint whose tokenizer is of a newer format (sample.py's one line names it), or whose
    # tokenizer does not match its sha256
    checkpoint = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    newer = dict(checkpoint, tokenizer=dict(checkpoint["tokenizer"], format=2))
    torch.save(newer, tmp_path / "ckpt.pt")
    line = error_line(run("sample.py", f"--out_dir={tmp_path}", "--device=cpu", check=False))
    assert "holds a BPE tokenizer of format 2, newer than this code reads (format 1)" in line
    damaged = dict(checkpoint["tokenizer"], json=checkpoint["tokenizer"]["json"][:-2] + " }")
    with pytest.raises(UserError, match="damaged .* does not match its sha256"):
        checkpoints.check_checkpoint(dict(checkpoint, tokenizer=damaged), "ckpt.pt")
