"""The AdamW recipe against hand computations in numpy (float64), never against optax itself.

The fake parameter trees follow the model's naming convention (scanned blocks with a leading
layer axis, `kernel` / `embedding` / `scale` / `bias` leaves), and their group trees come from
`_groups_from_paths` below, so these tests do not depend on the model package.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from seismo.config import DECAY_GROUPS, ModelConfig, OptimizerConfig
from seismo.train import optimizer as opt

L, D, H, V = 2, 4, 2, 8  # layers, width, heads, vocabulary of the fake trees


# --------------------------------------------------------------------------- fake params


def _fake_params(d: int = D, shapes_only: bool = False, seed: int = 0) -> dict:
    """A tree shaped like the model's params, one leaf of every parameter group."""
    shapes = {
        "embed": {"embedding": (V, d)},
        "blocks": {
            "attn_norm": {"scale": (L, d), "bias": (L, d)},
            "attn": {
                "q": {"kernel": (L, d, d)},
                "o": {"kernel": (L, d, d)},
                "q_norm": {"scale": (L, d // H)},
                "attn_bias": {"k": (L, H, d // H), "v": (L, H, d // H)},
            },
            "mlp_norm": {"scale": (L, d)},
            "mlp": {
                "up": {"kernel": (L, d, 4 * d), "bias": (L, 4 * d)},
                "down": {"kernel": (L, 4 * d, d)},
                "act": {"alpha": (L,)},
            },
            "layerscale": {"attn": (L, d), "mlp": (L, d)},
        },
        "final_norm": {"scale": (d,)},
        "head": {"kernel": (d, V)},
    }
    is_shape = lambda x: isinstance(x, tuple)
    if shapes_only:
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), shapes, is_leaf=is_shape)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), shapes, is_leaf=is_shape)


def _group_of(path: tuple[str, ...]) -> str:
    if "attn_bias" in path:
        return "attn_bias"
    if "layerscale" in path:
        return "layerscale"
    if path[-1] in ("kernel", "embedding"):
        return path[-1]
    if any(p.endswith("norm") for p in path[:-1]):
        return "norm" if path[-1] == "scale" else "bias"
    if path[-1] == "bias":
        return "bias"
    if "act" in path:
        return "activation"
    raise AssertionError(f"fake params: no group for {path}")


def _groups_from_paths(params: dict) -> dict:
    """The group tree the naming convention implies (what seismo.models.param_groups returns)."""
    return jax.tree_util.tree_map_with_path(lambda p, _: _group_of(tuple(k.key for k in p)), params)


def _flat_groups(params: dict) -> dict[str, str]:
    return {jax.tree_util.keystr(p): g for p, g in jax.tree_util.tree_leaves_with_path(_groups_from_paths(params))}


def _flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(x, np.float64) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


# --------------------------------------------------------------------------- hand computations


def _lr_hand(t: int, lr: float, min_lr: float, warmup: int, total: int, kind: str) -> float:
    """Update t (0-based) is schedule step k = t + 1: linear warmup to lr at k = warmup, then decay."""
    k = t + 1
    if k <= warmup:
        return lr * k / warmup
    if kind == "constant" or total <= warmup:
        return lr
    frac = min(k - warmup, total - warmup) / (total - warmup)
    if kind == "cosine":
        return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * frac))
    return lr + (min_lr - lr) * frac


