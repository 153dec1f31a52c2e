"""In-step probes against independent computations: numpy over the taps, the optimizer's own
update, and gradients computed separately."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seismo import config, models
from seismo.instrument.probes import make_step_probes, path_name
from seismo.models.loss import lm_loss
from seismo.train import optimizer as opt_lib
from seismo.train.step import TrainState, make_train_step

pytestmark = pytest.mark.xdist_group("probes")  # the module fixture built once

CFG = config.load(None, [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=16", "model.activation=relu",
    "data.batch_size=2", "data.seq_len=8", "optimizer.lr=1e-2", "optimizer.warmup_steps=0",
    "optimizer.schedule=constant", "optimizer.weight_decay=0", "run.steps=10",
])


@pytest.fixture(scope="module")
def one_probe_step():
    model = models.build(CFG.model)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, 256)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    params = model.init(jax.random.PRNGKey(0), batch["inputs"])
    tx = opt_lib.build(CFG.optimizer, CFG.model, params, CFG.run.steps)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    step = jax.jit(make_train_step(model, tx, CFG, opt_lib.schedule(CFG.optimizer, 10), make_step_probes(model, CFG)))
    new_state, metrics, probes = step(state, batch)
    return model, params, batch, new_state, jax.device_get(metrics), jax.device_get(probes)


def _rms(x):
    return np.sqrt(np.mean(np.square(np.asarray(x, np.float64))))


def test_update_rms_is_the_unscaled_adam_update(one_probe_step):
    """With constant LR and no decay, the applied update is exactly -lr * Delta."""
    _, params, _, new_state, _, probes = one_probe_step
    for path, p0 in jax.tree_util.tree_leaves_with_path(params):
        name = path_name(path)
        p1 = np.asarray(dict((path_name(q), v) for q, v in jax.tree_util.tree_leaves_with_path(new_state.params))[name])
        delta = (p1 - np.asarray(p0)) / -CFG.optimizer.lr
        got = np.asarray(probes[f"update_rms/{name}"])
        if name.startswith("blocks/"):  # stacked over layers: one value per layer
            want = [_rms(delta[i]) for i in range(delta.shape[0])]
        else:
            want = _rms(delta)
        np.testing.assert_allclose(got, want, rtol=2e-4, err_msg=name)


def test_grad_and_param_rms_match_separate_computation(one_probe_step):
    model, params, batch, new_state, _, probes = one_probe_step

    def loss(p):
        logits, _ = model.apply(p, batch["inputs"])
        return lm_loss(logits, batch["targets"])[0]

    grads = jax.grad(loss)(params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        name = path_name(path)
        g = np.asarray(g)
        want = [_rms(g[i]) for i in range(g.shape[0])] if name.startswith("blocks/") else _rms(g)
        np.testing.assert_allclose(probes[f"grad_rms/{name}"], want, rtol=1e-4, err_msg=name)
    emb = np.asarray(new_state.params["embed"]["embedding"])
    np.testing.assert_allclose(probes["param_rms/embed/embedding"], _rms(emb), rtol=1e-5)


def test_layer_stats_match_numpy_over_taps(one_probe_step):
    model, params, batch, _, _, probes = one_probe_step
    _, taps = model.apply(params, batch["inputs"], taps=True)
    taps = jax.device_get(taps)
    resid = np.asarray(taps["resid"], np.float64)
    np.testing.assert_allclose(probes["resid_rms"], [_rms(resid[i]) for i in range(2)], rtol=1e-5)
    np.testing.assert_allclose(probes["resid_max"], np.abs(resid).reshape(2, -1).max(1), rtol=1e-6)
    z = np.asarray(taps["attn_logits"], np.float64)  # [L, B, H, T, T]
    t = z.shape[-1]
    causal = np.tril(np.ones((t, t), bool))
    want = [np.abs(z[i][..., causal]).max() for i in range(2)]  # explicit mask, no jax
    np.testing.assert_allclose(probes["attn_logit_max"], want, rtol=1e-6)
    post = np.asarray(taps["mlp_post"])
    np.testing.assert_allclose(probes["mlp_zero_frac"], [(post[i] == 0).mean() for i in range(2)], rtol=1e-6)
    assert 0.2 < probes["mlp_zero_frac"][0] < 0.8  # relu: about half the units are off at init
    a = np.asarray(taps["attn_probs"], np.float64)
    ent = [np.mean(-np.sum(np.where(a[i] > 0, a[i] * np.log(np.where(a[i] > 0, a[i], 1)), 0), -1)) for i in range(2)]
    np.testing.assert_allclose(probes["attn_entropy"], ent, rtol=1e-5)
    np.testing.assert_allclose(probes["attn_row_mass"], [1.0, 1.0], rtol=1e-5)


def test_head_stats_and_learnable_activation_params():
    cfg = config.with_overrides(CFG, ["model.activation=swish_beta"])
    model = models.build(cfg.model)
    tokens = jnp.zeros((2, 8), jnp.int32)
    params = model.init(jax.random.PRNGKey(0), tokens)
    tx = opt_lib.build(cfg.optimizer, cfg.model, params, 10)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    step = make_train_step(model, tx, cfg, opt_lib.schedule(cfg.optimizer, 10), make_step_probes(model, cfg))
    _, metrics, probes = jax.jit(step)(state, {"inputs": tokens, "targets": tokens})
    act = [k for k in probes if k.startswith("act/")]
    assert act and all("activation" in k for k in act)
    beta = [k for k in act if k.endswith("beta")][0]
    assert np.allclose(np.asarray(probes[beta]), 1.0, atol=0.05)  # init 1, one small step
    # log Z from the logits of the params the step started from, in float64 numpy
    logits = np.asarray(model.apply(params, tokens)[0], np.float64)
    top = logits.max(-1, keepdims=True)
    logz = (top[..., 0] + np.log(np.exp(logits - top).sum(-1)))
    assert float(probes["logz_mean"]) == pytest.approx(logz.mean(), rel=1e-5)
    assert float(probes["logz_max"]) == pytest.approx(logz.max(), rel=1e-5)


class _CountingProbe:
    """A user probe: one statistic inside the step, then its own row and a warning on the host."""

    def __init__(self, model, cfg):
        self.seen = []

    def inside_step(self, info):
        return {"embed_rms": jnp.sqrt(jnp.mean(jnp.square(info.new_params["embed"]["embedding"]))),
                "n_taps": jnp.asarray(len(info.taps), jnp.int32)}

    def on_step(self, step, summary, log):
        self.seen.append(step)
        log.write({"step": step, "kind": "probe", **summary})
        if step == 4:
            log.warn(step, "a test warning")


def test_a_user_probe_runs_both_halves_through_train(tmp_path):
    from seismo import rundir
    from seismo.instrument.probes import StepProbe
    from seismo.train.loop import train

    made = []

    def factory(model, cfg):
        made.append(_CountingProbe(model, cfg))
        return made[-1]

    cfg = config.with_overrides(CFG, ["run.steps=4", "run.probe_every=2", "run.progress=off", "run.eval_every=4",
                                      "run.checkpoint_async=false", "data.eval_sequences=4", "optimizer.warmup_steps=1"])
    train(cfg, tmp_path, probe=factory)
    assert len(made) == 1 and isinstance(made[0], StepProbe) and made[0].seen == [2, 4]
    rows = [json.loads(x) for x in (tmp_path / rundir.METRICS_FILE).read_text().splitlines()]
    probes = [r for r in rows if r["kind"] == "probe"]
    assert [r["step"] for r in probes] == [2, 4] and all(r["n_taps"] > 0 and r["embed_rms"] > 0 for r in probes)
    assert [r["warning"] for r in rows if r["kind"] == "warning"] == ["a test warning"]
