"""Synthetic tasks are what their docstrings say (seismo.data.synthetic)."""

import numpy as np
import pytest

import seismo.data as D
from seismo.config import DataConfig


def _tokens(b):
    return np.concatenate([b["inputs"][:, :1], b["targets"]], axis=1)


@pytest.mark.parametrize("seq_len", [16, 17])
def test_induction_second_half_repeats_the_first(seq_len):
    ds = D.build(DataConfig(source="synthetic:induction", seq_len=seq_len, synthetic_vocab=50), seed=0)
    b = ds.batch(3)
    tok = _tokens(b)
    half = -(-seq_len // 2)
    assert (tok[:, 0] == 0).all() and (tok[:, 1:] >= 1).all() and tok.max() < 50
    np.testing.assert_array_equal(tok[:, 1 + half:], tok[:, 1:1 + seq_len - half])
    # the mask keeps exactly the targets of the second copy
    assert (b["loss_mask"][:, half:] == 1).all() and (b["loss_mask"][:, :half] == 0).all()
    assert ds.vocab_size == 50


def test_copy_episodes_repeat_after_the_separator():
    ds = D.build(DataConfig(source="synthetic:copy", seq_len=64, synthetic_vocab=20), seed=0)
    b = ds.batch(0)
    for tok, mask in zip(_tokens(b), b["loss_mask"]):
        pos, n_episodes = 0, 0
        while pos < len(tok):
            sep = pos + int(np.argmax(tok[pos:] == 1)) if (tok[pos:] == 1).any() else len(tok)
            x = tok[pos:sep]
            assert (x >= 2).all() and 1 <= len(x) <= (64 - 1) // 4 or sep == len(tok)
            copy = tok[sep + 1:sep + 1 + len(x)]
            np.testing.assert_array_equal(copy, x[:len(copy)])
            end = sep + 1 + len(x)
            if end < len(tok):
                assert tok[end] == 0
            # determined targets: the copy and its EOS (target t is token t + 1)
            assert (mask[sep:min(end, len(tok) - 1)] == 1).all()
            assert pos == 0 or (mask[pos - 1:sep - 1] == 0).all()
            pos, n_episodes = end + 1, n_episodes + 1
        assert n_episodes >= 2


def test_modular_arithmetic_answers_are_right_and_masked():
    p = 13
    ds = D.build(DataConfig(source="synthetic:modular_arithmetic", seq_len=59, synthetic_modulus=p,
                            holdout_fraction=0.3), seed=0)
    assert ds.vocab_size == p + 3
    b = ds.batch(0)
    eq = _tokens(b).reshape(8, 10, 6)
    a, plus, bb, equals, c, eos = np.moveaxis(eq, -1, 0)
    assert (plus == p).all() and (equals == p + 1).all() and (eos == p + 2).all()
    np.testing.assert_array_equal(c, (a + bb) % p)
    masked = b["targets"][b["loss_mask"] == 1].reshape(8, 10)
    np.testing.assert_array_equal(masked, c)
    assert b["loss_mask"].sum() == 8 * 10


def test_modular_arithmetic_eval_pairs_are_never_trained_on():
    p = 11
    cfg = DataConfig(source="synthetic:modular_arithmetic", seq_len=35, synthetic_modulus=p,
                     holdout_fraction=0.4, eval_sequences=16)
    ds = D.build(cfg, seed=0)
    assert ds.info["n_train_pairs"] + ds.info["n_eval_pairs"] == p * p
    assert abs(ds.info["n_eval_pairs"] / (p * p) - 0.4) < 0.15

    def pairs(b):
        eq = _tokens(b).reshape(len(b["inputs"]), -1, 6)
        return set(zip(eq[..., 0].ravel().tolist(), eq[..., 2].ravel().tolist()))

    train = set().union(*(pairs(ds.batch(s)) for s in range(50)))
    held = pairs(ds.eval_set())
    assert held and not held & train
    # the split does not move with the run seed
    assert pairs(D.build(cfg, seed=9).eval_set()) == held


def test_unknown_task_lists_the_tasks():
    with pytest.raises(D.DataError, match=r"Did you mean 'induction'.*copy, induction, modular_arithmetic"):
        D.build(DataConfig(source="synthetic:inductoin"), seed=0)


def test_bad_task_settings_say_what_to_change():
    with pytest.raises(D.DataError, match="synthetic_vocab >= 4"):
        D.build(DataConfig(source="synthetic:copy", synthetic_vocab=3), seed=0)
    with pytest.raises(D.DataError, match="synthetic_modulus >= 2"):
        D.build(DataConfig(source="synthetic:modular_arithmetic", synthetic_modulus=1), seed=0)
