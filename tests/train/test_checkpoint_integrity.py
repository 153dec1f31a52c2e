"""Checkpoints are checked and set aside, never deleted: every array's checksum (against a
numpy implementation of its formula), a flipped byte caught on restore and the step set aside
with its reason, a run whose checkpoints are all unreadable refused instead of started over,
and `seismo analyze` skipping a bad checkpoint and naming it."""

import json
import shutil
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from seismo import rundir
from seismo.train import checkpoint as ckpt_lib
from seismo.train.loop import train
from tiny_run import tiny_run

pytestmark = pytest.mark.xdist_group("integrity")


def tiny():
    return tiny_run()


def losses(d):
    return {r["step"]: r["loss"] for r in map(json.loads, (d / rundir.METRICS_FILE).read_text().splitlines())
            if r["kind"] == "train"}


def numpy_checksum(x: np.ndarray) -> int:
    bits = np.ascontiguousarray(x).view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]).ravel()
    w = 2 * np.arange(bits.size, dtype=np.uint64) + 1
    return int(np.sum(bits.astype(np.uint64) * w % 2**32) % 2**32)


def test_checksum_matches_numpy_and_sees_every_bit(rng):
    x = rng.normal(size=(3, 5, 7)).astype(np.float32)
    tree = {"a": x, "b": np.arange(10, dtype=np.int32), "c": x[0].astype(jnp.bfloat16)}
    got = ckpt_lib.flat_checksums(tree)
    assert got == {"['a']": numpy_checksum(x), "['b']": numpy_checksum(tree["b"]),
                   "['c']": numpy_checksum(np.asarray(tree["c"]))}
    bits = x.view(np.uint32).copy()
    for i, bit in [(0, 0), (17, 31), (104, 12)]:  # one flipped bit anywhere changes the sum
        flipped = bits.copy().ravel()
        flipped[i] ^= np.uint32(1 << bit)
        assert numpy_checksum(flipped.view(np.float32).reshape(x.shape)) != numpy_checksum(x)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref") / "run"
    train(tiny(), d)
    return d


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """The tiny run stopped at step 4 (checkpoints 0 and 4), trained once: each test corrupts
    a copy of it (the same files a fresh `train(tiny(), d, stop_at=4)` writes)."""
    d = tmp_path_factory.mktemp("stopped") / "run"
    assert train(tiny(), d, stop_at=4).step == 4
    return d


def _stopped_copy(stopped, d):
    shutil.copytree(stopped, d)
    assert ckpt_lib.Checkpointer(d / rundir.CHECKPOINTS_DIR).steps() == [0, 4]


def _flip_a_data_byte(step_dir):
    files = [f for f in (step_dir / "state").rglob("*") if f.is_file()]
    biggest = max(files, key=lambda f: f.stat().st_size)
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0x10
    biggest.write_bytes(bytes(data))


def test_a_flipped_byte_is_caught_set_aside_and_the_step_saved_again(tmp_path, reference, stopped):
    d = tmp_path / "run"
    _stopped_copy(stopped, d)
    _flip_a_data_byte(d / rundir.CHECKPOINTS_DIR / "4")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(tiny(), d)
    assert result.status == "finished"
    assert any("set aside" in str(w.message) for w in caught), [str(w.message) for w in caught]
    (aside,) = (d / rundir.CHECKPOINTS_DIR).glob("4.corrupt-*")
    assert "step 4 set aside" in (aside / "REASON.txt").read_text()
    assert ckpt_lib.Checkpointer(d / rundir.CHECKPOINTS_DIR).steps() == [0, 4, 8], "step 4 is saved again"
    assert losses(d) == losses(reference), "resumed from step 0: the same trajectory"


def test_all_checkpoints_unreadable_is_refused_not_started_over(tmp_path, stopped):
    d = tmp_path / "run"
    _stopped_copy(stopped, d)
    for step in (0, 4):
        _flip_a_data_byte(d / rundir.CHECKPOINTS_DIR / str(step))
    before = (d / rundir.METRICS_FILE).read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ckpt_lib.NoReadableCheckpoint, match="not started over.*--restart"):
            train(tiny(), d)
    assert (d / rundir.METRICS_FILE).read_bytes() == before, "the record is untouched"
    assert len(list((d / rundir.CHECKPOINTS_DIR).glob("*.corrupt-*"))) == 2, "both set aside, none deleted"


def test_analyze_skips_a_bad_checkpoint_and_names_it(tmp_path, reference):
    from seismo.analysis import analyze_run, read_table

    d = tmp_path / "run"
    shutil.copytree(reference, d)
    for f in (d / rundir.CHECKPOINTS_DIR / "4").rglob("*"):
        if f.is_file():
            f.write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="checkpoint 4 skipped"):
        folder = analyze_run(d, probes=["weights"], progress=False)
    done = json.loads((folder / "done.json").read_text())
    assert list(done["skipped"]) == ["4"]
    assert sorted(read_table(d, "weights")["step"].unique()) == [0, 8]


def _corrupt(step_dir, kind, rng):
    state = step_dir / "state"
    data = max((f for f in state.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    if kind == "truncated":
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    elif kind == "random bytes":
        data.write_bytes(rng.integers(0, 256, data.stat().st_size, dtype=np.uint8).tobytes())
    elif kind == "manifest deleted":
        for m in state.rglob("manifest.ocdbt"):
            m.unlink()
    elif kind == "state deleted":
        shutil.rmtree(state)
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["truncated", "random bytes", "manifest deleted", "state deleted"])
def test_each_kind_of_corruption_is_set_aside_and_the_run_resumes_exactly(tmp_path, reference, stopped, rng,
                                                                             kind):
    d = tmp_path / "run"
    _stopped_copy(stopped, d)
    _corrupt(d / rundir.CHECKPOINTS_DIR / "4", kind, rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train(tiny(), d)
    assert result.status == "finished"
    assert list((d / rundir.CHECKPOINTS_DIR).glob("4.corrupt-*")), "the bad step is kept, renamed aside"
    assert ckpt_lib.Checkpointer(d / rundir.CHECKPOINTS_DIR).steps() == [0, 4, 8]
    assert losses(d) == losses(reference)
