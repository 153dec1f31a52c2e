"""`Dataset`: batches as a pure function of (seed, step, rows of the global batch).

A source implements one method, `windows(keys_B, split)`: for each row key (a 64-bit hash
of seed, stream, step and global row index, `seismo.data.sampler.row_keys`) it returns
`seq_len + 1` token ids, and optionally a loss mask. `batch` and `eval_set` are built on
it, so every source has the same guarantees:

* determinism: `batch(step, rows)` depends on nothing but (seed, step, rows) and the data;
  there is no iterator state, so resuming at step s gives exactly the batches of an
  uninterrupted run, and calls may come in any order;
* host independence: row r of the global batch is the same whichever host computes it,
  so `batch(step, slice(0, 4))` and `batch(step, slice(4, 8))` are the two halves of
  `batch(step)`, whatever the number of hosts;
* a fixed evaluation set of `data.eval_sequences` rows drawn with `data.eval_seed` from the
  held-out split only.

Batches are numpy (the trainer makes device arrays with
`jax.make_array_from_process_local_data`): `inputs` and `targets` int32[B, T] (targets are
inputs shifted by one; rows are windows of T + 1 tokens), and, for sources whose targets
are only partly meaningful (synthetic tasks), `loss_mask` float32[B, T] (1 where the
target counts).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from seismo.config import DataConfig
from seismo.data import sampler
from seismo.data.errors import DataError

Split = Literal["train", "eval"]
Batch = dict[str, np.ndarray]
Rows = slice | Sequence[int] | np.ndarray


class Dataset(ABC):
    """Step-indexed batches and a fixed evaluation set. Subclasses implement `windows`."""

    vocab_size: int
    info: dict[str, Any]  # source, sha256, n_documents, n_train_tokens, n_eval_tokens, tokenizer, ...

    def __init__(self, cfg: DataConfig, seed: int):
        self.cfg = cfg
        self.seed = int(seed)
        self.batch_size = cfg.batch_size
        self.seq_len = cfg.seq_len
        self._eval: Batch | None = None

    @abstractmethod
    def windows(self, keys_B: np.ndarray, split: Split) -> Batch:
        """For each row key, `tokens` int[B, T+1] from `split` (and optionally `loss_mask`
        float32[B, T], aligned with the targets). Must depend on the keys only."""

    # ------------------------------------------------------------------ public API

    def batch(self, step: int, rows: Rows = slice(None)) -> Batch:
        """Rows `rows` (a slice or indices into the global batch) of the batch of `step`."""
        if int(step) < 0:
            raise DataError(f"batch(step={step}): the step must be 0 or more")
        row_ids = self._row_ids(rows)
        keys = sampler.row_keys(self.seed, sampler.TRAIN, int(step), row_ids)
        return self._finish(self.windows(keys, "train"), len(row_ids))

    def eval_set(self) -> Batch:
        """The fixed evaluation set: `data.eval_sequences` rows from the held-out split,
        drawn with `data.eval_seed` (not the run seed), computed once and cached."""
        if self._eval is None:
            n = self.cfg.eval_sequences
            keys = sampler.row_keys(self.cfg.eval_seed, sampler.EVAL, 0, np.arange(n))
            self._eval = self._finish(self.windows(keys, "eval"), n) if n else self._empty()
        return {k: v.copy() for k, v in self._eval.items()}

    # ------------------------------------------------------------------ helpers

    def _row_ids(self, rows: Rows) -> np.ndarray:
        if isinstance(rows, slice):
            start, stop, stride = rows.indices(self.batch_size)
            if (rows.start is not None and not 0 <= rows.start <= self.batch_size) or (
                    rows.stop is not None and not 0 <= rows.stop <= self.batch_size):
                raise DataError(f"batch rows {rows} lie outside the global batch of {self.batch_size} rows "
                                f"(data.batch_size)")
            return np.arange(start, stop, stride, dtype=np.int64)
        ids = np.asarray(rows, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.batch_size):
            raise DataError(f"batch rows {ids.tolist()} lie outside the global batch of {self.batch_size} rows "
                            f"(data.batch_size)")
        return ids

    def _finish(self, out: Batch, n: int) -> Batch:
        tokens = np.asarray(out["tokens"])
        assert tokens.shape == (n, self.seq_len + 1), (tokens.shape, n, self.seq_len)
        batch = {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32)}
        if "loss_mask" in out:
            batch["loss_mask"] = np.ascontiguousarray(out["loss_mask"], dtype=np.float32)
        return batch

    def _empty(self) -> Batch:
        keys = sampler.row_keys(self.cfg.eval_seed, sampler.EVAL, 0, np.arange(1))
        one = self._finish(self.windows(keys, "eval"), 1)
        return {k: v[:0] for k, v in one.items()}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(source={self.info.get('source')!r}, vocab_size={self.vocab_size}, "
                f"batch_size={self.batch_size}, seq_len={self.seq_len}, seed={self.seed})")


def base_info(source: str, tokenizer: str, **extra: Any) -> dict[str, Any]:
    """The keys every `Dataset.info` has, in a fixed order, then source-specific ones."""
    info: dict[str, Any] = {"source": source, "sha256": None, "n_documents": None,
                            "n_train_tokens": None, "n_eval_tokens": None, "tokenizer": tokenizer}
    info.update(extra)
    return info
