"""`synthetic:<task>`: generated sequences with known structure, for mechanism studies.

Every row is a function of its row key alone (`seismo.data.sampler`), like every source.
Batches carry `loss_mask` float32[B, T], 1 where the target is determined by the task (the
other targets are random symbols no model can predict); the trainer and the evaluation
weigh the loss with it. A task is one class plus one line in `TASKS`.

* `induction` (vocab `synthetic_vocab`): `[BOS, r_1 .. r_L, r_1 .. r_L]` cut to T + 1
  tokens, with L = ceil(T / 2), BOS = 0 and r uniform over 1 .. V-1. The second copy is
  predictable by an induction head (Olsson et al. 2022, arXiv:2209.11895); the mask keeps
  the targets of the second copy.
* `copy` (vocab `synthetic_vocab` >= 4): episodes `[x_1 .. x_n, SEP, x_1 .. x_n, EOS]`
  packed back to back from the row start and cut to T + 1 tokens, n uniform in
  1 .. max(1, (T - 1) // 4), EOS = 0, SEP = 1, x uniform over 2 .. V-1. The mask keeps the
  targets of the copy and its EOS (everything after SEP is determined).
* `modular_arithmetic` (vocab `synthetic_modulus + 3`): equations `[a, +, b, =, c, EOS]`
  with c = (a + b) mod p, packed from the row start and cut to T + 1 tokens; numbers are
  ids 0 .. p-1, '+' = p, '=' = p+1, EOS = p+2. The mask keeps only the answer c (Power et
  al. 2022, arXiv:2201.02177). The p^2 pairs (a, b) are split into training and held-out
  pairs by a fixed hash of a*p + b (fraction `data.holdout_fraction`, the same split for
  every run seed): evaluation measures generalisation to unseen pairs.

For `induction` and `copy` the evaluation rows come from a separate random stream
(`eval_seed`); a repeat of a training row has probability about V^-(T/2).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from seismo.config import DataConfig
from seismo.data import sampler
from seismo.data.dataset import Batch, Dataset, Split, base_info
from seismo.data.errors import DataError
from seismo.registry import Registry

_PAIR_SPLIT_KEY = 0x5E15_0DA7A  # fixed: the modular-arithmetic split does not move with the run seed


class Induction:
    def __init__(self, cfg: DataConfig):
        if cfg.synthetic_vocab < 2:
            raise DataError(f"synthetic:induction needs data.synthetic_vocab >= 2, got {cfg.synthetic_vocab}")
        self.vocab_size = cfg.synthetic_vocab
        self.seq_len = cfg.seq_len
        self.half = -(-cfg.seq_len // 2)  # L = ceil(T / 2)

    def rows(self, keys_B: np.ndarray, split: Split) -> Batch:
        b, n = len(keys_B), self.seq_len + 1
        r_BxL = 1 + sampler.integers(keys_B, self.half, self.vocab_size - 1)
        tokens = np.concatenate([np.zeros((b, 1), np.int64), r_BxL, r_BxL], axis=1)[:, :n]
        mask_T = (np.arange(self.seq_len) >= self.half).astype(np.float32)  # target t is token t + 1
        return {"tokens": tokens, "loss_mask": np.broadcast_to(mask_T, (b, self.seq_len))}


class Copy:
    EOS, SEP = 0, 1

    def __init__(self, cfg: DataConfig):
        if cfg.synthetic_vocab < 4:
            raise DataError(f"synthetic:copy needs data.synthetic_vocab >= 4 (EOS, SEP and 2+ symbols), "
                            f"got {cfg.synthetic_vocab}")
        self.vocab_size = cfg.synthetic_vocab
        self.seq_len = cfg.seq_len
        self.max_len = max(1, (cfg.seq_len - 1) // 4)

    def rows(self, keys_B: np.ndarray, split: Split) -> Batch:
        n = self.seq_len + 1
        lengths_BxE = 1 + sampler.integers(keys_B, n, self.max_len)  # at most n episodes
        symbols_BxN = 2 + sampler.integers(keys_B, n, self.vocab_size - 2, start=n)
        tokens = np.zeros((len(keys_B), n), np.int64)
        target = np.zeros((len(keys_B), n), np.float32)  # 1 where token i is determined
        for row in range(len(keys_B)):
            pos, used, e = 0, 0, 0
            while pos < n:
                m = int(lengths_BxE[row, e])
                x = symbols_BxN[row, used:used + m]
                episode = np.concatenate([x, [self.SEP], x, [self.EOS]])
                k = min(len(episode), n - pos)
                tokens[row, pos:pos + k] = episode[:k]
                target[row, pos + m + 1:pos + k] = 1.0  # the copy and its EOS
                pos, used, e = pos + k, used + m, e + 1
        return {"tokens": tokens, "loss_mask": target[:, 1:]}


class ModularArithmetic:
    WIDTH = 6  # a + b = c EOS

    def __init__(self, cfg: DataConfig):
        p = cfg.synthetic_modulus
        if p < 2:
            raise DataError(f"synthetic:modular_arithmetic needs data.synthetic_modulus >= 2, got {p}")
        self.p, self.seq_len = p, cfg.seq_len
        self.plus, self.equals, self.eos = p, p + 1, p + 2
        self.vocab_size = p + 3
        pairs = np.arange(p * p, dtype=np.int64)
        unit = sampler.mix(pairs.astype(np.uint64) ^ np.uint64(_PAIR_SPLIT_KEY)) / 2.0**64
        held = unit < cfg.holdout_fraction
        if held.all() or not held.any():  # tiny moduli: keep one pair on each side
            held[:] = False
            held[int(np.argmin(unit))] = True
        self.train_pairs, self.eval_pairs = pairs[~held], pairs[held]

    def rows(self, keys_B: np.ndarray, split: Split) -> Batch:
        n = self.seq_len + 1
        n_eq = -(-n // self.WIDTH)
        pool = self.train_pairs if split == "train" else self.eval_pairs
        pair_BxE = pool[sampler.integers(keys_B, n_eq, len(pool))]
        a, b = pair_BxE // self.p, pair_BxE % self.p
        ones = np.ones_like(a)
        eq_BxEx6 = np.stack([a, self.plus * ones, b, self.equals * ones, (a + b) % self.p, self.eos * ones], -1)
        tokens = eq_BxEx6.reshape(len(keys_B), -1)[:, :n]
        mask_T = ((np.arange(1, n) % self.WIDTH) == 4).astype(np.float32)  # target t is token t + 1
        return {"tokens": tokens, "loss_mask": np.broadcast_to(mask_T, (len(keys_B), self.seq_len))}


TASKS: Registry[Any] = Registry("synthetic task")
TASKS.register("induction", Induction)
TASKS.register("copy", Copy)
TASKS.register("modular_arithmetic", ModularArithmetic)


class SyntheticDataset(Dataset):
    def __init__(self, cfg: DataConfig, seed: int, task_name: str):
        super().__init__(cfg, seed)
        self.task = TASKS.get(task_name)(cfg)
        self.vocab_size = self.task.vocab_size
        definition = {"task": task_name, "seq_len": cfg.seq_len, "vocab": self.vocab_size,
                      "modulus": cfg.synthetic_modulus if task_name == "modular_arithmetic" else None,
                      "holdout_fraction": cfg.holdout_fraction if task_name == "modular_arithmetic" else None}
        sha = hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()
        extra: dict[str, Any] = {"task": task_name}
        n_docs = None
        if isinstance(self.task, ModularArithmetic):
            n_docs = len(self.task.train_pairs) + len(self.task.eval_pairs)
            extra.update(n_train_pairs=len(self.task.train_pairs), n_eval_pairs=len(self.task.eval_pairs))
        self.info = base_info(f"synthetic:{task_name}", "synthetic", sha256=sha, n_documents=n_docs, **extra)

    def windows(self, keys_B: np.ndarray, split: Split) -> Batch:
        return self.task.rows(keys_B, split)


def synthetic_source(arg: str, cfg: DataConfig, seed: int) -> SyntheticDataset:
    """`synthetic:<task>`: one of `TASKS`."""
    if arg not in TASKS:
        raise DataError(f"data.source 'synthetic:{arg}': {TASKS.unknown_message(arg)}")
    return SyntheticDataset(cfg, seed, arg)
