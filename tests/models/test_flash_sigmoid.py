"""FlashSigmoid (seismo.models.kernels.flash_sigmoid) against an explicit sigmoid attention.

The reference materialises the [B, H, T, T] weights, jnp.where(mask, sigmoid(z + b), 0), and
contracts with einsum at HIGHEST precision; gradients come from jax.vjp of it. Kernels run in
Pallas interpret mode, under jax.jit, with the bias a traced argument.

Tolerances are worst-case floating-point bounds, not observed errors, so they hold on any IEEE
machine whatever its summation order. With u = 2^-24 (float32 unit roundoff), a sum of n terms
is off by at most n u sum|terms|, elementwise. Each term a_ij v_j (or dS_ij k_j, ...) is itself
off by a relative (D + 2) u zmax (the D-term logit dot, zmax the largest |q.k| scale + |b| +
ALiBi over the tile, through sigmoid whose log-derivative is at most 1; dA = dO.v adds another D
terms). Kernel and reference both err, hence

    |kernel - reference| <= 2 u (n + D + (D + 2) zmax + 4) M,

M the same sum over |terms| (computed below from the reference's weights). For bfloat16
inputs the kernel also rounds the weights (or dS) to bfloat16 for the matmul and its output to
bfloat16, 2 u_bf M more (u_bf = 2^-8), doubled here: rows with one dominant term (the first
queries) nearly reach it. The float32 errors observed are 50-500x below their bounds (the d bias
and d slope bounds, n = B H T^2 terms, are looser still); a wrong mask, scale or missing block is
O(M). Matmuls run at float32 precision (the fixture below), so a TF32 default cannot loosen them.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seismo.models.kernels.flash_sigmoid import flash_sigmoid_attention

U32 = 2.0**-24
U_BF16 = 2.0**-8
HI = jax.lax.Precision.HIGHEST
# Interpret-mode kernels are big unrolled-loop programs; XLA's backend optimisations halve
# their compile time here (most of this file's runtime) and change no value beyond the bounds.
JIT = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@pytest.fixture(autouse=True)
def _float32_matmuls():
    with jax.default_matmul_precision("float32"):
        yield


# ----------------------------------------------------------------------------------------------
# explicit reference (test-only)


def _parts(q, k, v, scale, bias, slopes):
    """Weights a [B, H, T, T] (masked 0), k, v repeated to H heads, float32, and |z| max."""
    B, T, H, D = q.shape
    G = H // k.shape[2]
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
    i, j = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
    dist = (i - j).astype(jnp.float32)
    z = jnp.einsum("bihd,bjhd->bhij", q, k, precision=HI) * scale + bias
    zabs = jnp.einsum("bihd,bjhd->bhij", jnp.abs(q), jnp.abs(k), precision=HI) * scale + jnp.abs(bias)
    if slopes is not None:
        z = z - slopes[None, :, None, None] * dist
        zabs = zabs + jnp.abs(slopes)[None, :, None, None] * jnp.abs(dist)
    mask = j <= i
    a = jnp.where(mask, jax.nn.sigmoid(z), 0.0)
    return a, k, v, dist, jnp.max(jnp.where(mask, zabs, 0.0))


def reference(q, k, v, *, scale, bias, alibi_slopes=None):
    a, _, v, _, _ = _parts(q, k, v, scale, bias, alibi_slopes)
    return jnp.einsum("bhij,bjhd->bihd", a, v, precision=HI)


def magnitudes(q, k, v, do, scale, bias, slopes):
    """M for out, dq, dk, dv, d bias, d slopes (sums of |terms|) and zmax."""
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    a, kh, vh, dist, zmax = _parts(q, k, v, scale, bias, slopes)
    q32, do = q.astype(jnp.float32), do.astype(jnp.float32)
    ds_abs = jnp.einsum("bihd,bjhd->bhij", jnp.abs(do), jnp.abs(vh), precision=HI) * a * (1 - a)

    def per_kv(x):  # [B, T, H, D] summed over each group's query heads -> [B, T, Hkv, D]
        return x.reshape(B, T, Hkv, H // Hkv, D).sum(3)

    return dict(
        out=jnp.einsum("bhij,bjhd->bihd", a, jnp.abs(vh), precision=HI),
        dq=scale * jnp.einsum("bhij,bjhd->bihd", ds_abs, jnp.abs(kh), precision=HI),
        dk=per_kv(scale * jnp.einsum("bhij,bihd->bjhd", ds_abs, jnp.abs(q32), precision=HI)),
        dv=per_kv(jnp.einsum("bhij,bihd->bjhd", a, jnp.abs(do), precision=HI)),
        bias=jnp.sum(ds_abs),
        slopes=jnp.sum(ds_abs * jnp.abs(dist), axis=(0, 2, 3)),
    ), zmax


def assert_within(name, got, want, mag, *, n, D, zmax, bf16=False):
    got, want, mag = (np.asarray(x, np.float64) for x in (got, want, mag))
    zmax = float(zmax)
    tol = 2 * U32 * (n + D + (D + 2) * zmax + 4) * mag
    if bf16:
        tol = tol + 2 * (2 * U_BF16) * mag
    err = np.abs(got - want)
    worst = np.unravel_index(np.argmax(err - tol), err.shape) if err.ndim else ()
    assert np.all(err <= tol), (f"{name}: |err| {err[worst]:.3g} > tol {tol[worst]:.3g} at {worst} "
                                f"(max |err| {err.max():.3g}, max |ref| {np.abs(want).max():.3g})")


# ----------------------------------------------------------------------------------------------


def inputs(B, T, H, Hkv, D, dtype=jnp.float32, seed=0):
    kq, kk, kv, kd = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(kq, (B, T, H, D), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (B, T, Hkv, D), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (B, T, Hkv, D), jnp.float32).astype(dtype)
    do = jax.random.normal(kd, (B, T, H, D), jnp.float32).astype(dtype)
    return q, k, v, do


SLOPES4 = jnp.asarray([0.25, 0.0625, 0.015625, 0.00390625], jnp.float32)  # geometric, 4 heads


def value_and_grads(fn, q, k, v, bias, slopes, do):
    """(out, (dq, dk, dv, d bias[, d slopes])) of fn(q, k, v, bias, slopes) with cotangent do."""
    if slopes is None:
        out, vjp = jax.vjp(lambda q, k, v, b: fn(q, k, v, b, None), q, k, v, bias)
    else:
        out, vjp = jax.vjp(fn, q, k, v, bias, slopes)
    return out, vjp(do.astype(out.dtype))


def check_against_reference(B, T, H, Hkv, D, *, alibi, block_q, block_k, dtype=jnp.float32,
                            backend="triton"):
    q, k, v, do = inputs(B, T, H, Hkv, D, dtype)
    scale, bias = D**-0.5, jnp.float32(-np.log(T))
    slopes = SLOPES4[:H] if alibi else None

    def kernel(q, k, v, b, s):
        return flash_sigmoid_attention(q, k, v, scale=scale, bias=b, alibi_slopes=s,
                                       block_q=block_q, block_k=block_k, interpret=True,
                                       backend=backend)

    def ref(q, k, v, b, s):
        return reference(q, k, v, scale=scale, bias=b, alibi_slopes=s)

    out, grads = JIT(value_and_grads, static_argnums=0)(kernel, q, k, v, bias, slopes, do)

    @JIT
    def expected(q, k, v, bias, slopes, do):
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
        return value_and_grads(ref, q, k, v, bias, slopes, do), magnitudes(q, k, v, do, scale,
                                                                           bias, slopes)

    (out_r, grads_r), (mags, zmax) = expected(q, k, v, bias, slopes, do)

    assert out.shape == (B, T, H, D) and out.dtype == dtype
    bf16 = dtype == jnp.bfloat16
    kw = dict(D=D, zmax=zmax)
    assert_within("out", out, out_r, mags["out"], n=T, bf16=bf16, **kw)
    names = ["dq", "dk", "dv", "bias"] + (["slopes"] if alibi else [])
    G = H // Hkv
    n_terms = dict(dq=T + D, dk=G * T + D, dv=G * T, bias=B * H * T * T, slopes=B * T * T)
    for name, g, g_r in zip(names, grads, grads_r, strict=True):
        assert g.shape == g_r.shape, name
        assert_within(name, g, g_r, mags[name], n=n_terms[name],
                      bf16=bf16 and name in ("dq", "dk", "dv"), **kw)


@pytest.mark.parametrize("T,H,Hkv,alibi,block_q,block_k,backend", [
    (32, 4, 4, False, 8, 16, "triton"),  # multi-head, T a multiple of the blocks, bq < bk
    (40, 4, 2, True, 16, 16, "mosaic"),  # GQA 2 groups, ALiBi, T padded to 48; TPU layout
    (24, 4, 1, False, 16, 8, "triton"),  # multi-query (one kv head), T padded to 32, bq > bk
])
def test_values_and_grads_float32(T, H, Hkv, alibi, block_q, block_k, backend):
    """backend only picks the kernels' layout here (interpret mode either way): Triton's
    [B, T, H, D] with squeezed per-head scalars, or Mosaic's [B, H, T, D] with SMEM scalars."""
    check_against_reference(2, T, H, Hkv, 16, alibi=alibi, block_q=block_q, block_k=block_k,
                            backend=backend)


