"""Every user mistake train.py knows of ends with one line `error: ...` on stderr, exit status 1, no
traceback, and nothing in out_dir overwritten."""

import os
import pickle

import numpy as np
import pytest
import torch

from conftest import error_line

EXISTING = {'ckpt.pt': b'an earlier run\'s checkpoint', 'log.jsonl': b'{"iter": 0, "loss": 4.2}\n'}


@pytest.fixture
def out_dir(tmp_path):
    """An out_dir holding an earlier run's files, which no failing run may touch."""
    out = tmp_path / 'out'
    out.mkdir()
    for name, content in EXISTING.items():
        (out / name).write_bytes(content)
    return out


def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()} if folder.is_dir() else None


def fails_with(train, out_dir, *args):
    """Run train.py, expect a one-line user error, check out_dir is untouched; return the line.
    --overwrite=True:
    even a run allowed to replace the earlier one touches nothing when it fails before its first
    save."""
    before = snapshot(out_dir)
    line = error_line(train(f'--out_dir={out_dir}', '--overwrite=True', *args, check=False))
    assert snapshot(out_dir) == before
    return line


def write_dataset(folder, train_tokens, val_tokens, vocab_size=65):
    folder.mkdir()
    np.array(train_tokens, dtype=np.uint16).tofile(folder / 'train.bin')
    np.array(val_tokens, dtype=np.uint16).tofile(folder / 'val.bin')
    # a character vocabulary as nanoGPT writes it
    itos = {i: chr(0x100 + i) for i in range(vocab_size)}
    with open(folder / 'meta.pkl', 'wb') as f:
        pickle.dump(
            {'vocab_size': vocab_size, 'itos': itos, 'stoi': {c: i for i, c in itos.items()}}, f
        )
    return folder


@pytest.mark.parametrize(
    'args, message',
    [
        (['--batch_size=0'], 'error: batch_size must be at least 1, got 0'),
        (
            ['--gradient_accumulation_steps=-1'],
            'error: gradient_accumulation_steps must be at least 1, got -1',
        ),
        (['--n_embd=30', '--n_head=4'], 'error: n_embd (30) must be divisible by n_head (4)'),
        (['--n_layr=2'], "error: unknown config key 'n_layr'; did you mean n_layer"),
        (['--batch_size=abc'], "error: --batch_size: expected int like 12, got 'abc'"),
        (['config/no_such_config.py'], 'error: config file not found: config/no_such_config.py'),
        (['--init_from=gpt3'], "error: unknown pretrained model 'gpt3'"),
    ],
)
def test_bad_settings(train, out_dir, args, message):
    assert fails_with(train, out_dir, *args).startswith(message)


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has a GPU')
def test_cuda_without_gpu(train, out_dir):
    assert (
        fails_with(train, out_dir, '--device=cuda')
        == "error: device 'cuda' requested but no CUDA GPU is available here; use --device=cpu "
        "(or auto)"
    )


def test_unknown_dataset(train, out_dir):
    line = fails_with(train, out_dir, '--dataset=no_such_dataset', '--data_dir=')
    assert line.startswith(
        "error: unknown dataset 'no_such_dataset': the datasets are the folders of data/ ("
    )
    assert 'shakespeare_char' in line


def test_dataset_not_prepared(train, out_dir, tmp_path):
    (tmp_path / 'empty').mkdir()
    line = fails_with(train, out_dir, f'--data_dir={tmp_path / "empty"}')
    prepare = os.path.join('data', 'shakespeare_char', 'prepare.py')
    assert line.startswith(
        f"error: train.bin not found in {tmp_path / 'empty'}: prepare the dataset first with "
        "python "
    )
    assert line.endswith(prepare)


def test_validation_data_shorter_than_block(train, out_dir, tmp_path):
    data = write_dataset(tmp_path / 'short', list(range(60)) * 10, list(range(10)))
    assert (
        fails_with(train, out_dir, f'--data_dir={data}')
        == 'error: val.bin has 10 tokens, too few for block_size 32: use --block_size=9 or less'
    )


def test_too_little_data_hint_fits_both_splits(train, out_dir, tmp_path):
    data = write_dataset(tmp_path / 'short', list(range(20)), list(range(10)))
    assert (
        fails_with(train, out_dir, f'--data_dir={data}')
        == 'error: train.bin has 20 tokens, too few for block_size 32: use --block_size=9 or less'
    )


def test_token_id_beyond_vocabulary(train, out_dir, tmp_path):
    data = write_dataset(tmp_path / 'big_ids', [1, 2, 70] * 100, list(range(60)))
    assert (
        fails_with(train, out_dir, f'--data_dir={data}')
        == "error: train.bin holds token id 70 but the model's vocab_size is 65: the data was "
        "prepared for another vocabulary"
    )


def test_out_dir_not_writable(train, tmp_path):
    (tmp_path / 'a_file').write_text('')
    line = fails_with(train, tmp_path / 'a_file' / 'out')
    assert (
        line
        == f"error: out_dir must be a path for a folder: not an existing file, nor under a file, "
        "got "
        f"'{tmp_path / 'a_file' / 'out'}'"
    )


def test_resume_without_checkpoint(train, tmp_path):
    line = fails_with(train, tmp_path, '--init_from=resume')
    assert line.startswith(f"error: no checkpoint at {tmp_path / 'ckpt.pt'}: train one first")


def resume_fails(train, tmp_path, content):
    (tmp_path / 'ckpt.pt').write_bytes(content)
    return fails_with(train, tmp_path, '--init_from=resume')


def test_resume_truncated_checkpoint(train, tmp_path):
    path = tmp_path / 'ckpt.pt'
    torch.save({'model': {'w': torch.zeros(1000)}, 'model_args': {}}, path)
    line = resume_fails(train, tmp_path, path.read_bytes()[:2000])
    assert (
        line == f"error: checkpoint {path} is truncated or corrupt (not a complete PyTorch file); "
        "delete it, or restore it from a copy"
    )


def test_resume_checkpoint_of_unknown_format(train, tmp_path):
    path = tmp_path / 'ckpt.pt'
    torch.save({'weights': torch.zeros(3)}, path)
    line = resume_fails(train, tmp_path, path.read_bytes())
    assert (
        line
        == f"error: {path} is not a nanoGPT checkpoint: it has no model, optimizer, model_args, "
        "iter_num"
    )


def test_resume_checkpoint_with_pickled_objects(train, tmp_path):
    path = tmp_path / 'ckpt.pt'
    # a numpy array is pickled, not stored as a tensor
    torch.save({'model': {}, 'model_args': np.zeros(3)}, path)
    line = resume_fails(train, tmp_path, path.read_bytes())
    assert line.startswith(
        f"error: checkpoint {path} holds pickled Python objects besides tensors and plain values"
    )
