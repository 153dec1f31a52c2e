"""Counter-based random numbers: every random choice of the data pipeline is a hash of its
coordinates (seed, stream, step, row, draw), so any row of any step can be computed alone.

This is what makes batches a pure function of (seed, step, rows): no generator is carried
from one step to the next, nothing depends on which rows another host computed, and a
resumed run draws exactly the batches an uninterrupted one would have drawn.

The mixing function is SplitMix64's finaliser (Steele, Lea & Flood 2014, "Fast splittable
pseudorandom number generators", OOPSLA; the constants are Stafford's "Mix13"). Chained
over the coordinates it behaves as a keyed hash, vectorised over numpy uint64 arrays
(arithmetic wraps modulo 2**64, which is the point; numpy does not warn about wrapping in
array operations, only in scalar ones, so everything here stays an array).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

_U64 = np.uint64
_MASK = (1 << 64) - 1
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_M1 = _U64(0xBF58476D1CE4E5B9)
_M2 = _U64(0x94D049BB133111EB)

# Streams keep the draws of different purposes apart even with equal seeds.
TRAIN = 1
EVAL = 2


def mix(x_N: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser of a uint64 array (a bijection of 64-bit words)."""
    z = np.asarray(x_N, dtype=_U64) + _GOLDEN  # a new array: the in-place steps below are safe
    z ^= z >> 30
    z *= _M1
    z ^= z >> 27
    z *= _M2
    z ^= z >> 31
    return z


def mix_int(x: int) -> int:
    """`mix` of one Python int (the same function, without numpy's per-call overhead)."""
    z = (x + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def row_keys(seed: int, stream: int, step: int, rows_B: Sequence[int] | np.ndarray) -> np.ndarray:
    """One 64-bit key per row: hash(seed, stream, step, row). Shape [B], dtype uint64."""
    prefix = mix_int(mix_int(mix_int(int(seed) & _MASK) ^ (int(stream) & _MASK)) ^ (int(step) & _MASK))
    return mix(np.asarray(rows_B, dtype=np.int64).astype(_U64) ^ _U64(prefix))


def draws(keys_B: np.ndarray, n: int, start: int = 0) -> np.ndarray:
    """Draws start .. start+n-1 of each row's stream: uint64[B, n]."""
    counters = mix(np.arange(start, start + n, dtype=_U64))
    return mix(np.asarray(keys_B, dtype=_U64)[:, None] ^ counters[None, :])


def integers(keys_B: np.ndarray, n: int, high: int | np.ndarray, start: int = 0) -> np.ndarray:
    """Uniform integers in [0, high) (high may vary by row, shape [B] or [B, 1]): int64[B, n].

    Reduction by modulo; its bias is below high / 2**64, far under anything measurable."""
    high_arr = np.asarray(high, dtype=_U64)
    if np.any(high_arr == 0):
        raise ValueError("integers(): high must be at least 1")
    if high_arr.ndim == 1:
        high_arr = high_arr[:, None]
    return (draws(keys_B, n, start) % high_arr).astype(np.int64)


def unit_hash(text: str) -> float:
    """A deterministic number in [0, 1) from a string (the held-out split of documents).

    Built on SHA-256 rather than Python's `hash`, which is salted per process."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64
