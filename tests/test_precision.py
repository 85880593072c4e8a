"""float16 autocast with a GradScaler, the mixed-precision path of GPUs without bfloat16, run on the
CPU (torch has float16 autocast, GradScaler('cpu') and the fused AdamW there): exact resume with the
scaler's state, a step with inf gradients skipped with the scale halved, and training that goes like
float32."""

import math

import pytest
import torch

from conftest import read_log
from test_train import RUN, assert_same_run, weights

FP16 = [*RUN, '--dtype=float16']


@pytest.fixture(scope='module')
def fp16_straight(train, tmp_path_factory):
    """40 iterations in float16 in one go: its out_dir."""
    out = tmp_path_factory.mktemp('fp16')
    train(*FP16, '--max_iters=40', f'--out_dir={out}')
    return str(out)


def test_float16_split_and_resumed_is_the_straight_run(train, fp16_straight, tmp_path):
    out = tmp_path / 'out'
    train(*FP16, '--max_iters=20', f'--out_dir={out}')
    # 20 steps without overflow at the initial scale
    assert weights(out)['scaler']['_growth_tracker'] == 20
    train(*FP16, '--max_iters=40', '--init_from=resume', f'--out_dir={out}')
    assert_same_run(fp16_straight, out)
    # the scaler went on counting from the checkpoint: its state is the straight run's, not a fresh
    # one's
    assert weights(out)['scaler'] == weights(fp16_straight)['scaler']
    assert weights(out)['config']['dtype'] == 'float16'


def test_inf_gradients_skip_the_step_and_halve_the_scale(train, fp16_straight, tmp_path):
    # a scale of 2**40 makes the float16 gradients overflow for certain: the step must change
    # nothing
    ckpt = weights(fp16_straight)
    ckpt['scaler']['scale'] = 2.0**40
    out = tmp_path / 'out'
    out.mkdir()
    torch.save(ckpt, out / 'ckpt.pt')
    train(*FP16, '--init_from=resume', '--max_iters=41', f'--out_dir={out}')
    after = weights(out)
    assert after['iter_num'] == 41
    assert after['scaler']['scale'] == 2.0**39 and after['scaler']['_growth_tracker'] == 0
    for k, v in ckpt['model'].items():
        assert torch.equal(after['model'][k], v), k
    for p, state in ckpt['optimizer']['state'].items():
        for k, v in state.items():  # step counts, exp_avg and exp_avg_sq: untouched
            assert torch.equal(after['optimizer']['state'][p][k], v), (p, k)
    rows, _ = read_log(out)
    # only the gradients overflowed, not the loss
    assert list(rows) == [40] and math.isfinite(rows[40]['loss'])


def test_float16_trains_like_float32(train, fp16_straight, tmp_path):
    out = tmp_path / 'fp32'
    train(*RUN, '--max_iters=40', f'--out_dir={out}')
    (rows16, evals16), (rows32, evals32) = read_log(fp16_straight), read_log(out)
    assert sorted(rows16) == sorted(rows32) == list(range(40))
    for it in rows16:  # the same batches and dropout masks: float16 rounding is all that differs
        assert rows16[it]['loss'] == pytest.approx(rows32[it]['loss'], abs=0.01), it
    assert evals16[40]['val_loss'] == pytest.approx(evals32[40]['val_loss'], abs=0.01)
    assert evals16[40]['val_loss'] < evals16[0]['val_loss'] - 0.5
