"""optimizer='muon': Muon for the blocks' weight matrices and AdamW for the rest. The float32
Newton-Schulz against torch's, GradScaler with the pair, and end to end: it learns faster than
AdamW, a SIGTERM stop resumes bitwise, two processes train like one, GPT-2 weights finetune,
nanoGPT's loading still works."""

import os

import pytest
import torch

from conftest import error_line, read_log
from model import GPT, GPTConfig
from nanogpt.muon import Float32Muon, MuonAdamW
from test_train import stop_with_sigterm

# 30 iterations with dropout (so resuming must restore the RNG too), warmup to iter 5, decay until
# 20
RUN = [
    '--optimizer=muon',
    '--muon_learning_rate=0.05',
    '--batch_size=8',
    '--dropout=0.1',
    '--learning_rate=1e-2',
    '--min_lr=1e-3',
    '--warmup_iters=5',
    '--lr_decay_iters=20',
    '--eval_interval=30',
    '--eval_iters=4',
    '--log_interval=1',
]


def checkpoint(out_dir):
    return torch.load(os.path.join(out_dir, 'ckpt.pt'), weights_only=True)


def assert_equal_nested(a, b, where='checkpoint'):
    """Every tensor and value of two (nested) state dicts is identical."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_equal_nested(a[k], b[k], f'{where}/{k}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_nested(x, y, f'{where}/{i}')
    else:
        assert a == b, where


@pytest.fixture(scope='module')
def straight(train, tmp_path_factory):
    out = tmp_path_factory.mktemp('muon')
    train(*RUN, '--max_iters=30', f'--out_dir={out}')
    return str(out)


@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=pytest.mark.gpu)])
def test_float32_newton_schulz_is_torchs_muon_in_float32(device):
    # on CUDA torch's bfloat16 Newton-Schulz runs on tensor cores, which round otherwise than a CPU
    torch.manual_seed(0)
    # a tall and a wide matrix
    params = [torch.randn(96, 32, device=device), torch.randn(32, 64, device=device)]
    grads = [[torch.randn_like(p) for p in params] for _ in range(3)]
    updates = {}
    for cls in (torch.optim.Muon, Float32Muon):
        ps = [torch.nn.Parameter(p.clone()) for p in params]
        opt = cls(ps, lr=0.1, weight_decay=0.1, momentum=0.9)
        for step in grads:
            for p, g in zip(ps, step):
                p.grad = g.clone()
            opt.step()
        updates[cls] = [p.detach() - p0 for p, p0 in zip(ps, params)]
        assert set(opt.state_dict()['state'][0]) == {'momentum_buffer'}  # torch's state layout
    for ours, torchs in zip(updates[Float32Muon], updates[torch.optim.Muon]):
        # the same momentum, shape adjustment and weight decay: equal up to torch's bfloat16
        # rounding
        assert 1e-4 * ours.norm() < (ours - torchs).norm() < 2e-2 * ours.norm()


def test_grad_scaler_steps_and_skips_both():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=11, bias=True))
    optimizer = model.configure_optimizers(
        0.1,
        1e-2,
        (0.9, 0.95),
        'cpu',
        verbose=False,
        muon=dict(lr=0.05, momentum=0.95, weight_decay=0.0),
    )
    assert isinstance(optimizer, MuonAdamW)
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0**10)
    idx = torch.randint(11, (2, 8))
    for poison in (True, False):
        before = [p.detach().clone() for p in model.parameters()]
        _, loss = model(idx, idx)
        scaler.scale(loss).backward()
        if poison:
            model.lm_head.weight.grad[0, 0] = float('inf')
        scaler.unscale_(optimizer)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        changed = [not torch.equal(a, b) for a, b in zip(before, model.parameters())]
        # an overflow skips both optimizers, else both step
        assert changed == [not poison] * len(changed)


def test_sigterm_saves_and_resumes_exactly(train, train_command, tmp_path):
    out = tmp_path / 'out'
    stop = stop_with_sigterm(train_command(*RUN, '--max_iters=100000', f'--out_dir={out}'), out, 3)
    assert {'muon', 'adamw'} == set(checkpoint(out)['optimizer'])
    train(*RUN, f'--max_iters={stop + 3}', '--init_from=resume', f'--out_dir={out}')
    reference = tmp_path / 'reference'
    train(*RUN, f'--max_iters={stop + 3}', f'--out_dir={reference}')
    a, b = checkpoint(out), checkpoint(reference)
    for key in ('iter_num', 'model', 'optimizer'):
        assert_equal_nested(a[key], b[key], key)
    assert [(r['loss'], r['lr']) for r in read_log(out)[0].values()] == [
        (r['loss'], r['lr']) for r in read_log(reference)[0].values()
    ]


def test_two_processes_match_one(train, tmp_path):
    run = [
        *RUN,
        '--dropout=0',
        '--gradient_accumulation_steps=2',
        '--max_iters=6',
        '--eval_interval=3',
    ]
    train(*run, f'--out_dir={tmp_path / "one"}')
    result = train(
        *run, f'--out_dir={tmp_path / "two"}', torchrun=['--standalone', '--nproc_per_node=2']
    )
    assert result.stdout.count('muon for 8 matrices') == 1
    (rows, evals), (ref_rows, ref_evals) = read_log(tmp_path / 'two'), read_log(tmp_path / 'one')
    assert sorted(rows) == sorted(ref_rows) == list(range(6)) and sorted(evals) == [0, 3, 6]
    for it in rows:
        assert rows[it]['loss'] == pytest.approx(ref_rows[it]['loss'], abs=1e-5), it
    for it in evals:
        assert evals[it]['val_loss'] == pytest.approx(ref_evals[it]['val_loss'], abs=1e-5), it


def test_learns_faster_than_adamw(train, straight, tmp_path):
    # the same run with AdamW alone for every parameter, at its learning rate
    train(*RUN, '--optimizer=adamw', '--max_iters=30', f'--out_dir={tmp_path}')
    muon, adamw = read_log(straight)[1][30]['val_loss'], read_log(tmp_path)[1][30]['val_loss']
    assert muon < adamw - 0.05, (muon, adamw)


def test_checkpoint_loads_as_nanogpt_does(straight):
    ckpt = checkpoint(straight)
    # all nanoGPT's sample.py uses: model and model_args
    model = GPT(GPTConfig(**ckpt['model_args']))
    torch.nn.Module.load_state_dict(model, ckpt['model'], strict=True)
    groups = ckpt['optimizer']['muon']['param_groups'] + ckpt['optimizer']['adamw']['param_groups']
    # min_lr, Muon's scaled by 0.05 / 1e-2
    assert [g['lr'] for g in groups] == pytest.approx([0.005] + [1e-3] * 2)


def test_finetune_gpt2_weights(train, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(
        GPT2Config(vocab_size=65, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    ).save_pretrained(tmp_path / 'hf')
    out = tmp_path / 'out'
    train(
        f'--init_from={tmp_path / "hf"}',
        '--optimizer=muon',
        '--max_iters=4',
        '--eval_interval=4',
        '--eval_iters=2',
        '--learning_rate=1e-3',
        '--muon_learning_rate=0.01',
        '--decay_lr=False',
        f'--out_dir={out}',
    )
    _, evals = read_log(out)
    assert evals[4]['val_loss'] < evals[0]['val_loss'] - 0.01


def test_errors(train, straight, tmp_path):
    line = error_line(train('--optimizer=sgd', f'--out_dir={tmp_path}', check=False))
    assert line == "error: optimizer must be one of 'adamw', 'muon', got 'sgd'"
    # GradScaler would read its overflow flag on the host for MuonAdamW: a second sync in every
    # iteration
    line = error_line(
        train('--optimizer=muon', '--dtype=float16', f'--out_dir={tmp_path}', check=False)
    )
    assert (
        line.startswith("error: optimizer muon with float16 is not supported")
        and '--dtype=bfloat16' in line
    )
    before = open(os.path.join(straight, 'ckpt.pt'), 'rb').read()
    line = error_line(
        train('--optimizer=adamw', '--init_from=resume', f'--out_dir={straight}', check=False)
    )
    assert line.endswith("ckpt.pt was trained with optimizer muon: resume it with --optimizer=muon")
    assert open(os.path.join(straight, 'ckpt.pt'), 'rb').read() == before
