"""
Prepare OpenWebText (or any corpus of documents) for GPT-2 training, as nanoGPT does: hold out a
random 0.05% of the documents as val, tokenize every document with GPT-2 BPE plus the end-of-text
token 50256, and write all ids of each split into one flat uint16 file, train.bin and val.bin.

    python data/openwebtext/prepare.py                             # the Hugging Face hub dataset
    python data/openwebtext/prepare.py --source=my_corpus/ --out_dir=data/my_corpus
    python data/openwebtext/prepare.py --source='dumps/*.jsonl' --text_column=content

--source may be a hub dataset name, a folder written by Dataset.save_to_disk, a local copy of the
hub repository Skylion007/openwebtext (its subsets/urlsf_subset*.tar archives), or local files: a
path, a folder or a glob of .txt (one document per file), .json/.jsonl, .parquet or .csv files.

OpenWebText on the hub is a loading script (openwebtext.py), which datasets 4.0 and later refuse to
run. Then this script reads the archives that the loading script reads, downloaded through
huggingface_hub (resumable, with progress bars, into its cache), and yields the same documents with
the same cleaning in the same order (see openwebtext_documents), so the seed-2357 split puts the
same documents in val.

The tokenized corpus is never held in memory: datasets keeps it in its cache on disk
(HF_DATASETS_CACHE, which also needs room for the text: ~54 GB for OpenWebText) and it is copied
into the output files in batches, a chunk of documents at a time, so peak memory stays ~0.5 GB
whatever the corpus size (bench_prepare.py measures it). val.bin holds nanoGPT's val documents in
nanoGPT's order (the same bytes); train.bin holds the same documents as nanoGPT's, in corpus order
rather than shuffled (see below). For the full OpenWebText: train.bin ~17 GB (~9B tokens), val.bin
~8.5 MB (~4M tokens).
"""

import glob
import os
import re
import sys
import tarfile
import time

import datasets
import numpy as np
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict, Features, List, Value, load_dataset, load_from_disk
from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError
from tqdm import tqdm

# repo root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
# data/, for prepare_text
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import ANY, NON_NEGATIVE, POSITIVE, SEED, UserError, check, configure
from prepare_text import (
    FRACTION_OF_TEXT,
    atomic_outputs,
    check_free_space,
    check_out_dir,
    train_hint,
)
from nanogpt.tokenizer import RECORD, gpt2_encoding, gpt2_record, write_record

# -----------------------------------------------------------------------------
# hub dataset name, save_to_disk folder, or local .txt/.json/.jsonl/.parquet/.csv files
source = 'openwebtext'
text_column = 'text'  # the column holding each document's text
out_dir = os.path.dirname(os.path.abspath(__file__))  # where train.bin and val.bin go
num_proc = os.cpu_count() or 1  # worker processes for loading and tokenizing
# fraction of documents held out as val (nanoGPT's split: ~4,000 OpenWebText documents)
test_size = 0.0005
seed = 2357  # of that random split, nanoGPT's value, so the same documents end up in val
# documents tokenized by each new set of worker processes: bounds memory, see below
chunk = 20000
write_batch = 1024  # documents per batch when copying token ids into train.bin / val.bin
# free disk space to leave after the estimated output; checked before tokenizing
reserve_gb = 1.0
# -----------------------------------------------------------------------------
FILE_BUILDERS = {
    '.txt': 'text',
    '.json': 'json',
    '.jsonl': 'json',
    '.parquet': 'parquet',
    '.csv': 'csv',
}
# where the canonical name lives on the hub now
HUB_REPOS = {'openwebtext': 'Skylion007/openwebtext'}
# what the hub's openwebtext.py reads: 21 tars of .xz tars of .txt files
ARCHIVES = 'subsets/urlsf_subset*.tar'


def openwebtext_documents(archives):
    """Every document of the archives as {'text': ...}, as the hub's loading script yields them: it
    walks each archive with datasets' iter_archive (a streamed tar, regular files only, names
    starting with '.' or '__' skipped), opens each member ending in .xz as a compressed tar the same
    way, and takes each member ending in .txt, decoded as UTF-8, runs of 3+ newlines cut to 2,
    stripped."""

    def members(tar):
        for member in tar:
            if member.isreg() and not os.path.basename(member.name).startswith(('.', '__')):
                yield member
            tar.members = []  # a streamed tar remembers every member it has passed; forget them

    for archive in archives:
        with tarfile.open(archive, mode='r|*') as outer:
            for xz in members(outer):
                if not xz.name.endswith('.xz'):
                    continue
                with tarfile.open(fileobj=outer.extractfile(xz), mode='r|*') as inner:
                    for txt in members(inner):
                        if txt.name.endswith('.txt'):
                            text = inner.extractfile(txt).read().decode('utf-8')
                            yield {'text': re.sub('\n\n\n+', '\n\n', text).strip()}


