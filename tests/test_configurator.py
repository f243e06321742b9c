# configurator.py: config file + --key=value overrides with type checking, on a fake script's globals.
import os

import pytest

from plumbing.configurator import configure


def defaults():
    # what a script's globals() look like: config values plus things that are not config
    return dict(batch_size=8, learning_rate=1e-3, compile=False, out_dir='out', wandb_run_name='run',
                betas=(0.9, 0.95), stages=[4096, 8192], init_from=None, os=os, _private=1, __name__='__main__')


def write(tmp_path, text, name='cfg.py'):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_file_then_overrides(tmp_path):
    g = defaults()
    path = write(tmp_path, "batch_size = 16\nout_dir = 'out-file'\nstages = [1024]\n")
    config = configure(g, [path, '--learning_rate=3e-4'])
    assert g['batch_size'] == 16 and g['out_dir'] == 'out-file' and g['stages'] == [1024]
    assert g['learning_rate'] == 3e-4 and g['compile'] is False
    # the returned config holds only the config keys, with their final values
    assert set(config) == {'batch_size', 'learning_rate', 'compile', 'out_dir', 'wandb_run_name', 'betas',
                           'stages', 'init_from'}
    assert config['batch_size'] == 16 and config['learning_rate'] == 3e-4


def test_cli_beats_file_whatever_the_order(tmp_path):
    g = defaults()
    path = write(tmp_path, "batch_size = 16\nlearning_rate = 0.5\n")
    configure(g, ['--batch_size=32', path])
    assert g['batch_size'] == 32 and g['learning_rate'] == 0.5


def test_unknown_key_lists_close_matches(tmp_path):
    with pytest.raises(ValueError, match=r"learnig_rate.*learning_rate"):
        configure(defaults(), ['--learnig_rate=1e-4'])
    path = write(tmp_path, "batchsize = 4\n")
    with pytest.raises(ValueError, match=r"batchsize.*cfg\.py.*batch_size"):
        configure(defaults(), [path])
    # a non-config global (a module) cannot be set either
    with pytest.raises(ValueError, match="unknown config key 'os'"):
        configure(defaults(), ['--os=1'])


def test_type_errors_name_key_value_and_type(tmp_path):
    with pytest.raises(ValueError, match=r"batch_size=1\.5.*float.*expected int"):
        configure(defaults(), ['--batch_size=1.5'])
    with pytest.raises(ValueError, match=r"batch_size=True.*expected int"):
        configure(defaults(), ['--batch_size=True'])
    with pytest.raises(ValueError, match=r"learning_rate=.*fast.*expected float"):
        configure(defaults(), ['--learning_rate=fast'])
    with pytest.raises(ValueError, match=r"cfg\.py.*learning_rate='x'.*expected float"):
        configure(defaults(), [write(tmp_path, "learning_rate = 'x'\n")])
    # int -> float is allowed (and converted)
    g = defaults()
    configure(g, ['--learning_rate=3'])
    assert g['learning_rate'] == 3.0 and isinstance(g['learning_rate'], float)


def test_bool_parsing():
    g = defaults()
    configure(g, ['--compile=True'])
    assert g['compile'] is True
    configure(g, ['--compile=false'])
    assert g['compile'] is False
    with pytest.raises(ValueError, match=r"compile=1.*expected bool"):
        configure(defaults(), ['--compile=1'])


def test_string_values():
    g = defaults()
    # split at the first '=' only; a value that is not a literal stays a string
    configure(g, ['--wandb_run_name=lr=1e-5,bs=8', '--out_dir=2024'])
    assert g['wandb_run_name'] == 'lr=1e-5,bs=8'
    assert g['out_dir'] == '2024'  # a str default keeps the typed text, not the int 2024
    configure(g, ["--out_dir='a b'"])
    assert g['out_dir'] == 'a b'


def test_none_default_and_sequences():
    g = defaults()
    configure(g, ['--init_from=resume', '--betas=[0.9,0.99]'])
    assert g['init_from'] == 'resume'
    assert g['betas'] == (0.9, 0.99) and isinstance(g['betas'], tuple)
    g = defaults()
    configure(g, ['--init_from=3'])
    assert g['init_from'] == 3
    with pytest.raises(ValueError, match=r"stages=.*expected list"):
        configure(defaults(), ['--stages=4096'])


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="expected --key=value"):
        configure(defaults(), ['--compile'])
    with pytest.raises(FileNotFoundError, match="nope.py"):
        configure(defaults(), [str(tmp_path / 'nope.py')])
    with pytest.raises(SyntaxError) as e:
        configure(defaults(), [write(tmp_path, "batch_size = = 3\n", 'broken.py')])
    assert 'broken.py' in str(e.value.filename) and e.value.lineno == 1
