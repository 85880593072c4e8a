"""
Configuration overrides and one-line user errors, shared by every script.

A script keeps its defaults as plain module-level variables in one block at the top, then calls

    from configurator import configure
    config = configure(globals())

which applies, in order, each config file named on the command line (a Python file that assigns
some of those variables) and then each --key=value. Values are parsed with ast.literal_eval (a bare
word stays a string) and must have the default's type: an int is accepted where a float is expected,
and a default of None accepts anything. Config file paths are tried as given, then relative to the
repository root, so `python /path/to/train.py config/train_gpt2.py` works from any directory.

Mistakes a user can make raise UserError; importing this module installs an exception hook that
prints such an error as a single line (no traceback) and exits with status 1, and a Ctrl-C that no
handler caught as the line "interrupted".
"""

import ast
import difflib
import math
import os
import sys
import traceback

ROOT = os.path.dirname(os.path.abspath(__file__))


class UserError(Exception):
    """An error caused by the user's input or environment, printed as one line without a
    traceback."""


def _excepthook(exc_type, exc, tb, _default=sys.excepthook):
    if issubclass(exc_type, UserError):
        print(f"error: {exc}", file=sys.stderr, flush=True)
    elif issubclass(exc_type, KeyboardInterrupt):  # Ctrl-C where a script has no handler of its own
        print("interrupted", file=sys.stderr, flush=True)
    else:
        _default(exc_type, exc, tb)


sys.excepthook = _excepthook


def _unknown_key(key, known):
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
    hint = (
        f"; did you mean {', '.join(close)}?"
        if close
        else f"; known keys: {', '.join(sorted(known))}"
    )
    return UserError(f"unknown config key '{key}'{hint}")


def _check_type(key, value, default):
    if default is None or type(value) is type(default):
        return value
    if isinstance(default, float) and type(value) is int:  # --lr=1 means 1.0
        return float(value)
    raise UserError(f"--{key}: expected {type(default).__name__} like {default!r}, got {value!r}")


def _parse(text):
    try:
        return ast.literal_eval(text)
    except (SyntaxError, ValueError):
        return text  # a bare word such as --device=cpu or --dataset=shakespeare_char


def _find_config_file(path):
    for candidate in (path, os.path.join(ROOT, path)):
        if os.path.isfile(candidate):
            return candidate
    raise UserError(
        f"config file not found: {path} (looked in the current directory and in {ROOT})"
    )


def override(defaults, args):
    """Return a copy of `defaults` (name -> value) with config files and --key=value in `args`
    applied."""
    config = dict(defaults)
    for arg in args:
        if not arg.startswith("--"):
            path = _find_config_file(arg)
            scope = {}
            try:
                with open(path) as f:
                    exec(compile(f.read(), path, "exec"), scope)
            except SyntaxError as e:
                raise UserError(f"config file {path} line {e.lineno}: {e.msg}") from None
            # the file's own code failed, e.g. a NameError or a failed import
            except Exception as e:
                lines = [
                    f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == path
                ]
                where = f" line {lines[-1]}" if lines else ""
                reason = (str(e).strip().splitlines() or [""])[0]
                raise UserError(
                    f"config file {path}{where}: {type(e).__name__}: {reason}"
                ) from None
            for key, value in scope.items():
                if key.startswith("_") or type(value).__name__ == "module":
                    continue
                if key not in config:
                    raise _unknown_key(key, list(config)) from None
                config[key] = _check_type(key, value, defaults[key])
        else:
            key, sep, text = arg[2:].partition("=")
            if not sep:
                raise UserError(f"expected --key=value, got '{arg}'")
            if key not in config:
                raise _unknown_key(key, list(config))
            config[key] = _check_type(key, _parse(text), defaults[key])
    return config


def configure(scope, args=None):
    """Apply sys.argv[1:] (or `args`) to the simple-typed variables of `scope` (a script's
    globals()) but _private ones and CONSTANTS (ROOT or RECORD imported from a module are not
    settings), update them in
    place and return the resolved config as a dict."""
    keys = [
        k
        for k, v in scope.items()
        if not k.startswith("_")
        and not k.isupper()
        and (v is None or isinstance(v, (int, float, bool, str)))
    ]
    config = override({k: scope[k] for k in keys}, sys.argv[1:] if args is None else args)
    scope.update(config)
    return config


# -----------------------------------------------------------------------------
# Settings checks. Each script names every setting's allowed values in one dict right below its
# defaults, SETTINGS = {name: rule}, and checks them in one function right after configure(), before
# it touches anything: configure() has checked the types, check_settings() checks the values against
# these rules.


class Range:
    """A finite number from lo to hi (None: no bound), lo itself excluded when open_lo, hi when
    open_hi."""

    def __init__(self, lo=None, hi=None, open_lo=False, open_hi=False):
        self.lo, self.hi, self.open_lo, self.open_hi = lo, hi, open_lo, open_hi

    def allows(self, value):
        return (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
            and (self.lo is None or (value > self.lo if self.open_lo else value >= self.lo))
            and (self.hi is None or (value < self.hi if self.open_hi else value <= self.hi))
        )

    def __str__(self):
        if self.hi is None:
            return f"{'above' if self.open_lo else 'at least'} {self.lo}"
        excluded = [
            str(end)
            for end, open_end in ((self.lo, self.open_lo), (self.hi, self.open_hi))
            if open_end
        ]
        return f"between {self.lo} and {self.hi}" + (
            " (both excluded)"
            if len(excluded) == 2
            else f" ({excluded[0]} excluded)"
            if excluded
            else ""
        )


class OneOf:
    """One of the given values."""

    def __init__(self, *values):
        self.values = values

    def allows(self, value):
        return any(type(value) is type(v) and value == v for v in self.values)

    def __str__(self):
        return "one of " + ", ".join(map(repr, self.values))


class OutPath:
    """Where a script writes a folder (folder=True) or a file: not a thing of the other kind, nor
    under a file; '' (the script's default place) when optional. Checked without creating
    anything."""

    def __init__(self, folder, optional=False):
        self.folder, self.optional = folder, optional

    def allows(self, value):
        if value == '':
            return self.optional
        path = os.path.abspath(value)
        if os.path.exists(path):
            return os.path.isdir(path) == self.folder
        while not os.path.exists(path):  # the nearest ancestor that exists must be a folder
            path = os.path.dirname(path)
        return os.path.isdir(path)

    def __str__(self):
        return (
            f"a path for a {'folder' if self.folder else 'file'}: not an existing "
            f"{'file' if self.folder else 'folder'}, nor under a file"
        )


class Anything:
    """Any value of the default's type (configure() checked it): a name, a path read later, a
    prompt."""

    def allows(self, value):
        return True


ANY = Anything()
POSITIVE = Range(1)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1, open_hi=True)  # dropout, Adam's betas, momentum
SEED = Range(0, 2**31 - 1)  # numpy's seeds end at 2**32 - 1, and each process adds its rank


def check(config, rules):
    """Refuse (one line naming the setting, its value and what is allowed) the first value of config
    that its rule does not allow. Every setting needs a rule (ANY for those any value of their type
    suits), so a new setting cannot go unchecked by accident; bools need none, configure() allows
    only True and False."""
    unruled = [k for k, v in config.items() if k not in rules and type(v) is not bool]
    assert not unruled, f"settings without a rule: {unruled}"
    for key, rule in rules.items():
        if not rule.allows(config[key]):
            raise UserError(f"{key} must be {rule}, got {config[key]!r}")