def load_archives(archives):
    """The documents of OpenWebText archives as a datasets.Dataset, written to the datasets cache by
    num_proc processes, each reading consecutive archives, concatenated in archive order."""
    return Dataset.from_generator(
        openwebtext_documents,
        features=Features({'text': Value('string')}),
        gen_kwargs={'archives': archives},
        num_proc=min(num_proc, len(archives)),
        split='train',
    )


def load_hub(name):
    """A hub dataset through load_dataset; where that refuses a loading script (datasets >= 4.0), or
    is offline, the OpenWebText archives of the hub repository (downloaded, or from the hub
    cache)."""
    repo = HUB_REPOS.get(name, name)
    try:
        return load_dataset(repo, split='train', num_proc=num_proc)
    except (RuntimeError, ConnectionError) as e:
        if 'Dataset scripts are no longer supported' not in str(e) and not constants.HF_HUB_OFFLINE:
            raise
        refused = e
    # room for what is left to download, and for the text (~3x the archives)
    if not constants.HF_HUB_OFFLINE:
        plan = snapshot_download(repo, repo_type='dataset', allow_patterns=[ARCHIVES], dry_run=True)
        to_download = sum(f.file_size or 0 for f in plan if f.will_download)
        unpacked = 3 * sum(f.file_size or 0 for f in plan)
        for folder, needed, what in [
            (constants.HF_HUB_CACHE, to_download, f"the archives of {repo}"),
            (datasets.config.HF_DATASETS_CACHE, unpacked, "the documents in the datasets cache"),
        ]:
            os.makedirs(folder, exist_ok=True)
            check_free_space(folder, needed + int(reserve_gb * 1e9), what)
    try:  # resumes partial downloads, skips finished ones, shows a progress bar per file
        folder = snapshot_download(repo, repo_type='dataset', allow_patterns=[ARCHIVES])
    except LocalEntryNotFoundError:
        raise UserError(
            f"cannot load --source={name}: offline (HF_HUB_OFFLINE=1) and {repo} is not in the hub "
            f"cache {constants.HF_HUB_CACHE}"
        ) from None
    archives = sorted(glob.glob(os.path.join(folder, ARCHIVES)))
    if not archives:
        raise refused
    why = 'offline' if constants.HF_HUB_OFFLINE else 'load_dataset refused its loading script'
    print(f"{name}: {why}; reading its {len(archives)} archives from {folder}")
    return load_archives(archives)


def load_source(source):
    """The corpus as one datasets.Dataset of documents, from the hub, a save_to_disk folder or local
    files."""
    path = os.path.expanduser(source)
    if any(os.path.exists(os.path.join(path, f)) for f in ('state.json', 'dataset_dict.json')):
        dataset = load_from_disk(path)
        return dataset['train'] if isinstance(dataset, DatasetDict) else dataset
    archives = sorted(glob.glob(os.path.join(path, ARCHIVES)))
    # a local copy of the hub repository, e.g. from `hf download Skylion007/openwebtext ...`
    if archives:
        return load_archives(archives)
    if os.path.isdir(path):
        paths = glob.glob(os.path.join(path, '**', '*'), recursive=True)
    else:
        paths = glob.glob(path)
    files = sorted(p for p in paths if os.path.splitext(p)[1].lower() in FILE_BUILDERS)
    if paths or os.path.isdir(path):  # local files
        builders = {FILE_BUILDERS[os.path.splitext(p)[1].lower()] for p in files}
        if len(builders) != 1:
            raise UserError(
                f"--source={source} must name files of one kind among {', '.join(FILE_BUILDERS)}; "
                f"found {len(files)} such files"
                + (f" of kinds {sorted(builders)}" if files else "")
            )
        builder = builders.pop()
        # a whole .txt file is one document
        options = {'sample_by': 'document'} if builder == 'text' else {}
        return load_dataset(
            builder, data_files=files, split='train', num_proc=min(num_proc, len(files)), **options
        )
    if source.startswith(('/', '.', '~')) or os.path.splitext(source)[1].lower() in FILE_BUILDERS:
        raise UserError(f"--source not found: {source}")
    return load_hub(source)  # a hub dataset, e.g. openwebtext


