"""
Prepare FineWeb-Edu (HuggingFaceFW/fineweb-edu, the educational part of FineWeb) for GPT-2 training,
the way data/openwebtext/prepare.py prepares OpenWebText: every document tokenized with GPT-2 BPE
plus the end-of-text token 50256, written as uint16 ids to train.bin and val.bin, with
tokenizer.json beside them.

    python data/fineweb_edu/prepare.py             # sample-10BT: ~10B tokens, ~20 GB of output
    python data/fineweb_edu/prepare.py --max_tokens=1e9         # only the first ~1B tokens
    python data/fineweb_edu/prepare.py --source=~/fineweb-edu --out_dir=data/fineweb_edu_local

It goes shard by shard: one parquet file is downloaded (resumable, with a progress bar), read in
batches of documents, tokenized by tiktoken's threads and appended to the outputs, then deleted, so
neither memory nor the disk ever holds the whole corpus (only the output and one shard). Val is
spread through the stream: a document goes to val.bin while val holds less than test_size of all
tokens so far, so it is never empty and stays the same for any --max_tokens. Nothing appears in
out_dir until the end: train.bin, val.bin and tokenizer.json are renamed into place together, and
Ctrl-C leaves whatever was there before.
"""

import glob
import os
import shutil
import signal
import sys
import time

import numpy as np
import pyarrow.parquet as pq
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError

# repo root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
# data/, for prepare_text
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import ANY, NON_NEGATIVE, POSITIVE, UserError, check, configure
from prepare_text import (
    FRACTION_OF_TEXT,
    atomic_outputs,
    check_free_space,
    check_out_dir,
    train_hint,
)
from nanogpt.tokenizer import RECORD, gpt2_encoding, gpt2_record, write_record

# -----------------------------------------------------------------------------
# hub dataset, or a local folder (searched recursively) or file of parquet
source = 'HuggingFaceFW/fineweb-edu'
# 'sample-10BT', 'sample-100BT', 'sample-350BT', 'default' or a dump, 'CC-MAIN-2024-10'
config = 'sample-10BT'
text_column = 'text'  # the column holding each document's text
# where train.bin, val.bin and tokenizer.json go
out_dir = os.path.dirname(os.path.abspath(__file__))
# stop before the document that takes train + val past this many tokens (e.g. 1e9); 0: all
max_tokens = 0.0
test_size = 0.0005  # the fraction of tokens held out as val (~5M of sample-10BT's 10B)
batch_rows = 1024  # documents read and tokenized at a time
num_threads = os.cpu_count() or 1  # tiktoken's encoding threads
# keep each downloaded shard (in out_dir/.downloads) instead of deleting it once tokenized
keep_downloads = False
# free disk space to leave after the estimated output; checked before starting
reserve_gb = 1.0
# -----------------------------------------------------------------------------


def config_prefix(config):
    """Where a config's parquet files are in the hub repository (its README's `configs`)."""
    if config == 'default':
        return 'data/'
    if config.startswith('sample-'):
        return f"sample/{config[len('sample-') :]}/"
    return f'data/{config}/'


def local_shards(path, config):
    """The parquet files of a local file or folder, in path order; in a copy of the whole
    repository,
    only the config's own."""
    path = os.path.expanduser(path)
    if os.path.isfile(path):
        return [path]
    files = sorted(glob.glob(os.path.join(path, '**', '*.parquet'), recursive=True))
    inside = [
        f
        for f in files
        if os.path.relpath(f, path).replace(os.sep, '/').startswith(config_prefix(config))
    ]
    return inside or files


def hub_shards(repo, config):
    """(name, size in bytes) of the config's parquet files in the hub repository, in name order."""
    try:
        entries = HfApi().list_repo_tree(
            repo,
            path_in_repo=config_prefix(config).rstrip('/'),
            repo_type='dataset',
            recursive=True,
        )
        shards = sorted((e.path, e.size) for e in entries if e.path.endswith('.parquet'))
    except OfflineModeIsEnabled:
        raise UserError(
            f"cannot list the files of {repo}: offline (HF_HUB_OFFLINE=1); download them first "
            f"and pass --source=<that folder>"
        ) from None
    except RepositoryNotFoundError:
        raise UserError(
            f"no dataset {repo} on the hub (or it is private or gated): check --source="
        ) from None
    except HfHubHTTPError as e:
        # the repository is there, the folder not
        if e.response is not None and e.response.status_code == 404:
            shards = []
        else:
            raise UserError(
                f"cannot list the files of {repo} on the hub: {str(e).splitlines()[0]}"
            ) from None
    except OSError as e:  # no network: the HTTP client's connection errors
        raise UserError(
            f"cannot reach the hub to list {repo}'s files ({type(e).__name__}); check the network, "
            f"or pass --source=<a folder of its parquet files>"
        ) from None
    if not shards:
        raise UserError(
            f"{repo} has no parquet files for --config={config} "
            f"(looked under {config_prefix(config)})"
        )
    return shards


def estimated_output_bytes(shard_bytes, text_bytes):
    """What train.bin + val.bin will take: 2 bytes a token, GPT-2 BPE averaging ~4.2 bytes of text a
    token. text_bytes (uncompressed, from the parquet metadata) when known, else the parquet files'
    size."""
    estimate = text_bytes // 2 if text_bytes else shard_bytes
    return min(estimate, 2 * int(max_tokens)) if max_tokens else estimate


