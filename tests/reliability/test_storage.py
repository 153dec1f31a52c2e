"""A full disk or a read-only run directory mid-run: one line and exit 2 naming the cause,
status.json agreeing with the newest checkpoint, and after the cause is gone the same command
resumes to the losses of a run that never failed. The tests mount a small tmpfs (root on
Linux); where mounting is not allowed they are skipped with the reason."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from seismo import config, rundir
from seismo.train.loop import train

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess, pytest.mark.xdist_group("storage")]

CFG = textwrap.dedent("""\
    model: {d_model: 32, n_layers: 1, n_heads: 2, max_seq_len: 16}
    data: {batch_size: 4, seq_len: 16, eval_sequences: 4}
    optimizer: {warmup_steps: 1}
    run: {steps: 24, progress: "off", checkpoint_every: 1, checkpoint_log_until: 0, checkpoint_async: false,
          log_every: 1, eval_every: 12}
    """)


@pytest.fixture
def disk(tmp_path):
    where = tmp_path / "disk"
    where.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(where)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip() or 'mount failed'}); needs root on Linux")
    yield where
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _remount(where, opts):
    subprocess.run(["mount", "-o", f"remount,{opts}", str(where)], check=True, capture_output=True)


def _cli(cfg_path, run_dir):
    return subprocess.run([sys.executable, "-m", "seismo.cli", "train", str(cfg_path), "--run-dir", str(run_dir)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def _losses(d):
    rows = [json.loads(x) for x in (d / rundir.METRICS_FILE).read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def _checkpoint_steps(d):
    return sorted(int(p.name) for p in (d / rundir.CHECKPOINTS_DIR).iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("storage_ref")
    (tmp / "cfg.yaml").write_text(CFG)
    train(config.load(tmp / "cfg.yaml"), tmp / "run")
    return tmp / "cfg.yaml", _losses(tmp / "run")


def test_full_disk_is_one_line_and_resumes_when_freed(disk, reference):
    cfg_path, want = reference
    run_dir = disk / "run"
    p = _cli(cfg_path, run_dir)
    # Orbax's writer threads log their own errors (tracebacks included) around seismo's line.
    ours = [x for x in p.stderr.splitlines() if x.startswith("seismo train: ")]
    assert p.returncode == 2 and len(ours) == 1, p.stderr[-3000:]
    assert "No space left" in ours[0] and "run the same command again" in ours[0], ours[0]
    status = json.loads((run_dir / rundir.STATUS_FILE).read_text())
    # status.json names a checkpoint that is on disk: the newest, or the one before it when the
    # disk filled between writing a checkpoint and recording it (the resume reads checkpoints)
    steps = _checkpoint_steps(run_dir)
    assert status["status"] == "running" and status["step"] in steps[-2:], (status, steps)
    _remount(disk, "size=64m")  # space freed
    p = _cli(cfg_path, run_dir)
    assert p.returncode == 0, p.stderr[-2000:]
    assert _losses(run_dir) == want, "the resumed run must equal one that never ran out of space"


def test_read_only_run_directory_is_one_line_and_resumes_when_writable(disk, reference):
    cfg_path, want = reference
    _remount(disk, "size=64m")
    run_dir = disk / "run"
    train(config.load(cfg_path), run_dir, stop_at=6)
    _remount(disk, "ro")
    p = _cli(cfg_path, run_dir)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "Read-only file system" in lines[0], p.stderr[-2000:]
    _remount(disk, "rw")
    p = _cli(cfg_path, run_dir)
    assert p.returncode == 0, p.stderr[-2000:]
    assert _losses(run_dir) == want
