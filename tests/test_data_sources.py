"""
Real-run data: OpenWebText read from the hub repository's own archives (a replica of its layout
built here), FineWeb-Edu from parquet files in the hub's columns, the tokenizer record that every
prepare script writes and train.py / sample.py check, and data_order='epoch'. Everything offline, on
data the tests build.
"""

import http.server
import functools
import hashlib
import importlib.util
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import threading
import urllib.parse

import numpy as np
import pytest
import torch

from conftest import ROOT, SHAKESPEARE, error_line, hermetic_env, read_log
from test_data import assert_user_error, documents, read_bin, run, split_like_nanogpt  # noqa: F401 (a fixture)

sys.path.insert(0, os.path.join(ROOT, "data"))
from nanogpt import dataloader  # noqa: E402
from nanogpt import tokenizer  # noqa: E402


def load_script(path):
    """A prepare script as a module (its __main__ block does not run), to call its functions."""
    spec = importlib.util.spec_from_file_location(
        os.path.basename(os.path.dirname(path)), os.path.join(ROOT, path)
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- OpenWebText's hub
# archives


def tar_bytes(members, compression=""):
    """A tar (xz-compressed when compression='xz') of (name, bytes or None for a directory), in this
    order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=f"w:{compression}" if compression else "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def build_owt_replica(folder, documents):
    """The hub repository Skylion007/openwebtext in miniature: openwebtext.py beside
    subsets/urlsf_subsetNN.tar, each tar holding openwebtext/urlsf_subsetNN-K_data.xz members, each
    an xz tar of NNNNNNN-<hash>.txt files, members deliberately not in sorted order, plus what the
    loading script skips (directories, hidden files, names not ending in .xz / .txt). Returns the
    documents as the loading script yields them, in order."""
    os.makedirs(os.path.join(folder, "subsets"))
    with open(os.path.join(folder, "openwebtext.py"), "w") as f:
        f.write("# the loading script that datasets >= 4.0 refuses to run\n")
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write("---\npretty_name: OpenWebText\n---\n")
    expected, k = [], 0
    for subset in range(3):
        outer = [("openwebtext", None), ("openwebtext/README", b"not an .xz")]
        for part in (2, 1, 3):  # archive order, not sorted order
            inner = [("x", None), ("._hidden.txt", b"skipped"), ("notes.md", b"skipped")]
            for _ in range(len(documents) // 9):
                doc = documents[k % len(documents)]
                raw = f"\n\n{doc}\n\n\n\nsecond paragraph {k}\r\n\n\n\n\n  ".encode()
                inner.append((f"{9999999 - k:07d}-{k:032x}.txt", raw))
                expected.append(re.sub("\n\n\n+", "\n\n", raw.decode()).strip())
                k += 1
            outer.append(
                (f"openwebtext/urlsf_subset{subset:02d}-{part}_data.xz", tar_bytes(inner, "xz"))
            )
        with open(os.path.join(folder, "subsets", f"urlsf_subset{subset:02d}.tar"), "wb") as f:
            f.write(tar_bytes(outer))
    return expected


@pytest.fixture(scope="module")
def owt(tmp_path_factory, documents):
    """The replica, its expected documents, and prepare.py's output from the replica as a local copy
    of the
    repository (--source=<its folder>)."""
    folder = tmp_path_factory.mktemp("owt")
    expected = build_owt_replica(str(folder / "repo"), documents)
    result = run(
        "data/openwebtext/prepare.py",
        f"--source={folder / 'repo'}",
        f"--out_dir={folder / 'out'}",
        "--test_size=0.1",
        "--num_proc=2",
        cwd=str(folder),
    )
    assert result.returncode == 0, result.stderr
    return folder, expected


def test_openwebtext_archives_yield_the_loading_scripts_documents(owt):
    folder, expected = owt
    prepare = load_script("data/openwebtext/prepare.py")
    archives = sorted(str(p) for p in (folder / "repo" / "subsets").iterdir())
    assert [d["text"] for d in prepare.openwebtext_documents(archives)] == expected


def test_openwebtext_from_a_local_copy_of_the_repository(owt):
    # the same bins as the path without archives gives for the same documents (see test_data.py)
    folder, expected = owt
    enc = tokenizer.gpt2_encoding()
    for split, docs in split_like_nanogpt(expected, 0.1).items():
        assert read_bin(folder / "out" / f"{split}.bin").tolist() == [
            i for doc in docs for i in enc.encode_ordinary(doc) + [50256]
        ]
    assert sorted(os.listdir(folder / "out")) == ["tokenizer.json", "train.bin", "val.bin"]
    record = json.loads((folder / "out" / "tokenizer.json").read_text())
    assert record["tokenizer"] == "gpt2" and record["tokens"] == {
        s: len(read_bin(folder / "out" / f"{s}.bin")) for s in ("train", "val")
    }


def test_openwebtext_default_source_offline_from_the_hub_cache(owt, tmp_path):
    # python data/openwebtext/prepare.py, offline, with the repository already in the hub cache
    folder, _ = owt
    repo = tmp_path / "hf_home" / "hub" / "datasets--Skylion007--openwebtext"
    os.makedirs(repo / "refs")
    (repo / "refs" / "main").write_text("0" * 40)
    os.makedirs(repo / "snapshots")
    os.symlink(folder / "repo", repo / "snapshots" / ("0" * 40))
    result = run(
        "data/openwebtext/prepare.py",
        f"--out_dir={tmp_path / 'out'}",
        "--test_size=0.1",
        "--num_proc=1",
        cwd=str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert "reading its 3 archives" in result.stdout
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert (tmp_path / "out" / name).read_bytes() == (folder / "out" / name).read_bytes(), name


def test_openwebtext_default_source_from_the_hub_refusing_its_loading_script(
    owt, local_hub, tmp_path
):
    # python data/openwebtext/prepare.py as on a fresh machine: load_dataset finds openwebtext.py
    # and refuses it
    folder, _ = owt
    result = run_online(
        "data/openwebtext/prepare.py",
        f"--out_dir={tmp_path / 'out'}",
        "--test_size=0.1",
        "--num_proc=1",
        cwd=str(tmp_path),
        endpoint=local_hub,
    )
    assert result.returncode == 0, result.stderr
    assert (
        "openwebtext: load_dataset refused its loading script; reading its 3 archives"
        in result.stdout
    )
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert (tmp_path / "out" / name).read_bytes() == (folder / "out" / name).read_bytes(), name
    snapshots = tmp_path / "hf_home" / "hub" / "datasets--Skylion007--openwebtext" / "snapshots"
    # downloaded into the hub cache
    assert len(list(snapshots.glob("*/subsets/urlsf_subset*.tar"))) == 3


# ----------------------------------------------------------------------------- FineWeb-Edu

FINEWEB_COLUMNS = [
    "text",
    "id",
    "dump",
    "url",
    "file_path",
    "language",
    "language_score",
    "token_count",
    "score",
    "int_score",
]


def write_fineweb_shard(path, texts):
    """A parquet file with FineWeb-Edu's columns, in several row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(texts)
    table = pa.table(
        {
            "text": texts,
            "id": [f"<urn:uuid:{i}>" for i in range(n)],
            "dump": ["CC-MAIN-2024-10"] * n,
            "url": [f"https://example.org/{i}" for i in range(n)],
            "file_path": ["s3://x.warc.gz"] * n,
            "language": ["en"] * n,
            "language_score": [0.9] * n,
            "token_count": [len(t) // 4 for t in texts],
            "score": [3.1] * n,
            "int_score": [3] * n,
        }
    )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path, row_group_size=40)


@pytest.fixture(scope="module")
def fineweb(tmp_path_factory, documents):
    """A copy of the hub repository's layout: sample/10BT/ with two shards (the documents, each made
    unique), and another config's shard under data/ that sample-10BT must not read. Returns (folder,
    documents)."""
    folder = tmp_path_factory.mktemp("fineweb") / "repo"
    docs = [f"document {i}: {doc}" for i, doc in enumerate(documents)]
    write_fineweb_shard(str(folder / "sample" / "10BT" / "000_00000.parquet"), docs[:200])
    write_fineweb_shard(str(folder / "sample" / "10BT" / "001_00000.parquet"), docs[200:])
    write_fineweb_shard(
        str(folder / "data" / "CC-MAIN-2024-10" / "000_00000.parquet"), ["not in sample-10BT"] * 50
    )
    return folder, docs


def split_documents(ids):
    """Token ids -> the list of documents' ids, each ending at (and without) the end-of-text
    token."""
    ends = np.flatnonzero(ids == 50256)
    return [ids[a + 1 : b].tolist() for a, b in zip(np.concatenate([[-1], ends[:-1]]), ends)]


def test_fineweb_edu_from_local_parquet_hub_and_max_tokens(fineweb, local_hub, tmp_path):
    folder, docs, hub = *fineweb, local_hub
    enc = tokenizer.gpt2_encoding()
    expected = [enc.encode_ordinary(doc) for doc in docs]
    outs = {}
    for name, extra in [("all", []), ("part", ["--max_tokens=20000"])]:
        outs[name] = out = tmp_path / name
        result = run(
            "data/fineweb_edu/prepare.py",
            f"--source={folder}",
            f"--out_dir={out}",
            "--test_size=0.05",
            "--batch_rows=64",
            *extra,
            cwd=str(tmp_path),
        )
        assert result.returncode == 0, result.stderr
        assert sorted(os.listdir(out)) == ["tokenizer.json", "train.bin", "val.bin"]
        assert re.search(r"done in .* tokens from .* documents of \d of 2 shards", result.stdout)
    train, val = (split_documents(read_bin(outs["all"] / f"{s}.bin")) for s in ("train", "val"))
    # every document once, whole; val spread through the stream, ~test_size of the tokens; train in
    # corpus order
    assert sorted(train + val) == sorted(expected) and len(train) + len(val) == len(docs)
    assert [d for d in expected if d not in val] == train
    n_val = sum(len(d) + 1 for d in val)
    total = n_val + sum(len(d) + 1 for d in train)
    assert 0.05 <= n_val / total < 0.05 + (max(map(len, val)) + 1) / total
    assert val[0] == expected[0] and val[-1] != expected[0]
    # --max_tokens: whole documents, the same prefix of each file, stopping before the limit would
    # be crossed
    part = {s: read_bin(outs["part"] / f"{s}.bin") for s in ("train", "val")}
    full = {s: read_bin(outs["all"] / f"{s}.bin") for s in ("train", "val")}
    total = sum(len(a) for a in part.values())
    next_doc = expected[len(split_documents(np.concatenate(list(part.values()))))]
    assert total <= 20000 and total + len(next_doc) + 1 > 20000
    for s in part:
        assert part[s].tolist() == full[s][: len(part[s])].tolist() and part[s][-1] == 50256
    record = json.loads((outs["part"] / "tokenizer.json").read_text())
    assert record["tokenizer"] == "gpt2" and record["tokens"] == {
        s: len(a) for s, a in part.items()
    }
    # the same from the hub (a local stand-in): downloaded shard by shard into out_dir/.downloads,
    # then deleted
    result = run_online(
        "data/fineweb_edu/prepare.py",
        f"--out_dir={tmp_path / 'hub'}",
        "--test_size=0.05",
        "--batch_rows=64",
        cwd=str(tmp_path),
        endpoint=hub,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path / "hub")) == ["tokenizer.json", "train.bin", "val.bin"]
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert (tmp_path / "hub" / name).read_bytes() == (outs["all"] / name).read_bytes(), name