def test_values_and_grads_bfloat16_inputs():
    check_against_reference(1, 32, 4, 2, 16, alibi=True, block_q=16, block_k=16,
                            dtype=jnp.bfloat16)


def test_vmap_over_bias(backend="triton"):
    """The sweep pattern: jit(vmap(f over bias)), values and d q, d bias, one bias per lane."""
    B, T, H, Hkv, D = 1, 24, 4, 2, 16
    q, k, v, do = inputs(B, T, H, Hkv, D, seed=1)
    biases = jnp.asarray([-np.log(T), 0.0, 1.5], jnp.float32)
    scale = D**-0.5

    def lane(fn):
        def f(b):
            out, vjp = jax.vjp(lambda q, b: fn(q, k, v, scale=scale, bias=b), q, b)
            return out, *vjp(do)
        return JIT(jax.vmap(f))

    kernel = lambda q, k, v, **kw: flash_sigmoid_attention(q, k, v, block_q=8, block_k=8,
                                                           interpret=True, backend=backend, **kw)
    got = lane(kernel)(biases)
    want = lane(reference)(biases)
    all_mags = JIT(jax.vmap(lambda b: magnitudes(q, k, v, do, scale, b, None)))(biases)
    for lane_i, b in enumerate(np.asarray(biases)):
        mags, zmax = jax.tree.map(lambda x, i=lane_i: x[i], all_mags)
        for name, n, g, w in zip(["out", "dq", "bias"], [T, T + D, B * H * T * T], got, want):
            assert_within(f"{name}[bias={b:.3g}]", g[lane_i], w[lane_i], mags[name], n=n, D=D,
                          zmax=zmax)


