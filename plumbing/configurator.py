"""
nanoGPT-style configuration: a script's module globals are its defaults; a flat Python config file and
--key=value flags override them, with type checking. Usage at the top of a script, after its globals:

    from plumbing.configurator import configure
    config = configure(globals(), sys.argv[1:])   # updates globals() in place
    print(config)                                  # once; also stored in every checkpoint

    $ python grpo.py config/grpo_8gpu.py --learning_rate=1e-6 --wandb_run_name=lr=1e-6

Order: config files first (in the order given), then every --key=value flag, so the command line always
beats a file. Only existing config keys may be set: a typo is an error listing close matches, never a new
silent global. --help (or -h) prints the settings with their values (after any config files given before it) and
the comment beside each in the script's config block, then exits.
"""

import ast
import difflib
import io
import os
import sys
import tokenize

from plumbing import watchdog

# the types a config value may have (everything else in a script's globals is not config)
CONFIG_TYPES = (int, float, bool, str, list, tuple, type(None))


def config_keys(g):
    # the keys of a script's globals that are config: public names holding plain values
    return [k for k, v in g.items() if not k.startswith('_') and isinstance(v, CONFIG_TYPES)]


def _unknown(key, keys, where):
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else f" Known keys: {', '.join(sorted(keys))}"
    return ValueError(f"configurator: unknown config key '{key}' ({where}).{hint}")


def _is_schedule(v):
    # a schedule: [[from_step, value], ...] (grpo.py's max_new_tokens); a plain number means [[0, number]]
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, (int, float)) for x in p) for p in v)


def check_type(key, value, default, where):
    """Return value converted to the default's type, or raise a ValueError naming key, value and type.
    Rules: None defaults accept anything; int -> float is allowed; bool only from True/False (a default of 'auto':
    'auto' or a bool);
    a list default accepts a tuple and vice versa (converted); a schedule default ([[from_step, value], ...])
    accepts a plain integer, meaning [[0, integer]]; a str default keeps the raw string."""
    if default is None:
        return value
    expected = type(default)
    bad = ValueError(f"configurator: {where}: {key}={value!r} has type {type(value).__name__}, "
                     f"expected {expected.__name__} (default {default!r})")
    if expected is bool or default == 'auto':  # a default of 'auto' (activation_checkpointing) takes a bool too
        if default == 'auto' and value == 'auto':
            return value
        if isinstance(value, str) and value.lower() in ('true', 'false'):
            return value.lower() == 'true'
        if not isinstance(value, bool):
            raise bad
        return value
    if isinstance(value, bool):  # bool is a subclass of int: never let True pass as 1
        raise bad
    if expected is float and isinstance(value, (int, float)):
        return float(value)
    if expected is float and isinstance(value, str):
        try:
            return float(value)  # 'inf', 'nan' are not Python literals
        except ValueError:
            raise bad from None
    if expected in (list, tuple) and isinstance(value, (list, tuple)):
        return expected(value)
    if _is_schedule(default) and isinstance(value, int):  # one value for the whole run
        return expected([[0, value]])
    if not isinstance(value, expected):
        raise bad
    return value


def parse_value(s, default):
    # a Python literal when it is one (numbers, bools, None, lists, quoted strings), else the raw string
    try:
        value = ast.literal_eval(s)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return s
    # a str default keeps what was typed: --out_dir=2024 is the directory '2024', not the int 2024
    if isinstance(default, str) and not isinstance(value, str):
        return s
    return value


def read_config_file(path):
    """Execute a flat config file in a fresh namespace and return its public assignments."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"configurator: config file '{path}' not found "
                                f"(positional arguments are config files; overrides are --key=value)")
    with open(path) as f:
        src = f.read()
    ns = {}
    exec(compile(src, path, 'exec'), ns)  # compile with the path so a syntax error names the file and line
    return {k: v for k, v in ns.items() if not k.startswith('_')}


def help_text(g, keys, path=None):
    """The settings of a script as --help prints them: its config block read from its source (path, default
    g['__file__']), each key with its current value and the comment beside it, the block's own comment lines as
    headings."""
    path = path or g.get('__file__')
    name = os.path.basename(path) if path else 'script'
    out = [f"usage: python {name} [config files] [--key=value ...]   (torchrun --nproc_per_node=N {name} ... too)"]
    doc = (g.get('__doc__') or '').strip().split('\n\n')[0]
    if doc:
        out += ['', doc]
    out += ['', 'settings (--key=value; the value shown is the default, or what the config files set):']
    if not path or not os.path.isfile(path):
        return '\n'.join(out + [f"  --{k}={g[k]!r}" for k in keys])
    src = open(path).read()
    comments = {}  # line -> the comment on it
    for t in tokenize.generate_tokens(io.StringIO(src).readline):
        if t.type == tokenize.COMMENT:
            comments[t.start[0]] = t.string.lstrip('#').strip()
    where = {}  # key -> the line of its assignment in the config block
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in keys and node.col_offset == 0:
                where.setdefault(node.targets[0].id, node.lineno)
    if not where:
        return '\n'.join(out + [f"  --{k}={g[k]!r}" for k in keys])
    lines = src.splitlines()
    by_line = {ln: k for k, ln in where.items()}
    for ln in range(min(where.values()), max(where.values()) + 1):
        if ln in by_line:
            k = by_line[ln]
            v = g[k] if isinstance(g[k], str) else repr(g[k])
            entry = f"  --{k}={v}"
            out.append(f"{entry:<40} {comments[ln]}" if ln in comments else entry)
        elif lines[ln - 1].startswith('#') and ln in comments and not set(comments[ln]) <= set('-'):
            out.append(f"# {comments[ln]}")
    rest = [k for k in keys if k not in where]  # set elsewhere (e.g. computed): value only
    return '\n'.join(out + [f"  --{k}={g[k]!r}" for k in rest])


def configure(g, argv, keys=None, sources=None):
    """Update the dict g (a script's globals()) from config files and --key=value flags in argv.
    keys: the config keys (default: config_keys(g), computed before any override).
    sources: a dict to fill with {key: where it was set: "config file PATH" or "command line"} for the keys a file
    or a flag set (a key left at the script's default is absent: eval.py lets a checkpoint's generation_config.json
    set those). Returns {key: final value} for the config keys only. With --help / -h in argv: prints help_text
    and exits."""
    sources = {} if sources is None else sources
    watchdog.install_hooks()  # bad input from here on: one line (plumbing/watchdog.py)
    keys = list(keys) if keys is not None else config_keys(g)
    files = [a for a in argv if not a.startswith('-')]
    flags = [a for a in argv if a.startswith('--') and a != '--help']
    # 1) config files, in order
    for path in files:
        for k, v in read_config_file(path).items():
            if k not in keys:
                raise _unknown(k, keys, f"in config file {path}")
            g[k] = check_type(k, v, g[k], f"config file {path}")
            sources[k] = f"config file {path}"
    if '--help' in argv or '-h' in argv:
        print(help_text(g, keys))
        sys.exit(0)
    # 2) --key=value flags: split at the first '=' only, so values may contain '='
    for arg in flags:
        if '=' not in arg:
            raise ValueError(f"configurator: bad argument '{arg}': expected --key=value")
        k, s = arg[2:].split('=', 1)
        if k not in keys:
            raise _unknown(k, keys, f"from {arg}")
        g[k] = check_type(k, parse_value(s, g[k]), g[k], f"argument {arg}")
        sources[k] = "command line"
    return {k: g[k] for k in keys}
