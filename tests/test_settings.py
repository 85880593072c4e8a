"""Every setting of every script is checked before the script touches anything: a bad value is one
line naming the setting, the value and what is allowed. The battery is drawn from each script's own
rules (the dict its check_settings() passes to configurator.check), so a setting added later is
tested too: for each one a value of the wrong type, and for each rule values just outside it (below,
above, not finite, not one of, a path under a file...). Those run in this process, each script
executed as __main__ up to the first step after its checks (runtime.pick_device, made to raise),
which costs milliseconds; a few real runs then prove it end to
end: exit status 1, one `error:` line, no traceback, out_dir and the data folder unchanged."""

import math
import os
import runpy
import shutil
import subprocess
import sys

import pytest

import configurator
from nanogpt import runtime
from configurator import OneOf, OutPath, Range, UserError
from conftest import ROOT, error_line, hermetic_env
from test_out_dir import snapshot

SCRIPTS = ['train.py', 'sample.py', 'eval.py', 'bench.py', 'serve.py']


class Reached(Exception):
    """The script got past its settings checks."""


def run_checks(script, args, monkeypatch):
    """Run script as __main__ with args until it refuses a setting or gets past its checks. Returns
    (the
    UserError's message or None, the rules it checked, its resolved config)."""
    seen = {}

    def recording_check(config, rules, _check=configurator.check):
        seen.update(config=dict(config), rules=rules)
        return _check(config, rules)

    def reached(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(configurator, 'check', recording_check)
    monkeypatch.setattr(runtime, 'pick_device', reached)
    monkeypatch.setattr(sys, 'argv', [script, *args])
    try:
        runpy.run_path(os.path.join(ROOT, script), run_name='__main__')
    except Reached:
        return None, seen['rules'], seen['config']
    except UserError as e:
        return str(e), seen.get('rules'), seen.get('config')
    raise AssertionError(f"{script} {args} neither refused a setting nor reached pick_device")


def bad_values(rule, default, tmp_path):
    """Values just outside rule, of the default's type (so that configure() lets them through to the
    rule)."""
    if isinstance(rule, Range):
        step = 1 if type(default) is int else 0.5
        values = [] if rule.lo is None else [rule.lo if rule.open_lo else rule.lo - step]
        if rule.hi is not None:
            values.append(rule.hi if rule.open_hi else rule.hi + step)
        return [type(default)(v) for v in values] + (
            [math.inf, -math.inf] if type(default) is float else []
        )
    if isinstance(rule, OneOf):
        return ['no_such_value'] if isinstance(default, str) else [1]  # compile=None takes any type
    if isinstance(rule, OutPath):
        (tmp_path / 'a_file').write_text('')
        (tmp_path / 'a_folder').mkdir(exist_ok=True)
        return [
            str(tmp_path / 'a_file' / 'below'),
            str(tmp_path / ('a_file' if rule.folder else 'a_folder')),
        ]
    return []  # configurator.ANY: any value of its type


def as_arg(key, value):
    """--key=value as a user types it: literal_eval reads it back as value (1e999 is how inf is
    written)."""
    text = '1e999' if value == math.inf else '-1e999' if value == -math.inf else repr(value)
    return f'--{key}={text}'


def wrong_type(default):
    return "'text'" if not isinstance(default, str) else '[1]'


@pytest.mark.parametrize('script', SCRIPTS)
def test_every_setting_is_checked(script, monkeypatch, tmp_path):
    refused, rules, config = run_checks(script, [], monkeypatch)
    assert refused is None, refused  # the defaults pass
    # every setting has a rule
    assert set(rules) | {k for k, v in config.items() if type(v) is bool} == set(config)
    cases = 0
    for key, rule in rules.items():
        default = config[key]
        for value in bad_values(rule, default, tmp_path):
            refused, _, _ = run_checks(script, [as_arg(key, value)], monkeypatch)
            assert refused == f"{key} must be {rule}, got {value!r}", (key, value, refused)
            cases += 1
        if default is not None:  # a default of None takes any type; its rule decides
            refused, _, _ = run_checks(script, [f'--{key}={wrong_type(default)}'], monkeypatch)
            assert refused.startswith(
                f"--{key}: expected {type(default).__name__} like {default!r}, got"
            ), refused
            cases += 1
    for key in [k for k, v in config.items() if type(v) is bool]:
        assert (
            run_checks(script, [f'--{key}=2'], monkeypatch)[0]
            == f"--{key}: expected bool like {config[key]!r}, got 2"
        )
    assert cases >= len(rules)


@pytest.mark.parametrize(
    'script, args, message',
    [
        (
            'train.py',
            ['--warmup_iters=100', '--lr_decay_iters=100'],
            "lr_decay_iters (100) must be greater than "
            "warmup_iters (100): the learning rate decays between them (or --decay_lr=False)",
        ),
        (
            'train.py',
            ['--min_lr=0.1'],
            "min_lr (0.1) must be at most learning_rate (0.0006): the learning rate decays "
            "from one to the other (or --decay_lr=False)",
        ),
        (
            'train.py',
            ['--early_stop_patience=2', '--checkpoint_interval=10'],
            "early_stop_patience keeps the best model "
            "in ckpt.pt and checkpoint_interval overwrites it: use one of them",
        ),
        (
            'train.py',
            ['--optimizer=muon', '--learning_rate=0'],
            "optimizer muon needs learning_rate > 0 (Muon's schedule is scaled from it), got 0.0",
        ),
        (
            'eval.py',
            ['--tasks=hellaswag,mmlu'],
            "tasks must be hellaswag, val or hellaswag,val, got 'hellaswag,mmlu'",
        ),
        ('eval.py', ['--tasks=,'], "tasks must be hellaswag, val or hellaswag,val, got ','"),
        ('bench.py', ['--n_embd=30', '--n_head=4'], "n_embd (30) must be divisible by n_head (4)"),
    ],
)
def test_settings_that_go_together(script, args, message, monkeypatch):
    assert run_checks(script, args, monkeypatch)[0] == message
    assert run_checks(script, [], monkeypatch)[0] is None


def test_plot_settings(tmp_path, monkeypatch):
    import plot

    (tmp_path / 'a_file').write_text('')
    for out, message in [
        (
            str(tmp_path / 'a_file' / 'loss.png'),
            "out must be a path for a file: not an existing "
            f"folder, nor under a file, got '{tmp_path / 'a_file' / 'loss.png'}'",
        ),
        (
            str(tmp_path),
            f"out must be a path for a file: not an existing folder, nor under a file, "
            f"got '{tmp_path}'",
        ),
        ('loss.xyz', "out must end in a format matplotlib writes ("),
    ]:
        with pytest.raises(UserError) as e:
            plot.main(['some_out_dir', f'--out={out}'])
        assert str(e.value).startswith(message), str(e.value)


@pytest.fixture(scope='module')
def trained(train, tmp_path_factory):
    out = tmp_path_factory.mktemp('trained')
    train(f'--out_dir={out}', '--max_iters=2', '--eval_interval=2', '--eval_iters=1')
    return out


@pytest.mark.parametrize(
    'script, args, message',
    [
        ('train.py', ['--grad_clip=-1.0'], "grad_clip must be at least 0, got -1.0"),
        ('sample.py', ['--temperature=-0.5'], "temperature must be at least 0, got -0.5"),
        (
            'eval.py',
            ['--out_json={out}'],
            "out_json must be a path for a file: not an existing folder, nor under a file",
        ),
        (
            'bench.py',
            ['--mode=nonsense'],
            "mode must be one of 'train', 'generate', 'speed', 'memory', got 'nonsense'",
        ),
        ('plot.py', ['{out}', '--out={out}/ckpt.pt/loss.png'], "out must be a path for a file"),
        # checked later, still before anything is written: the checkpoint's block_size, the model's
        # tokenizer
        (
            'train.py',
            ['--init_from=resume', '--block_size=16'],
            "{out}/ckpt.pt was trained with block_size 32: resume it with --block_size=32",
        ),
        (
            'eval.py',
            ['--tasks=hellaswag'],
            "hellaswag needs a model with the GPT-2 tokenizer, but {out}/ckpt.pt (iter 2) "
            "has a 65-token character-level vocabulary",
        ),
    ],
)
def test_refused_end_to_end(script, args, message, trained, train_command, shakespeare_char):
    """The real scripts, in subprocesses, on a trained out_dir and the prepared data: one line,
    nothing touched."""
    before = snapshot(trained), snapshot(shakespeare_char)
    data = [a for a in train_command() if a.startswith(('--dataset=', '--data_dir=', '--device='))]
    extra = {
        'train.py': [*data, '--overwrite=True'],
        'sample.py': ['--device=cpu'],
        'eval.py': ['--device=cpu'],
        'bench.py': ['--device=cpu'],
        'plot.py': [],
    }[script]
    out_dir = (
        [] if script == 'plot.py' else [f'--out_dir={trained}'] if script != 'bench.py' else []
    )
    cmd = [
        sys.executable,
        os.path.join(ROOT, script),
        *out_dir,
        *extra,
        *(a.format(out=trained) for a in args),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env=hermetic_env(), timeout=120)
    assert error_line(result).startswith(f"error: {message.format(out=trained)}")
    assert (snapshot(trained), snapshot(shakespeare_char)) == before


@pytest.mark.parametrize(
    'script, args, message',
    [
        (
            'data/prepare_text.py',
            ['--input={data}/input.txt', '--val_fraction=0'],
            "val_fraction must be between 0 and 1 (both excluded), got 0.0",
        ),
        ('data/openwebtext/prepare.py', ['--num_proc=0'], "num_proc must be at least 1, got 0"),
        (
            'data/fineweb_edu/prepare.py',
            ['--test_size=1.0'],
            "test_size must be between 0 and 1 (both excluded), got 1.0",
        ),
    ],
)
def test_prepare_scripts_refuse_before_touching(script, args, message, shakespeare_char, tmp_path):
    data = tmp_path / 'data'
    shutil.copytree(shakespeare_char, data)
    (data / 'input.txt').write_text('some text to prepare\n' * 100)
    before = snapshot(data)
    cmd = [
        sys.executable,
        os.path.join(ROOT, script),
        f'--out_dir={data}',
        *(a.format(data=data) for a in args),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env=hermetic_env(), timeout=120)
    assert error_line(result) == f"error: {message}"
    assert snapshot(data) == before
