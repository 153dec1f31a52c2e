"""SIGTERM at every phase of a run: during the first step (its compile), a later step, an eval,
a checkpoint save and the final save. Each exits 0 (preempted, or finished when the signal
comes with the last save), status.json names the newest checkpoint's step, and the resumed run
equals one never interrupted. The signal is sent by the process to itself from inside the
phase (in-process, so the handler runs on the main thread as in `seismo train`); start-up is
covered through the CLI in test_bad_input.py."""

import json
import os
import signal
import threading

import pytest

from seismo import rundir
from seismo.train import checkpoint as ckpt_lib
from seismo.train import engine as engine_lib
from seismo.train import loop
from seismo.train.loop import train
from tiny_run import tiny_run

pytestmark = pytest.mark.xdist_group("signals")



def tiny():
    return tiny_run("run.eval_every=3", "run.checkpoint_every=2")


def losses(d):
    rows = [json.loads(x) for x in (d / rundir.METRICS_FILE).read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("sig_ref") / "run"
    train(tiny(), d)
    return losses(d)


def _sigterm():
    os.kill(os.getpid(), signal.SIGTERM)


def _patch_phase(monkeypatch, phase):
    """Make the chosen phase send SIGTERM to this process while it runs."""
    calls = {"n": 0}
    if phase in ("first step", "later step"):
        real_build = engine_lib.build

        def build(*a, **k):
            e = real_build(*a, **k)
            step = e.train_step

            def signalling_step(state, batch):
                calls["n"] += 1
                if calls["n"] == (1 if phase == "first step" else 5):
                    _sigterm()
                return step(state, batch)

            e.train_step = signalling_step
            return e

        monkeypatch.setattr(engine_lib, "build", build)
    elif phase == "eval":
        real = loop.Feed.evaluate

        def evaluate(self, params):
            calls["n"] += 1
            if calls["n"] == 2:  # the eval at step 3 (the first is the loss at init)
                _sigterm()
            return real(self, params)

        monkeypatch.setattr(loop.Feed, "evaluate", evaluate)
    else:
        real = ckpt_lib.Checkpointer.save
        when = 4 if phase == "checkpoint save" else 8

        def save(self, step, state, record=None):
            if step == when:
                _sigterm()
            return real(self, step, state, record)

        monkeypatch.setattr(ckpt_lib.Checkpointer, "save", save)


@pytest.mark.parametrize("phase, status, step", [
    ("first step", "preempted", 1),
    ("later step", "preempted", 5),
    ("eval", "preempted", 4),
    ("checkpoint save", "preempted", 5),
    ("final save", "finished", 8),
])
def test_sigterm_in_each_phase_saves_agrees_and_resumes(monkeypatch, tmp_path, reference, phase, status, step):
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers need the main thread")
    d = tmp_path / "run"
    _patch_phase(monkeypatch, phase)
    result = train(tiny(), d)
    monkeypatch.undo()
    assert result.exit_code == 0 and (result.status, result.step) == (status, step)
    saved = json.loads((d / rundir.STATUS_FILE).read_text())
    newest = max(ckpt_lib.Checkpointer(d / rundir.CHECKPOINTS_DIR).steps())
    assert saved["status"] == status and saved["step"] == newest == step, (saved, newest)
    assert train(tiny(), d).status == "finished"
    assert losses(d) == reference, f"resumed after a SIGTERM in the {phase}: not the uninterrupted run"
