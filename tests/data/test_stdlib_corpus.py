"""The default corpus: the Python standard library, byte-level (seismo.data.corpus, packed)."""

import re
import time

import numpy as np
import pytest

import seismo.data as D
from seismo.config import DataConfig
from seismo.data import corpus, packed

pytestmark = pytest.mark.xdist_group("stdlib_corpus")  # the module fixture built once


@pytest.fixture(scope="module")
def ds():
    return D.build(DataConfig(), seed=0)


def test_info_records_source_hash_and_sizes(ds):
    info = ds.info
    assert info["source"] == "stdlib" and info["tokenizer"] == "bytes"
    assert re.fullmatch(r"[0-9a-f]{64}", info["sha256"])
    assert info["sha256"] == corpus.stdlib_documents().sha256
    assert info["n_documents"] > 100, "the stdlib corpus should hold hundreds of modules"
    assert info["n_train_documents"] + info["n_eval_documents"] + info["n_eval_duplicates_dropped"] == info["n_documents"]
    assert info["n_train_tokens"] > 1_000_000 and info["n_eval_tokens"] > 10 * 65
    assert info["python"].split()[-1].count(".") == 2
    assert ds.vocab_size == 256


def test_hash_is_stable_and_sensitive_to_content():
    docs = corpus.stdlib_documents()
    again = packed.Documents(docs.names, docs.texts)
    assert again.sha256 == docs.sha256
    edited = packed.Documents(docs.names, (docs.texts[0] + b"#",) + docs.texts[1:])
    renamed = packed.Documents(("x.py",) + docs.names[1:], docs.texts)
    assert len({docs.sha256, edited.sha256, renamed.sha256}) == 3


def test_corpus_excludes_site_packages_and_test_suites():
    names = corpus.stdlib_documents().names
    assert "os.py" in names and "json/decoder.py" in names
    for name in names:
        parts = name.split("/")
        assert not {"site-packages", "dist-packages", "test", "tests", "idle_test"} & set(parts), name
    assert list(names) == sorted(names)


def test_eval_files_are_disjoint_from_train_files(ds):
    train, held = set(ds.splits.train_names), set(ds.splits.eval_names)
    assert held and not train & held
    assert len(held) == ds.info["n_eval_documents"]
    # the split follows the file name alone, at about holdout_fraction
    assert abs(len(held) / len(train | held) - 0.05) < 0.03
    docs = corpus.stdlib_documents()
    text = dict(zip(docs.names, docs.texts))
    assert not {text[n] for n in held} & {text[n] for n in train}, "a held-out file has a training twin"


def test_eval_windows_come_from_held_out_files_only(ds):
    docs = corpus.stdlib_documents()
    text = dict(zip(docs.names, docs.texts))
    held_text = b"\x00".join(text[n] for n in ds.splits.eval_names)
    ev = ds.eval_set()
    rows = np.concatenate([ev["inputs"][:, :1], ev["targets"]], axis=1).astype(np.uint8)
    for row in rows:
        for piece in row.tobytes().split(b"\x00"):
            if len(piece) >= 16:  # every document fragment of an eval window is held-out text
                assert piece in held_text


def test_byte_windows_decode_to_python_source(ds):
    b = ds.batch(0)
    decoded = D.ByteTokenizer().decode(b["inputs"][0])
    assert len(decoded) > 0
    assert ds.batch(0, slice(0, 1))["inputs"].shape == (1, 64)


def test_batch_is_fast_after_load():
    ds = D.build(DataConfig(batch_size=8, seq_len=64), seed=0)
    ds.batch(0)
    times = []
    for step in range(200):
        t = time.perf_counter()
        ds.batch(step)
        times.append(time.perf_counter() - t)
    # the issue asks for well under 1 ms for 8x65 tokens; the median is ~50-100 us on a laptop
    assert np.median(times) < 1e-3, f"median batch time {np.median(times) * 1e6:.0f} us"


def test_stdlib_takes_no_argument():
    with pytest.raises(D.DataError, match="stdlib takes no argument"):
        D.build(DataConfig(source="stdlib:foo"), seed=0)


def test_too_long_sequences_for_the_held_out_split_say_what_to_change(tmp_path):
    (tmp_path / "a.txt").write_text("short")
    (tmp_path / "b.txt").write_text("also short")
    with pytest.raises(D.DataError, match=r"fewer than data.seq_len \+ 1 = 65"):
        D.build(DataConfig(source=f"text:{tmp_path}/*.txt"), seed=0)
