"""A stop that reaches the hosts of a multi-process job at different moments, and a checkpoint
that one host cannot read: two `seismo train` processes over loopback (gloo), one CPU device
each. Each case ends with both processes exiting 0 at the same step, and the resumed run equal
to one never interrupted (a two-process reference). A hang fails through the timeout of
`_Pair.wait`, which kills both processes.

The stopped runs' steps are slowed down (a sleep after each step, in a launcher that wraps
`seismo.cli`), so that the stop lands well before the last step whatever the machine; the
read error of one host is injected the same way (Orbax's `Checkpointer.restore` of one step
raising on process 1 only),
since two processes on one machine share one view of the disk."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from seismo import config, rundir
from seismo.train.stop import CHECK_EVERY
from tiny_run import TINY_RUN

pytestmark = [pytest.mark.multiprocess, pytest.mark.xdist_group("coordinated_stop")]  # a group of its own: the longest

STEPS = 150
BASE = [*TINY_RUN, f"run.steps={STEPS}", "optimizer.schedule=constant", f"run.eval_every={STEPS}",
        "run.checkpoint_every=50", "run.checkpoint_log_until=0"]
TIMEOUT = 300  # seconds for one pair of processes, start-up and compile included

# Runs seismo's CLI with two test-only faults, chosen by environment variables: a sleep after
# every training step, and an I/O error when this process (only) restores one step.
LAUNCHER = """
import os, sys, time
import jax
import orbax.checkpoint as ocp
from seismo.train import engine
delay = float(os.environ.get("SEISMO_TEST_STEP_SLEEP", "0"))
if delay:
    build = engine.build
    def slow_build(*a, **k):
        e = build(*a, **k)
        step = e.train_step
        def slow(state, batch):
            out = step(state, batch)
            time.sleep(delay)
            return out
        e.train_step = slow
        return e
    engine.build = slow_build
bad = os.environ.get("SEISMO_TEST_UNREADABLE")  # "process:step"
if bad:
    who, bad_step = map(int, bad.split(":"))
    restore = ocp.Checkpointer.restore
    def failing(self, directory, *a, **k):
        if os.path.basename(str(directory)) == str(bad_step) and jax.process_index() == who:
            raise OSError(5, f"Input/output error (injected on process {who})")
        return restore(self, directory, *a, **k)
    ocp.Checkpointer.restore = failing
from seismo.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Pair:
    """Two processes of one `seismo train` job over loopback."""

    def __init__(self, cfg_path, run_dir, *extra, env=(None, None)):
        port = _port()
        self.procs = []
        for pid in range(2):
            e = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS" and not k.startswith("SLURM_")}
            e.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
                     JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid),
                     **(env[pid] or {}))
            args = [sys.executable, "-c", LAUNCHER, "train", str(cfg_path), "--run-dir", str(run_dir),
                    "--set", "mesh.data=-1", *extra]
            self.procs.append(subprocess.Popen(args, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                               text=True))
        self.start = time.time()

    def signal(self, pid):
        if self.procs[pid].poll() is None:
            self.procs[pid].send_signal(signal.SIGTERM)

    def wait(self):
        """(returncode, status, step) of each process; both are killed past TIMEOUT."""
        out = []
        for p in self.procs:
            try:
                stdout, stderr = p.communicate(timeout=max(1.0, TIMEOUT - (time.time() - self.start)))
            except subprocess.TimeoutExpired:
                for q in self.procs:
                    q.kill()
                pytest.fail(f"the two processes did not finish within {TIMEOUT} s (a hang)")
            m = re.search(r"^(\w+) at step (\d+):", stdout, re.M)
            assert p.returncode == 0 and m, (p.returncode, stdout[-2000:], stderr[-4000:])
            out.append((p.returncode, m.group(1), int(m.group(2))))
        return out


def _rows(run_dir):
    return [json.loads(x) for x in (run_dir / rundir.METRICS_FILE).read_text().splitlines()]


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in _rows(run_dir) if r.get("kind") == "train"}


def _wait_for_step(run_dir, step, pair, timeout=TIMEOUT):
    end = time.time() + timeout
    while time.time() < end:
        if (run_dir / rundir.METRICS_FILE).exists() and any(s >= step for s in _losses(run_dir)):
            return
        if any(p.poll() is not None for p in pair.procs):
            pytest.fail(f"a process exited before step {step}: {[p.returncode for p in pair.procs]}")
        time.sleep(0.1)
    for p in pair.procs:
        p.kill()
    pytest.fail(f"step {step} not reached within {timeout} s")


