"""A new activation is one function plus one registry line, and is at once usable from a
config string: registered inside the test, then trained for a step by name."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seismo import config, models
from seismo.models import activations
from seismo.train import optimizer as opt_lib
from seismo.train.engine import check_config
from seismo.train.step import TrainState, make_train_step


@pytest.fixture
def softsign():
    @activations.register("softsign_test")  # the one registry line
    def softsign_test(x):  # the one function
        """x / (1 + |x|)."""
        return x / (1 + jnp.abs(x))

    yield "softsign_test"
    activations.REGISTRY.unregister("softsign_test")


def test_registered_activation_trains_by_its_config_name(softsign):
    cfg = config.load(None, [f"model.activation={softsign}", "model.d_model=32", "model.n_heads=2",
                             "model.n_layers=1", "model.max_seq_len=16", "data.seq_len=8",
                             "optimizer.warmup_steps=0", "run.steps=10"])
    assert softsign in activations.names()
    model = models.build(cfg.model)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 9), 0, 256)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    params = model.init(jax.random.PRNGKey(1), batch["inputs"])
    _, taps = model.apply(params, batch["inputs"], taps=True)
    pre, post = np.asarray(taps["mlp_pre"]), np.asarray(taps["mlp_post"])
    np.testing.assert_allclose(post, pre / (1 + np.abs(pre)), rtol=1e-5, atol=1e-6)  # it is really used
    tx = opt_lib.build(cfg.optimizer, cfg.model, params, cfg.run.steps)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    step = jax.jit(make_train_step(model, tx, cfg, opt_lib.schedule(cfg.optimizer, cfg.run.steps)))
    state, metrics = step(state, batch)
    assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))


def test_unknown_activation_is_a_config_error_listing_names():
    with pytest.raises(config.ConfigError, match=r"unknown activation 'swishh'.*Did you mean 'swish"):
        check_config(config.load(None, ["model.activation=swishh"]))