def test_vmap_over_qkv():
    B, T, H, Hkv, D = 1, 16, 2, 1, 16
    lanes = [inputs(B, T, H, Hkv, D, seed=s) for s in (2, 3)]
    q, k, v = (jnp.stack([lane[i] for lane in lanes]) for i in range(3))
    f = JIT(jax.vmap(lambda q, k, v, b: flash_sigmoid_attention(
        q, k, v, scale=0.25, bias=b, alibi_slopes=SLOPES4[:H], block_q=8, block_k=8,
        interpret=True), in_axes=(0, 0, 0, None)))
    got = f(q, k, v, jnp.float32(-1.0))
    want, (mags, zmax) = JIT(jax.vmap(lambda q, k, v: (
        reference(q, k, v, scale=0.25, bias=-1.0, alibi_slopes=SLOPES4[:H]),
        magnitudes(q, k, v, q, 0.25, -1.0, SLOPES4[:H]))))(q, k, v)
    for i in range(2):
        assert_within(f"out[lane {i}]", got[i], want[i], mags["out"][i], n=T, D=D, zmax=zmax[i])


def test_causal_weights_exactly_zero():
    """Masked weights are exactly 0, so keys and values after query i (even 1e30) cannot
    change out_i by a single bit; the first query sees only itself. Default interpret mode."""
    B, T, H, D = 1, 16, 2, 16
    q, k, v, _ = inputs(B, T, H, H, D, seed=4)
    f = JIT(lambda q, k, v: flash_sigmoid_attention(q, k, v, scale=0.25, bias=-2.0,
                                                    block_q=8, block_k=8))
    out = f(q, k, v)
    cut = 5  # keys and values 5.. replaced
    k2 = k.at[:, cut:].set(1e30)
    v2 = v.at[:, cut:].set(1e30)
    out2 = f(q, k2, v2)
    np.testing.assert_array_equal(np.asarray(out[:, :cut]), np.asarray(out2[:, :cut]))
    a00 = jax.nn.sigmoid(jnp.sum(q[:, 0] * k[:, 0], -1) * 0.25 - 2.0)  # [B, H]
    mags, zmax = JIT(magnitudes, static_argnums=(4, 5))(q, k, v, q, 0.25, -2.0, None)
    assert_within("out[0]", out[:, 0], a00[..., None] * v[:, 0], mags["out"][:, 0], n=1, D=D,
                  zmax=zmax)


def test_validation():
    q = jnp.zeros((1, 8, 3, 16))
    kv = jnp.zeros((1, 8, 2, 16))
    with pytest.raises(ValueError, match="multiple of kv heads"):
        flash_sigmoid_attention(q, kv, kv, scale=1.0, bias=0.0)
    q = jnp.zeros((1, 8, 4, 16))
    with pytest.raises(ValueError, match="alibi_slopes"):
        flash_sigmoid_attention(q, kv, kv, scale=1.0, bias=0.0, alibi_slopes=jnp.zeros(3))
    with pytest.raises(ValueError, match="k and v"):
        flash_sigmoid_attention(q, kv, jnp.zeros((1, 8, 2, 8)), scale=1.0, bias=0.0)
    with pytest.raises(ValueError, match="share a dtype"):
        flash_sigmoid_attention(q, kv, kv.astype(jnp.bfloat16), scale=1.0, bias=0.0)
    with pytest.raises(ValueError, match="backend"):
        flash_sigmoid_attention(q, kv, kv, scale=1.0, bias=0.0, backend="cuda")
