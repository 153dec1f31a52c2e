"""FlashSigmoid: fused causal sigmoid attention in Pallas, forward and backward.

Ramapuram et al. 2024, "Theory, Analysis, and Best Practices for Sigmoid Self-Attention",
arXiv 2409.04431 (ICLR 2025), the FlashSigmoid section (§4 of arXiv v1 as recalled offline;
docs/methods.md §2 notes the paper's section numbers were not checked against the PDF). It fuses
the paper's sigmoid attention

    SigmoidAttn(X) = sigma(Q K^T / sqrt(d_qk) + b) V        (the paper's SigmoidAttn definition)

with a causal mask and optional ALiBi. Per query i and head h, with kv head g = h // (H // Hkv)
(grouped-query attention):

    a_ij  = sigmoid(q_i . k_j * scale + bias - slope_h * (i - j))   for j <= i, exactly 0 for j > i
    out_i = sum_j a_ij v_j

(the ALiBi term only when `alibi_slopes` is given). Unlike FlashAttention there is no row max and
no normaliser: each query block just accumulates sigma(.) V over the visible key blocks, so the
forward keeps no residuals beyond q, k, v. Logits and weights are float32; matmul operands are the
input dtype (the weights are cast to it for the PV product, as in every flash kernel) and
accumulate in float32.

Backward (two kernels, the weights recomputed blockwise, never materialised):

    dV_j = sum_i a_ij dO_i                dA_ij = dO_i . v_j
    dS_ij = dA_ij a_ij (1 - a_ij)         (0 on masked entries, since a_ij = 0 there)
    dQ_i = scale sum_j dS_ij k_j          dK_j = scale sum_i dS_ij q_i
    d bias = sum_{b,h,i,j} dS_ij          d slope_h = -sum_{b,i,j} dS_ij (i - j)

dK, dV of a kv head are summed over the H // Hkv query heads of its group inside the dK/dV kernel.
bias may be a traced value (e.g. swept under jax.vmap); alibi_slopes are differentiable too.

Kernels are written Triton-style after jax.experimental.pallas.ops.gpu.attention: the forward
and dQ kernels run a grid over (batch, head, query block) and a fori_loop over key blocks
0 .. the diagonal (fully masked key blocks are never visited); the dK/dV kernel runs a grid over
(batch, kv head, key block) and loops from the diagonal query block to the end. `interpret=None`
means Pallas interpret mode on the CPU backend and compiled (Triton) otherwise. The Triton
lowering wants power-of-two tiles, so block sizes are min(block, next_power_of_2(T)) (at least
16 when compiled, Triton's smallest dot tile), the sequence is zero-padded to a multiple of the
blocks (padded keys sit after every real query, so the causal mask hides them; padded queries
are sliced off and get zero cotangents) and a head dim that is not a power of two is zero-padded.
Mosaic (TPU) lowering is not supported: the [B, T, H, D] blocks squeeze the head axis, the
second-minor dimension Mosaic tiles by 8.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

__all__ = ["flash_sigmoid_attention"]


class _Cfg(NamedTuple):  # static (hashable) kernel configuration
    scale: float
    block_q: int
    block_k: int
    group: int  # query heads per kv head, H // Hkv
    alibi: bool
    interpret: bool


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [M, K] @ b [K, N], accumulated in float32."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _weights(q, k, bias, slope, start_q, start_k, cfg: _Cfg):
    """Causal sigmoid weights [block_q, block_k] in float32 for one (query, key) tile; masked
    entries exactly 0."""
    bq, bk = q.shape[0], k.shape[0]
    z = _dot(q, k.T) * cfg.scale + bias
    pos_q = start_q * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    pos_k = start_k * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    dist = pos_q - pos_k
    if cfg.alibi:
        z = z - slope * dist.astype(jnp.float32)
    return jnp.where(dist >= 0, jax.nn.sigmoid(z), 0.0), dist


def _n_kv_blocks(start_q, cfg: _Cfg):
    """Key blocks 0 .. n-1 hold every key a query block start_q can see (cdiv)."""
    return lax.div((start_q + 1) * cfg.block_q + cfg.block_k - 1, cfg.block_k)


# ---------------------------------------------------------------------------------------------
# kernels


def _fwd_kernel(q_ref, k_ref, v_ref, bias_ref, *rest, cfg: _Cfg):
    slope_ref, o_ref = rest if cfg.alibi else (None, *rest)
    start_q = pl.program_id(2)
    q = q_ref[...]
    bias = bias_ref[...]
    slope = slope_ref[...] if cfg.alibi else None

    def body(start_k, acc):
        ks = pl.ds(start_k * cfg.block_k, cfg.block_k)
        k, v = k_ref[ks, :], v_ref[ks, :]
        a, _ = _weights(q, k, bias, slope, start_q, start_k, cfg)
        return acc + _dot(a.astype(v.dtype), v)

    acc = jnp.zeros(o_ref.shape, jnp.float32)
    acc = lax.fori_loop(0, _n_kv_blocks(start_q, cfg), body, acc)
    o_ref[...] = acc.astype(o_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, bias_ref, *rest, cfg: _Cfg):
    if cfg.alibi:
        slope_ref, do_ref, dq_ref, db_ref, ds_ref = rest
    else:
        (do_ref, dq_ref, db_ref), slope_ref, ds_ref = rest, None, None
    start_q = pl.program_id(2)
    q, do = q_ref[...], do_ref[...]
    bias = bias_ref[...]
    slope = slope_ref[...] if cfg.alibi else None

    def body(start_k, carry):
        dq, db, dsl = carry
        ks = pl.ds(start_k * cfg.block_k, cfg.block_k)
        k, v = k_ref[ks, :], v_ref[ks, :]
        a, dist = _weights(q, k, bias, slope, start_q, start_k, cfg)
        ds = _dot(do, v.T) * a * (1.0 - a)  # [bq, bk] f32, 0 where masked
        dq = dq + _dot(ds.astype(k.dtype), k)
        db = db + jnp.sum(ds, axis=1)
        if cfg.alibi:
            dsl = dsl - jnp.sum(ds * dist.astype(jnp.float32), axis=1)
        return dq, db, dsl

    zeros_row = jnp.zeros((cfg.block_q,), jnp.float32)
    carry = (jnp.zeros(dq_ref.shape, jnp.float32), zeros_row, zeros_row)
    dq, db, dsl = lax.fori_loop(0, _n_kv_blocks(start_q, cfg), body, carry)
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)
    db_ref[...] = db
    if cfg.alibi:
        ds_ref[...] = dsl


def _dkv_kernel(q_ref, k_ref, v_ref, bias_ref, *rest, cfg: _Cfg):
    # q_ref, do_ref: [T, G, D], the G query heads of this kv head; bias_ref, slope_ref: [G]
    slope_ref, do_ref, dk_ref, dv_ref = rest if cfg.alibi else (None, *rest)
    start_k = pl.program_id(2)
    ks = pl.ds(start_k * cfg.block_k, cfg.block_k)
    k, v = k_ref[ks, :], v_ref[ks, :]
    n_q = q_ref.shape[0] // cfg.block_q
    first_q = lax.div(start_k * cfg.block_k, cfg.block_q)  # query blocks before it see none of it
    dk = jnp.zeros(dk_ref.shape, jnp.float32)
    dv = jnp.zeros(dv_ref.shape, jnp.float32)
    for g in range(cfg.group):  # static: G is small
        bias = bias_ref[g]
        slope = slope_ref[g] if cfg.alibi else None

        def body(start_q, carry, g=g, bias=bias, slope=slope):
            dk, dv = carry
            qs = pl.ds(start_q * cfg.block_q, cfg.block_q)
            q, do = q_ref[qs, g, :], do_ref[qs, g, :]
            a, _ = _weights(q, k, bias, slope, start_q, start_k, cfg)
            dv = dv + _dot(a.astype(do.dtype).T, do)
            ds = _dot(do, v.T) * a * (1.0 - a)
            dk = dk + _dot(ds.astype(q.dtype).T, q)
            return dk, dv

        dk, dv = lax.fori_loop(first_q, n_q, body, (dk, dv))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ---------------------------------------------------------------------------------------------
# pallas_calls (arrays already padded: T a multiple of both blocks, D a power of two)


def _compiler_params(cfg: _Cfg, D: int):
    """Triton parameters whenever compiled: without them a GPU pallas_call may take the Mosaic
    GPU path (jax_pallas_use_mosaic_gpu), which these kernels are not written for."""
    if cfg.interpret:
        return None
    from jax.experimental.pallas import triton as plgpu

    warps = 4 if cfg.block_q * cfg.block_k <= 64 * 64 or D <= 64 else 8
    return plgpu.CompilerParams(num_warps=warps, num_stages=2)


def _head_specs(cfg: _Cfg, T: int, D: int, with_slopes: bool):
    """Specs for a grid (b, h, i) over query heads: q-block, full k and v of kv head h // G,
    the per-head bias (and slope) scalars."""
    G = cfg.group
    specs = [
        pl.BlockSpec((None, cfg.block_q, None, D), lambda b, h, i: (b, i, h, 0)),
        pl.BlockSpec((None, T, None, D), lambda b, h, i: (b, 0, h // G, 0)),
        pl.BlockSpec((None, T, None, D), lambda b, h, i: (b, 0, h // G, 0)),
        pl.BlockSpec((None,), lambda b, h, i: (h,)),
    ]
    if with_slopes:
        specs.append(pl.BlockSpec((None,), lambda b, h, i: (h,)))
    return specs


def _forward(q, k, v, bias_h, slopes, cfg: _Cfg):
    B, T, H, D = q.shape
    args = (q, k, v, bias_h) + ((slopes,) if cfg.alibi else ())
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=(B, H, T // cfg.block_q),
        in_specs=_head_specs(cfg, T, D, cfg.alibi),
        out_specs=pl.BlockSpec((None, cfg.block_q, None, D), lambda b, h, i: (b, i, h, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_compiler_params(cfg, D),
        interpret=cfg.interpret,
        name="flash_sigmoid_fwd",
    )(*args)


def _backward(q, k, v, bias_h, slopes, do, cfg: _Cfg):
    B, T, H, D = q.shape
    Hkv, G = k.shape[2], cfg.group
    extra = (slopes,) if cfg.alibi else ()
    row = pl.BlockSpec((None, None, cfg.block_q), lambda b, h, i: (b, h, i))
    row_shape = jax.ShapeDtypeStruct((B, H, T), jnp.float32)
    dq, *rows = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(B, H, T // cfg.block_q),
        in_specs=[*_head_specs(cfg, T, D, cfg.alibi),
                  pl.BlockSpec((None, cfg.block_q, None, D), lambda b, h, i: (b, i, h, 0))],
        out_specs=[pl.BlockSpec((None, cfg.block_q, None, D), lambda b, h, i: (b, i, h, 0)),
                   row] + ([row] if cfg.alibi else []),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), row_shape]
        + ([row_shape] if cfg.alibi else []),
        compiler_params=_compiler_params(cfg, D),
        interpret=cfg.interpret,
        name="flash_sigmoid_bwd_dq",
    )(q, k, v, bias_h, *extra, do)

    group = pl.BlockSpec((None, T, G, D), lambda b, g, j: (b, 0, g, 0))
    kv_block = pl.BlockSpec((None, cfg.block_k, None, D), lambda b, g, j: (b, j, g, 0))
    per_group = pl.BlockSpec((G,), lambda b, g, j: (g,))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg),
        grid=(B, Hkv, T // cfg.block_k),
        in_specs=[group,
                  pl.BlockSpec((None, T, None, D), lambda b, g, j: (b, 0, g, 0)),
                  pl.BlockSpec((None, T, None, D), lambda b, g, j: (b, 0, g, 0)),
                  per_group] + ([per_group] if cfg.alibi else []) + [group],
        out_specs=[kv_block, kv_block],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_compiler_params(cfg, D),
        interpret=cfg.interpret,
        name="flash_sigmoid_bwd_dkv",
    )(q, k, v, bias_h, *extra, do)

    d_bias = jnp.sum(rows[0], axis=(0, 2))  # [H]
    d_slopes = jnp.sum(rows[1], axis=(0, 2)) if cfg.alibi else None
    return dq, dk, dv, d_bias, d_slopes


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, bias_h, slopes, cfg: _Cfg):
    return _forward(q, k, v, bias_h, slopes, cfg)


def _attention_fwd(q, k, v, bias_h, slopes, cfg: _Cfg):
    return _forward(q, k, v, bias_h, slopes, cfg), (q, k, v, bias_h, slopes)


def _attention_bwd(cfg: _Cfg, res, do):
    q, k, v, bias_h, slopes = res
    dq, dk, dv, d_bias, d_slopes = _backward(q, k, v, bias_h, slopes, do.astype(q.dtype), cfg)
    return dq, dk, dv, d_bias, d_slopes


_attention.defvjp(_attention_fwd, _attention_bwd)


# ---------------------------------------------------------------------------------------------
# public API


def _block(requested: int, T: int, compiled: bool) -> int:
    if requested < 1:
        raise ValueError(f"block sizes must be positive, got {requested}")
    b = min(requested, pl.next_power_of_2(T))
    if compiled:
        if b & (b - 1):
            raise ValueError(f"compiled (Triton) blocks must be powers of two, got {requested}")
        b = max(b, 16)
    return b


def flash_sigmoid_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, bias,
                            alibi_slopes: jax.Array | None = None, block_q: int = 128,
                            block_k: int = 128, interpret: bool | None = None) -> jax.Array:
    """Causal sigmoid attention, fused (FlashSigmoid, Ramapuram et al. 2024, arXiv 2409.04431).

    q [B, T, H, D]; k, v [B, T, Hkv, D] with H % Hkv == 0 (query head h reads kv head
    h // (H // Hkv)). Returns out [B, T, H, D] in q's dtype with

        out[b, i, h] = sum_{j <= i} sigmoid(q_i . k_j * scale + bias - slope_h (i - j)) v_j,

    the ALiBi term only when `alibi_slopes` ([H] float32) is given. `scale` is a static Python
    float; `bias` a float32 scalar, possibly traced (vmap over it works, as over q, k, v).
    Differentiable in q, k, v, bias and alibi_slopes (custom VJP, Pallas backward kernels).
    Any T works: blocks are min(block, next_power_of_2(T)) and T is zero-padded to a multiple of
    them. `interpret=None`: Pallas interpret mode on the CPU backend, compiled otherwise.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, T, heads, D]; got {q.shape}, {k.shape}, {v.shape}")
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    if k.shape != v.shape or k.shape[:2] != (B, T) or k.shape[3] != D:
        raise ValueError(f"k and v must be [B, T, Hkv, D] matching q {q.shape}; "
                         f"got k {k.shape}, v {v.shape}")
    if H % Hkv:
        raise ValueError(f"query heads H={H} must be a multiple of kv heads Hkv={Hkv}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    bq = _block(block_q, T, compiled=not interpret)
    bk = _block(block_k, T, compiled=not interpret)
    Tp = -(-T // max(bq, bk)) * max(bq, bk)
    if Tp % bq or Tp % bk:
        raise ValueError(f"block_q={bq} and block_k={bk} must divide one another")
    Dp = pl.next_power_of_2(D)
    if Tp != T or Dp != D:
        pad = ((0, 0), (0, Tp - T), (0, 0), (0, Dp - D))
        q, k, v = jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad)

    bias_h = jnp.broadcast_to(jnp.asarray(bias, jnp.float32), (H,))
    slopes = None
    if alibi_slopes is not None:
        slopes = jnp.asarray(alibi_slopes, jnp.float32)
        if slopes.shape != (H,):
            raise ValueError(f"alibi_slopes must be [H]={H,}; got {slopes.shape}")
    cfg = _Cfg(float(scale), bq, bk, H // Hkv, slopes is not None, bool(interpret))
    out = _attention(q, k, v, bias_h, slopes, cfg)
    return out[:, :T, :, :D]
