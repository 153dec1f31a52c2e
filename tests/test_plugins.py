"""User code everywhere: `--import MODULE` on the command line and `run.plugins` in a config
import the user's registrations before the config is checked, in `train`, in every worker of a
parallel sweep, and wherever a config is loaded. The README's extension example runs word for
word (with a few steps)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from seismo import config
from seismo.models import activations
from seismo.rundir import CONFIG_FILE
from seismo.train.metrics import read_status

ROOT = Path(__file__).resolve().parents[1]
FEW_STEPS = ["--set", "run.steps=2", "--set", "run.eval_every=2", "--set", "optimizer.warmup_steps=1",
             "--set", "run.progress=off", "--set", "data.batch_size=2", "--set", "data.eval_sequences=2"]


def _readme_example() -> tuple[str, str]:
    """The README's 'Adding an activation' section: its Python block and its command."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Adding an activation", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    command = re.search(r"```bash\n(.*?)```", section, re.S).group(1).strip()
    assert "my_activations.py" in section  # the file the README tells the reader to write
    return code, command


def _seismo() -> list[str]:
    """The installed console script (which, unlike `python -m`, does not put the current
    directory on the Python path), else the module."""
    script = Path(sys.executable).with_name("seismo")
    return [str(script)] if script.exists() else [sys.executable, "-m", "seismo.cli"]


def _workdir(tmp_path: Path, code: str) -> Path:
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "my_activations.py").write_text(code)
    return tmp_path


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the user's folder is found because it is the current directory
    return env


@pytest.mark.multiprocess
def test_readme_extension_example_runs_word_for_word(tmp_path):
    code, command = _readme_example()
    assert command == "seismo train configs/tiny.yaml --import my_activations --set model.activation=softsign"
    work = _workdir(tmp_path, code)
    words = command.split()
    assert words[0] == "seismo"
    done = subprocess.run(_seismo() + words[1:] + FEW_STEPS, cwd=work, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    run = work / "runs" / "tiny"
    assert yaml.safe_load((run / CONFIG_FILE).read_text())["model"]["activation"] == "softsign"
    assert read_status(run)["status"] == "finished"
    assert "finished at step 2" in done.stdout

    # without the import the same command is bad input: one line, exit 2, naming the activation
    bare = [w for w in words[1:] if w not in ("--import", "my_activations")]
    failed = subprocess.run(_seismo() + bare + FEW_STEPS + ["--run-dir", "runs/bare"], cwd=work, env=_env(),
                            capture_output=True, text=True, timeout=600)
    assert failed.returncode == 2
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown activation 'softsign'" in lines[0]
    assert not (work / "runs" / "bare" / "checkpoints").exists()


def test_a_module_that_cannot_be_imported_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    from seismo import cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken.py").write_text("raise RuntimeError('half-written module')\n")
    for name, expected in [("no_such_module_xyz", "no module named 'no_such_module_xyz'"),
                           ("broken", "importing 'broken' failed: RuntimeError: half-written module"),
                           ("missing/file.py", "no file 'missing/file.py'")]:
        # (analyze: `train` would install its stop handlers in this process)
        assert cli.main(["analyze", "runs/none", "--import", name]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("seismo analyze: --import: ") and expected in err[0], err
    assert not (tmp_path / "runs").exists()  # nothing was trained or written


@pytest.fixture
def plugin_file(tmp_path):
    name = "softsign_plugin_test"
    path = tmp_path / "user_acts.py"
    path.write_text(
        "import jax.numpy as jnp\n"
        "from seismo.models import activations\n\n"
        f"@activations.register({name!r})\n"
        "def f(x):\n"
        "    '''x / (1 + |x|).'''\n"
        "    return x / (1 + jnp.abs(x))\n")
    yield name, path
    activations.REGISTRY.unregister(name)
    for key in [k for k, m in sys.modules.items() if getattr(m, "__file__", None) == str(path)]:
        del sys.modules[key]


def test_run_plugins_in_a_config_imports_before_the_names_are_checked(plugin_file, tmp_path, monkeypatch):
    from seismo.train.engine import check_config

    name, path = plugin_file
    assert name not in activations.names()
    cfg = config.load(None, [f"run.plugins=[{path}]", f"model.activation={name}"])
    assert name in activations.names()
    check_config(cfg)  # the registered name is valid now
    assert cfg.run.plugins == (str(path),)
    # recorded in config.yaml and imported again from there, once (no second registration)
    config.dump(cfg, tmp_path / "config.yaml")
    again = config.load(tmp_path / "config.yaml")
    assert again.run.plugins == (str(path),) and again.model.activation == name
    # by module name from the current directory, where that same file was imported by path already
    monkeypatch.chdir(path.parent)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(path.parent))])
    by_name = config.import_plugins(["user_acts"])[0]
    assert Path(by_name.__file__) == path


def test_run_plugins_errors_name_the_key():
    with pytest.raises(config.ConfigError, match=r"run\.plugins: no module named 'no_such_module_xyz'"):
        config.load(None, ["run.plugins=[no_such_module_xyz]"])
    with pytest.raises(config.ConfigError, match=r"run\.plugins must be a list of str"):
        config.load(None, ["run.plugins=no_such_module_xyz"])


@pytest.mark.multiprocess
def test_parallel_sweep_workers_import_the_module(tmp_path):
    """A worker process is a fresh `seismo train`; it imports what the sweep was given."""
    code, _ = _readme_example()
    work = _workdir(tmp_path, code)
    sweep = {"name": "plug", "base": "configs/tiny.yaml",
             "set": {"model.activation": "softsign", "model.d_model": 16, "model.n_heads": 2,
                     "model.n_layers": 1, "data.batch_size": 2, "data.seq_len": 16, "data.eval_sequences": 2,
                     "run.steps": 2, "run.eval_every": 2, "optimizer.warmup_steps": 1, "run.progress": "off",
                     "run.checkpoint_every": 2},
             "grid": {"optimizer.lr": [1e-3]}, "execution": "parallel", "workers": 1}
    (work / "plug.yaml").write_text(yaml.safe_dump(sweep))
    done = subprocess.run(_seismo() + ["sweep", "plug.yaml", "--import", "my_activations"], cwd=work,
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    runs = sorted((work / "runs" / "plug" / "runs").iterdir())
    assert len(runs) == 1
    for run in runs:
        assert read_status(run)["status"] == "finished", (run / "train.log").read_text()[-2000:]
        rows = [yaml.safe_load(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in rows if r.get("kind") == "train"]
        assert losses and np.all(np.isfinite(losses))
