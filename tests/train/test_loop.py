"""The training loop end to end on a tiny model: run directory, resume, preemption,
corrupt checkpoints, divergence, CLI errors. Each test trains for well under a minute."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from seismo import config, models
from seismo.train import checkpoint as ckpt_lib
from seismo.train.loop import train

TINY = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=32",
    "data.batch_size=4", "data.seq_len=16", "data.eval_sequences=8",
    "optimizer.lr=3e-3", "optimizer.warmup_steps=2",
    "run.steps=12", "run.log_every=1", "run.eval_every=6", "run.checkpoint_every=6",
    "run.checkpoint_log_until=2", "run.progress=off", "run.checkpoint_async=false",
]
pytestmark = pytest.mark.xdist_group("train_loop")


def tiny(*extra: str) -> config.Config:
    return config.load(None, [*TINY, *extra])


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows(run_dir) if r.get("kind") == "train"}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ref")
    result = train(tiny(), run_dir)
    return run_dir, result


def test_run_directory_is_complete(reference_run):
    run_dir, result = reference_run
    assert result.status == "finished" and result.exit_code == 0 and result.step == 12
    assert (run_dir / "config.yaml").exists()
    # the config as given, with what `auto` resolved to on this platform: model.attention_impl
    # and mesh.layout (jax's layout of one CPU device)
    assert tiny().model.attention_impl == "auto" and tiny().mesh.layout == "auto"
    want = models.resolve_attention(tiny(), "cpu")
    assert config.load(run_dir / "config.yaml") == want.replace(mesh=dataclasses.replace(want.mesh, layout="physical"))
    assert config.load(run_dir / "config.yaml").model.attention_impl == "explicit"
    all_rows = rows(run_dir)
    evals = [r for r in all_rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 6, 12]
    # loss at initialisation is about ln(vocab) for a byte model with small init
    assert abs(evals[0]["eval_loss"] - np.log(256)) < 1.0
    train_rows = [r for r in all_rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 13))
    for key in ("loss", "lr", "grad_norm", "param_norm", "tokens", "step_time_s", "tokens_per_s", "logz_mean"):
        assert all(key in r for r in train_rows), key
    assert train_rows[-1]["tokens"] == 12 * 4 * 16
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    steps = ckpt_lib.Checkpointer(run_dir / "checkpoints").steps()
    assert steps == [0, 1, 2, 6, 12]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"


def test_stop_and_resume_continues_exactly(reference_run, tmp_path):
    ref_dir, _ = reference_run
    first = train(tiny(), tmp_path, stop_at=7)  # like a preemption at step 7
    assert first.status == "preempted" and first.step == 7
    second = train(tiny(), tmp_path)
    assert second.status == "finished"
    assert train_losses(tmp_path) == train_losses(ref_dir)  # bit-exact


def test_corrupt_newest_checkpoint_falls_back(reference_run, tmp_path):
    ref_dir, _ = reference_run
    train(tiny(), tmp_path, stop_at=7)
    for f in (tmp_path / "checkpoints" / "7").rglob("*"):
        if f.is_file():
            f.write_bytes(b"not a checkpoint")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(tiny(), tmp_path)
    assert result.status == "finished"
    assert any("could not be read" in str(w.message) for w in caught)
    assert train_losses(tmp_path) == train_losses(ref_dir)


def test_divergence_is_recorded_not_raised(tmp_path):
    cfg = tiny("optimizer.lr=1e4", "optimizer.clip_norm=0", "optimizer.warmup_steps=0", "run.steps=30",
               "optimizer.eps=1e-30", "model.init_std=10.0")
    result = train(cfg, tmp_path)
    assert result.status == "diverged" and result.exit_code == 3
    last = rows(tmp_path)[-1]
    assert last["kind"] == "divergence" and last["loss"] is None and last["step"] <= 30
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "diverged"


def _cli(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "seismo.cli", *args], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_bad_config_fails_before_compiling(tmp_path):
    p = _cli("train", "none.yaml", "--run-dir", str(tmp_path / "r"))
    _, err = p.communicate(timeout=60)
    assert p.returncode == 2 and "does not exist" in err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  n_layyers: 3\n")
    p = _cli("train", str(cfg), "--run-dir", str(tmp_path / "r"))
    _, err = p.communicate(timeout=60)
    assert p.returncode == 2 and "unknown key 'model.n_layyers'" in err and "model.n_layers" in err
    assert not (tmp_path / "r").exists()  # nothing was created, nothing compiled


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if (run_dir / "metrics.jsonl").exists() and any(
                r.get("step", 0) >= step and "loss" in r for r in rows(run_dir)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.communicate()}")
        time.sleep(0.2)
    raise AssertionError("training did not reach the step in time")


def _write_cfg(tmp_path: Path, extra: list[str]) -> Path:
    path = tmp_path / "cfg.yaml"
    config.dump(tiny(*extra), path)
    return path


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_trajectory(tmp_path):
    cfg_path = _write_cfg(tmp_path, ["run.steps=60", "run.checkpoint_every=10"])
    ref = tmp_path / "ref"
    train(config.load(cfg_path), ref)
    run_dir = tmp_path / "killed"
    proc = _cli("train", str(cfg_path), "--run-dir", str(run_dir))
    _wait_for_step(run_dir, 25, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (json.loads((run_dir / "status.json").read_text())["status"] == "finished")
    resumed = _cli("train", str(cfg_path), "--run-dir", str(run_dir))
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert train_losses(run_dir) == train_losses(ref)


@pytest.mark.slow
def test_sigterm_saves_and_exits_zero(tmp_path):
    cfg_path = _write_cfg(tmp_path, ["run.steps=100000", "optimizer.warmup_steps=2", "run.checkpoint_every=100000",
                                     "run.eval_every=100000", "run.log_every=1"])
    run_dir = tmp_path / "run"
    proc = _cli("train", str(cfg_path), "--run-dir", str(run_dir))
    _wait_for_step(run_dir, 5, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "preempted"
    assert status["step"] in ckpt_lib.Checkpointer(run_dir / "checkpoints").steps()
