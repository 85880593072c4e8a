"""
Real-run data: OpenWebText read from the hub repository's own archives (a replica of its layout built
here), FineWeb-Edu from parquet files in the hub's columns, the tokenizer record that every prepare script
writes and train.py / sample.py check, and data_order='epoch'. Everything offline, on data the tests build.
"""
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

from conftest import ROOT, SHAKESPEARE, TINY, error_line, hermetic_env, read_log
from test_data import assert_user_error, documents, read_bin, run  # noqa: F401 (documents: a fixture)

sys.path.insert(0, os.path.join(ROOT, "data"))
import runtime  # noqa: E402
import tokenizer  # noqa: E402


def load_script(path):
    """A prepare script as a module (its __main__ block does not run), to call its functions."""
    spec = importlib.util.spec_from_file_location(os.path.basename(os.path.dirname(path)), os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- OpenWebText's hub archives

def tar_bytes(members, compression=""):
    """A tar (xz-compressed when compression='xz') of (name, bytes or None for a directory), in this order."""
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
    """The hub repository Skylion007/openwebtext in miniature: openwebtext.py beside subsets/urlsf_subsetNN.tar,
    each tar holding openwebtext/urlsf_subsetNN-K_data.xz members, each an xz tar of NNNNNNN-<hash>.txt files,
    members deliberately not in sorted order, plus what the loading script skips (directories, hidden files,
    names not ending in .xz / .txt). Returns the documents as the loading script yields them, in order."""
    os.makedirs(os.path.join(folder, "subsets"))
    with open(os.path.join(folder, "openwebtext.py"), "w") as f:
        f.write("# the loading script that datasets >= 4.0 refuses to run\n")
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
            outer.append((f"openwebtext/urlsf_subset{subset:02d}-{part}_data.xz", tar_bytes(inner, "xz")))
        with open(os.path.join(folder, "subsets", f"urlsf_subset{subset:02d}.tar"), "wb") as f:
            f.write(tar_bytes(outer))
    return expected


@pytest.fixture(scope="module")
def owt(tmp_path_factory, documents):
    """The replica, its expected documents, and prepare.py's output from those documents given as a .jsonl
    file (the loading path that does not involve archives), to compare against."""
    folder = tmp_path_factory.mktemp("owt")
    expected = build_owt_replica(str(folder / "repo"), documents)
    with open(folder / "docs.jsonl", "w", encoding="utf-8") as f:
        for doc in expected:
            f.write(json.dumps({"text": doc}) + "\n")
    result = run("data/openwebtext/prepare.py", f"--source={folder / 'docs.jsonl'}", f"--out_dir={folder / 'reference'}",
                 "--test_size=0.1", "--num_proc=1", cwd=str(folder))
    assert result.returncode == 0, result.stderr
    return folder, expected


def test_openwebtext_archives_yield_the_loading_scripts_documents(owt):
    folder, expected = owt
    prepare = load_script("data/openwebtext/prepare.py")
    archives = sorted(str(p) for p in (folder / "repo" / "subsets").iterdir())
    assert [d["text"] for d in prepare.openwebtext_documents(archives)] == expected


@pytest.mark.parametrize("where", ["local_copy", "hub_cache"])
def test_openwebtext_from_archives_equals_the_plain_path(owt, tmp_path, where):
    folder, expected = owt
    if where == "local_copy":  # --source= a folder holding the repository's files
        source = [f"--source={folder / 'repo'}"]
    else:  # the default source, offline, its repository already downloaded into the hub cache
        snapshot = tmp_path / "hf_home" / "hub" / "datasets--Skylion007--openwebtext"
        os.makedirs(snapshot / "refs")
        (snapshot / "refs" / "main").write_text("0" * 40)
        os.makedirs(snapshot / "snapshots")
        os.symlink(folder / "repo", snapshot / "snapshots" / ("0" * 40))
        source = []
    out = tmp_path / "out"
    result = run("data/openwebtext/prepare.py", *source, f"--out_dir={out}", "--test_size=0.1", "--num_proc=2",
                 cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert (out / name).read_bytes() == (folder / "reference" / name).read_bytes(), name
    assert sorted(os.listdir(out)) == ["tokenizer.json", "train.bin", "val.bin"]
    record = json.loads((out / "tokenizer.json").read_text())
    assert record["tokenizer"] == "gpt2" and sum(record["tokens"].values()) == \
        len(read_bin(out / "train.bin")) + len(read_bin(out / "val.bin"))
