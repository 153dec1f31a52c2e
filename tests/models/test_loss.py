"""lm_loss and z-loss against a numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seismo.models import lm_loss


def reference(logits, targets, coef, mask):
    m = logits.max(-1, keepdims=True)
    logz = (np.log(np.exp(logits - m).sum(-1, keepdims=True)) + m)[..., 0]
    nll = logz - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    w = np.ones_like(nll) if mask is None else mask.astype(np.float64)
    mean = lambda v: (v * w).sum() / w.sum()
    return {
        "ce": mean(nll), "z_loss": coef * mean(logz**2), "logz_mean": mean(logz),
        "logz_max": logz[w > 0].max(), "logit_mean": mean(logits.mean(-1)),
    }


@pytest.mark.parametrize("coef", [0.0, 1e-4, 0.5])
@pytest.mark.parametrize("masked", [False, True])
def test_lm_loss_matches_numpy(coef, masked):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 11)) * 4 - 2  # log Z away from 0, so the z-loss is visible
    targets = rng.integers(0, 11, (3, 5))
    mask = (rng.random((3, 5)) > 0.4).astype(np.float32) if masked else None
    loss, stats = lm_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(targets),
                          z_loss=coef, mask=None if mask is None else jnp.asarray(mask))
    want = reference(logits, targets, coef, mask)
    assert set(stats) == set(want)  # the contract: exactly these keys
    for k, v in want.items():
        assert float(stats[k]) == pytest.approx(v, rel=1e-5, abs=1e-6), k
    assert float(loss) == pytest.approx(want["ce"] + want["z_loss"], rel=1e-5)


def test_z_loss_coefficient_may_be_traced():
    logits = jnp.asarray(np.random.default_rng(2).normal(size=(2, 3, 5)), jnp.float32)
    f = jax.vmap(lambda c: lm_loss(logits, jnp.zeros((2, 3), jnp.int32), z_loss=c)[0])
    losses = np.asarray(f(jnp.asarray([0.0, 1.0])))
    assert losses[1] > losses[0]


def test_z_loss_gradient_pulls_log_z_to_zero():
    logits = jnp.full((1, 2, 4), 3.0)  # log Z = 3 + log 4 > 0
    g = jax.grad(lambda y: lm_loss(y, jnp.zeros((1, 2), jnp.int32), z_loss=1.0)[1]["z_loss"])(logits)
    assert np.all(np.asarray(g) > 0)  # descending lowers every logit, hence log Z


def test_bfloat16_logits_are_upcast():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 7)), jnp.bfloat16)
    loss, stats = lm_loss(logits, jnp.zeros((2, 3), jnp.int32), z_loss=1e-4)
    assert loss.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in stats.values())
