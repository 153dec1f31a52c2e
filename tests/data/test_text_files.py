"""`text:<glob>`: local files as documents, held out by file name (seismo.data.corpus)."""

import os

import numpy as np
import pytest

import seismo.data as D
from seismo.config import DataConfig
from seismo.data import corpus


def _corpus(folder, n=30):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        # each file is one repeated, unique marker: any window shows which file it came from
        (folder / f"f{i:02d}.txt").write_text(f"<{i:02d}>" * 40)
    return folder


def _markers(row):
    text = bytes(row.astype(np.uint8)).replace(b"\x00", b"").decode()
    return {text[j + 1:j + 3] for j in range(len(text) - 3) if text[j] == "<" and text[j + 3] == ">"}


def test_eval_windows_never_show_a_training_file(tmp_path):
    _corpus(tmp_path / "c")
    ds = D.build(DataConfig(source=f"text:{tmp_path}/c/*.txt", seq_len=32, batch_size=8, eval_sequences=32,
                            holdout_fraction=0.3), seed=0)
    held = {n[1:3] for n in ds.splits.eval_names}
    train = {n[1:3] for n in ds.splits.train_names}
    assert held and train and not held & train
    ev = ds.eval_set()
    for row in np.concatenate([ev["inputs"], ev["targets"][:, -1:]], axis=1):
        assert _markers(row) <= held
    for step in range(20):
        for row in ds.batch(step)["inputs"]:
            assert _markers(row) <= train
    assert ds.info["n_documents"] == 30 and ds.info["tokenizer"] == "bytes"


def test_names_are_relative_to_the_glob_so_the_split_does_not_move(tmp_path, monkeypatch):
    _corpus(tmp_path / "data" / "sub", n=6)
    absolute = D.build(DataConfig(source=f"text:{tmp_path}/data/**/*.txt", seq_len=16), seed=0)
    monkeypatch.chdir(tmp_path)
    relative = D.build(DataConfig(source="text:data/**/*.txt", seq_len=16), seed=0)
    assert absolute.splits.eval_names == relative.splits.eval_names
    assert absolute.splits.train_names[0] == "sub/f00.txt"
    assert absolute.info["sha256"] == relative.info["sha256"]
    np.testing.assert_array_equal(absolute.batch(3)["inputs"], relative.batch(3)["inputs"])


def test_one_file_holds_out_its_tail(tmp_path):
    path = tmp_path / "one.txt"
    path.write_bytes(bytes(range(1, 251)) * 8)
    ds = D.build(DataConfig(source=f"text:{path}", seq_len=16, holdout_fraction=0.25), seed=0)
    n = len(path.read_bytes()) + 1  # plus the EOS
    assert ds.info["n_train_tokens"] == round(n * 0.75) and ds.info["n_eval_tokens"] == n - round(n * 0.75)
    tail = path.read_bytes()[ds.info["n_train_tokens"]:] + b"\x00"
    for row in ds.eval_set()["inputs"]:
        assert bytes(row.astype(np.uint8)) in tail


def test_empty_glob_names_the_glob_and_the_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(D.DataError) as e:
        D.build(DataConfig(source="text:nothing/*.md"), seed=0)
    msg = str(e.value)
    assert "'nothing/*.md' matched no files" in msg and os.fspath(tmp_path) in msg
    with pytest.raises(D.DataError, match="needs a glob"):
        D.build(DataConfig(source="text:"), seed=0)


def test_glob_base_stops_at_the_first_wildcard():
    assert str(corpus._glob_base("a/b/*.txt")) == "a/b"
    assert str(corpus._glob_base("a/**/c/*.txt")) == "a"
    assert str(corpus._glob_base("*.txt")) == "."
