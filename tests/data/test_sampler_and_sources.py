"""Counter-based draws (seismo.data.sampler) and the source registry (seismo.data.sources)."""

import numpy as np
import pytest

import seismo.data as D
from seismo.config import DataConfig
from seismo.data import sampler
from seismo.data.synthetic import SyntheticDataset


def test_python_and_numpy_mix_agree():
    for x in [0, 1, 12345, 2**63, 2**64 - 1]:
        assert sampler.mix_int(x) == int(sampler.mix(np.array([x], np.uint64))[0])


def test_keys_depend_on_every_coordinate():
    base = sampler.row_keys(0, sampler.TRAIN, 5, np.arange(4))
    assert len(set(base.tolist())) == 4
    for other in [sampler.row_keys(1, sampler.TRAIN, 5, np.arange(4)),
                  sampler.row_keys(0, sampler.EVAL, 5, np.arange(4)),
                  sampler.row_keys(0, sampler.TRAIN, 6, np.arange(4))]:
        assert not set(base.tolist()) & set(other.tolist())
    np.testing.assert_array_equal(sampler.row_keys(0, sampler.TRAIN, 5, [2, 3]), base[2:])
    # large and negative seeds are fine (taken modulo 2**64)
    sampler.row_keys(-1, sampler.TRAIN, 10**12, [0])


def test_integers_are_in_range_and_uniform():
    keys = sampler.row_keys(0, sampler.TRAIN, 0, np.arange(200))
    x = sampler.integers(keys, 500, 10)
    assert x.shape == (200, 500) and x.min() == 0 and x.max() == 9
    counts = np.bincount(x.ravel(), minlength=10)
    assert np.abs(counts / x.size - 0.1).max() < 0.01
    # draws are a stream: a later window of draws equals the tail of a longer one
    np.testing.assert_array_equal(sampler.draws(keys, 5, start=3), sampler.draws(keys, 8)[:, 3:])
    assert 0 <= sampler.unit_hash("os.py") < 1 and sampler.unit_hash("os.py") == sampler.unit_hash("os.py")


def test_byte_tokenizer_round_trip():
    tok = D.ByteTokenizer()
    text = "naïve café — λx. x² 🙂\n\tdef f(): pass"
    ids = tok.encode(text)
    assert ids.dtype == np.uint8 and len(ids) == len(text.encode())
    assert tok.decode(ids) == text
    assert tok.encode(b"a\x00b").tolist() == [97, 98], "NUL is the EOS id, never a text byte"
    assert tok.decode(np.array([104, 105, 0, 33])) == "hi!"


def test_unknown_scheme_lists_the_known_ones():
    with pytest.raises(D.DataError) as e:
        D.build(DataConfig(source="txt:*.md"), seed=0)
    msg = str(e.value)
    assert "'txt'" in msg and "Did you mean 'text'" in msg
    assert "stdlib, synthetic, text, tfds" in msg


def test_a_new_source_is_one_function_and_one_line():
    def constant(arg, cfg, seed):
        class Constant(SyntheticDataset):
            def windows(self, keys_B, split):
                return {"tokens": np.full((len(keys_B), cfg.seq_len + 1), int(arg))}
        return Constant(cfg, seed, "induction")

    D.SOURCES.register("constant", constant)
    try:
        ds = D.build(DataConfig(source="constant:7", seq_len=8), seed=0)
        assert (ds.batch(0)["inputs"] == 7).all()
    finally:
        D.SOURCES.unregister("constant")