if __name__ == '__main__':
    # every setting's allowed values, before anything is touched (the source is checked by loading
    # it)
    check(
        configure(globals()),
        dict(
            source=ANY,
            text_column=ANY,
            out_dir=ANY,
            num_proc=POSITIVE,
            test_size=FRACTION_OF_TEXT,
            seed=SEED,
            chunk=POSITIVE,
            write_batch=POSITIVE,
            reserve_gb=NON_NEGATIVE,
        ),
    )
    check_out_dir(out_dir)
    enc = gpt2_encoding()
    t0 = time.time()

    try:
        dataset = load_source(source)
    except UserError:
        raise
    # offline and not cached, no such dataset, unreadable files: one line, not a traceback
    except Exception as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else ''
        raise UserError(f"cannot load --source={source}: {type(e).__name__}: {message}") from None
    if text_column not in dataset.column_names:
        raise UserError(
            f"--source={source} has no '{text_column}' column "
            f"(it has {', '.join(dataset.column_names)}); "
            f"pick one with --text_column="
        )
    if len(dataset) < 2:
        raise UserError(
            f"--source={source} has {len(dataset)} document(s); a train/val split needs at least 2"
        )
    # GPT-2 BPE averages ~4.2 bytes of text per token, 2 bytes each in the output: ~half the text's
    # size
    check_free_space(
        out_dir, dataset.data.nbytes // 2 + int(reserve_gb * 1e9), 'train.bin and val.bin'
    )

    # owt by default only contains the 'train' split, so hold out val documents with nanoGPT's
    # split. It is run on a column of document numbers, which gives the same split as on the text
    # (it depends only on the number of documents, test_size and seed) and tells us which documents
    # are val: val.bin gets them in nanoGPT's shuffled order, byte for byte the same file, while
    # train.bin gets the others in corpus order (nanoGPT: shuffled; training samples random windows,
    # so the order doesn't matter), see below for why.
    try:
        numbers = Dataset.from_dict({'doc': np.arange(len(dataset))})
        val_docs = np.array(
            numbers.train_test_split(test_size=test_size, seed=seed, shuffle=True)['test']['doc']
        )
    except ValueError as e:  # e.g. --test_size=1.5, or too few documents for it
        raise UserError(f"--test_size={test_size}: {e}") from None
    is_val = np.zeros(len(dataset), dtype=bool)
    is_val[val_docs] = True
    splits = {'train': np.flatnonzero(~is_val), 'val': val_docs}
    del numbers, is_val

    def process(example):
        # encode_ordinary ignores any special tokens
        ids = enc.encode_ordinary(example[text_column])
        ids.append(enc.eot_token)  # add the end of text token, 50256 for gpt2 bpe
        return {'ids': ids}

    # Tokenize and write `chunk` documents at a time, each chunk in fresh worker processes (datasets
    # starts a pool per map call), reading the corpus front to back. datasets memory-maps its files,
    # and every page of them a process has read counts as its resident memory until the process
    # exits or the file is closed; this keeps memory flat whatever the corpus size. (Reading in
    # shuffled order, nanoGPT's workers end up with the whole corpus file resident.) Token ids go
    # into the datasets cache as uint16 (the default, int64, makes it 4x larger), and into the
    # output with plain sequential writes rather than nanoGPT's np.memmap, whose written pages would
    # count as resident memory too.
    datasets.disable_progress_bars()  # one bar per split below rather than one per chunk
    paths = [os.path.join(out_dir, f'{split}.bin') for split in splits] + [
        os.path.join(out_dir, RECORD)
    ]
    counts = {}
    # a char run's, stale
    with atomic_outputs(paths, remove=[os.path.join(out_dir, 'meta.pkl')]) as tmps:
        for (split, docs), tmp in zip(splits.items(), tmps):
            n_tokens = 0
            with (
                open(tmp, 'wb') as f,
                tqdm(total=len(docs), unit='doc', desc=f'tokenizing {split}') as bar,
            ):
                for start in range(0, len(docs), chunk):
                    # (just the indices)
                    part = dataset.select(docs[start : start + chunk], keep_in_memory=True)
                    tokenized = part.map(
                        process,
                        remove_columns=dataset.column_names,
                        num_proc=min(num_proc, len(part)),
                        features=Features({'ids': List(Value('uint16'))}),
                    )
                    for batch in tokenized.with_format('arrow').iter(batch_size=write_batch):
                        arr_batch = pc.list_flatten(batch['ids']).to_numpy()
                        f.write(arr_batch.tobytes())
                        n_tokens += len(arr_batch)
                    bar.update(len(part))
                    bar.set_postfix(tokens=f'{n_tokens:,}')
                    del part, tokenized, batch  # closes this chunk's cache file
            print(f"{split}.bin: {n_tokens:,} tokens from {len(docs):,} documents")
            counts[split] = n_tokens
        write_record(tmps[-1], gpt2_record(), counts)
    if os.path.exists(os.path.join(out_dir, 'meta.pkl')):
        # an earlier char-level run's vocabulary is not this data's
        os.remove(os.path.join(out_dir, 'meta.pkl'))
    print(
        f"done in {time.time() - t0:,.1f} s: {sum(counts.values()):,} tokens "
        f"from {len(dataset):,} documents; "
        f"wrote {', '.join(os.path.basename(p) for p in paths)} "
        f"({sum(os.path.getsize(p) for p in paths) / 1e9:,.2f} GB) to {out_dir}"
    )
    print(train_hint(out_dir))

# train.bin is ~17GB, val.bin ~8.5MB
# train has ~9B tokens (9,035,582,198)
# val has ~4M tokens (4,434,897)

# to read the bin files later, e.g. with numpy:
# m = np.memmap('train.bin', dtype=np.uint16, mode='r')
