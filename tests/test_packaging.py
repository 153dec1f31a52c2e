"""The installed package stands alone: a wheel built from the source, installed into a fresh
virtual environment, finds its presets and studies (package data) and trains from a folder
outside the checkout."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def _build_wheel(tmp: Path) -> Path:
    src = tmp / "src-copy"  # build from a copy: nothing is written into the checkout
    shutil.copytree(REPO / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    dist = tmp / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(src)], check=True, capture_output=True, text=True, timeout=600)
    (wheel,) = dist.glob("seismo-*.whl")
    return wheel


def _fresh_venv(tmp: Path) -> Path:
    """A new venv whose only seismo is the wheel; its dependencies (jax, flax, ...) come from
    this test's environment through a .pth line, whose own .pth files (the editable install
    of the checkout) are not processed."""
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return py


def test_wheel_trains_tiny_from_outside_the_checkout(tmp_path):
    wheel = _build_wheel(tmp_path)
    py = _fresh_venv(tmp_path)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, text=True, timeout=600)
    away = tmp_path / "elsewhere"
    away.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SEISMO_CONFIGS")}
    env["JAX_PLATFORMS"] = "cpu"
    where = subprocess.run([str(py), "-c", "import seismo, seismo.config as c; print(seismo.__file__); "
                            "print(c.CONFIG_ROOT)"], cwd=away, env=env, capture_output=True, text=True, timeout=300)
    module, root = where.stdout.split()
    assert Path(module).is_relative_to(tmp_path / "venv"), f"seismo came from {module}, not the wheel"
    assert Path(root).is_relative_to(tmp_path / "venv") and (Path(root) / "studies" / "qk_layernorm.yaml").is_file()
    cmd = [str(tmp_path / "venv" / "bin" / "seismo"), "train", "tiny", "--run-dir", str(away / "run"),
           "--set", "run.steps=2", "--set", "optimizer.warmup_steps=1", "--set", "run.progress=off",
           "--set", "data.eval_sequences=8"]
    p = subprocess.run(cmd, cwd=away, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    status = json.loads((away / "run" / "status.json").read_text())
    assert status["status"] == "finished" and status["step"] == 2
