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
(batch, kv head, key block) and loops over the group's query heads and, per head, from the
diagonal query block to the end. `interpret=None` means Pallas interpret mode on the CPU backend
and compiled otherwise.

Backends (`backend=`, default by jax.default_backend()): 'triton' (GPU) blocks the
[B, T, H, D] arrays directly; 'mosaic' (TPU) runs the same kernel bodies on [B, H, T, D]
(transposed around the kernels: Mosaic tiles the last two block dims by (8, 128), which a
squeezed head axis breaks) with the per-head scalars in SMEM. Checked on a CPU-only machine
(jax 0.10.2): the Triton path lowers to Triton IR (jax.export for 'cuda' on CPU; PTX compilation is
left to XLA on a GPU, not checked), the Mosaic path compiles ahead of time for TPU v5e, v6e and
v5p (libtpu, compile-only topology). Neither has been run on its device. The Mosaic kernels hold
whole-sequence K, V (and for dK/dV the group's Q, dO) blocks in VMEM, as the Triton-style
design implies; the scoped-VMEM limit is raised to fit (T = 8192, D = 128, 4 heads a group
compiles) but is not a tuned TPU kernel. Compiled blocks are min(block, next_power_of_2(T)),
at least 16 (Triton) or 128 (Mosaic); the sequence is zero-padded to a multiple of the blocks
(padded keys sit after every real query, so the causal mask hides them; padded queries are
sliced off and get zero cotangents) and a head dim that is not a power of two is zero-padded.
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
    mosaic: bool = False  # TPU layout and scalars (see the kernels section)
    vmem_limit_bytes: int | None = None


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
# kernels. Two layouts of the same kernels: Triton (GPU) blocks [B, T, H, D] directly, heads
# squeezed, per-head scalars as squeezed blocks; Mosaic (TPU) wants the last two block dims
# (T, D), so it runs on [B, H, T, D] and reads the per-head scalars ([H, 1]) from SMEM.


def _head_scalar(ref, h, cfg: _Cfg):
    """bias or slope of query head h (ref a squeezed block for Triton, the whole [H, 1] array
    in SMEM for Mosaic: a trailing 1 so that a vmap's leading axis keeps Mosaic's last-two-dims
    block rule)."""
    return ref[h, 0] if cfg.mosaic else ref[...]


def _rows(ref, start, size, cfg: _Cfg):
    """Rows start*size .. of a [T, D] ref."""
    if cfg.mosaic:
        return ref[pl.ds(pl.multiple_of(start * size, size), size), :]
    return ref[pl.ds(start * size, size), :]


def _group_rows(ref, g, start, size, cfg: _Cfg):
    """Rows of query head g of the group block ([G, T, D] Mosaic, [T, G, D] Triton)."""
    if cfg.mosaic:
        return ref[g, pl.ds(pl.multiple_of(start * size, size), size), :]
    return ref[pl.ds(start * size, size), g, :]


def _fwd_kernel(q_ref, k_ref, v_ref, bias_ref, *rest, cfg: _Cfg):
    slope_ref, o_ref = rest if cfg.alibi else (None, *rest)
    h, start_q = pl.program_id(1), pl.program_id(2)
    q = q_ref[...]
    bias = _head_scalar(bias_ref, h, cfg)
    slope = _head_scalar(slope_ref, h, cfg) if cfg.alibi else None

    def body(start_k, acc):
        k, v = _rows(k_ref, start_k, cfg.block_k, cfg), _rows(v_ref, start_k, cfg.block_k, cfg)
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
    h, start_q = pl.program_id(1), pl.program_id(2)
    q, do = q_ref[...], do_ref[...]
    bias = _head_scalar(bias_ref, h, cfg)
    slope = _head_scalar(slope_ref, h, cfg) if cfg.alibi else None

    def body(start_k, carry):
        dq, db, dsl = carry
        k, v = _rows(k_ref, start_k, cfg.block_k, cfg), _rows(v_ref, start_k, cfg.block_k, cfg)
        a, dist = _weights(q, k, bias, slope, start_q, start_k, cfg)
        ds = _dot(do, v.T) * a * (1.0 - a)  # [bq, bk] f32, 0 where masked
        dq = dq + _dot(ds.astype(k.dtype), k)
        db = db + jnp.sum(ds, axis=1, keepdims=True)
        if cfg.alibi:
            dsl = dsl - jnp.sum(ds * dist.astype(jnp.float32), axis=1, keepdims=True)
        return dq, db, dsl

    zeros_row = jnp.zeros((cfg.block_q, 1), jnp.float32)
    carry = (jnp.zeros(dq_ref.shape, jnp.float32), zeros_row, zeros_row)
    dq, db, dsl = lax.fori_loop(0, _n_kv_blocks(start_q, cfg), body, carry)
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)
    db_ref[...] = db
    if cfg.alibi:
        ds_ref[...] = dsl


