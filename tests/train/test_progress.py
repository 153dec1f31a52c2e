"""What a person watching a run sees (seismo.train.metrics.Progress, seismo.train.loop.RunClock,
seismo.sweep.runner.SweepProgress): plain progress lines off a terminal with tokens/s and an
ETA computed by hand here, the compile lines, the end-of-run summary with the parameter count
counted independently, and the sweep's ETA."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from seismo import rundir
from seismo.sweep import runner
from seismo.train import metrics
from seismo.train.metrics import Progress, duration

pytestmark = pytest.mark.xdist_group("progress")


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(metrics.time, "perf_counter", c)
    monkeypatch.setattr(runner.time, "perf_counter", c)
    return c


def test_duration_reads_as_a_person_would():
    assert duration(4.26) == "4.3 s"
    assert duration(42.4) == "42 s"
    assert duration(3 * 60 + 5) == "3 min 05 s"
    assert duration(2 * 3600 + 7 * 60 + 59) == "2 h 07 min"
    assert duration(-1) == "0.0 s"


def test_plain_lines_every_interval_with_tokens_per_second_and_eta(clock, capsys):
    p = Progress(total=100, initial=0, mode="lines", desc="tiny", log_seconds=30, tokens_per_step=64)
    assert p.bar is None and p.lines
    clock.t = 10.0
    assert p.line_due(1, row=False)  # the first recorded step always has a line
    p.line(1, 5.0)
    clock.t = 20.0
    assert not p.line_due(5, row=True)  # 10 s since the last line < 30 s
    clock.t = 45.0
    assert p.line_due(10, row=False)
    p.line(10, 4.0)
    clock.t = 50.0
    assert p.line_due(100, row=False)  # the last step always has a line
    p.line(100, 3.5)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == "seismo: tiny: step 1/100 (1%), loss 5.0000"
    # 9 steps x 64 tokens in the 35 s since the last line; elapsed since the start (t = 0);
    # ETA: 90 steps left at 35 s per 9 steps (the rate since the first recorded step) = 350 s
    assert lines[1] == "seismo: tiny: step 10/100 (10%), loss 4.0000, 16 tokens/s, 45 s elapsed, ETA 5 min 50 s"
    # no ETA at the end; 90 steps x 64 tokens in 5 s
    assert lines[2] == "seismo: tiny: step 100/100 (100%), loss 3.5000, 1,152 tokens/s, 50 s elapsed"


def test_every_row_with_log_seconds_zero_and_modes(clock):
    p = Progress(total=10, initial=0, mode="lines", log_seconds=0)
    p.line(1, 1.0)
    assert p.line_due(2, row=True) and not p.line_due(3, row=False)
    assert not Progress(10, 0, mode="off").line_due(1, True)
    assert Progress(10, 0, mode="auto").lines == (not sys.stderr.isatty())


def test_sweep_eta_from_the_time_per_point(clock):
    s = runner.SweepProgress(4)
    clock.t = 10.0
    assert s.finished() == "1/4 points done in 10 s, ETA 30 s"
    clock.t = 50.0
    assert s.finished(2) == "3/4 points done in 50 s, ETA 17 s"
    clock.t = 60.0
    assert s.finished() == "4/4 points done in 1 min 00 s"


def tiny_params(d: int, n_layers: int, vocab: int = 256, d_ff: int | None = None) -> tuple[int, int]:
    """Parameters of the tiny family counted by hand: untied embedding and head (V x d each),
    per block q, k, v, o (d x d), the MLP (d x 4d and 4d x d) and two layernorm scales (no
    biases anywhere), and the final norm's scale. Returns (total, non-embedding)."""
    f = d_ff or 4 * d
    body = n_layers * (4 * d * d + 2 * d * f + 2 * d) + d
    return body + 2 * vocab * d, body


TINY_CLI = [
    "--set", "model.d_model=32", "--set", "model.n_layers=1", "--set", "model.n_heads=2",
    "--set", "model.max_seq_len=16", "--set", "data.batch_size=4", "--set", "data.seq_len=16",
    "--set", "data.eval_sequences=4", "--set", "optimizer.warmup_steps=1", "--set", "run.steps=8",
    "--set", "run.log_every=2", "--set", "run.eval_every=4", "--set", "run.probe_every=4",
    "--set", "run.checkpoint_every=4", "--set", "run.checkpoint_log_until=0", "--set", "run.checkpoint_async=false",
    "--set", "run.log_seconds=0",
]


def test_train_off_a_terminal_says_compiling_shows_progress_and_sums_up(tmp_path):
    """`seismo train` with stderr a pipe (as under nohup or a cluster log): the default
    run.progress=auto prints plain lines; the compile lines come before the first step's line;
    the summary names the status, the parameters (counted by hand) and the run's files."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    p = subprocess.run([sys.executable, "-m", "seismo.cli", "train", "configs/tiny.yaml", *TINY_CLI,
                        "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=600, env=env,
                       cwd=Path(__file__).resolve().parents[2])
    assert p.returncode == 0, p.stderr[-3000:]
    err = p.stderr.splitlines()
    at = {k: next(i for i, x in enumerate(err) if k in x) for k in
          ("compiling the train step", "train step compiled in", "compiling the probe step",
           "probe step compiled in", "step 1/8", "step 8/8", "finished at step 8/8")}
    assert at["compiling the train step"] < at["train step compiled in"] < at["step 1/8"]
    assert at["compiling the probe step"] < at["probe step compiled in"]
    assert re.search(r"train step compiled in [\d.]+ (s|min)", err[at["train step compiled in"]])
    steps = [int(m.group(1)) for x in err if (m := re.search(r"run: step (\d+)/8 ", x))]
    assert steps == [1, 2, 4, 6, 8]  # the first recorded step, then every row (run.log_seconds=0)
    middle = next(x for x in err if "run: step 4/8" in x)
    assert re.search(r"loss \d+\.\d{4}, [\d,]+ tokens/s, .* elapsed, ETA ", middle), middle
    summary = err[at["finished at step 8/8"]:]
    total, body = tiny_params(32, 1)
    assert f"{total:,} parameters ({body:,} non-embedding)" in summary[0], summary[0]
    assert re.search(r"8 steps in .* \(.* compiling\), [\d,]+ tokens/s after the compile", summary[0])
    final = [r for r in map(rundir.parse_row, (run_dir / "metrics.jsonl").read_text().splitlines())]
    last_train = [r for r in final if r["kind"] == "train"][-1]
    last_eval = [r for r in final if r["kind"] == "eval"][-1]
    assert f"train loss {last_train['loss']:.4f}, eval loss {last_eval['eval_loss']:.4f}" in summary[1], summary[1]
    assert "checkpoints/ (steps 0, 4, 8)" in summary[2] and "metrics.jsonl" in summary[2], summary[2]
    assert p.stdout.strip().endswith(f"(eval loss {last_eval['eval_loss']:.4f})")  # the result line, as before
