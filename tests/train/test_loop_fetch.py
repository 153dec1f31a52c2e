"""The loop's host work: losses fetched in windows, batches handed over as host arrays.
Whatever the window, every step's loss is checked, rows carry the same numbers, and a
divergence is recorded at the first non-finite step with nothing after it."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seismo import config
from seismo.train import engine as engine_lib
from seismo.train import loop
from seismo.train import mesh as mesh_lib
from seismo.train.loop import train

TINY = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=32",
    "data.batch_size=4", "data.seq_len=16", "data.eval_sequences=8",
    "optimizer.lr=3e-3", "optimizer.warmup_steps=2",
    "run.steps=24", "run.eval_every=12", "run.checkpoint_every=12",
    "run.checkpoint_log_until=2", "run.progress=off", "run.checkpoint_async=false",
]
DIVERGE = ["optimizer.lr=1e4", "optimizer.clip_norm=0", "optimizer.warmup_steps=0", "run.steps=30",
           "optimizer.eps=1e-30", "model.init_std=10.0"]
pytestmark = pytest.mark.xdist_group("train_loop")


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def count_fetches(monkeypatch) -> list[int]:
    """The number of pending steps of each loss fetch."""
    sizes: list[int] = []
    real = loop.Recorder._losses

    def counted(self, losses):
        sizes.append(len(losses))
        return real(self, losses)

    monkeypatch.setattr(loop.Recorder, "_losses", counted)
    return sizes


def test_window_fetches_every_loss_in_few_transfers(tmp_path, monkeypatch):
    every_step = tmp_path / "every_step"
    train(config.load(None, [*TINY, "run.log_every=1"]), every_step)
    sizes = count_fetches(monkeypatch)
    windowed = tmp_path / "windowed"
    train(config.load(None, [*TINY, "run.log_every=4"]), windowed)
    assert sum(sizes) == 24  # every step's loss reached the host once
    assert len(sizes) <= 24 // 4 + 4  # one fetch per row, a few more at checkpoints (1, 2, 12, 24)
    assert max(sizes) <= 4
    ref = {r["step"]: r for r in rows(every_step) if r["kind"] == "train"}
    got = {r["step"]: r for r in rows(windowed) if r["kind"] == "train"}
    assert sorted(got) == [4, 8, 12, 16, 20, 24]
    for step, row in got.items():  # the same numbers, fetched in one stacked transfer or alone
        assert {k: row[k] for k in ("loss", "grad_norm", "lr")} == {k: ref[step][k] for k in ("loss", "grad_norm", "lr")}
    assert [r["step"] for r in rows(windowed) if r["kind"] == "eval"] == [0, 12, 24]


def test_window_is_capped(tmp_path, monkeypatch):
    sizes = count_fetches(monkeypatch)
    train(config.load(None, [*TINY, "run.log_every=1000", "run.steps=35", "run.checkpoint_every=1000",
                             "run.eval_every=1000"]), tmp_path)
    assert sum(sizes) == 35 and max(sizes) <= loop.FETCH_WINDOW
    train_rows = [r for r in rows(tmp_path) if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [35]  # the last step always has a row


def nan_from(monkeypatch, bad_step: int) -> None:
    """The engine's plain step reports a NaN loss from step `bad_step` on (the state is unchanged)."""
    real_build = engine_lib.build

    def build(*a, **k):
        e = real_build(*a, **k)
        step = e.train_step

        def nan_step(state, batch):
            state, metrics = step(state, batch)
            bad = jnp.where(state.step >= bad_step, jnp.nan, 0.0)
            return state, {**metrics, "loss": metrics["loss"] + bad}

        e.train_step = nan_step
        return e

    monkeypatch.setattr(engine_lib, "build", build)


@pytest.mark.parametrize("log_every, bad_step", [(1, 7), (10, 7), (4, 8), (10, 13)])
def test_divergence_found_at_its_step_whatever_the_window(tmp_path, monkeypatch, log_every, bad_step):
    nan_from(monkeypatch, bad_step)
    result = train(config.load(None, [*TINY, f"run.log_every={log_every}"]), tmp_path)
    got = rows(tmp_path)
    assert result.status == "diverged" and result.exit_code == 3 and result.step == bad_step
    assert got[-1]["kind"] == "divergence" and got[-1]["step"] == bad_step  # nothing recorded after it
    assert got[-1]["loss"] is None and np.isfinite(got[-1]["grad_norm"])  # the whole metrics of that step
    assert all(r["step"] < bad_step for r in got[:-1])
    assert [r["step"] for r in got if r["kind"] == "eval"] == [0, 12][:1 + (bad_step > 12)]
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "diverged"


def test_real_divergence_is_recorded(tmp_path):
    result = train(config.load(None, [*TINY, *DIVERGE, "run.log_every=10"]), tmp_path)
    assert result.status == "diverged" and rows(tmp_path)[-1]["kind"] == "divergence"


def test_single_process_batches_are_host_arrays():
    cfg = config.load(None, [*TINY, "run.log_every=1"])
    engine = engine_lib.build(cfg, mesh_lib.make_mesh(cfg.mesh))
    feed = loop.Feed(engine)
    batch = feed.batch(3)
    assert all(isinstance(v, np.ndarray) for v in batch.values())
    state, metrics = engine.train_step(engine.init_state(), batch)  # the jitted step places them
    assert np.isfinite(float(metrics["loss"]))


@pytest.mark.parametrize("lead", [(), (3,)])
def test_summary_layout_round_trip(lead):
    """The probe step's summary packed into one vector per dtype inside a jit, fetched and
    split back: every array exactly as it was, with its shape, dtype and a points axis."""
    rng = np.random.default_rng(0)
    summary = {"a": rng.normal(size=lead).astype(np.float32), "b": rng.normal(size=(*lead, 4)).astype(np.float32),
               "n": rng.integers(0, 9, size=(*lead, 2, 3)).astype(np.int32),
               "c": rng.normal(size=(*lead, 5)).astype(np.float32)}
    layout = engine_lib.SummaryLayout(lead)
    packed = jax.device_get(jax.jit(layout.pack)(summary))
    assert sorted(packed) == ["float32", "int32"] and packed["float32"].shape == (*lead, 10)
    got = layout.unpack(packed)
    assert list(got) == sorted(summary)  # as jit returns a dict
    for k, v in summary.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
        np.testing.assert_array_equal(got[k], v)


def test_engine_probe_step_summary_is_the_probes(tmp_path):
    """engine.probe_step's packed summary, unpacked, is what the probes compute in the step."""
    from seismo.instrument.probes import make_step_probes
    from seismo.train import optimizer as opt_lib
    from seismo.train.step import make_train_step

    cfg = config.load(None, [*TINY, "run.probe_every=1"])
    engine = engine_lib.build(cfg, mesh_lib.make_mesh(cfg.mesh))
    state = engine.init_state()
    batch = loop.Feed(engine).batch(0)
    model = engine.model
    tx = opt_lib.build(cfg.optimizer, cfg.model, state.params, cfg.run.steps)
    ref_step = jax.jit(make_train_step(model, tx, cfg, opt_lib.schedule(cfg.optimizer, cfg.run.steps),
                                       make_step_probes(model, cfg)))
    _, _, ref = jax.device_get(ref_step(state, batch))
    _, _, packed = engine.probe_step(state, batch)
    got = engine.unpack_probes(jax.device_get(packed))
    assert list(got) == list(ref) and len(got) > 10
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-6, atol=0, err_msg=k)
