"""The guarantees every source gives (seismo.data.dataset): determinism, host independence,
resume, the input/target shift and a fixed evaluation set, checked on each source."""

import contextlib
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

import seismo.data as D
from seismo.config import DataConfig


def _write_corpus(folder):
    for i in range(12):
        (folder / f"doc{i:02d}.txt").write_text(f"document {i} says " + f"word{i} " * (20 + 3 * i))
    return str(folder / "*.txt")


@contextlib.contextmanager
def _mock_tfds():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=40):
        yield


SOURCES = ["stdlib", "text", "tfds:lm1b", "synthetic:induction", "synthetic:copy",
           "synthetic:modular_arithmetic"]


@pytest.fixture(params=SOURCES)
def dataset(request, tmp_path):
    source = request.param
    if source == "text":
        source = "text:" + _write_corpus(tmp_path)
    ctx = _mock_tfds() if source.startswith("tfds") else contextlib.nullcontext()
    with ctx:  # the tfds mock stays active for the whole test
        yield D.build(DataConfig(source=source, batch_size=8, seq_len=32, eval_sequences=6,
                                 holdout_fraction=0.25, synthetic_modulus=11), seed=3)


def test_shapes_and_dtypes(dataset):
    b = dataset.batch(0)
    assert b["inputs"].shape == b["targets"].shape == (8, 32)
    assert b["inputs"].dtype == b["targets"].dtype == np.int32
    assert 0 <= b["inputs"].min() and b["inputs"].max() < dataset.vocab_size
    if "loss_mask" in b:
        assert b["loss_mask"].shape == (8, 32) and b["loss_mask"].dtype == np.float32
    for key in ("source", "sha256", "n_documents", "n_train_tokens", "n_eval_tokens", "tokenizer"):
        assert key in dataset.info


def test_same_step_same_batch_and_steps_differ(dataset):
    a, b, c = dataset.batch(7), dataset.batch(7), dataset.batch(8)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["inputs"], c["inputs"]), "two steps drew the same batch"


def test_rows_are_the_same_whatever_the_number_of_hosts(dataset):
    full = dataset.batch(5)
    halves = [dataset.batch(5, slice(0, 4)), dataset.batch(5, slice(4, 8))]
    quarters = [dataset.batch(5, slice(i, i + 2)) for i in range(0, 8, 2)]
    for parts in (halves, quarters):
        for k in full:
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), full[k])
    np.testing.assert_array_equal(dataset.batch(5, [6, 1])["inputs"], full["inputs"][[6, 1]])


def test_batch_does_not_depend_on_what_came_before(dataset):
    # a "resumed" dataset built afresh and asked for step 9 first agrees with one that walked 0..9
    walked = [dataset.batch(s)["inputs"] for s in range(10)]
    fresh = D.build(dataset.cfg, seed=dataset.seed)
    np.testing.assert_array_equal(fresh.batch(9)["inputs"], walked[9])
    np.testing.assert_array_equal(dataset.batch(2)["inputs"], walked[2])


def test_seed_changes_the_batches_but_not_the_eval_set(dataset):
    other = D.build(dataset.cfg, seed=dataset.seed + 1)
    assert not np.array_equal(other.batch(0)["inputs"], dataset.batch(0)["inputs"])
    np.testing.assert_array_equal(other.eval_set()["inputs"], dataset.eval_set()["inputs"])


def test_targets_are_inputs_shifted_by_one(dataset):
    b = dataset.batch(4)
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])


def test_eval_set_is_fixed_and_sized(dataset):
    e1, e2 = dataset.eval_set(), dataset.eval_set()
    assert e1["inputs"].shape == (6, 32)
    for k in e1:
        np.testing.assert_array_equal(e1[k], e2[k])
    e1["inputs"][:] = -1  # a caller's edit does not leak into the cached set
    assert dataset.eval_set()["inputs"].min() >= 0
    np.testing.assert_array_equal(e2["inputs"][:, 1:], e2["targets"][:, :-1])


def test_rows_outside_the_batch_are_refused(dataset):
    with pytest.raises(D.DataError, match="outside the global batch of 8"):
        dataset.batch(0, slice(4, 12))
    with pytest.raises(D.DataError, match="outside the global batch"):
        dataset.batch(0, [8])
    with pytest.raises(D.DataError, match="step must be 0 or more"):
        dataset.batch(-1)


def _digest(batch):
    return hashlib.sha256(b"".join(batch[k].tobytes() for k in sorted(batch))).hexdigest()


def test_other_processes_draw_the_same_batch():
    # another host is another process: with another hash salt it must compute the same rows
    code = ("import hashlib, seismo.data as D; from seismo.config import DataConfig; "
            "b = D.build(DataConfig(seq_len=32), seed=3).batch(11, slice(2, 6)); "
            "print(hashlib.sha256(b''.join(b[k].tobytes() for k in sorted(b))).hexdigest())")
    here = _digest(D.build(DataConfig(seq_len=32), seed=3).batch(11, slice(2, 6)))
    for salt in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": salt}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == here