def _dkv_kernel(q_ref, k_ref, v_ref, bias_ref, *rest, cfg: _Cfg):
    # q_ref, do_ref: the G query heads of this kv head ([T, G, D] Triton, [G, T, D] Mosaic);
    # bias_ref, slope_ref: their [G] scalars (Triton) or all [H, 1] (Mosaic, SMEM)
    slope_ref, do_ref, dk_ref, dv_ref = rest if cfg.alibi else (None, *rest)
    kvh, start_k = pl.program_id(1), pl.program_id(2)
    k, v = _rows(k_ref, start_k, cfg.block_k, cfg), _rows(v_ref, start_k, cfg.block_k, cfg)
    n_q = q_ref.shape[1 if cfg.mosaic else 0] // cfg.block_q
    first_q = lax.div(start_k * cfg.block_k, cfg.block_q)  # query blocks before it see none of it

    def head(g, carry):  # query head g of the group
        if cfg.mosaic:
            bias = bias_ref[kvh * cfg.group + g, 0]
            slope = slope_ref[kvh * cfg.group + g, 0] if cfg.alibi else None
        else:
            bias = bias_ref[g]
            slope = slope_ref[g] if cfg.alibi else None

        def body(start_q, carry):
            dk, dv = carry
            q = _group_rows(q_ref, g, start_q, cfg.block_q, cfg)
            do = _group_rows(do_ref, g, start_q, cfg.block_q, cfg)
            a, _ = _weights(q, k, bias, slope, start_q, start_k, cfg)
            dv = dv + _dot(a.astype(do.dtype).T, do)
            ds = _dot(do, v.T) * a * (1.0 - a)
            dk = dk + _dot(ds.astype(q.dtype).T, q)
            return dk, dv

        return lax.fori_loop(first_q, n_q, body, carry)

    zeros = jnp.zeros(dk_ref.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, cfg.group, head, (zeros, zeros))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ---------------------------------------------------------------------------------------------
# pallas_calls (arrays already padded: T a multiple of both blocks, D a power of two; in the
# kernel layout, [B, T, heads, D] for Triton, [B, heads, T, D] for Mosaic)


def _compiler_params(cfg: _Cfg, D: int):
    """Triton parameters whenever compiled for GPU: without them a GPU pallas_call may take the
    Mosaic GPU path (jax_pallas_use_mosaic_gpu), which these kernels are not written for.
    Every grid axis is independent (the key loop is inside the kernel), hence all parallel."""
    if cfg.interpret:
        return None
    if cfg.mosaic:
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.CompilerParams(dimension_semantics=("parallel",) * 3,
                                    vmem_limit_bytes=cfg.vmem_limit_bytes)
    from jax.experimental.pallas import triton as plgpu

    warps = 4 if cfg.block_q * cfg.block_k <= 64 * 64 or D <= 64 else 8
    return plgpu.CompilerParams(num_warps=warps, num_stages=2)