def _adamw_hand(params, grads_seq, cfg: OptimizerConfig, total: int, mask: dict, mult: dict):
    """AdamW written out (Loshchilov & Hutter; Wortsman et al. 2023 independent decay).

    Returns, per step, (theta, Delta) as flat float64 dicts."""
    theta = _flat(params)
    m = {k: np.zeros_like(x) for k, x in theta.items()}
    v = {k: np.zeros_like(x) for k, x in theta.items()}
    out = []
    for t, grads in enumerate(grads_seq):
        g = _flat(grads)
        if cfg.clip_norm > 0:
            norm = math.sqrt(sum(float(np.sum(x**2)) for x in g.values()))
            if norm >= cfg.clip_norm:
                g = {k: x * cfg.clip_norm / norm for k, x in g.items()}
        s = _lr_hand(t, cfg.lr, cfg.min_lr, cfg.warmup_steps, total, cfg.schedule) / cfg.lr
        deltas = {}
        for k in theta:
            m[k] = cfg.b1 * m[k] + (1 - cfg.b1) * g[k]
            v[k] = cfg.b2 * v[k] + (1 - cfg.b2) * g[k] ** 2
            m_hat = m[k] / (1 - cfg.b1 ** (t + 1))
            v_hat = v[k] / (1 - cfg.b2 ** (t + 1))
            delta = m_hat / (np.sqrt(v_hat) + cfg.eps)
            lam = cfg.weight_decay if mask[k] else 0.0
            if cfg.weight_decay_form == "independent":
                theta[k] = theta[k] - s * (cfg.lr * mult[k] * delta + lam * theta[k])
            else:
                theta[k] = theta[k] - s * cfg.lr * mult[k] * (delta + lam * theta[k])
            deltas[k] = delta
        out.append(({k: x.copy() for k, x in theta.items()}, deltas))
    return out


def _run(cfg: OptimizerConfig, model_cfg: ModelConfig, params, grads_seq, total: int):
    """Apply the real optax chain (jitted); returns per step (params, Delta from unscaled_update)."""
    tx = opt.build(cfg, model_cfg, params, total, groups=_groups_from_paths(params))
    state = tx.init(params)

    @jax.jit
    def step(p, s, g):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s, opt.unscaled_update(s)

    out = []
    for grads in grads_seq:
        params, state, delta = step(params, state, grads)
        out.append((_flat(params), _flat(delta)))
    return out


def _assert_close(got: dict, want: dict, rtol: float = 1e-6, what: str = ""):
    """Equal to `rtol` relative to each tensor's scale: float32 entries that cancel to near 0
    keep an absolute error of about 1e-7 of the tensor's largest entry."""
    for k in want:
        atol = rtol * float(np.max(np.abs(want[k])))
        np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=atol, err_msg=f"{what} {k}")


