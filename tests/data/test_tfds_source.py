"""`tfds:<name>` through `tfds.data_source` on the real registered 'lm1b' builder, with its
records faked by `tfds.testing.mock_data` (the ArrayRecord reader is mocked; everything
above it, from the builder to the decoding of records, is tfds's own code)."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

import seismo.data as D
from seismo.config import DataConfig
from seismo.data import sampler


def _texts(src_name, split, n):
    with tfds.testing.mock_data(num_examples=n):
        src = tfds.data_source(src_name, split=split)
        return [src[i]["text"] for i in range(n)]


def test_rows_are_packed_documents_and_eval_uses_held_out_documents_only():
    n = 40
    texts = _texts("lm1b", "train", n)
    held, train = set(texts[30:]), set(texts[:30])  # holdout 0.25: the last 10 indices
    assert len(set(texts)) == n, "mock documents should be distinct for this test"
    with tfds.testing.mock_data(num_examples=n):
        ds = D.build(DataConfig(source="tfds:lm1b", seq_len=48, batch_size=4, eval_sequences=8,
                                holdout_fraction=0.25), seed=0)
        assert ds.info["n_train_documents"] == 30 and ds.info["n_eval_documents"] == 10
        assert ds.info["dataset"].startswith("lm1b/") and len(ds.info["sha256"]) == 64

        def pieces(rows):
            for row in rows:
                parts = bytes(row.astype(np.uint8)).split(b"\x00")
                yield parts[0], parts[1:-1], parts[-1]  # a suffix, whole documents, a prefix

        ev = ds.eval_set()
        rows = np.concatenate([ev["inputs"][:, :1], ev["targets"]], axis=1)
        for first, whole, last in pieces(rows):
            assert all(w.decode() in held for w in whole)
            assert any(t.encode().endswith(first) for t in held)
            assert any(t.encode().startswith(last) for t in held)
        for step in range(5):
            b = ds.batch(step)
            rows = np.concatenate([b["inputs"][:, :1], b["targets"]], axis=1)
            for _, whole, _ in pieces(rows):
                assert all(w.decode() in train for w in whole)
        # the bookkeeping agrees: every document of an eval row has a held-out index
        keys = sampler.row_keys(0, sampler.EVAL, 0, [0, 1, 2])
        for k in range(3):
            assert all(30 <= i < 40 for i in ds.row_documents(keys[k:k + 1], "eval"))


def test_separate_eval_split():
    with tfds.testing.mock_data(num_examples=12):
        ds = D.build(DataConfig(source="tfds:lm1b", tfds_eval_split="test", seq_len=16, eval_sequences=3), seed=1)
        assert ds.info["n_train_documents"] == 12 and ds.info["eval_split"] == "test"
        assert ds.eval_set()["inputs"].shape == (3, 16)


def test_missing_text_key_lists_the_fields():
    with tfds.testing.mock_data(num_examples=4):
        with pytest.raises(D.DataError, match=r"no 'content' field .*fields: \['text'\]"):
            D.build(DataConfig(source="tfds:lm1b", tfds_text_key="content", seq_len=8), seed=0)


def test_missing_dataset_says_where_it_looked_and_never_downloads(tmp_path):
    # no mock: the real tfds code looks in an empty data_dir; download=False keeps it local
    with pytest.raises(D.DataError) as e:
        D.build(DataConfig(source="tfds:lm1b", tfds_data_dir=str(tmp_path), seq_len=8), seed=0)
    msg = str(e.value)
    assert str(tmp_path) in msg and "never downloads" in msg
    assert "tfds build lm1b --file_format=array_record" in msg
    assert list(tmp_path.iterdir()) == [], "seismo must not write (download/prepare) into the data dir"
    with pytest.raises(D.DataError, match="needs a dataset name"):
        D.build(DataConfig(source="tfds:"), seed=0)
