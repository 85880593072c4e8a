"""Every file the scripts read may come from a stranger: the real train.py, sample.py and bench.py
are run on each kind of damaged or hostile file and must answer with one line `error: ...` (exit
status 1, no traceback), run no code from the file, and leave every file on disk as it was (names,
sizes, mtimes and bytes)."""

import json
import os
import pickle
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from nanogpt import checkpoints
from nanogpt import runtime
from nanogpt import tokenizer
from configurator import UserError
from conftest import ROOT, TINY, error_line, hermetic_env
from model import GPT, GPTConfig


class Hostile:
    """Unpickling this runs code: its __reduce__ tells pickle to call exec, which here creates a
    marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def hostile_meta(path, marker):
    with open(path, 'wb') as f:
        pickle.dump({'vocab_size': 65, 'itos': Hostile(marker), 'stoi': {}}, f)


def snapshot(folder):
    """Every file under folder: relative path -> (size, mtime in ns, bytes)."""
    files = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            st = os.stat(path)
            with open(path, 'rb') as f:
                files[os.path.relpath(path, folder)] = (st.st_size, st.st_mtime_ns, f.read())
    return files


@pytest.fixture(scope='module')
def trained(tmp_path_factory, train):
    """A tiny model trained for 2 iterations: out_dir with ckpt.pt and log.jsonl, the base of the
    damaged copies."""
    out = tmp_path_factory.mktemp('trained')
    train(f'--out_dir={out}', '--max_iters=2', '--eval_interval=2', '--eval_iters=1')
    return str(out)


def resume_from(case, trained, edit):
    """out/ckpt.pt (and log.jsonl) copied from the trained run, with edit(checkpoint) applied."""
    checkpoint = torch.load(os.path.join(trained, 'ckpt.pt'), weights_only=True)
    edit(checkpoint)
    torch.save(checkpoint, case / 'out' / 'ckpt.pt')
    shutil.copy(os.path.join(trained, 'log.jsonl'), case / 'out')
    return ['--init_from=resume']


HF_CONFIG = json.dumps(
    dict(model_type='gpt2', vocab_size=65, n_positions=32, n_embd=32, n_layer=2, n_head=2)
)
REFUSED_PICKLE = "meta.pkl was not loaded: it names builtins.exec to be called on loading"


def damage(name, case, data, trained, marker):
    """Damage the files of case `name` in the folder case, whose data/ is a copy of the prepared
    shakespeare_char
    dataset; return (script, its extra arguments, what its error line says)."""
    if name.startswith('meta_reduce'):
        hostile_meta(data / 'meta.pkl', marker)
    if name == 'meta_reduce_train':
        return 'train.py', [], REFUSED_PICKLE
    # sample.py finds meta.pkl where the checkpoint says the data was
    if name == 'meta_reduce_sample':
        return (
            'sample.py',
            resume_from(
                case,
                trained,
                lambda c: (c['config'].update(data_dir=str(data)), c.pop('tokenizer')),
            ),
            REFUSED_PICKLE,
        )
    # bench.py reads data/<dataset>, and data/<an absolute path> is that path
    if name == 'meta_reduce_bench':
        return 'bench.py', [f'--dataset={data}'], REFUSED_PICKLE
    if name == 'meta_truncated':
        (data / 'meta.pkl').write_bytes((data / 'meta.pkl').read_bytes()[:100])
        return (
            'train.py',
            [],
            "meta.pkl is not a valid meta.pkl (UnpicklingError: pickle data was truncated)",
        )
    if name == 'meta_wrong_types':
        (data / 'meta.pkl').write_bytes(pickle.dumps({'vocab_size': '65', 'itos': {}, 'stoi': {}}))
        return (
            'train.py',
            [],
            "meta.pkl is not a valid character vocabulary: vocab_size is '65', not an int",
        )
    if name == 'meta_missing_keys':
        (data / 'meta.pkl').write_bytes(pickle.dumps({'vocab_size': 65}))
        return 'train.py', [], "meta.pkl is not a valid character vocabulary: it has no itos, stoi"
    if name == 'train_bin_odd':
        (data / 'train.bin').write_bytes((data / 'train.bin').read_bytes()[:-1])
        return (
            'train.py',
            [],
            "train.bin is damaged: 2,007,707 bytes is an odd length for uint16 token ids",
        )
    if name == 'val_bin_empty':
        (data / 'val.bin').write_bytes(b'')
        return 'train.py', [], "val.bin is damaged: it is empty"
    if name == 'bench_train_bin_odd':
        (data / 'train.bin').write_bytes(b'\0' * 2001)
        return (
            'bench.py',
            [f'--dataset={data}', '--vocab_size=65'],
            "train.bin is damaged: 2,001 bytes is an odd length",
        )
    if name == 'config_raises':
        (case / 'bad_config.py').write_text("n_layer = 2\nn_head = undefined_name\n")
        return (
            'train.py',
            [str(case / 'bad_config.py')],
            "bad_config.py line 2: NameError: name 'undefined_name' is not defined",
        )
    if name == 'ckpt_missing_tensor':
        return (
            'train.py',
            resume_from(case, trained, lambda c: c['model'].pop('transformer.h.1.mlp.c_fc.weight')),
            "ckpt.pt does not fit this code's GPT (Error(s) in loading state_dict for GPT:",
        )
    if name == 'ckpt_wrong_shape':
        return (
            'sample.py',
            resume_from(
                case,
                trained,
                lambda c: c['model'].update({'transformer.wpe.weight': torch.zeros(16, 32)}),
            ),
            "ckpt.pt does not fit this code's GPT (Error(s) in loading state_dict for GPT:",
        )
    if name == 'ckpt_bad_model_args':
        return (
            'train.py',
            resume_from(case, trained, lambda c: c['model_args'].pop('n_head')),
            "ckpt.pt is damaged or of a format this code does not know: "
            "model_args['n_head'] is None, not a positive int",
        )
    # a 65-character model on nanoGPT's data (no record) of 13 characters
    if name == 'ckpt_vocab_disagrees':
        (data / 'meta.pkl').write_bytes(pickle.dumps(tokenizer.char_meta('abcdefghij' * 8 + 'xyz')))
        (data / 'tokenizer.json').unlink()
        return (
            'train.py',
            resume_from(case, trained, lambda c: None),
            "ckpt.pt uses the tokenizer char (65 characters",
        )
    (case / 'hf').mkdir()
    if name == 'hf_bad_config':
        (case / 'hf' / 'config.json').write_text(HF_CONFIG[:-5])
        (case / 'hf' / 'model.safetensors').write_bytes(b'')
        return 'train.py', [f'--init_from={case / "hf"}'], "hf/config.json is not valid JSON"
    (case / 'hf' / 'config.json').write_text(HF_CONFIG)
    if name == 'hf_no_weights':
        return (
            'sample.py',
            [f'--init_from={case / "hf"}'],
            "hf has no weights: expected model.safetensors",
        )
    assert name == 'hf_pickle_only'
    (case / 'hf' / 'pytorch_model.bin').write_bytes(pickle.dumps(Hostile(marker)))
    return (
        'train.py',
        [f'--init_from={case / "hf"}'],
        "hf holds its weights only as pytorch_model.bin, a pickle, which is not loaded",
    )


CASES = [
    'meta_reduce_train',
    'meta_reduce_sample',
    'meta_reduce_bench',
    'meta_truncated',
    'meta_wrong_types',
    'meta_missing_keys',
    'train_bin_odd',
    'val_bin_empty',
    'bench_train_bin_odd',
    'config_raises',
    'ckpt_missing_tensor',
    'ckpt_wrong_shape',
    'ckpt_bad_model_args',
    'ckpt_vocab_disagrees',
    'hf_bad_config',
    'hf_no_weights',
    'hf_pickle_only',
]
SCRIPT_ARGS = {  # the tiny model, on the CPU, in the case's folders
    'train.py': lambda data, out: [
        f'--out_dir={out}',
        '--dataset=shakespeare_char',
        f'--data_dir={data}',
        *TINY,
    ],
    'sample.py': lambda data, out: [
        f'--out_dir={out}',
        '--device=cpu',
        '--num_samples=1',
        '--max_new_tokens=2',
    ],
    'bench.py': lambda data, out: [
        '--device=cpu',
        '--n_layer=2',
        '--n_head=2',
        '--n_embd=32',
        '--block_size=32',
        '--batch_size=2',
        '--burnin=0',
        '--iters=1',
    ],
}


@pytest.fixture(scope='module')
def runs(tmp_path_factory, shakespeare_char, trained):
    """Each case damaged in a folder of its own and its script run on it, as many at a time as there
    are cores (most of a failing run is importing torch, on one core): name -> (folder, its snapshot
    before, expected error, the finished process)."""
    cases = {}
    for name in CASES:
        case = tmp_path_factory.mktemp(name)
        data, out = case / 'data', case / 'out'
        shutil.copytree(shakespeare_char, data)
        out.mkdir()
        (out / 'notes.txt').write_text("an earlier run's file\n")
        script, args, expected = damage(name, case, data, trained, case / 'marker')
        cmd = [sys.executable, os.path.join(ROOT, script), *SCRIPT_ARGS[script](data, out), *args]
        cases[name] = (case, snapshot(case), expected, cmd)

    def run(cmd):
        return subprocess.run(cmd, capture_output=True, text=True, env=hermetic_env(), timeout=300)

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        results = dict(zip(cases, pool.map(run, [cmd for *_, cmd in cases.values()])))
    return {name: (*cases[name][:3], results[name]) for name in cases}


@pytest.mark.parametrize('name', CASES)
def test_damaged_file_is_refused_in_one_line(name, runs):
    case, before, expected, result = runs[name]
    line = error_line(result)
    assert expected in line, line
    assert not (case / 'marker').exists()
    assert snapshot(case) == before


def test_hostile_pickles_are_real(tmp_path):
    """The control for the cases above: plain pickle.load of the same meta.pkl does run its code."""
    hostile_meta(tmp_path / 'meta.pkl', tmp_path / 'marker')
    with open(tmp_path / 'meta.pkl', 'rb') as f:
        pickle.load(f)
    assert (tmp_path / 'marker').exists()


@pytest.mark.parametrize('protocol', range(pickle.HIGHEST_PROTOCOL + 1))
def test_meta_pkl_plain_data_loads_at_every_protocol(tmp_path, protocol):
    meta = tokenizer.char_meta("First Citizen:\nBefore we proceed any further, hear me speak.")
    # plain data needs no global
    meta['extra'] = [1, 2.5, True, False, None, ('a', -3), {'nested': ['list']}]
    with open(tmp_path / 'meta.pkl', 'wb') as f:
        # nanoGPT writes with pickle.dump's default protocol
        pickle.dump(meta, f, protocol=protocol)
    assert tokenizer.load_meta(str(tmp_path / 'meta.pkl')) == meta


def test_resume_drops_log_lines_that_are_not_ours(trained, tmp_path, train):
    out = tmp_path / 'out'
    shutil.copytree(trained, out)
    with open(out / 'log.jsonl', 'ab') as f:
        f.write(b'not json\n[1, 2]\n{"iter": null}\n{"no_iter": 1}\n\xff\xfe not UTF-8\n')
    train(f'--out_dir={out}', '--init_from=resume', '--eval_only=True', '--eval_iters=1')
    with open(os.path.join(trained, 'log.jsonl')) as f:
        kept = [json.loads(line) for line in f if json.loads(line)['iter'] < 2]
    with open(out / 'log.jsonl') as f:
        rows = [json.loads(line) for line in f]
    assert rows[:-1] == kept and rows[-1]['iter'] == 2 and 'val_loss' in rows[-1]


@pytest.mark.architecture
@pytest.mark.format
def test_hf_pickle_weights_load_only_when_allowed(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2))
    hf.save_pretrained(tmp_path / 'safe')
    (tmp_path / 'pickle').mkdir()
    shutil.copy(tmp_path / 'safe' / 'config.json', tmp_path / 'pickle')
    torch.save(hf.state_dict(), tmp_path / 'pickle' / 'pytorch_model.bin')
    with pytest.raises(
        ValueError,
        match=r"only as pytorch_model.bin.*use_safetensors=False.*allow_unsafe_pickle=True",
    ):
        checkpoints.load_pretrained(str(tmp_path / 'pickle'))
    idx = torch.randint(0, 50, (2, 16))
    safe = GPT.from_pretrained(str(tmp_path / 'safe')).eval()
    unsafe = GPT.from_pretrained(str(tmp_path / 'pickle'), allow_unsafe_pickle=True).eval()
    assert torch.equal(safe(idx, idx)[0], unsafe(idx, idx)[0])
    # damaged safetensors: cut short, or a tensor missing (transformers would fill it in at random)
    (tmp_path / 'cut').mkdir()
    shutil.copy(tmp_path / 'safe' / 'config.json', tmp_path / 'cut')
    data = (tmp_path / 'safe' / 'model.safetensors').read_bytes()
    (tmp_path / 'cut' / 'model.safetensors').write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot load the weights of .*cut"):
        GPT.from_pretrained(str(tmp_path / 'cut'))
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / 'safe' / 'model.safetensors')
    del weights['transformer.h.1.mlp.c_fc.weight']
    save_file(weights, tmp_path / 'cut' / 'model.safetensors', metadata={'format': 'pt'})
    with pytest.raises(
        ValueError, match=r"do not fit its config.json \(1 tensors missing.*h.1.mlp.c_fc.weight"
    ):
        GPT.from_pretrained(str(tmp_path / 'cut'))


def test_checkpoint_loop_state_is_checked():
    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=2, n_embd=8))
    good = {
        'model': model.state_dict(),
        'model_args': dict(
            n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=16, bias=True, dropout=0.0
        ),
        'iter_num': 3,
        'rng_states': [runtime.rng_state()],
        'sampler_state': torch.Generator().get_state(),
    }
    checkpoints.check_checkpoint(good, 'ckpt.pt')
    before = torch.get_rng_state()
    for bad, message in [
        ({'rng_states': [{'python': 1}]}, 'random state cannot be restored'),
        ({'sampler_state': torch.zeros(3)}, 'random state cannot be restored'),
        ({'iter_num': '3'}, "iter_num is '3'"),
        ({'config': {'data_dir': 7}}, 'config is not a dict with dataset and data_dir'),
    ]:
        with pytest.raises(UserError, match=message):
            checkpoints.check_checkpoint({**good, **bad}, 'ckpt.pt')
    assert torch.equal(torch.get_rng_state(), before)  # checking restored nothing into this process
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu', verbose=False)
    model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))[1].backward()
    optimizer.step()
    state = optimizer.state_dict()
    buffer = next(k for k, v in state['state'][0].items() if v.dim() > 0)  # e.g. AdamW's exp_avg
    state['state'][0][buffer] = torch.zeros(3, 3)
    with pytest.raises(
        UserError, match=rf"the optimizer's {buffer} has shape \(3, 3\) for a parameter of shape"
    ):
        checkpoints.load_optimizer_state(model, optimizer, state, 'ckpt.pt')
    state['param_groups'] = state['param_groups'][:1]
    with pytest.raises(UserError, match="optimizer state is for other trainable parameters"):
        checkpoints.load_optimizer_state(model, optimizer, state, 'ckpt.pt')