@pytest.fixture(scope="module")
def cfg_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("coord") / "cfg.yaml"
    config.dump(config.load(None, BASE), path)
    return path


@pytest.fixture(scope="module")
def reference(cfg_path):
    """The uninterrupted two-process run's losses."""
    d = cfg_path.parent / "reference"
    assert all(status == "finished" and step == STEPS for _, status, step in _Pair(cfg_path, d).wait())
    return _losses(d)


def _stopped_then_resumed(cfg_path, run_dir, reference, signals, resume=True, **env):
    """Start a slowed pair, send SIGTERM per `signals` [(delay after step 3, pid)], check that
    both stop at one step with one checkpoint, resume (unless not `resume`) and compare with
    the reference."""
    slow = {"SEISMO_TEST_STEP_SLEEP": "0.05", **env}
    pair = _Pair(cfg_path, run_dir, env=(slow, slow))
    _wait_for_step(run_dir, 3, pair)
    t0 = time.time()
    for delay, pid in signals:
        time.sleep(max(0.0, t0 + delay - time.time()))
        pair.signal(pid)
    (_, s0, k0), (_, s1, k1) = pair.wait()
    assert s0 == s1 == "preempted" and k0 == k1, ((s0, k0), (s1, k1))
    assert 3 < k0 < STEPS
    status = json.loads((run_dir / rundir.STATUS_FILE).read_text())
    assert (status["status"], status["step"]) == ("preempted", k0)
    assert str(k0) in os.listdir(run_dir / rundir.CHECKPOINTS_DIR)
    assert max(_losses(run_dir)) == k0
    if not resume:
        return k0
    assert all(status == "finished" and step == STEPS for _, status, step in _Pair(cfg_path, run_dir).wait())
    got = _losses(run_dir)
    assert sorted(got) == sorted(reference)
    assert [got[s] for s in sorted(got)] == pytest.approx([reference[s] for s in sorted(reference)], rel=1e-6,
                                                          abs=1e-7)
    return k0


@pytest.mark.parametrize("service", ["sync point", "or of the flags"])
def test_sigterm_to_one_process_only_stops_both_at_one_step(cfg_path, reference, tmp_path, service):
    """JAX's preemption sync point decides; with JAX's preemption service off, the OR of the
    hosts' flags every seismo.train.stop.CHECK_EVERY steps does."""
    env = {"JAX_ENABLE_PREEMPTION_SERVICE": "false"} if service == "or of the flags" else {}
    # how the decision was taken does not change what was saved: the sync-point case resumes
    step = _stopped_then_resumed(cfg_path, tmp_path / "run", reference, [(0.0, 1)], resume=not env, **env)
    if env:
        assert step % CHECK_EVERY == 0


def test_sigterm_to_both_processes_one_and_a_half_seconds_apart(cfg_path, reference, tmp_path):
    _stopped_then_resumed(cfg_path, tmp_path / "run", reference, [(0.0, 0), (1.5, 1)])


def test_a_step_unreadable_on_one_process_only_is_restored_by_neither(cfg_path, reference, tmp_path):
    """Steps 1, 2, 4 and 8 saved; process 1 cannot read step 8: both restore step 4 (not
    process 0 step 8 and process 1 step 4), step 8 is set aside with its reason and saved
    again when the run reaches it."""
    d = tmp_path / "run"
    log_spaced = ("--set", "run.checkpoint_log_until=8")  # checkpoints at 1, 2, 4, 8, then every 50
    first = _Pair(cfg_path, d, "--set", "run.steps=8", *log_spaced)
    assert all(s == "finished" and k == 8 for _, s, k in first.wait())
    assert {"4", "8"} <= set(os.listdir(d / rundir.CHECKPOINTS_DIR))
    pair = _Pair(cfg_path, d, *log_spaced, env=(None, {"SEISMO_TEST_UNREADABLE": "1:8"}))
    assert all(s == "finished" and k == STEPS for _, s, k in pair.wait())
    aside = [n for n in os.listdir(d / rundir.CHECKPOINTS_DIR) if n.startswith("8.corrupt-")]
    assert len(aside) == 1, os.listdir(d / rundir.CHECKPOINTS_DIR)
    reason = (d / rundir.CHECKPOINTS_DIR / aside[0] / "REASON.txt").read_text()
    assert "process(es) [1]" in reason, reason
    assert "8" in os.listdir(d / rundir.CHECKPOINTS_DIR)  # saved again when the run came back to it
    got = _losses(d)
    assert [got[s] for s in sorted(reference)] == pytest.approx([reference[s] for s in sorted(reference)],
                                                                rel=1e-6, abs=1e-7)
