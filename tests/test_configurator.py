"""configurator.py: config files, then --key=value, type-checked against the defaults."""

import os

import pytest

from conftest import ROOT

from configurator import UserError, configure, override

DEFAULTS = dict(
    batch_size=12, learning_rate=6e-4, compile=None, eval_only=False, device='auto', dataset='owt'
)


def test_config_file_then_command_line_in_order(tmp_path):
    config = tmp_path / 'my_config.py'
    config.write_text(
        "import math\nbatch_size = 64\nlearning_rate = math.sqrt(1e-6)\n_private = 'ignored'\n"
    )
    result = override(DEFAULTS, [str(config), '--batch_size=32', '--device=cpu', '--compile=False'])
    assert result == dict(DEFAULTS, batch_size=32, learning_rate=1e-3, device='cpu', compile=False)
    # the last one wins
    assert override(DEFAULTS, ['--batch_size=32', str(config)])['batch_size'] == 64


def test_values_are_literals_of_the_defaults_type():
    result = override(
        DEFAULTS, ['--learning_rate=1', '--eval_only=True', '--dataset=shakespeare_char']
    )
    # int where float is expected
    assert result['learning_rate'] == 1.0 and type(result['learning_rate']) is float
    # a bare word is a string
    assert result['eval_only'] is True and result['dataset'] == 'shakespeare_char'
    assert override(DEFAULTS, ["--dataset='123'"])['dataset'] == '123'


@pytest.mark.parametrize(
    'args, message',
    [
        (['--batch_size=1.5'], "--batch_size: expected int like 12, got 1.5"),
        (['--eval_only=1'], "--eval_only: expected bool like False, got 1"),
        (['--learning_rate=fast'], "--learning_rate: expected float like 0.0006, got 'fast'"),
        (['--batch_sise=8'], "unknown config key 'batch_sise'; did you mean batch_size?"),
        (
            ['--zzz=1'],
            "unknown config key 'zzz'; known keys: batch_size, compile, dataset, device, "
            "eval_only, learning_rate",
        ),
        (['--batch_size'], "expected --key=value, got '--batch_size'"),
        (['no/such/config.py'], "config file not found: no/such/config.py"),
    ],
)
def test_mistakes(args, message):
    with pytest.raises(UserError) as e:
        override(DEFAULTS, args)
    assert str(e.value).startswith(message)


def test_unknown_key_in_config_file(tmp_path):
    (tmp_path / 'c.py').write_text("batchsize = 8\n")
    with pytest.raises(UserError, match="unknown config key 'batchsize'; did you mean batch_size"):
        override(DEFAULTS, [str(tmp_path / 'c.py')])


def train_defaults():
    """The default block of train.py: the lines between its two rule lines."""
    with open(os.path.join(ROOT, 'train.py')) as f:
        block = f.read().split('# ' + '-' * 77 + '\n')[1]
    scope = {}
    exec(block, scope)
    return {k: v for k, v in scope.items() if not k.startswith('_')}


@pytest.mark.parametrize('name', sorted(os.listdir(os.path.join(ROOT, 'config'))))
def test_shipped_configs_apply_from_any_directory(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # config/... is found relative to the repository root
    result = override(train_defaults(), [f'config/{name}'])
    assert result != train_defaults()
    if name == 'train_shakespeare_char_cpu.py':
        assert (result['dataset'], result['n_layer'], result['device'], result['max_iters']) == (
            'shakespeare_char',
            2,
            'cpu',
            800,
        )


def test_configure_updates_the_scope_in_place():
    scope = dict(batch_size=12, device='auto', np=pytest, helper=print, _hidden=1)
    config = configure(scope, ['--batch_size=4'])
    assert config == dict(batch_size=4, device='auto')
    assert scope['batch_size'] == 4 and scope['_hidden'] == 1


def test_constants_are_not_settings():
    # a script's CONSTANTS, and ROOT or RECORD imported from a module, cannot be changed from the
    # command line
    scope = dict(batch_size=12, ROOT='/repo', RECORD='tokenizer.json')
    assert configure(scope, []) == dict(batch_size=12)
    with pytest.raises(UserError, match="unknown config key 'ROOT'"):
        configure(scope, ['--ROOT=/elsewhere'])
