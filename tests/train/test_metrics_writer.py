"""The run's record on the host: rows made JSON-ready (NaN and inf as null) and appended to
metrics.jsonl, each in the file as soon as it is written, also across a resume's truncation."""

import json
import math

import jax.numpy as jnp
import numpy as np

from seismo.train.metrics import MetricsWriter, to_jsonable


def reference(value):
    """A second implementation: through Python objects one element at a time."""
    if isinstance(value, dict):
        return {str(k): reference(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [reference(v) for v in value]
    if isinstance(value, (np.ndarray, np.generic)) or hasattr(value, "__array__"):
        arr = np.asarray(value)
        return reference(arr.item()) if arr.ndim == 0 else [reference(v) for v in arr]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


def test_to_jsonable_matches_an_element_wise_reference():
    rng = np.random.default_rng(0)
    row = {"step": 3, "kind": "probe", "vec": rng.normal(size=4).astype(np.float32),
           "bad": np.array([1.5, np.nan, -np.inf], np.float32), "scalar": np.float32(2.5), "nan0": np.array(np.nan),
           "mat": np.array([[1.0, np.inf], [3.0, 4.0]]), "ints": np.arange(3, dtype=np.int32), "flag": np.array(True),
           "jax": jnp.asarray([0.25, jnp.nan]), "py": [1.0, float("nan"), {"x": np.float64(7.0)}], "none": None,
           "text": "ok", "f64": np.float64(-np.inf)}
    got = to_jsonable(row)
    assert got == reference(row)
    assert got["bad"] == [1.5, None, None] and got["nan0"] is None and got["f64"] is None
    assert got["mat"] == [[1.0, None], [3.0, 4.0]] and got["flag"] is True and got["ints"] == [0, 1, 2]
    assert type(got["ints"][0]) is int and type(got["vec"][0]) is float
    json.dumps(got, allow_nan=False)  # strict JSON


def test_rows_are_in_the_file_at_once_and_after_a_truncation(tmp_path):
    writer = MetricsWriter(tmp_path)
    path = tmp_path / "metrics.jsonl"
    for step in range(1, 4):
        writer.write({"step": step, "kind": "train", "loss": np.float32(step)})
        assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == list(range(1, step + 1))
    kept = writer.truncate_after(2)  # a resume from step 2: the file is replaced
    assert [r["step"] for r in kept] == [1, 2]
    writer.write({"step": 3, "kind": "train", "loss": 0.5})
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3]
    aside = (tmp_path / "metrics.aside.jsonl").read_text().splitlines()
    assert json.loads(aside[1])["step"] == 3 and json.loads(aside[1])["loss"] == 3.0  # set aside, not deleted
    writer.close()
    MetricsWriter(tmp_path).write({"step": 4, "kind": "train", "loss": 0.25})  # another writer appends
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4]
