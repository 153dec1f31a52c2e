"""run.checkpoint_log_points: N distinct checkpoint steps log-spaced from 1 to run.steps
(seismo.train.checkpoint.log_points), kept by the checkpointer beside the other schedules,
validated (ConfigError, exit 2 from the CLI), and a cadence key (a resume may change it)."""

import subprocess
import sys

import numpy as np
import pytest

from seismo import config
from seismo.config import ConfigError, RunConfig
from seismo.train import checkpoint as ckpt_lib
from seismo.train.loop import train
from seismo.train.ownership import check_config_matches
from tiny_run import tiny_run


def test_log_points_by_hand():
    # 1 -> 10 over 3 points: ratio 10^(1/2) = 3.16 -> 3; then 3 * (10/3)^1 = 10
    assert ckpt_lib.log_points(3, 10) == [1, 3, 10]
    assert ckpt_lib.log_points(2, 10) == [1, 10] and ckpt_lib.log_points(1, 10) == [1]
    assert ckpt_lib.log_points(5, 5) == [1, 2, 3, 4, 5]  # as many points as steps: every step
    assert ckpt_lib.log_points(0, 100) == [] and ckpt_lib.log_points(-3, 100) == []
    with pytest.raises(ValueError, match="do not fit"):
        ckpt_lib.log_points(11, 10)


@pytest.mark.parametrize("n,last", [(40, 800), (40, 500), (10, 1000), (30, 143_000), (7, 7), (25, 40)])
def test_log_points_are_n_distinct_steps_evenly_spread_in_log_step(n, last):
    got = ckpt_lib.log_points(n, last)
    assert len(got) == n and got[0] == 1 and got[-1] == last and all(np.diff(got) >= 1)
    # where the geometric spacing is wider than one step, the ratio between neighbours is
    # close to the even ratio of what is left: compare with numpy's geomspace over the tail
    dense = int(np.argmax(np.diff(got) >= 2)) if max(np.diff(got), default=1) >= 2 else n - 1
    # the head is consecutive (1, 2, 3, ...) up to the first gap
    assert got[:dense + 1] == list(range(1, dense + 2))
    tail = np.array(got[dense:], float)
    if tail.size > 2:
        ideal = np.geomspace(tail[0], last, tail.size)
        np.testing.assert_allclose(tail, ideal, rtol=0.1)


def test_schedule_keeps_log_points_beside_the_other_steps():
    run = RunConfig(steps=100, checkpoint_every=50, checkpoint_log_until=4, checkpoint_log_points=6)
    # by hand: 100^(1/5) = 2.51 -> 3; 3 (100/3)^(1/4) = 7.2 -> 7; 7 (100/7)^(1/3) = 17.0 -> 17;
    # 17 (100/17)^(1/2) = 41.2 -> 41; then 100
    points = ckpt_lib.log_points(6, 100)
    assert points == [1, 3, 7, 17, 41, 100]
    assert ckpt_lib.CheckpointSchedule(run).steps() == sorted({0, 1, 2, 4, 50, 100, *points})
    off = RunConfig(steps=100, checkpoint_every=50, checkpoint_log_until=4)
    assert off.checkpoint_log_points == 0 and ckpt_lib.CheckpointSchedule(off).steps() == [0, 1, 2, 4, 50, 100]


def test_a_run_keeps_exactly_the_scheduled_steps(tmp_path):
    cfg = tiny_run("run.steps=12", "run.checkpoint_every=100", "run.checkpoint_log_points=5")
    train(cfg, tmp_path / "run")
    ck = ckpt_lib.Checkpointer(tmp_path / "run" / "checkpoints", async_save=False)
    try:
        assert ck.steps() == [0, *ckpt_lib.log_points(5, 12)] == [0, 1, 2, 4, 7, 12]
    finally:
        ck.close()


@pytest.mark.parametrize("value,match", [
    ("-1", r"run.checkpoint_log_points must be 0 or more, got -1"),
    ("9", r"run.checkpoint_log_points \(9\) exceeds run.steps \(8\)"),
])
def test_bad_values_are_config_errors(value, match):
    with pytest.raises(ConfigError, match=match):
        tiny_run(f"run.checkpoint_log_points={value}")


def test_cli_bad_value_is_one_line_and_exit_2(tmp_path):
    cfg_path = tmp_path / "cfg.yaml"
    config.dump(tiny_run(), cfg_path)
    p = subprocess.run([sys.executable, "-m", "seismo.cli", "config", str(cfg_path),
                        "--set", "run.checkpoint_log_points=100"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "run.checkpoint_log_points (100) exceeds" in p.stderr


def test_changing_log_points_continues_the_run(tmp_path):
    d = tmp_path / "run"
    train(tiny_run(), d, stop_at=4)
    assert check_config_matches(d, tiny_run("run.checkpoint_log_points=3")) is None
