"""A run directory keeps its identity and has one writer: a changed config is refused with the
differing keys, --restart sets the old run aside (never deleted), a longer run.steps and
cadence changes continue, a second writer is refused and a stale lock is taken over, any bad
line in metrics.jsonl survives a resume, and a missing final eval row is recomputed."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from seismo import config, rundir
from seismo.analysis import load_run
from seismo.train.loop import train
from seismo.train.ownership import LOCK_FILE, RunDirConflict, RunLock
from tiny_run import tiny_run

pytestmark = pytest.mark.xdist_group("ownership")


def rows(d):
    return [json.loads(x) for x in (d / rundir.METRICS_FILE).read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref") / "run"
    train(tiny_run(), d)
    return d


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """The tiny run stopped at step 4, trained once: the tests that start from it take a copy
    (the same files a fresh `train(tiny_run(), d, stop_at=4)` writes)."""
    d = tmp_path_factory.mktemp("stopped") / "run"
    assert train(tiny_run(), d, stop_at=4).step == 4
    return d


def _stopped_copy(stopped, d):
    shutil.copytree(stopped, d)
    assert json.loads((d / rundir.STATUS_FILE).read_text())["step"] == 4 and not (d / LOCK_FILE).exists()


def test_a_changed_config_is_refused_before_anything_is_written(tmp_path, stopped):
    d = tmp_path / "run"
    _stopped_copy(stopped, d)
    before = {p: p.read_bytes() for p in (d / rundir.METRICS_FILE, d / rundir.CONFIG_FILE)}
    with pytest.raises(RunDirConflict, match=r"optimizer.lr: 0.003 -> 0.01.*--run-dir.*--restart"):
        train(tiny_run("optimizer.lr=1e-2"), d)
    with pytest.raises(RunDirConflict, match=r"model.d_model: 32 -> 64"):
        train(tiny_run("model.d_model=64"), d)
    assert {p: p.read_bytes() for p in before} == before, "a refused start changed the run directory"
    assert not (d / LOCK_FILE).exists()


def test_cli_refusal_is_one_line_and_restart_sets_the_old_run_aside(tmp_path, stopped):
    d = tmp_path / "run"
    cfg_path = tmp_path / "cfg.yaml"
    config.dump(tiny_run(), cfg_path)
    _stopped_copy(stopped, d)
    old_rows = rows(d)
    cmd = [sys.executable, "-m", "seismo.cli", "train", str(cfg_path), "--run-dir", str(d), "--set", "optimizer.lr=1e-2"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "optimizer.lr" in p.stderr
    p = subprocess.run([*cmd, "--restart"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    (aside,) = [q for q in tmp_path.iterdir() if q.name.startswith("run.aside-")]
    assert rows(aside) == old_rows, "the set-aside run must be kept whole"
    assert config.load(d / rundir.CONFIG_FILE).optimizer.lr == 1e-2
    assert json.loads((d / rundir.STATUS_FILE).read_text())["status"] == "finished"


def test_longer_run_and_cadence_changes_continue(tmp_path, stopped, finished):
    d = tmp_path / "run"
    _stopped_copy(stopped, d)
    train(tiny_run("run.log_every=2", "run.eval_every=2"), d, stop_at=6)  # cadence: continues
    result = train(tiny_run("run.steps=12"), d)  # longer: continues, says the horizon moved
    assert result.status == "finished" and result.step == 12
    warn = [r for r in rows(d) if r["kind"] == "warning"]
    assert len(warn) == 1 and "run.steps extended from 8 to 12" in warn[0]["warning"] and warn[0]["step"] == 6
    first = {r["step"]: r["loss"] for r in rows(finished) if r["kind"] == "train"}
    got = {r["step"]: r["loss"] for r in rows(d) if r["kind"] == "train"}
    assert all(got[s] == first[s] for s in (1, 2, 3, 4, 6)), "the steps before the change are the original run's"
    assert config.load(d / rundir.CONFIG_FILE).run.steps == 12
    with pytest.raises(RunDirConflict, match=r"run.steps: 12 -> 10"):
        train(tiny_run("run.steps=10"), d)  # shorter is not an extension


def test_a_second_writer_is_refused_and_a_stale_lock_taken_over(tmp_path, finished):
    d = tmp_path / "run"
    d.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (d / LOCK_FILE).write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename, "started": 0,
                                               "what": "seismo train"}))
        with pytest.raises(RunDirConflict, match=rf"in use by seismo train \(pid {holder.pid} on"):
            train(tiny_run(), d)
        assert not (d / rundir.METRICS_FILE).exists()
    finally:
        holder.kill()
        holder.wait()
    result = train(tiny_run(), d)  # the holder is gone: its lock is stale
    assert result.status == "finished" and not (d / LOCK_FILE).exists()
    assert (d / f"{LOCK_FILE}.stale-{holder.pid}").exists()
    with RunLock(d, "test"):
        with pytest.raises(RunDirConflict, match="in use by test"):
            RunLock(d, "another").acquire()


BAD_LINES = [b"\xff\xfe not utf-8", b"[1, 2, 3]", b'{"step": "abc"}', b'{"step": 7, "loss": 1.']


def test_bad_lines_survive_resume_and_readers(tmp_path, stopped, finished):
    """Invalid UTF-8, a JSON list, a step that is not a number and a half-written last line."""
    d = tmp_path / "run"
    _stopped_copy(stopped, d)
    with (d / rundir.METRICS_FILE).open("ab") as f:
        f.write(b"\n".join(BAD_LINES) + b"\n")
    result = train(tiny_run(), d)
    assert result.status == "finished"
    got = {r["step"]: r["loss"] for r in rows(d) if r["kind"] == "train"}
    assert got == {r["step"]: r["loss"] for r in rows(finished) if r["kind"] == "train"}
    aside = (d / rundir.METRICS_ASIDE_FILE).read_bytes()
    for bad in BAD_LINES:
        assert bad.decode("utf-8", errors="replace").encode() in aside, "a bad line is kept aside, not deleted"
    with (d / rundir.METRICS_FILE).open("ab") as f:  # readers skip and count them too
        f.write(b"\n".join(BAD_LINES) + b"\n")
    run = load_run(d)
    assert run.skipped_lines == len(BAD_LINES) and run.final_eval_loss == load_run(finished).final_eval_loss


def test_a_missing_final_eval_row_is_recomputed(tmp_path, finished):
    d = tmp_path / "run"
    shutil.copytree(finished, d)
    kept = [r for r in rows(d) if not (r["kind"] == "eval" and r["step"] == 8)]  # killed before the last eval
    (d / rundir.METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in kept))
    result = train(tiny_run(), d)
    want = [r["eval_loss"] for r in rows(finished) if r["kind"] == "eval" and r["step"] == 8]
    assert [r["eval_loss"] for r in rows(d) if r["kind"] == "eval" and r["step"] == 8] == want
    assert result.final_eval_loss == want[0]
