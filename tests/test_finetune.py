"""Finetuning a model pretrained here: init_from=<its out_dir> (its weights only, a fresh run on
other data) and LoRA adapters (peft): only the adapters train, the checkpoint holds the merged
weights nanoGPT reads, resume is exact (float16 and SIGTERM included), and two processes (DDP or
FSDP) train like one."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from nanogpt import lora
from nanogpt import tokenizer
from configurator import UserError
from conftest import ROOT, SHAKESPEARE, error_line, read_log
from nanogpt.dataloader import get_batch
from model import GPT, GPTConfig
from test_train import assert_same_run, stop_with_sigterm, weights

PRETRAIN = [
    '--max_iters=30',
    '--learning_rate=1e-2',
    '--decay_lr=False',
    '--eval_interval=30',
    '--eval_iters=2',
]
# a LoRA finetuning run of the pretrained model: 2 micro-batches per iteration (the 2-process drill
# splits them)
LORA = [
    '--lora_rank=4',
    '--lora_alpha=8',
    '--gradient_accumulation_steps=2',
    '--learning_rate=1e-2',
    '--warmup_iters=2',
    '--lr_decay_iters=8',
    '--min_lr=1e-3',
    '--eval_interval=4',
    '--eval_iters=2',
]


@pytest.fixture(scope='module')
def pretrained(train, tmp_path_factory):
    """A tiny model pretrained here on tiny-shakespeare (char): its out_dir."""
    out = tmp_path_factory.mktemp('pretrained')
    train(*PRETRAIN, f'--out_dir={out}')
    return str(out)


@pytest.fixture(scope='module')
def other_data(shakespeare_char, tmp_path_factory):
    """Another prepared dataset of the same tokenizer: shakespeare_char with its splits swapped."""
    out = tmp_path_factory.mktemp('other')
    for name in os.listdir(shakespeare_char):
        shutil.copy(os.path.join(shakespeare_char, name), out / name)
    os.replace(out / 'train.bin', out / 'tmp.bin')
    os.replace(out / 'val.bin', out / 'train.bin')
    os.replace(out / 'tmp.bin', out / 'val.bin')
    record = json.loads((out / tokenizer.RECORD).read_text())
    tokenizer.write_record(
        out / tokenizer.RECORD,
        {k: v for k, v in record.items() if k != 'tokens'},
        {split: os.path.getsize(out / f'{split}.bin') // 2 for split in ('train', 'val')},
    )
    return str(out)


@pytest.fixture(scope='module')
def lora_run(train, pretrained, tmp_path_factory):
    """8 iterations of LoRA finetuning from the pretrained model: its out_dir."""
    out = tmp_path_factory.mktemp('lora')
    train(*LORA, '--max_iters=8', f'--init_from={pretrained}', f'--out_dir={out}')
    return str(out)


def test_init_from_a_run_starts_a_new_run_from_its_weights(train, pretrained, other_data, tmp_path):
    train(
        f'--init_from={pretrained}',
        f'--data_dir={other_data}',
        '--freeze_layers=1',
        '--max_iters=3',
        '--eval_interval=3',
        '--eval_iters=2',
        '--learning_rate=1e-2',
        '--warmup_iters=4',
        f'--out_dir={tmp_path}',
    )
    before, after = weights(pretrained), weights(tmp_path)
    # iteration 0's loss is the pretrained model's own on the batch that iteration drew from the
    # other data
    model = GPT(GPTConfig(**before['model_args']))
    model.load_state_dict(before['model'])
    data = np.memmap(os.path.join(other_data, 'train.bin'), dtype=np.uint16, mode='r')
    ix = torch.randint(len(data) - 32, (1, 4), generator=torch.Generator().manual_seed(1337))[0]
    with torch.no_grad():
        _, loss = model(*get_batch(data, ix, 32, 'cpu'))
    rows, _ = read_log(tmp_path)
    assert rows[0]['loss'] == pytest.approx(loss.item(), abs=1e-5)
    # a fresh run: its own schedule from iteration 0 and a fresh optimizer (3 steps, not 33)
    assert after['iter_num'] == 3 and rows[0]['lr'] == pytest.approx(1e-2 / 5)
    assert {s['step'].item() for s in after['optimizer']['state'].values()} == {3.0}
    assert after['config']['data_dir'] == other_data and after['tokenizer'] == before['tokenizer']
    # freeze_layers applies: the embeddings and the lowest Block are the pretrained ones, bit for
    # bit
    for k, v in after['model'].items():
        frozen = k.startswith(('transformer.wte', 'transformer.wpe', 'transformer.h.0.', 'lm_head'))
        assert torch.equal(v, before['model'][k]) == frozen, k


def test_init_from_refusals(train, pretrained, tmp_path):
    # a char-level model onto GPT-2 BPE data
    text = tmp_path / 'text.txt'
    text.write_text(open(SHAKESPEARE).read()[:20000])
    subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, 'data', 'prepare_text.py'),
            f'--input={text}',
            '--tokenizer=gpt2',
            f'--out_dir={tmp_path / "bpe"}',
        ],
        check=True,
        capture_output=True,
    )
    line = error_line(
        train(
            f'--init_from={pretrained}',
            f'--data_dir={tmp_path / "bpe"}',
            f'--out_dir={tmp_path / "a"}',
            check=False,
        )
    )
    assert (
        f"{pretrained}/ckpt.pt uses the tokenizer" in line
        and "prepare the data with the model's tokenizer" in line
    )
    # a path without a checkpoint
    (tmp_path / 'empty').mkdir()
    line = error_line(
        train(f'--init_from={tmp_path / "empty"}', f'--out_dir={tmp_path / "b"}', check=False)
    )
    assert line.startswith(f"error: init_from={tmp_path / 'empty'}: no checkpoint there")
    # resuming with another freeze_layers names init_from=<path>
    shutil.copytree(pretrained, tmp_path / 'c')
    line = error_line(
        train('--init_from=resume', '--freeze_layers=1', f'--out_dir={tmp_path / "c"}', check=False)
    )
    assert "another freeze_layers" in line and f"--init_from={tmp_path / 'c' / 'ckpt.pt'}" in line
    # LoRA settings that cannot work are refused before anything is touched
    line = error_line(
        train('--lora_rank=4', '--optimizer=muon', f'--out_dir={tmp_path / "d"}', check=False)
    )
    assert "use --optimizer=adamw" in line and not (tmp_path / 'd').exists()


def test_lora_trains_only_the_adapters(pretrained, lora_run):
    before, after = weights(pretrained), weights(lora_run)
    saved = after['lora']
    assert saved['rank'] == 4 and saved['targets'] == ['c_attn', 'c_fc', 'c_proj']
    # the base weights are the pretrained ones, bit for bit; every other tensor too
    assert len(saved['base']) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj in each of 2 Blocks
    for k, v in before['model'].items():
        assert torch.equal(saved['base'].get(k, after['model'][k]), v), k
    # the adapters trained (lora_B starts at zero), and the merged weights moved with them
    assert all(v.abs().sum() > 0 for k, v in saved['adapters'].items() if '.lora_B.' in k)
    assert not torch.equal(
        after['model']['transformer.h.1.mlp.c_fc.weight'],
        before['model']['transformer.h.1.mlp.c_fc.weight'],
    )
    # the optimizer holds state for the adapters only: A and B of 8 layers
    assert len(after['optimizer']['state']) == len(saved['adapters']) == 16
    _, evals = read_log(lora_run)
    assert evals[8]['val_loss'] < evals[0]['val_loss']


def test_lora_resume_refuses_other_settings_and_damaged_adapters(lora_run):
    ckpt = weights(lora_run)
    saved = {k: ckpt['lora'][k] for k in ('rank', 'alpha', 'dropout', 'targets')}
    lora.check_resume(ckpt, saved, 'out/ckpt.pt')  # the same settings: resumes
    with pytest.raises(
        UserError,
        match=r"trained with lora_rank=4, lora_alpha=8, .* asks for lora_rank=0: .*"
        r"--init_from=out/ckpt.pt",
    ):
        lora.check_resume(ckpt, None, 'out/ckpt.pt')
    with pytest.raises(UserError, match="trained with lora_rank=0, this run asks for lora_rank=8"):
        lora.check_resume({'model': ckpt['model']}, dict(saved, rank=8), 'out/ckpt.pt')
    ckpt['lora']['adapters'] = {'transformer.h.0.attn.c_attn.lora_A.default.weight': 'not a tensor'}
    with pytest.raises(
        UserError, match="its 'lora' entry is not LoRA settings, adapters and weights"
    ):
        lora.check_resume(ckpt, saved, 'out/ckpt.pt')


@pytest.mark.format
def test_lora_checkpoint_is_nanogpt_format_with_merged_weights(lora_run):
    ckpt = weights(lora_run)
    # what nanoGPT's sample.py does with it: the plain GPT, strict, '_orig_mod.' stripped
    merged = GPT(GPTConfig(**ckpt['model_args']))
    torch.nn.Module.load_state_dict(
        merged, {k.removeprefix('_orig_mod.'): v for k, v in ckpt['model'].items()}
    )
    # the model that trained: peft's adapters on the unmerged weights
    adapted = GPT(GPTConfig(**ckpt['model_args']))
    lora.add_adapters(
        adapted, {k: ckpt['lora'][k] for k in ('rank', 'alpha', 'dropout', 'targets')}, ckpt
    )
    x = torch.randint(
        ckpt['model_args']['vocab_size'], (2, 32), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        torch.testing.assert_close(
            merged.eval()(x, x)[0], adapted.eval()(x, x)[0], rtol=0, atol=1e-5
        )
    assert_merged_by_peft(ckpt)


def assert_merged_by_peft(ckpt):
    """ckpt['model'] holds peft's own merge (on the CPU, in float32) of the adapters and base
    weights that ckpt['lora'] kept, bit for bit: the same arithmetic whatever device and
    parallelism wrote it (no TF32, no FSDP-only path)."""
    adapted = GPT(GPTConfig(**ckpt['model_args']))
    lora.add_adapters(
        adapted, {k: ckpt['lora'][k] for k in ('rank', 'alpha', 'dropout', 'targets')}, ckpt
    )
    layers = {name: m for name, m in adapted.named_modules() if hasattr(m, 'base_layer')}
    assert len(layers) == len(ckpt['lora']['base']) > 0
    scaling = ckpt['lora']['alpha'] / ckpt['lora']['rank']
    for name, layer in layers.items():
        # and W + B A * scaling computed in float64, within float32's rounding of the products,
        # their sum and W: an exact float32 merge, not one in a lower precision
        w = layer.base_layer.weight.detach().double()
        a, b = (getattr(layer, f'lora_{x}')[lora.ADAPTER].weight.detach().double() for x in 'AB')
        bound = 8 * torch.finfo(torch.float32).eps * (w.abs() + scaling * b.abs() @ a.abs())
        layer.merge()
        merged = ckpt['model'][f'{name}.weight']
        assert merged.device.type == 'cpu', name
        assert torch.equal(layer.base_layer.weight, merged), name
        assert ((merged.double() - (w + scaling * b @ a)).abs() <= bound).all(), name


def test_lora_float16_stopped_by_sigterm_resumes_exactly(
    train, train_command, pretrained, tmp_path
):
    run = [
        *LORA,
        f'--init_from={pretrained}',
        '--dtype=float16',
        '--lora_dropout=0.1',
        '--dropout=0.1',
    ]
    out = tmp_path / 'out'
    stop = stop_with_sigterm(train_command(*run, '--max_iters=100000', f'--out_dir={out}'), out, 3)
    resumed = [a for a in run if not a.startswith('--init_from')]
    train(*resumed, f'--max_iters={stop + 3}', '--init_from=resume', f'--out_dir={out}')
    reference = tmp_path / 'reference'
    train(*run, f'--max_iters={stop + 3}', f'--out_dir={reference}')
    assert_same_run(reference, out)
    assert weights(out)['lora']['adapters'].keys() == weights(reference)['lora']['adapters'].keys()
    for k, v in weights(out)['lora']['adapters'].items():
        assert torch.equal(v, weights(reference)['lora']['adapters'][k]), k
    assert weights(out)['scaler'] == weights(reference)['scaler']


@pytest.mark.parametrize('fsdp', [False, True], ids=['ddp', 'fsdp'])
def test_lora_two_processes_with_activation_checkpointing_match_one(
    train, pretrained, lora_run, fsdp, tmp_path
):
    train(
        *LORA,
        '--max_iters=8',
        f'--init_from={pretrained}',
        '--activation_checkpointing=True',
        f'--fsdp={fsdp}',
        f'--out_dir={tmp_path}',
        torchrun=['--standalone', '--nproc_per_node=2'],
    )
    (rows, evals), (ref_rows, ref_evals) = read_log(tmp_path), read_log(lora_run)
    assert sorted(rows) == sorted(ref_rows) == list(range(8)) and sorted(evals) == [0, 4, 8]
    for it in rows:
        assert rows[it]['loss'] == pytest.approx(ref_rows[it]['loss'], abs=1e-5), it
    for it in evals:
        assert evals[it]['val_loss'] == pytest.approx(ref_evals[it]['val_loss'], abs=1e-5), it
    ckpt, ref = weights(tmp_path), weights(lora_run)
    torch.testing.assert_close(ckpt['lora']['adapters'], ref['lora']['adapters'], rtol=0, atol=1e-5)
    torch.testing.assert_close(ckpt['model'], ref['model'], rtol=0, atol=1e-5)
    # each merged as one process merges its own adapters: FSDP's gathered state included
    assert_merged_by_peft(ckpt)


def test_the_cpu_lora_recipe_trains_adapters_on_a_char_checkpoint(train, pretrained, tmp_path):
    # config/finetune_shakespeare_char_lora_cpu.py, shrunk, from a character model trained here
    train(
        'config/finetune_shakespeare_char_lora_cpu.py',
        f'--init_from={pretrained}',
        f'--out_dir={tmp_path}',
        '--max_iters=8',
        '--eval_interval=8',
        '--eval_iters=2',
        '--batch_size=4',
        '--learning_rate=1e-2',
        '--always_save_checkpoint=True',  # a checkpoint whether the loss went down or not
    )
    before, after = weights(pretrained), weights(tmp_path)
    assert after['lora']['rank'] == 8 and after['tokenizer'] == before['tokenizer']
    for k, v in before['model'].items():  # the base weights are the checkpoint's, bit for bit
        assert torch.equal(after['lora']['base'].get(k, after['model'][k]), v), k
    _, evals = read_log(tmp_path)
    assert evals[8]['val_loss'] < evals[0]['val_loss']
