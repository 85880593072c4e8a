"""The repository's layout: imports point one way (scripts on top, the model at the bottom), with no
cycle and none hidden inside a function; model.py imports nothing of ours at import time (only its
delegates do, when called: Muon's optimizer, and nanoGPT's GPT.from_pretrained and GPT.generate);
the core files stay nanoGPT's size."""

import ast
import glob
import os
import subprocess
import sys

from conftest import ROOT

# the scripts at the top ('train') and the modules they share ('nanogpt.runtime')
MODULES = sorted(
    [os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, '*.py'))]
    + [
        'nanogpt.' + os.path.basename(p)[:-3]
        for p in glob.glob(os.path.join(ROOT, 'nanogpt', '*.py'))
        if not p.endswith('__init__.py')
    ]
)


# model.py's delegates, imported inside the one function that needs each
MODEL_DELEGATES = {'nanogpt.muon', 'nanogpt.hf', 'nanogpt.generate'}


def repo_imports(name, lazy=True):
    """The repository's modules that module `name` imports, anywhere in it (a function's body
    too, unless lazy=False)."""
    with open(
        os.path.join(ROOT, *name.split('.')[:-1], name.split('.')[-1] + '.py'), encoding='utf-8'
    ) as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree) if lazy else tree.body:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f'{node.module}.{a.name}' for a in node.names)
    return {m if m in MODULES else m.rsplit('.', 1)[0] for m in found} & set(MODULES) - {name}


def test_imports_have_no_cycle():
    graph = {name: repo_imports(name) for name in MODULES}
    graph['model'] -= MODEL_DELEGATES  # called by users of GPT only, after model.py is imported
    done, path = set(), []

    def visit(name):
        assert name not in path, f"import cycle: {' -> '.join(path[path.index(name) :] + [name])}"
        if name in done:
            return
        path.append(name)
        for dep in sorted(graph[name]):
            visit(dep)
        path.pop()
        done.add(name)

    for name in MODULES:
        visit(name)


def test_model_imports_nothing_of_ours():
    assert repo_imports('model', lazy=False) == set()
    assert repo_imports('model') <= MODEL_DELEGATES
    code = (
        f"import sys, model\nours = {MODULES!r}\nprint(sorted(m for m in sys.modules if m in ours))"
    )
    result = subprocess.run(
        [sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["['model']"]


def test_the_core_files_read_in_one_sitting():
    # about nanoGPT's sizes (model.py 330 lines, train.py 336), with room for a research change: the
    # model and the loop, each read at once; the width of every line is kept by ruff (ruff.toml)
    for name, most in (('model.py', 350), ('train.py', 420)):
        with open(os.path.join(ROOT, name), encoding='utf-8') as f:
            n = sum(1 for _ in f)
        assert n <= most, f"{name} has {n} lines (at most {most}): move what is not its concern out"
