"""The install: no module of this repo shadows an installed package, the locks are what the ranges resolve to, and
every run records its environment (env.json)."""
import importlib.metadata
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def repo_import_names(root=ROOT):
    """Top-level import names this repo puts first on sys.path: the modules and packages at the root (our scripts
    run from there), in tools/ (its scripts run from there) and in tests/ (pytest puts it on sys.path). A folder without __init__.py is a namespace package,
    which any installed module or package of that name outranks, so it cannot shadow one."""
    names = {}
    for d in (root, os.path.join(root, "tools"), os.path.join(root, "tests")):
        for f in os.listdir(d) if os.path.isdir(d) else []:
            p = os.path.join(d, f)
            if f.endswith(".py"):
                names[f[:-3]] = os.path.relpath(p, root)
            elif os.path.isfile(os.path.join(p, "__init__.py")):
                names[f] = os.path.relpath(p, root)
    return names


def clashes(ours, installed):
    """{name: (our file, [distributions])} for every import name both this repo and an installed distribution own."""
    return {n: (path, sorted(set(installed[n]))) for n, path in ours.items() if n in installed}


def test_no_repo_module_shadows_an_installed_package():
    # transformers 5.25 imports Hugging Face's `kernels` package; our old top-level kernels.py shadowed it and broke
    # every import of transformers' modeling code. This catches the next such clash where it first appears.
    found = clashes(repo_import_names(), importlib.metadata.packages_distributions())
    assert not found, "repo modules shadow installed packages (rename ours): " + ", ".join(
        f"{path} hides '{n}' of {'/'.join(d)}" for n, (path, d) in found.items())


def test_clash_check_finds_a_restored_kernels_py(tmp_path):
    # the check itself: a repo with kernels.py at its root, next to an installed `kernels` distribution
    (tmp_path / "tests").mkdir()
    (tmp_path / "kernels.py").write_text("")
    (tmp_path / "sampler.py").write_text("")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "dev").mkdir()  # no __init__.py: a namespace package, never a clash
    ours = repo_import_names(str(tmp_path))
    assert set(ours) == {"kernels", "sampler", "pkg"}
    installed = {"kernels": ["kernels"], "pkg": ["some-dist"], "dev": ["x"], "torch": ["torch"]}
    assert clashes(ours, installed) == {"kernels": ("kernels.py", ["kernels"]), "pkg": ("pkg", ["some-dist"])}


def _pins(path):
    return dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", open(os.path.join(ROOT, path)).read(), re.M))


@pytest.mark.parametrize("lock", ["requirements.lock", "requirements-gpu-stack.lock"])
def test_lock_pins_every_requirement_and_no_torch(lock):
    pins = {k.lower().replace("_", "-"): v for k, v in _pins(lock).items()}
    assert "torch" not in pins and not any(k.startswith("nvidia-") for k in pins)  # torch is installed separately
    for req in ("requirements.txt", "requirements-dev.txt"):
        for line in open(os.path.join(ROOT, req)):
            name = re.match(r"\s*([A-Za-z0-9_.\-]+)", line.split("#")[0])
            if name and not line.startswith("-r"):
                assert name.group(1).lower().replace("_", "-") in pins, f"{lock} does not pin {name.group(1)} ({req})"


def test_the_suite_runs_on_its_lock():
    # the venv this suite runs in holds exactly the locked versions (a CUDA torch's own triton excepted), so the
    # README's numbers and these tests come from one set of versions. Not on `setup.sh latest`'s venv.
    if os.path.basename(sys.prefix) == ".venv-latest" or os.environ.get("NANOR1V_UNLOCKED"):
        pytest.skip("the unlocked (newest allowed) venv")
    import torch
    lock = "requirements-gpu-stack.lock" if torch.__version__.startswith("2.11.") else "requirements.lock"
    wrong = []
    for name, want in _pins(lock).items():
        if name == "triton" and torch.version.cuda:
            continue
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            have = None
        if have != want:
            wrong.append(f"{name} {have} (lock: {want})")
    assert not wrong, f"this venv differs from {lock} (rerun bash scripts/setup.sh): " + ", ".join(wrong)


def check_env_json(directory, world_size=1, script=None):
    """directory/env.json is a complete record of what the run ran on (used by the scripts' own tests)."""
    with open(os.path.join(directory, "env.json")) as f:
        env = json.load(f)
    import torch
    assert env["packages"]["torch"] == torch.__version__ and env["python"] == ".".join(map(str, sys.version_info[:3]))
    for name in ("transformers", "triton", "tokenizers", "numpy", "pillow", "math-verify"):
        assert env["packages"][name] == importlib.metadata.version(name), name
    assert {"torch_cuda", "gpus", "gpu_count", "driver", "git_commit", "git_dirty", "command"} <= set(env)
    assert env["world_size"] == world_size and env["gpu_count"] == len(env["gpus"])
    assert env["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", env["git_commit"])
    if script:
        assert any(a.endswith(script) for a in env["command"]), env["command"]
    return env


def test_environment_names_the_code_and_the_command():
    import plumbing
    env = plumbing.environment()
    # this checkout is a git repo: the commit is the HEAD of the repo the code came from, dirty or not
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert env["git_commit"] == head.stdout.strip() and isinstance(env["git_dirty"], bool)
    assert env["command"][0] == sys.executable


def test_wandb_missing_stops_the_run_before_the_model_loads(tmp_path):
    # wandb_log=True without wandb installed: one clear error at start-up, not after a 38B load
    fake = tmp_path / "nowandb"
    fake.mkdir()
    (fake / "wandb.py").write_text("raise ImportError('No module named wandb')\n")
    env = dict(os.environ, PYTHONPATH=str(fake), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "grpo.py", "--wandb_log=True", f"--out_dir={tmp_path / 'out'}",
                        "--init_from=/nonexistent/model"], cwd=ROOT, capture_output=True, text=True, env=env,
                       timeout=120)
    assert p.returncode != 0 and "wandb_log=True needs wandb" in p.stderr, p.stderr[-2000:]
    assert "/nonexistent/model" not in p.stderr  # it stopped before looking for the model


class FakeWandb:
    """Records wandb.init / log calls (the real wandb needs an account or an offline directory)."""

    def __init__(self):
        self.inits, self.logs = [], []

    def init(self, **kw):
        self.inits.append(kw)
        return type("Run", (), {"id": kw.get("id") or "run-abc123"})()

    def log(self, d, step=None):
        self.logs.append((step, d))


def test_wandb_resume_continues_the_same_run(tmp_path, monkeypatch):
    import plumbing
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = str(tmp_path / "run")
    assert plumbing.wandb_init(False, "p", "n", {}, out, resume=False) is None and not fake.inits
    assert plumbing.wandb_init(True, "p", "n", {"a": 1}, out, resume=False) is fake
    assert fake.inits[-1]["id"] is None and fake.inits[-1]["resume"] is None
    assert open(os.path.join(out, "wandb_run_id.txt")).read().strip() == "run-abc123"
    plumbing.wandb_init(True, "p", "n", {"a": 1}, out, resume=True)  # --init_from=resume: the same run, continued
    assert fake.inits[-1]["id"] == "run-abc123" and fake.inits[-1]["resume"] == "must"