def _block_spec(cfg: _Cfg, rows: int | None, D: int, index):
    """A [rows, D] block of one head; index(b, h, i) -> (batch, head, row block)."""
    if cfg.mosaic:
        return pl.BlockSpec((None, None, rows, D), lambda b, h, i: (*index(b, h, i), 0))

    def triton_index(b, h, i):
        bb, hh, rr = index(b, h, i)
        return bb, rr, hh, 0
    return pl.BlockSpec((None, rows, None, D), triton_index)


def _scalar_spec(cfg: _Cfg, index=lambda b, h, i: (h,), size=None):
    if cfg.mosaic:
        from jax.experimental.pallas import tpu as pltpu

        return pl.BlockSpec(memory_space=pltpu.SMEM)
    return pl.BlockSpec((size,), index)


def _head_specs(cfg: _Cfg, T: int, D: int):
    """Specs for a grid (b, h, i) over query heads: q-block, full k and v of kv head h // G,
    the per-head bias (and slope) scalars."""
    G = cfg.group
    kv = _block_spec(cfg, T, D, lambda b, h, i: (b, h // G, 0))
    specs = [_block_spec(cfg, cfg.block_q, D, lambda b, h, i: (b, h, i)), kv, kv,
             _scalar_spec(cfg)]
    return specs + ([_scalar_spec(cfg)] if cfg.alibi else [])


def _forward(q, k, v, bias_h, slopes, cfg: _Cfg):
    B, H = q.shape[0], q.shape[2 if not cfg.mosaic else 1]
    T, D = q.shape[1 if not cfg.mosaic else 2], q.shape[3]
    args = (q, k, v, bias_h) + ((slopes,) if cfg.alibi else ())
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=(B, H, T // cfg.block_q),
        in_specs=_head_specs(cfg, T, D),
        out_specs=_block_spec(cfg, cfg.block_q, D, lambda b, h, i: (b, h, i)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_compiler_params(cfg, D),
        interpret=cfg.interpret,
        name="flash_sigmoid_fwd",
    )(*args)


def _backward(q, k, v, bias_h, slopes, do, cfg: _Cfg):
    B, H = q.shape[0], q.shape[2 if not cfg.mosaic else 1]
    T, D = q.shape[1 if not cfg.mosaic else 2], q.shape[3]
    Hkv, G = H // cfg.group, cfg.group
    extra = (slopes,) if cfg.alibi else ()
    q_block = _block_spec(cfg, cfg.block_q, D, lambda b, h, i: (b, h, i))
    row = pl.BlockSpec((None, None, cfg.block_q, 1), lambda b, h, i: (b, h, i, 0))
    row_shape = jax.ShapeDtypeStruct((B, H, T, 1), jnp.float32)  # per-query sums of dS
    dq, *rows = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(B, H, T // cfg.block_q),
        in_specs=[*_head_specs(cfg, T, D), q_block],
        out_specs=[q_block, row] + ([row] if cfg.alibi else []),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), row_shape]
        + ([row_shape] if cfg.alibi else []),
        compiler_params=_compiler_params(cfg, D),
        interpret=cfg.interpret,
        name="flash_sigmoid_bwd_dq",
    )(q, k, v, bias_h, *extra, do)

    if cfg.mosaic:
        group = pl.BlockSpec((None, G, T, D), lambda b, g, j: (b, g, 0, 0))
    else:
        group = pl.BlockSpec((None, T, G, D), lambda b, g, j: (b, 0, g, 0))
    kv_full = _block_spec(cfg, T, D, lambda b, g, j: (b, g, 0))
    kv_block = _block_spec(cfg, cfg.block_k, D, lambda b, g, j: (b, g, j))
    per_group = _scalar_spec(cfg, lambda b, g, j: (g,), size=G)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg),
        grid=(B, Hkv, T // cfg.block_k),
        in_specs=[group, kv_full, kv_full, per_group]
        + ([per_group] if cfg.alibi else []) + [group],
        out_specs=[kv_block, kv_block],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_compiler_params(cfg, D),
        interpret=cfg.interpret,
        name="flash_sigmoid_bwd_dkv",
    )(q, k, v, bias_h, *extra, do)

    d_bias = jnp.sum(rows[0], axis=(0, 2, 3)).reshape(bias_h.shape)  # [H] or [H, 1]
    d_slopes = jnp.sum(rows[1], axis=(0, 2, 3)).reshape(slopes.shape) if cfg.alibi else None
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


