"""Mesh shapes, sharding rules and the checkpoint schedule / corrupt-checkpoint fallback."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seismo.config import MeshConfig, RunConfig
from seismo.train import checkpoint as ckpt_lib
from seismo.train import mesh as mesh_lib


def test_mesh_shape_infers_one_axis():
    assert mesh_lib.mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2)
    assert mesh_lib.mesh_shape(MeshConfig(), 1) == (1, 1, 1)
    with pytest.raises(ValueError, match="cannot be split"):
        mesh_lib.mesh_shape(MeshConfig(data=-1, fsdp=3), 8)
    with pytest.raises(ValueError, match="devices are available"):
        mesh_lib.mesh_shape(MeshConfig(data=2, fsdp=2, tensor=1), 8)


def test_spec_for_replicates_what_does_not_divide():
    mesh = mesh_lib.make_mesh(MeshConfig())  # one CPU device: everything divides by 1
    spec = mesh_lib.spec_for(("layers", "embed", "mlp"), (2, 64, 256), mesh)
    assert tuple(spec) == (None, "fsdp", "tensor")
    assert tuple(mesh_lib.spec_for(None, (3,), mesh)) == ()


def test_log_spaced_schedule_keeps_early_every_and_last():
    sched = ckpt_lib.CheckpointSchedule(RunConfig(steps=300, checkpoint_every=100, checkpoint_log_until=64))
    assert sched.steps() == [0, 1, 2, 4, 8, 16, 32, 64, 100, 200, 300]
    sched = ckpt_lib.CheckpointSchedule(RunConfig(steps=250, checkpoint_every=100, checkpoint_log_until=4))
    assert sched.steps() == [0, 1, 2, 4, 100, 200, 250]


def _tree(x):
    return {"w": jnp.full((4, 3), x, jnp.float32), "step": jnp.asarray(int(x), jnp.int32)}


def test_checkpointer_roundtrip_and_corrupt_fallback(tmp_path):
    ck = ckpt_lib.Checkpointer(tmp_path / "ckpt", async_save=True)
    for s in (1, 2, 4):
        ck.save(s, _tree(float(s)), {"data": "hash"})
    ck.wait()
    assert ck.steps() == [1, 2, 4]
    step, state, record = ck.restore_latest(_tree(0.0))
    assert step == 4 and float(state["w"][0, 0]) == 4.0 and record == {"data": "hash"}
    # Corrupt every file of the newest checkpoint: the previous one is used, with a warning.
    for f in (tmp_path / "ckpt" / "4").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step, state, _ = ck.restore_latest(_tree(0.0))
    assert step == 2 and np.all(np.asarray(state["w"]) == 2.0)
    assert any(issubclass(w.category, ckpt_lib.CorruptCheckpointWarning) for w in caught)
    ck.close()


def test_restore_when_empty_returns_none(tmp_path):
    ck = ckpt_lib.Checkpointer(tmp_path / "none")
    assert ck.restore_latest(_tree(0.0)) is None
    ck.close()


def test_host_rows_single_process_is_everything():
    mesh = mesh_lib.make_mesh(MeshConfig())
    sh = mesh_lib.batch_sharding(mesh)
    assert mesh_lib.host_rows(sh, 8) == slice(0, 8)
    arr = mesh_lib.put_batch({"x": np.arange(16).reshape(8, 2)}, sh, 8)["x"]
    assert isinstance(arr, jax.Array) and arr.shape == (8, 2)