def text_bytes_of(path):
    """The uncompressed size of the text column in a parquet file, from its metadata (nothing is
    read)."""
    meta = pq.ParquetFile(path).metadata
    names = [meta.schema.column(i).name for i in range(meta.num_columns)]
    if text_column not in names:
        raise UserError(
            f"{path} has no '{text_column}' column (it has {', '.join(names)}); "
            f"pick one with --text_column="
        )
    i = names.index(text_column)
    return sum(
        meta.row_group(g).column(i).total_uncompressed_size for g in range(meta.num_row_groups)
    )


def interrupted(signum, frame):
    raise UserError(
        f"interrupted: nothing was written to {out_dir} (what was there before is untouched)"
    )


if __name__ == '__main__':
    # every setting's allowed values, before anything is touched (the source is checked by reading
    # it)
    check(
        configure(globals()),
        dict(
            source=ANY,
            config=ANY,
            text_column=ANY,
            out_dir=ANY,
            max_tokens=NON_NEGATIVE,
            test_size=FRACTION_OF_TEXT,
            batch_rows=POSITIVE,
            num_threads=POSITIVE,
            reserve_gb=NON_NEGATIVE,
        ),
    )
    check_out_dir(out_dir)
    enc = gpt2_encoding()
    local = os.path.exists(os.path.expanduser(source))
    if local:
        shards = [(path, os.path.getsize(path)) for path in local_shards(source, config)]
        if not shards:
            raise UserError(f"no .parquet files in {source}")
        # also checks the column in every file
        text_bytes = sum(text_bytes_of(path) for path, _ in shards)
    elif source.startswith(('/', '.', '~')) or source.endswith('.parquet'):
        raise UserError(f"--source not found: {source}")
    else:
        shards, text_bytes = hub_shards(source, config), 0
    download_dir = os.path.join(out_dir, '.downloads')
    downloads = (
        0
        if local
        else (
            sum(size for _, size in shards) if keep_downloads else max(size for _, size in shards)
        )
    )
    check_free_space(
        out_dir,
        estimated_output_bytes(sum(size for _, size in shards), text_bytes)
        + downloads
        + int(reserve_gb * 1e9),
        'train.bin and val.bin' + (' and the downloads' if downloads else ''),
    )

    # Ctrl-C: one line, and atomic_outputs deletes the partial files
    signal.signal(signal.SIGINT, interrupted)
    t0 = time.time()
    counts, n_docs, full = {'train': 0, 'val': 0}, {'train': 0, 'val': 0}, False
    paths = [os.path.join(out_dir, name) for name in ('train.bin', 'val.bin', RECORD)]
    # a char run's, stale
    with atomic_outputs(paths, remove=[os.path.join(out_dir, 'meta.pkl')]) as tmps:
        with open(tmps[0], 'wb') as train_file, open(tmps[1], 'wb') as val_file:
            files = {'train': train_file, 'val': val_file}
            for k, (shard, size) in enumerate(shards):
                print(f"shard {k + 1}/{len(shards)}: {shard} ({size / 1e6:,.0f} MB)", flush=True)
                path = (
                    shard
                    if local
                    else hf_hub_download(source, shard, repo_type='dataset', local_dir=download_dir)
                )
                parquet = pq.ParquetFile(path)
                columns = parquet.schema_arrow.names
                if text_column not in columns:
                    raise UserError(
                        f"{shard} has no '{text_column}' column (it has {', '.join(columns)}); "
                        f"pick one with --text_column="
                    )
                for batch in parquet.iter_batches(batch_size=batch_rows, columns=[text_column]):
                    docs = enc.encode_ordinary_batch(
                        batch.column(0).to_pylist(), num_threads=num_threads
                    )
                    for ids in docs:
                        ids.append(enc.eot_token)  # 50256 ends every document
                        if max_tokens and counts['train'] + counts['val'] + len(ids) > max_tokens:
                            full = True
                            break
                        total = counts['train'] + counts['val'] + len(ids)
                        split = 'val' if counts['val'] < test_size * total else 'train'
                        files[split].write(np.array(ids, dtype=np.uint16).tobytes())
                        counts[split] += len(ids)
                        n_docs[split] += 1
                    if full:
                        break
                print(
                    f"  {sum(counts.values()):,} tokens so far ({time.time() - t0:,.0f} s)",
                    flush=True,
                )
                if not local and not keep_downloads:
                    os.remove(path)  # one shard on disk at a time
                if full:
                    break
        if counts['val'] == 0 or counts['train'] == 0:
            raise UserError(
                f"only {sum(counts.values())} tokens: too few for a train and a val split; "
                f"raise --max_tokens"
            )
        write_record(tmps[2], gpt2_record(), counts)
    if not keep_downloads:
        shutil.rmtree(download_dir, ignore_errors=True)
    if os.path.exists(os.path.join(out_dir, 'meta.pkl')):
        # an earlier char-level run's vocabulary is not this data's
        os.remove(os.path.join(out_dir, 'meta.pkl'))
    for split in counts:
        print(
            f"{split}.bin: {counts[split]:,} tokens from {n_docs[split]:,} documents "
            f"({os.path.getsize(os.path.join(out_dir, f'{split}.bin')) / 1e6:,.1f} MB)"
        )
    stopped = f", stopped at --max_tokens={int(max_tokens):,}" if full else ""
    print(
        f"done in {time.time() - t0:,.1f} s: {sum(counts.values()):,} tokens from "
        f"{sum(n_docs.values()):,} documents of {k + 1} of {len(shards)} shards{stopped}; "
        f"wrote train.bin, val.bin, {RECORD} to {out_dir}"
    )
    print(train_hint(out_dir))