def _block(requested: int, T: int, compiled: bool, mosaic: bool) -> int:
    if requested < 1:
        raise ValueError(f"block sizes must be positive, got {requested}")
    b = min(requested, pl.next_power_of_2(T))
    if compiled:
        if b & (b - 1):
            raise ValueError(f"compiled blocks must be powers of two, got {requested}")
        b = max(b, 128 if mosaic else 16)  # Mosaic: (8, 128) tiles; Triton: 16-wide dots
    return b


def _vmem_limit(T: int, D: int, G: int, itemsize: int) -> int | None:
    """Mosaic: the kernels hold whole-sequence k, v (and, for dK/dV, the group's q, dO) blocks,
    double-buffered; raise the scoped VMEM limit when that passes the 16 MiB default."""
    need = 2 * (2 + 2 * G) * T * D * itemsize + (4 << 20)
    return None if need <= (16 << 20) else min(need + (need >> 2), 100 << 20)


def flash_sigmoid_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, bias,
                            alibi_slopes: jax.Array | None = None, block_q: int = 128,
                            block_k: int = 128, interpret: bool | None = None,
                            backend: str | None = None) -> jax.Array:
    """Causal sigmoid attention, fused (FlashSigmoid, Ramapuram et al. 2024, arXiv 2409.04431).

    q [B, T, H, D]; k, v [B, T, Hkv, D] with H % Hkv == 0 (query head h reads kv head
    h // (H // Hkv)). Returns out [B, T, H, D] in q's dtype with

        out[b, i, h] = sum_{j <= i} sigmoid(q_i . k_j * scale + bias - slope_h (i - j)) v_j,

    the ALiBi term only when `alibi_slopes` ([H] float32) is given. `scale` is a static Python
    float; `bias` a float32 scalar, possibly traced (vmap over it works, as over q, k, v).
    Differentiable in q, k, v, bias and alibi_slopes (custom VJP, Pallas backward kernels).
    Any T works: blocks are min(block, next_power_of_2(T)) (compiled: at least 16 for Triton,
    128 for Mosaic) and T is zero-padded to a multiple of them; a head dim that is not a power
    of two is zero-padded. `interpret=None`: Pallas interpret mode on the CPU backend, compiled
    otherwise. `backend`: 'triton' (GPU, the [B, T, H, D] layout) or 'mosaic' (TPU: q, k, v are
    transposed to [B, H, T, D] around the kernels); None picks 'mosaic' on a TPU backend and
    'triton' elsewhere. Either runs in interpret mode.
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
    if backend is None:
        backend = "mosaic" if jax.default_backend() == "tpu" else "triton"
    if backend not in ("triton", "mosaic"):
        raise ValueError(f"backend must be 'triton' or 'mosaic', got {backend!r}")
    mosaic = backend == "mosaic"
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    bq = _block(block_q, T, compiled=not interpret, mosaic=mosaic)
    bk = _block(block_k, T, compiled=not interpret, mosaic=mosaic)
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
            raise ValueError(f"alibi_slopes must be [H] = [{H}]; got {slopes.shape}")
    G = H // Hkv
    vmem = _vmem_limit(Tp, Dp, G, q.dtype.itemsize) if mosaic and not interpret else None
    cfg = _Cfg(float(scale), bq, bk, G, slopes is not None, bool(interpret), mosaic, vmem)
    if mosaic:
        q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
        bias_h, slopes = bias_h[:, None], None if slopes is None else slopes[:, None]
        out = _attention(q, k, v, bias_h, slopes, cfg).transpose(0, 2, 1, 3)
    else:
        out = _attention(q, k, v, bias_h, slopes, cfg)
    return out[:, :T, :, :D]
