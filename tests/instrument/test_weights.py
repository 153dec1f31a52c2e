"""seismo.instrument.weights on matrices with chosen spectra."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seismo.instrument import weights


def _with_spectrum(rng, s, shape):
    """U diag(s) V^T with random orthonormal U [a, r] and V [b, r]."""
    a, b = shape
    u, _ = np.linalg.qr(rng.normal(size=(a, len(s))))
    v, _ = np.linalg.qr(rng.normal(size=(b, len(s))))
    return (u * np.asarray(s)) @ v.T


def _erank(s):
    p = np.asarray(s) / np.sum(s)
    p = p[p > 0]
    return np.exp(-np.sum(p * np.log(p)))


def test_known_spectrum(rng):
    s = [10.0, 5.0, 2.0, 1.0, 0.5]
    w = _with_spectrum(rng, s, (8, 5))
    np.testing.assert_allclose(weights.singular_values(w), s, rtol=1e-5)
    np.testing.assert_allclose(weights.condition_number(w), 20.0, rtol=1e-4)
    np.testing.assert_allclose(weights.condition_number(w, top_r=3), 5.0, rtol=1e-5)
    np.testing.assert_allclose(weights.effective_rank(w), _erank(s), rtol=1e-5)
    np.testing.assert_allclose(weights.effective_rank(w.T), _erank(s), rtol=1e-5)


def test_equal_singular_values_give_full_effective_rank(rng):
    w = _with_spectrum(rng, [3.0] * 6, (6, 6))
    np.testing.assert_allclose(weights.effective_rank(w), 6.0, rtol=1e-5)
    np.testing.assert_allclose(weights.condition_number(w), 1.0, rtol=1e-5)


def test_rank_one_matrix(rng):
    w = np.outer(rng.normal(size=12), rng.normal(size=7))
    assert float(weights.condition_number(w)) > 1e5  # inf or float32 rounding of 0
    np.testing.assert_allclose(weights.effective_rank(w), 1.0, atol=1e-4)
    np.testing.assert_allclose(weights.condition_number(w, top_r=1), 1.0)


def test_exactly_singular_and_zero_matrices():
    assert float(weights.condition_number(np.diag([2.0, 1.0, 0.0]))) == np.inf
    assert float(weights.condition_number(np.zeros((3, 4)))) == np.inf
    assert float(weights.effective_rank(np.zeros((3, 4)))) == 0.0


def test_stacked_layers_are_handled_per_layer(rng):
    spectra = [[4.0, 2.0, 1.0], [9.0, 3.0, 3.0]]
    w_LxAxB = np.stack([_with_spectrum(rng, s, (5, 3)) for s in spectra])
    np.testing.assert_allclose(weights.condition_number(w_LxAxB), [4.0, 3.0], rtol=1e-4)
    np.testing.assert_allclose(
        weights.effective_rank(w_LxAxB), [_erank(s) for s in spectra], rtol=1e-5
    )


def test_bf16_input_runs_in_float32(rng):
    w = jnp.asarray(_with_spectrum(rng, [4.0, 2.0, 1.0], (6, 3)), jnp.bfloat16)
    assert weights.singular_values(w).dtype == jnp.float32
    np.testing.assert_allclose(weights.condition_number(w), 4.0, rtol=2e-2)


def test_under_jit_and_errors(rng):
    w = rng.normal(size=(2, 4, 3))
    np.testing.assert_allclose(
        jax.jit(weights.effective_rank)(w), weights.effective_rank(w), rtol=1e-6
    )
    np.testing.assert_allclose(
        jax.jit(weights.condition_number)(w), weights.condition_number(w), rtol=1e-6
    )
    with pytest.raises(ValueError, match="top_r must be between 1 and 3"):
        weights.condition_number(w, top_r=4)
    with pytest.raises(ValueError, match="at least 2 axes"):
        weights.singular_values(np.ones(3))
