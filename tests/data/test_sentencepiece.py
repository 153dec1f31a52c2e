"""SentencePiece tokenizer path: a tiny model trained here on stdlib text (no download)."""

import numpy as np
import pytest
import sentencepiece as spm
import tensorflow_datasets as tfds

import seismo.data as D
from seismo.config import DataConfig
from seismo.data import corpus

pytestmark = pytest.mark.xdist_group("sentencepiece")  # the module fixture built once


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sp")
    stdlib = corpus.stdlib_documents()
    docs = dict(zip(stdlib.names, stdlib.texts))
    text = (docs["json/decoder.py"] + docs["textwrap.py"]).decode()
    (folder / "train.txt").write_text(text)
    spm.SentencePieceTrainer.train(input=str(folder / "train.txt"), model_prefix=str(folder / "tiny"),
                                   vocab_size=100, model_type="bpe", character_coverage=1.0,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   minloglevel=2)  # identity: spaces survive a round trip
    return str(folder / "tiny.model")


def test_round_trip_and_eos(sp_model):
    tok = D.get_tokenizer(sp_model)
    assert tok.vocab_size == 100 and tok.eos_id == 2 and tok.dtype == np.uint16
    ids = tok.encode("def decode(self, s):  return s.strip()")
    assert ids.dtype == np.uint16 and tok.eos_id not in ids
    assert tok.decode(ids) == "def decode(self, s):  return s.strip()"
    assert tok.name.startswith("sentencepiece:tiny.model@")


def test_text_source_with_sentencepiece(sp_model, tmp_path):
    for i in range(8):
        (tmp_path / f"{i}.txt").write_text(f"the number {i} is written here. " * 30)
    ds = D.build(DataConfig(source=f"text:{tmp_path}/*.txt", tokenizer=sp_model, seq_len=24), seed=0)
    assert ds.vocab_size == 100 and ds.info["tokenizer"].startswith("sentencepiece:")
    b = ds.batch(0)
    assert b["inputs"].max() < 100
    assert "here. the number" in " ".join(ds.tokenizer.decode(row) for row in b["inputs"])
    # documents are separated by the model's EOS id
    assert np.count_nonzero(ds.splits.train_N == 2) == len(ds.splits.train_names)


def test_tfds_source_with_sentencepiece(sp_model):
    with tfds.testing.mock_data(num_examples=10):
        ds = D.build(DataConfig(source="tfds:lm1b", tokenizer=sp_model, seq_len=16), seed=0)
        assert ds.vocab_size == 100 and ds.batch(0)["inputs"].shape == (8, 16)


def test_tokenizer_errors(tmp_path):
    with pytest.raises(D.DataError, match="does not exist"):
        D.get_tokenizer(str(tmp_path / "missing.model"))
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(D.DataError, match="not a readable SentencePiece model"):
        D.get_tokenizer(str(bad))
    with pytest.raises(D.DataError, match="SentencePiece .model file"):
        D.get_tokenizer("gpt2")
