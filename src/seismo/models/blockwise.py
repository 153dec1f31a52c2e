"""Blockwise causal attention in plain JAX: memory linear in sequence length, on every backend.

    out, lse, rows = blockwise_attention(q, k, v, kind="softmax", scale=..., block=512)

The queries and keys are cut into blocks; each query block walks the key blocks up to the
diagonal and keeps, per query row, what the attention needs to finish without ever holding a
[T, S] map: no block of logits lives beyond one (query block, key block) pair.

* softmax (the online softmax of Milakov & Gimelshein 2018, arXiv 1805.02867, as used by
  FlashAttention, Dao et al. 2022, arXiv 2205.14135, section 3.1; docs/methods.md §11.1): a running row max m, a running
  normaliser l = sum_j exp(s_ij - m_i) and an accumulator sum_j exp(s_ij - m_i) v_j,
  rescaled by exp(m_old - m_new) whenever the max grows. out = acc / l, lse = m + log l.
* sigmoid (FlashSigmoid, Ramapuram et al. 2024, arXiv 2409.04431; docs/methods.md §11.2):
  a_ij = sigma(s_ij + b) needs no row max and no normaliser; the accumulator is a plain sum.

The backward pass (a `jax.custom_vjp`) recomputes each block's weights from q, k and the
saved per-row log-sum-exp (FlashAttention, Appendix B, without the atomic adds: one pass over
query blocks for dq and one over key blocks for dk and dv), so training memory is linear in
T too. Gradients flow into q, k, v, the sigmoid bias and the returned lse (whose cotangent
the explicit attention-bias slot needs, attention.py).

Scores s_ij = q_i.k_j * scale - slope_h (i - j) (the ALiBi term only with slopes), visible
when j <= i. Grouped-query attention: q has H heads, k and v have Hkv (H % Hkv == 0), query
head h reads kv head h // (H / Hkv); nothing is repeated in memory.

With `stats=True` the forward pass also returns the per-row quantities the in-step probes
reduce (docs/methods.md §11.3), from the same running values: max |q.k| scale
over visible keys, the log-sum-exp of the scores, the softmax-weighted mean score (entropy =
lse - mean score), the first key's score (the sink), and for sigmoid the row mass sum_j a_ij
and sum_j a_ij log a_ij. `finish_row_stats` turns them into per-layer scalars.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax.scipy.special import xlogy

KINDS = ("softmax", "sigmoid")
_NEG_INF = -jnp.inf


def block_size(T: int, block: int) -> int:
    """The block length used for a sequence of T: `block`, or T when shorter."""
    return min(block, T)


def _blocks(x: jax.Array, n: int, axis: int) -> jax.Array:
    """[..., n*b, ...] -> [n, ..., b, ...] along `axis`."""
    shape = x.shape
    x = x.reshape(*shape[:axis], n, shape[axis] // n, *shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _scores(q_blk, k_blk, scale, slopes, q0, k0):
    """Scores of one (query block, key block) pair: z = q.k * scale [B, Hk, G, bq, bk] float32,
    s = z minus the ALiBi distance, and the causal visibility [bq, bk]."""
    z = jnp.einsum("bhgqd,bhkd->bhgqk", q_blk, k_blk, preferred_element_type=jnp.float32) * scale
    qpos = q0 + jnp.arange(q_blk.shape[-2])
    kpos = k0 + jnp.arange(k_blk.shape[-2])
    dist = (qpos[:, None] - kpos[None, :]).astype(jnp.float32)
    s = z if slopes is None else z - slopes[..., None, None] * dist
    return z, s, dist >= 0


def _forward(qg, kg, vg, bias, slopes, *, kind, scale, bq, bk, stats):
    """Forward over query blocks: (out [B, Hk, G, T, Dv] float32, lse [B, Hk, G, T], rows)."""
    B, Hk, G, T, D = qg.shape
    Dv = vg.shape[-1]
    nq = T // bq
    q_blocks = _blocks(qg, nq, 3)

    def one_query_block(args):
        i, q_blk = args
        q0 = i * bq
        rows = (B, Hk, G, bq)
        carry = {"acc": jnp.zeros((*rows, Dv), jnp.float32), "m": jnp.full(rows, _NEG_INF, jnp.float32),
                 "l": jnp.zeros(rows, jnp.float32)}
        if stats:
            carry.update(u=jnp.zeros(rows, jnp.float32), zmax=jnp.zeros(rows, jnp.float32),
                         mass=jnp.zeros(rows, jnp.float32), alog=jnp.zeros(rows, jnp.float32))

        def body(j, c):
            k0 = j * bk
            k_blk = jax.lax.dynamic_slice_in_dim(kg, k0, bk, axis=2)
            v_blk = jax.lax.dynamic_slice_in_dim(vg, k0, bk, axis=2)
            z, s, vis = _scores(q_blk, k_blk, scale, slopes, q0, k0)
            c = dict(c)
            if kind == "softmax" or stats:  # the running max and normaliser (log Z for the probes)
                m_new = jnp.maximum(c["m"], jnp.max(jnp.where(vis, s, _NEG_INF), axis=-1))
                corr = jnp.exp(c["m"] - m_new)
                e = jnp.where(vis, jnp.exp(s - m_new[..., None]), 0.0)
                c["l"] = c["l"] * corr + jnp.sum(e, axis=-1)
                if stats:
                    c["u"] = c["u"] * corr + jnp.sum(e * jnp.where(vis, s, 0.0), axis=-1)
                c["m"] = m_new
            if kind == "softmax":
                w = e
                c["acc"] = c["acc"] * corr[..., None]
            else:
                w = jnp.where(vis, jax.nn.sigmoid(s + bias), 0.0)
                if stats:
                    c["mass"] = c["mass"] + jnp.sum(w, axis=-1)
                    c["alog"] = c["alog"] + jnp.sum(xlogy(w, w), axis=-1)
            if stats:
                c["zmax"] = jnp.maximum(c["zmax"], jnp.max(jnp.where(vis, jnp.abs(z), 0.0), axis=-1))
            c["acc"] = c["acc"] + jnp.einsum("bhgqk,bhkd->bhgqd", w.astype(vg.dtype), v_blk,
                                             preferred_element_type=jnp.float32)
            return c

        n_keys = (q0 + bq + bk - 1) // bk  # key blocks that start at or before the block's last query
        c = jax.lax.fori_loop(0, n_keys, body, carry)
        out = c["acc"] / c["l"][..., None] if kind == "softmax" else c["acc"]
        lse = c["m"] + jnp.log(c["l"]) if kind == "softmax" or stats else jnp.zeros_like(c["l"])
        rows_out = {}
        if stats:
            first = _scores(q_blk, kg[:, :, :1], scale, slopes, q0, 0)[1][..., 0]
            rows_out = {"zmax": c["zmax"], "lse": lse, "mean_score": c["u"] / c["l"], "first_score": first}
            if kind == "sigmoid":
                rows_out.update(mass=c["mass"], alog=c["alog"])
        return out, lse, rows_out

    out, lse, rows = jax.lax.map(one_query_block, (jnp.arange(nq), q_blocks))
    unblock = lambda x: jnp.moveaxis(x, 0, 3).reshape(*x.shape[1:4], T, *x.shape[5:])
    return unblock(out), unblock(lse), {k: unblock(v) for k, v in rows.items()}


def _weights_and_dscores(q_blk, k_blk, v_blk, do_blk, lse_blk, delta_blk, bias, slopes, q0, k0, *, kind, scale):
    """Recomputed weights w [B, Hk, G, bq, bk] and dL/ds of one block pair."""
    _, s, vis = _scores(q_blk, k_blk, scale, slopes, q0, k0)
    dw = jnp.einsum("bhgqd,bhkd->bhgqk", do_blk, v_blk, preferred_element_type=jnp.float32)
    if kind == "softmax":
        w = jnp.where(vis, jnp.exp(s - lse_blk[..., None]), 0.0)
        ds = w * (dw - delta_blk[..., None])
    else:
        w = jnp.where(vis, jax.nn.sigmoid(s + bias), 0.0)
        ds = dw * w * (1.0 - w)
    return w, ds


def _backward(qg, kg, vg, bias, slopes, out, lse, dout, dlse, *, kind, scale, bq, bk):
    B, Hk, G, T, D = qg.shape
    nq, nk = T // bq, T // bk
    do = dout.astype(jnp.float32)
    # softmax: dL/ds_ij = w_ij (dL/dw_ij - sum_j' w_ij' dL/dw_ij') + w_ij dL/dlse_i
    delta = jnp.sum(do * out, axis=-1) - dlse if kind == "softmax" else jnp.zeros_like(lse)
    do_c = do.astype(vg.dtype)
    q_blocks, do_blocks = _blocks(qg, nq, 3), _blocks(do_c, nq, 3)
    lse_blocks, delta_blocks = _blocks(lse, nq, 3), _blocks(delta, nq, 3)

    def dq_block(args):  # one query block over its key blocks
        i, q_blk, do_blk, lse_blk, delta_blk = args
        q0 = i * bq

        def body(j, c):
            dq, db = c
            k0 = j * bk
            k_blk = jax.lax.dynamic_slice_in_dim(kg, k0, bk, axis=2)
            v_blk = jax.lax.dynamic_slice_in_dim(vg, k0, bk, axis=2)
            _, ds = _weights_and_dscores(q_blk, k_blk, v_blk, do_blk, lse_blk, delta_blk, bias, slopes, q0, k0,
                                         kind=kind, scale=scale)
            dq = dq + jnp.einsum("bhgqk,bhkd->bhgqd", ds.astype(kg.dtype), k_blk,
                                 preferred_element_type=jnp.float32) * scale
            return dq, db + jnp.sum(ds)

        n_keys = (q0 + bq + bk - 1) // bk
        return jax.lax.fori_loop(0, n_keys, body, (jnp.zeros(q_blk.shape, jnp.float32), jnp.zeros((), jnp.float32)))

    dq, dbias = jax.lax.map(dq_block, (jnp.arange(nq), q_blocks, do_blocks, lse_blocks, delta_blocks))
    dq = jnp.moveaxis(dq, 0, 3).reshape(qg.shape)

    k_blocks, v_blocks = _blocks(kg, nk, 2), _blocks(vg, nk, 2)

    def dkv_block(args):  # one key block over the query blocks that see it
        j, k_blk, v_blk = args
        k0 = j * bk

        def body(i, c):
            dk, dv = c
            q0 = i * bq
            sl = lambda x: jax.lax.dynamic_slice_in_dim(x, q0, bq, axis=3)
            q_blk, do_blk = sl(qg), sl(do_c)
            w, ds = _weights_and_dscores(q_blk, k_blk, v_blk, do_blk, sl(lse), sl(delta), bias, slopes, q0, k0,
                                         kind=kind, scale=scale)
            dv = dv + jnp.einsum("bhgqk,bhgqd->bhkd", w.astype(do_c.dtype), do_blk, preferred_element_type=jnp.float32)
            dk = dk + jnp.einsum("bhgqk,bhgqd->bhkd", ds.astype(qg.dtype), q_blk,
                                 preferred_element_type=jnp.float32) * scale
            return dk, dv

        first = k0 // bq  # the first query block with a query at or after this key block's start
        zeros = (jnp.zeros(k_blk.shape, jnp.float32), jnp.zeros(v_blk.shape, jnp.float32))
        return jax.lax.fori_loop(first, nq, body, zeros)

    dk, dv = jax.lax.map(dkv_block, (jnp.arange(nk), k_blocks, v_blocks))
    dk = jnp.moveaxis(dk, 0, 2).reshape(kg.shape)
    dv = jnp.moveaxis(dv, 0, 2).reshape(vg.shape)
    return dq, dk, dv, jnp.sum(dbias)


@partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _attention(qg, kg, vg, bias, slopes, kind, scale, bq, bk):
    out, lse, _ = _forward(qg, kg, vg, bias, slopes, kind=kind, scale=scale, bq=bq, bk=bk, stats=False)
    return out.astype(qg.dtype), lse


def _attention_fwd(qg, kg, vg, bias, slopes, kind, scale, bq, bk):
    out, lse, _ = _forward(qg, kg, vg, bias, slopes, kind=kind, scale=scale, bq=bq, bk=bk, stats=False)
    return (out.astype(qg.dtype), lse), (qg, kg, vg, bias, slopes, out, lse)


def _attention_bwd(kind, scale, bq, bk, res, cts):
    qg, kg, vg, bias, slopes, out, lse = res
    dout, dlse = cts
    dq, dk, dv, dbias = _backward(qg, kg, vg, bias, slopes, out, lse, dout, dlse, kind=kind, scale=scale, bq=bq, bk=bk)
    dslopes = None if slopes is None else jnp.zeros_like(slopes)  # ALiBi slopes are fixed, not learned
    return (dq.astype(qg.dtype), dk.astype(kg.dtype), dv.astype(vg.dtype),
            jnp.asarray(dbias, jnp.result_type(bias)), dslopes)


_attention.defvjp(_attention_fwd, _attention_bwd)


def _grouped(q, k, v):
    """[B, T, H, D] q and [B, T, Hkv, D] k, v -> [B, Hkv, G, T, D] and [B, Hkv, T, D]."""
    B, T, H, D = q.shape
    Hk = k.shape[2]
    if H % Hk:
        raise ValueError(f"{H} query heads cannot share {Hk} key/value heads: H must be a multiple of Hkv")
    qg = q.reshape(B, T, Hk, H // Hk, D).transpose(0, 2, 3, 1, 4)
    return qg, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _pad_to(x: jax.Array, T_pad: int, axis: int) -> jax.Array:
    pad = T_pad - x.shape[axis]
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def blockwise_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    kind: str,
    scale: float,
    bias: Any = 0.0,
    alibi_slopes: jax.Array | None = None,
    block: int = 512,
    stats: bool = False,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Causal attention of q [B, T, H, D] over k, v [B, T, Hkv, D] (module docstring).

    Returns (out [B, T, H, Dv] in q's dtype, lse [B, H, T] float32, rows) where rows is {}
    unless `stats`, then per-row float32 [B, H, T] values (module docstring; their gradients
    are not defined: the probes read them under stop_gradient). `bias` is the sigmoid bias b
    (a float or a traced scalar); `alibi_slopes` [H] adds -slope_h (i - j).
    """
    if kind not in KINDS:
        raise ValueError(f"blockwise attention computes {' or '.join(KINDS)} weights, not {kind!r}")
    B, T, H, _ = q.shape
    b = block_size(T, block)
    T_pad = -(-T // b) * b  # padded keys sit after every real query: causally invisible to them
    qg, kg, vg = (_pad_to(x, T_pad, 1) for x in (q, k, v))
    qg, kg, vg = _grouped(qg, kg, vg)
    Hk, G = kg.shape[1], H // kg.shape[1]
    slopes = None if alibi_slopes is None else jnp.asarray(alibi_slopes, jnp.float32).reshape(1, Hk, G)
    bias = jnp.asarray(bias, jnp.float32)
    to_bht = lambda x: x.reshape(B, H, T_pad)[..., :T]
    if stats:
        fwd = jax.lax.stop_gradient
        out, lse, rows = _forward(*(fwd(x) for x in (qg, kg, vg)), fwd(bias), slopes, kind=kind, scale=scale,
                                  bq=b, bk=b, stats=True)
        out = out.astype(q.dtype)
        rows = {name: to_bht(r) for name, r in rows.items()}
    else:
        out, lse = _attention(qg, kg, vg, bias, slopes, kind, scale, b, b)
        rows = {}
    out = out.transpose(0, 3, 1, 2, 4).reshape(B, T_pad, H, -1)[:, :T]
    return out, to_bht(lse), rows


def finish_row_stats(
    kind: str,
    rows: dict[str, jax.Array],
    *,
    bias: Any = 0.0,
    slot_score: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Per-layer scalars from the per-row values of `blockwise_attention(..., stats=True)`.

    `slot_score` [B, H, T]: the score q.k' scale (also its logit: the slot has no ALiBi distance) of an explicit attention-bias slot that every query sees
    (Sun et al. 2024, arXiv 2402.17762), combined here as one more key. Returns, averaged over
    batch, heads and queries unless said otherwise:
      attn_logit_max  max |q.k| scale over visible keys (Wortsman et al. 2023, arXiv 2309.14322, §3.1)
      attn_logz_mean, attn_logz_max   log-sum-exp of the scores per row (the softmax log Z)
      attn_entropy    entropy of the row's normalised weights (Zhai et al. 2023, arXiv 2303.06296)
      attn_row_mass   sum of the row's weights (1 for softmax)
      attn_sink_mass  the weight on the first token (Sun et al. 2024; Gu et al. 2024, arXiv 2410.10781)
    """
    zmax, lse, mean_s, first = rows["zmax"], rows["lse"], rows["mean_score"], rows["first_score"]
    if slot_score is not None:
        zmax = jnp.maximum(zmax, jnp.abs(slot_score))
        total = jnp.logaddexp(lse, slot_score)
        mean_s = jnp.exp(lse - total) * mean_s + jnp.exp(slot_score - total) * slot_score
        lse = total
    if kind == "softmax":
        entropy = lse - mean_s
        mass = jnp.ones_like(lse)
        sink = jnp.exp(first - lse)
    else:
        mass, alog = rows["mass"], rows["alog"]
        if slot_score is not None:
            a = jax.nn.sigmoid(slot_score + bias)
            mass, alog = mass + a, alog + xlogy(a, a)
        safe = jnp.where(mass > 0, mass, 1.0)
        entropy = jnp.where(mass > 0, jnp.log(safe) - alog / safe, 0.0)
        sink = jax.nn.sigmoid(first + bias)
    return {
        "attn_logit_max": jnp.max(zmax),
        "attn_logz_mean": jnp.mean(lse),
        "attn_logz_max": jnp.max(lse),
        "attn_entropy": jnp.mean(entropy),
        "attn_row_mass": jnp.mean(mass),
        "attn_sink_mass": jnp.mean(sink),
    }