@pytest.fixture(scope="module")
def local_hub(owt, fineweb):
    """A local stand-in for the hub's HTTP API holding two dataset repositories, the owt and fineweb
    fixtures' folders, with the routes and headers that datasets and huggingface_hub use: a
    repository's info, its tree, and its files. Any other repository gets the hub's answer for one
    that does not exist
    (404 with X-Error-Code: RepoNotFound). Yields its address, for HF_ENDPOINT."""
    repos = {"Skylion007/openwebtext": owt[0] / "repo", "HuggingFaceFW/fineweb-edu": fineweb[0]}
    api = re.compile(r"/api/datasets/([^/]+/[^/]+)/(revision|tree)/[^/]+/?(.*)")
    resolve = re.compile(r"/datasets/([^/]+/[^/]+)/resolve/[^/]+/(.*)")

    class Hub(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
            match = api.fullmatch(path) or resolve.fullmatch(path)
            folder = repos.get(match.group(1)) if match else None
            if folder is None:
                return self.reply(
                    404,
                    b'{"error":"Repository not found"}',
                    {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"},
                )
            if match.re is resolve:
                file = folder / match.group(2)
                if not file.is_file():
                    return self.reply(
                        404, b'{"error":"Entry not found"}', {"X-Error-Code": "EntryNotFound"}
                    )
                body = file.read_bytes()
                # the hub's etag of a large file: its sha256
                etag = f'"{hashlib.sha256(body).hexdigest()}"'
                return self.reply(200, body, {"X-Repo-Commit": "0" * 40, "ETag": etag})
            files = sorted(p for p in (folder / match.group(3)).rglob("*") if p.is_file())
            entries = [
                {
                    "type": "file",
                    "path": str(p.relative_to(folder)),
                    "size": p.stat().st_size,
                    "oid": f"{k:040x}",
                }
                for k, p in enumerate(files)
            ]
            info = {
                "id": match.group(1),
                "sha": "0" * 40,
                "private": False,
                "siblings": [{"rfilename": e["path"], "size": e["size"]} for e in entries],
            }
            self.reply(
                200,
                json.dumps(entries if match.group(2) == "tree" else info).encode(),
                {"Content-Type": "application/json"},
            )

        def do_HEAD(self):
            self.head_only = True
            self.do_GET()

        def reply(self, status, body, headers):
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not getattr(self, "head_only", False):
                self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def run_online(script, *args, cwd, endpoint):
    """run(), but with the hub client pointed at `endpoint` instead of offline."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(
        HF_HOME=os.path.join(cwd, "hf_home"),
        HF_DATASETS_CACHE=os.path.join(cwd, "hf_datasets"),
        HF_ENDPOINT=endpoint,
        HF_HUB_OFFLINE="0",
        HF_DATASETS_OFFLINE="0",
        HF_HUB_ETAG_TIMEOUT="5",
        HF_HUB_DOWNLOAD_TIMEOUT="5",
    )
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "script, case",
    [
        (script, case)
        for case in ("no_such_hub_dataset", "no_disk_space")
        for script in ("openwebtext", "fineweb_edu")
    ]
    + [("fineweb_edu", case) for case in ("offline", "unwritable_out_dir", "no_text_column")],
)
def test_bad_input_one_line_nothing_overwritten(fineweb, local_hub, tmp_path, script, case):
    # (test_data.py has openwebtext's other cases)
    folder, _ = fineweb
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.bin").write_bytes(b"\x07\x00" * 10)  # an earlier run's output, which must survive
    args, runner = [f"--out_dir={out}"], run
    if case == "no_such_hub_dataset":
        args.append("--source=no-such-user/no-such-dataset")
        expected = [
            "no-such-user/no-such-dataset",
            "n't exist" if script == "openwebtext" else "no dataset",
        ]
        runner = functools.partial(run_online, endpoint=local_hub)
    elif case == "offline":  # HF_HUB_OFFLINE=1
        expected = ["offline (HF_HUB_OFFLINE=1)"]
    elif case == "no_disk_space":
        args += [f"--source={folder}", "--reserve_gb=1e9"]
        expected = ["not enough free disk space in", "GB free"]
    elif case == "unwritable_out_dir":
        (tmp_path / "a_file").write_text("")
        args = [f"--source={folder}", f"--out_dir={tmp_path / 'a_file' / 'out'}"]
        expected = ["cannot write to the output directory"]
    elif case == "no_text_column":
        args += [f"--source={folder}", "--text_column=body"]
        expected = ["no 'body' column", "text, id, dump"]
    result = runner(f"data/{script}/prepare.py", *args, cwd=str(tmp_path))
    assert_user_error(result, *expected)
    assert os.listdir(out) == ["train.bin"] and (out / "train.bin").read_bytes() == b"\x07\x00" * 10


# ----------------------------------------------------------------------------- data_order='epoch'


def test_epoch_order_visits_every_window_once_per_epoch():
    n, sampler = 1000, dataloader.WindowSampler('epoch', seed=1337)
    # 3150 windows, batches straddle epochs
    drawn = torch.cat([sampler.draw(n, (3, 7)).flatten() for _ in range(150)])
    epochs = [drawn[e * n : (e + 1) * n] for e in range(3)]
    for order in epochs:
        assert sorted(order.tolist()) == list(range(n))
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[0], torch.arange(n))
    assert sampler.epoch(sampler.get_state(), n) == 3  # the 3150th window is in the 4th epoch
    again = dataloader.WindowSampler('epoch', seed=1337)  # the order depends on the seed only
    assert torch.equal(torch.cat([again.draw(n, (10,)) for _ in range(315)]), drawn)
    resumed = dataloader.WindowSampler('epoch', seed=1337)
    resumed.set_state({'data_order': 'epoch', 'windows_drawn': 1500})
    assert torch.equal(resumed.draw(n, (50,)), drawn[1500:1550])
    # a larger n
    assert (np.bincount(dataloader.shuffled(np.arange(2_000_003), 2_000_003, (1, 0))) == 1).all()


@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory):
    """A few hundred characters of tiny Shakespeare as char data (one epoch: 268 windows of 32) and
    as GPT-2 BPE data, both with their tokenizer.json, plus the char data in nanoGPT's format (no
    tokenizer.json)."""
    import prepare_text

    with open(SHAKESPEARE, encoding="utf-8") as f:
        text = f.read()
    root = tmp_path_factory.mktemp('tiny')
    for name in ('char', 'bpe', 'nanogpt_char'):
        os.makedirs(root / name)
    prepare_text.prepare(text[:400], str(root / 'char'), 'char', val_fraction=0.25)
    prepare_text.prepare(text[:20000], str(root / 'bpe'), 'gpt2')
    for name in ('train.bin', 'val.bin', 'meta.pkl'):
        (root / 'nanogpt_char' / name).write_bytes((root / 'char' / name).read_bytes())
    return root


# 16 windows a global batch, 2 micro-batches: epoch 0 ends during iteration 16; evals and
# checkpoints at 0, 12, 24
EPOCH_RUN = [
    '--data_order=epoch',
    '--batch_size=8',
    '--gradient_accumulation_steps=2',
    '--eval_interval=12',
    '--eval_iters=2',
    '--log_interval=1',
    '--dropout=0',
    '--learning_rate=1e-2',
    '--warmup_iters=4',
    '--lr_decay_iters=24',
]


@pytest.fixture(scope='module')
def epoch_straight(train, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp('epoch_straight')
    train(*EPOCH_RUN, f"--data_dir={tiny_data / 'char'}", '--max_iters=24', f'--out_dir={out}')
    return out


def test_epoch_order_logs_the_epoch_and_resumes_exactly(train, tiny_data, epoch_straight, tmp_path):
    from test_train import assert_same_run

    rows, _ = read_log(epoch_straight)
    assert [rows[it]['epoch'] for it in range(24)] == [
        ((it + 1) * 16 - 1) // 268 for it in range(24)
    ]
    assert [rows[it]['epoch'] for it in (15, 16)] == [0, 1]
    train(*EPOCH_RUN, f"--data_dir={tiny_data / 'char'}", '--max_iters=12', f'--out_dir={tmp_path}')
    train(
        *EPOCH_RUN,
        f"--data_dir={tiny_data / 'char'}",
        '--max_iters=24',
        '--init_from=resume',
        f'--out_dir={tmp_path}',
    )
    assert read_log(tmp_path)[0][20]['epoch'] == 1  # the resumed run logs the epoch too
    assert_same_run(epoch_straight, tmp_path)
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['sampler_state'] == {
        'data_order': 'epoch',
        'windows_drawn': 24 * 16,
    }
    wrong = train(
        *EPOCH_RUN[1:],
        f"--data_dir={tiny_data / 'char'}",
        '--max_iters=26',
        '--init_from=resume',
        f'--out_dir={tmp_path}',
        check=False,
    )
    assert "trained with data_order='epoch'; resume it with --data_order=epoch" in error_line(wrong)


def test_epoch_order_two_processes_match_one(train, tiny_data, epoch_straight, tmp_path):
    train(
        *EPOCH_RUN,
        f"--data_dir={tiny_data / 'char'}",
        '--max_iters=24',
        f'--out_dir={tmp_path}',
        torchrun=['--standalone', '--nproc_per_node=2'],
    )
    (one, one_evals), (two, two_evals) = read_log(epoch_straight), read_log(tmp_path)
    assert sorted(one) == sorted(two) == list(range(24)) and sorted(one_evals) == sorted(
        two_evals
    ) == [0, 12, 24]
    for it in one:
        assert (
            two[it]['loss'] == pytest.approx(one[it]['loss'], abs=1e-5)
            and two[it]['epoch'] == one[it]['epoch']
        )
    for it in one_evals:
        assert two_evals[it]['val_loss'] == pytest.approx(one_evals[it]['val_loss'], abs=1e-5)


# ----------------------------------------------------------------------------- the tokenizer record


def test_checkpoint_refuses_data_of_another_tokenizer(train, tiny_data, epoch_straight, tmp_path):
    # a char-level checkpoint on GPT-2 BPE data
    result = train(
        *EPOCH_RUN,
        f"--data_dir={tiny_data / 'bpe'}",
        '--max_iters=26',
        '--init_from=resume',
        f'--out_dir={epoch_straight}',
        check=False,
    )
    line = error_line(result)
    assert re.search(
        r"ckpt\.pt uses the tokenizer char \(\d+ characters, sha256 [0-9a-f]{8}\) but the data in "
        r".*bpe was made by gpt2 \(50257 tokens\)",
        line,
    ), line
    # and the reverse: a GPT-2 BPE checkpoint on char data, refused though its ids fit the larger
    # vocabulary
    train(
        f"--data_dir={tiny_data / 'bpe'}",
        '--max_iters=1',
        '--eval_interval=1',
        '--eval_iters=1',
        f'--out_dir={tmp_path}',
    )
    assert (
        torch.load(tmp_path / 'ckpt.pt', weights_only=True)['tokenizer'] == tokenizer.gpt2_record()
    )
    result = train(
        f"--data_dir={tiny_data / 'char'}",
        '--max_iters=2',
        '--init_from=resume',
        f'--out_dir={tmp_path}',
        check=False,
    )
    assert re.search(
        r"ckpt\.pt uses the tokenizer gpt2 \(50257 tokens\) "
        r"but the data in .*char was made by char",
        error_line(result),
    )


def test_nanogpt_data_folder_trains_and_sample_decodes_from_the_checkpoint(
    train, tiny_data, tmp_path
):
    data = tmp_path / 'data'
    os.makedirs(data)
    for name in ('train.bin', 'val.bin', 'meta.pkl'):  # nanoGPT's format: no tokenizer.json
        (data / name).write_bytes((tiny_data / 'nanogpt_char' / name).read_bytes())
    train(
        f'--data_dir={data}',
        '--max_iters=2',
        '--eval_interval=2',
        '--eval_iters=1',
        f'--out_dir={tmp_path}',
    )
    record = torch.load(tmp_path / 'ckpt.pt', weights_only=True)['tokenizer']
    assert record == tokenizer.char_record(tokenizer.load_meta(data / 'meta.pkl'))
    os.remove(data / 'meta.pkl')  # sample.py needs only the checkpoint now
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, 'sample.py'),
            f'--out_dir={tmp_path}',
            '--device=cpu',
            '--num_samples=1',
            '--max_new_tokens=20',
            '--start=First',
        ],
        capture_output=True,
        text=True,
        env=hermetic_env(),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    # stdout holds only the samples
    assert "decoding with the checkpoint's tokenizer: char (" in result.stderr
    sample = result.stdout.split('\n---------------\n')[0]
    assert (
        sample.startswith('First')
        and len(sample) == len('First') + 20
        and set(sample) <= set(record['chars'])
    )


def test_fineweb_edu_ctrl_c_leaves_out_dir_as_it_was(tmp_path, documents):
    source, out = tmp_path / "shards", tmp_path / "out"
    for k in range(12):  # ~2 MB of text a shard: tokenizing all of them takes seconds
        write_fineweb_shard(str(source / f"{k:03d}_00000.parquet"), [doc * 4 for doc in documents])
    out.mkdir()
    (out / "train.bin").write_bytes(b"\x07\x00" * 10)  # an earlier run's output
    env = hermetic_env(HF_HOME=str(tmp_path / "hf_home"))
    proc = subprocess.Popen(
        [
            sys.executable,
            os.path.join(ROOT, "data", "fineweb_edu", "prepare.py"),
            f"--source={source}",
            f"--out_dir={out}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    for line in proc.stdout:  # wait until it is tokenizing the second shard
        if line.startswith("shard 2/12"):
            break
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr)
    assert_user_error(result, "interrupted: nothing was written")
    assert os.listdir(out) == ["train.bin"] and (out / "train.bin").read_bytes() == b"\x07\x00" * 10