def _random_grads(params, n: int, seed: int = 1, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    return [jax.tree.map(lambda p: jnp.asarray(scale * rng.normal(size=p.shape), jnp.float32), params) for _ in range(n)]


# --------------------------------------------------------------------------- schedule


def test_schedule_cosine_key_points():
    lr, min_lr, warmup, total = 1e-2, 1e-4, 10, 110
    cfg = OptimizerConfig(lr=lr, min_lr=min_lr, warmup_steps=warmup, schedule="cosine")
    f = jax.jit(opt.schedule(cfg, total))
    at = lambda t: float(f(jnp.int32(t)))
    assert at(0) == pytest.approx(lr / warmup, rel=1e-6)  # the first update already moves
    assert at(4) == pytest.approx(lr / 2, rel=1e-6)  # warmup midpoint: schedule step 5 of 10
    assert at(warmup - 1) == pytest.approx(lr, rel=1e-6)  # the last warmup update is the peak
    assert at(warmup - 1 + (total - warmup) // 2) == pytest.approx((lr + min_lr) / 2, rel=1e-6)
    assert at(total - 1) == pytest.approx(min_lr, rel=1e-5)  # the last update runs at min_lr
    assert at(total + 50) == pytest.approx(min_lr, rel=1e-5)
    want = [_lr_hand(t, lr, min_lr, warmup, total, "cosine") for t in range(total + 5)]
    np.testing.assert_allclose(np.asarray(f(jnp.arange(total + 5))), want, rtol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "constant"])
def test_schedule_linear_and_constant(kind):
    lr, min_lr, warmup, total = 3e-3, 3e-5, 4, 24
    cfg = OptimizerConfig(lr=lr, min_lr=min_lr, warmup_steps=warmup, schedule=kind)
    f = opt.schedule(cfg, total)
    mid = float(f(warmup - 1 + (total - warmup) // 2))
    assert mid == pytest.approx((lr + min_lr) / 2 if kind == "linear" else lr, rel=1e-6)
    want = [_lr_hand(t, lr, min_lr, warmup, total, kind) for t in range(total + 3)]
    np.testing.assert_allclose(np.asarray(f(jnp.arange(total + 3))), want, rtol=1e-5)


def test_schedule_without_warmup_or_decay_room():
    cfg = OptimizerConfig(lr=1.0, min_lr=0.0, warmup_steps=0, schedule="cosine")
    f = opt.schedule(cfg, 4)
    np.testing.assert_allclose(np.asarray(f(jnp.arange(5))), [_lr_hand(t, 1.0, 0.0, 0, 4, "cosine") for t in range(5)],
                               atol=1e-7)
    f = opt.schedule(OptimizerConfig(lr=1.0, warmup_steps=4), 4)  # warmup fills the run: no decay
    np.testing.assert_allclose(np.asarray(f(jnp.arange(6))), [0.25, 0.5, 0.75, 1, 1, 1], rtol=1e-6)


# --------------------------------------------------------------------------- weight decay and muParam


@pytest.mark.parametrize("mup", ["off", "simple"])
@pytest.mark.parametrize("form,lam", [("independent", 0.05), ("coupled", 0.5)])
def test_weight_decay_forms_against_hand_adamw(form, lam, mup):
    # d_model 512 with base 256: the muParam multiplier of every kernel is 0.5
    model_cfg = ModelConfig(d_model=512, n_heads=4, mup=mup, mup_base_width=256)
    cfg = OptimizerConfig(lr=0.1, min_lr=0.01, warmup_steps=2, schedule="cosine", clip_norm=0.0,
                          weight_decay=lam, weight_decay_form=form)
    total = 4
    params = _fake_params()
    grads = _random_grads(params, 3)
    groups = _flat_groups(params)
    mask = {k: g not in cfg.decay_exclude for k, g in groups.items()}
    mult = {k: (0.5 if (mup != "off" and g == "kernel") else 1.0) for k, g in groups.items()}
    got = _run(cfg, model_cfg, params, grads, total)
    want = _adamw_hand(params, grads, cfg, total, mask, mult)
    other_form = "coupled" if form == "independent" else "independent"
    other = _adamw_hand(params, grads, dataclasses.replace(cfg, weight_decay_form=other_form), total, mask, mult)
    for t, ((theta, delta), (theta_hand, delta_hand)) in enumerate(zip(got, want)):
        _assert_close(theta, theta_hand, what=f"step {t} theta")
        _assert_close(delta, delta_hand, rtol=1e-5, what=f"step {t} Delta")
    kernel = "['blocks']['mlp']['up']['kernel']"
    # the test tells the forms apart: the other form's theta is far from this one's
    assert not np.allclose(got[-1][0][kernel], other[-1][0][kernel], rtol=1e-4)


def test_decay_mask_zero_gradients_move_only_decayed_leaves():
    params = _fake_params()
    zero = [jax.tree.map(jnp.zeros_like, params)]
    lam = 0.1
    for lr in (1e-3, 1e-1):  # independent decay does not depend on the LR
        cfg = OptimizerConfig(lr=lr, warmup_steps=0, schedule="constant", weight_decay=lam, clip_norm=0.0)
        (theta, delta), = _run(cfg, ModelConfig(), params, zero, 10)
        before = _flat(params)
        groups = _flat_groups(params)
        assert set(groups.values()) == set(DECAY_GROUPS)
        for k, g in groups.items():
            if g in cfg.decay_exclude:
                np.testing.assert_array_equal(theta[k], before[k], err_msg=f"{k} ({g}) must not decay")
            else:
                np.testing.assert_allclose(theta[k], before[k] * (1 - lam), rtol=1e-6, err_msg=f"{k} ({g})")
            np.testing.assert_array_equal(delta[k], 0.0)
    # coupled decay rides on the LR
    cfg = OptimizerConfig(lr=0.1, warmup_steps=0, schedule="constant", weight_decay=lam, weight_decay_form="coupled")
    (theta, _), = _run(cfg, ModelConfig(), params, zero, 10)
    k = "['head']['kernel']"
    np.testing.assert_allclose(theta[k], _flat(params)[k] * (1 - 0.1 * lam), rtol=1e-6)


def test_decay_exclude_is_configurable():
    params = _fake_params()
    cfg = OptimizerConfig(decay_exclude=("norm",))
    mask = opt.decay_mask(cfg, params, groups=_groups_from_paths(params))
    assert mask["blocks"]["attn_norm"] == {"scale": False, "bias": True}
    assert mask["blocks"]["mlp"]["act"]["alpha"] and mask["blocks"]["layerscale"]["attn"]
    default = opt.decay_mask(OptimizerConfig(), params, groups=_groups_from_paths(params))
    assert default["embed"]["embedding"] and default["blocks"]["mlp"]["down"]["kernel"]
    assert not default["blocks"]["attn"]["attn_bias"]["k"] and not default["final_norm"]["scale"]


@pytest.mark.parametrize("width,want", [(256, 1.0), (512, 0.5), (1024, 0.25), (2048, 0.125)])
def test_mup_simple_multipliers(width, want):
    params = _fake_params(d=width, shapes_only=True)
    groups = _groups_from_paths(params)
    mult = opt.lr_multipliers(params, ModelConfig(d_model=width, mup="simple", mup_base_width=256), groups=groups)
    down = params["blocks"]["mlp"]["down"]["kernel"]
    fan_in = down.shape[-2]
    assert fan_in == 4 * width
    base_fan_in = 4 * 256  # the down-projection's fan-in in the width-256 model
    assert mult["blocks"]["mlp"]["down"]["kernel"] == pytest.approx(base_fan_in / fan_in) == want
    for path in (("blocks", "attn", "q"), ("blocks", "attn", "o"), ("blocks", "mlp", "up"), ("head",)):
        node = mult
        for p in path:
            node = node[p]
        assert node["kernel"] == pytest.approx(want), path
    assert mult["embed"]["embedding"] == 1.0
    assert mult["blocks"]["mlp_norm"]["scale"] == 1.0 and mult["blocks"]["mlp"]["up"]["bias"] == 1.0
    full = opt.lr_multipliers(params, ModelConfig(d_model=width, mup="full"), groups=groups)
    assert full == mult
    off = opt.lr_multipliers(params, ModelConfig(d_model=width, mup="off"), groups=groups)
    assert set(jax.tree.leaves(off)) == {1.0}


# --------------------------------------------------------------------------- clipping, eps, the Adam direction


def _two_leaves(a, b):
    return {"head": {"kernel": jnp.asarray(a, jnp.float32)}, "final_norm": {"scale": jnp.asarray(b, jnp.float32)}}


@pytest.mark.parametrize("clip,g_a,g_b,factor", [
    (1.0, [6.0, 0.0], [0.0, 8.0], 0.1),  # global norm 10 -> 1
    (1.0, [0.3, 0.0], [0.0, 0.4], 1.0),  # norm 0.5: untouched
    (0.0, [6.0, 0.0], [0.0, 8.0], 1.0),  # clipping off
])
def test_global_norm_clipping(clip, g_a, g_b, factor):
    # eps = 1 makes the first Adam step depend on the gradient's scale: Delta = g / (|g| + 1)
    cfg = OptimizerConfig(lr=0.5, warmup_steps=0, schedule="constant", weight_decay=0.0, eps=1.0, clip_norm=clip)
    params = _two_leaves([[1.0, 2.0]], [1.0, 1.0])
    grads = _two_leaves([g_a], g_b)
    tx = opt.build(cfg, ModelConfig(), params, 10, groups=_groups_from_paths(params))
    updates, state = tx.update(grads, tx.init(params), params)
    g = factor * np.array(g_a + g_b)
    mu = optax.tree_utils.tree_get(state, "ScaleByAdamState").mu
    np.testing.assert_allclose(np.concatenate([np.ravel(mu["head"]["kernel"]), mu["final_norm"]["scale"]]),
                               (1 - cfg.b1) * g, rtol=1e-6)
    got = np.concatenate([np.ravel(updates["head"]["kernel"]), updates["final_norm"]["scale"]])
    np.testing.assert_allclose(got, -cfg.lr * g / (np.abs(g) + 1.0), rtol=1e-6)


def test_eps_default_and_configurable():
    assert OptimizerConfig().eps == 1e-8
    params = _two_leaves([[0.0, 0.0]], [0.0, 0.0])
    base = dict(lr=1.0, warmup_steps=0, schedule="constant", weight_decay=0.0, clip_norm=0.0)
    # default eps: a gradient of 1e-8 gives Delta = 1e-8 / (1e-8 + 1e-8) = 0.5 on the first step
    grads = _two_leaves([[1e-8, 1.0]], [1e-8, -1.0])
    (theta, delta), = _run(OptimizerConfig(**base), ModelConfig(), params, [grads], 10)
    np.testing.assert_allclose(delta["['head']['kernel']"], [[0.5, 1.0]], rtol=1e-5)
    np.testing.assert_allclose(theta["['final_norm']['scale']"], [-0.5, 1.0], rtol=1e-5)
    # eps = 1 over two steps, against the hand formula
    cfg = OptimizerConfig(**base, eps=1.0)
    grads = [_two_leaves([[1.0, 3.0]], [0.5, -2.0]), _two_leaves([[-1.0, 1.0]], [0.25, 4.0])]
    got = _run(cfg, ModelConfig(), params, grads, 10)
    flat = _flat_groups(params)
    want = _adamw_hand(params, grads, cfg, 10, {k: False for k in flat}, {k: 1.0 for k in flat})
    np.testing.assert_allclose(got[0][1]["['head']['kernel']"], [[0.5, 0.75]], rtol=1e-6)
    for (theta, delta), (theta_hand, delta_hand) in zip(got, want):
        _assert_close(theta, theta_hand)
        _assert_close(delta, delta_hand)


def test_unscaled_update_is_the_adam_direction():
    cfg = OptimizerConfig(lr=0.03, b1=0.8, b2=0.9, eps=1e-3, warmup_steps=0, schedule="constant",
                          weight_decay=0.0, clip_norm=0.0)
    params = _fake_params()
    tx = opt.build(cfg, ModelConfig(), params, 10, groups=_groups_from_paths(params))
    state = tx.init(params)
    zero = opt.unscaled_update(state)
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(zero))  # no 0/0 before the first update

    @jax.jit
    def step(grads, state):
        updates, state = tx.update(grads, state, params)
        return updates, state, opt.unscaled_update(state)  # b1, b2, eps read from the state

    for grads in _random_grads(params, 3, scale=1e-2):
        updates, state, delta = step(grads, state)
        # weight decay 0 and a constant schedule: the applied update is exactly -lr * Delta
        _assert_close(_flat(jax.tree.map(lambda d: -cfg.lr * d, delta)), _flat(updates), rtol=1e-6)
    _assert_close(_flat(opt.unscaled_update(state, cfg)), _flat(delta), rtol=1e-6)
    # an Adam state that does not record its hyperparameters needs the config
    plain = optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    small = _two_leaves([[1.0, 2.0]], [3.0, 4.0])
    plain_updates, plain_state = plain.update(small, plain.init(small))
    _assert_close(_flat(opt.unscaled_update(plain_state, cfg)), _flat(plain_updates), rtol=1e-6)
    with pytest.raises(ValueError, match="opt_cfg"):
        opt.unscaled_update(plain_state)


def test_traced_lr_and_weight_decay_in_a_vmapped_sweep():
    params = _two_leaves([[1.0, -2.0]], [0.5, 1.5])
    grads = [_two_leaves([[0.3, -0.1]], [0.2, 0.4]), _two_leaves([[-0.2, 0.5]], [0.1, -0.3])]
    base = OptimizerConfig(warmup_steps=1, min_lr=1e-3, clip_norm=0.0)
    lrs, lams = jnp.array([0.1, 0.03]), jnp.array([0.2, 0.0])

    def train(lr, lam):
        cfg = dataclasses.replace(base, lr=lr, weight_decay=lam)
        tx = opt.build(cfg, ModelConfig(), params, 3, groups=_groups_from_paths(params))
        p, s = params, tx.init(params)
        for g in grads:
            u, s = tx.update(g, s, p)
            p = optax.apply_updates(p, u)
        return p

    swept = jax.jit(jax.vmap(train))(lrs, lams)
    groups = _flat_groups(params)
    for i in range(2):
        cfg = dataclasses.replace(base, lr=float(lrs[i]), weight_decay=float(lams[i]))
        mask = {k: g not in cfg.decay_exclude for k, g in groups.items()}
        want = _adamw_hand(params, grads, cfg, 3, mask, {k: 1.0 for k in groups})[-1][0]
        _assert_close({k: v[i] for k, v in _flat(swept).items()}, want, what=f"lane {i}")


# --------------------------------------------------------------------------- plumbing


def test_build_from_abstract_params_and_errors():
    params = _fake_params(shapes_only=True)
    groups = _groups_from_paths(params)
    tx = opt.build(OptimizerConfig(), ModelConfig(mup="simple"), params, 10, groups=groups)
    state = jax.eval_shape(tx.init, params)  # the state's shapes, e.g. to shard it before it exists
    mu = optax.tree_utils.tree_get(state, "ScaleByAdamState").mu
    assert mu["blocks"]["mlp"]["down"]["kernel"].shape == (L, 4 * D, D)
    with pytest.raises(ValueError, match="structure"):
        opt.build(OptimizerConfig(), ModelConfig(), params, 10, groups={"embed": groups["embed"]})
    bad = jax.tree.map(lambda g: "weights" if g == "kernel" else g, groups)
    with pytest.raises(ValueError, match="unknown group 'weights'"):
        opt.build(OptimizerConfig(), ModelConfig(), params, 10, groups=bad)


@pytest.mark.parametrize("model_cfg", [
    ModelConfig(d_model=32, n_heads=2, n_layers=2, vocab_size=64, max_seq_len=16),
    ModelConfig(d_model=32, n_heads=2, n_layers=2, vocab_size=64, max_seq_len=16, attention="gated",
                attn_bias=True, layerscale=True, qk_norm=True, mlp="gated", activation="pau",
                positions="learned", use_bias=True, mup="simple", mup_base_width=16),
], ids=["default", "every_group"])
def test_real_model_params(model_cfg):
    """On a real tiny model: the groups come from seismo.models.param_groups (build's default),
    the decay mask and the multipliers cover every leaf, and one jitted update runs."""
    from seismo.models import build as build_model
    from seismo.models import param_groups

    model = build_model(model_cfg)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 8), jnp.int32))
    cfg = OptimizerConfig(weight_decay=0.1)
    tx = opt.build(cfg, model_cfg, params, 10)
    groups = jax.tree.leaves(param_groups(params))
    mask = opt.decay_mask(cfg, params)
    mult = opt.lr_multipliers(params, model_cfg)
    assert jax.tree.structure(mask) == jax.tree.structure(params) == jax.tree.structure(mult)
    for g, decays, m in zip(groups, jax.tree.leaves(mask), jax.tree.leaves(mult)):
        assert decays == (g not in cfg.decay_exclude), g
        assert m == (model_cfg.mup_base_width / model_cfg.d_model if model_cfg.mup != "off" and g == "kernel" else 1.0)
    if model_cfg.layerscale:
        assert set(groups) == set(DECAY_GROUPS)


    @jax.jit
    def one_update():
        ones = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), params)
        return tx.update(ones, tx.init(ones), ones)[0]

    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(one_update()))


def test_describe_is_one_line():
    text = opt.describe(OptimizerConfig())
    assert "\n" not in text
    for part in ("b2=0.95", "eps=1e-08", "cosine", "1e-05", "independent weight decay 0.0001", "clip global norm 1"):
        assert part in text, (part, text)
    assert "no weight decay" in opt.describe(OptimizerConfig(weight_decay=0.0))
