"""Packed corpora: documents tokenized and concatenated with EOS separators into one token
stream per split, windows drawn at uniformly random offsets.

Used by the local sources (`stdlib`, `text:<glob>`), whose documents are files:

* the held-out split is chosen by document name: a document is held out when
  `unit_hash(name) < holdout_fraction` (SHA-256 of its relative path), so the split of a
  file never depends on which other files exist, on the Python version or on the host;
* a held-out document whose bytes equal those of a training document (an empty
  `__init__.py`, a copied module) is dropped from the evaluation split, so evaluation text
  never occurs verbatim in training;
* with a single document, its last `holdout_fraction` of tokens is held out instead;
* each split is its own stream, so a window never mixes training and held-out text; a
  window may cross a document boundary (an EOS) inside its split, as in standard packing.

A window of T + 1 tokens starts at `integers(key, 1, n - T)`: uniform over all offsets.
Sampling is with replacement and independent across rows and steps.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from seismo.config import DataConfig
from seismo.data import sampler
from seismo.data.dataset import Batch, Dataset, Split, base_info
from seismo.data.errors import DataError
from seismo.data.tokenizers import Tokenizer


@dataclass(frozen=True)
class Documents:
    """Named raw documents (bytes), in a fixed order (sorted by name)."""

    names: tuple[str, ...]
    texts: tuple[bytes, ...]

    @functools.cached_property
    def sha256(self) -> str:
        """Content hash: names and bytes of every document, in order."""
        h = hashlib.sha256()
        for name, text in zip(self.names, self.texts):
            h.update(name.encode("utf-8") + b"\x00" + len(text).to_bytes(8, "little"))
            h.update(text)
        return h.hexdigest()


@dataclass(frozen=True)
class PackedSplits:
    train_N: np.ndarray  # the training stream, EOS-separated
    eval_N: np.ndarray  # the held-out stream
    train_names: tuple[str, ...]
    eval_names: tuple[str, ...]  # empty when a single document was split by its tail
    dropped_duplicates: int


def split_names(docs: Documents, holdout_fraction: float) -> tuple[list[int], list[int], int]:
    """Indices of training and held-out documents (held-out duplicates of training text
    dropped), and how many were dropped. At least one of each when there are 2+ documents."""
    unit = [sampler.unit_hash(n) for n in docs.names]
    held = [i for i, u in enumerate(unit) if u < holdout_fraction]
    if not held:  # a tiny corpus: hold out the document with the smallest hash
        held = [int(np.argmin(unit))]
    if len(held) == len(docs.names):  # keep at least one training document
        held.remove(int(np.argmax(unit)))
    held_set = set(held)
    train = [i for i in range(len(docs.names)) if i not in held_set]
    train_digests = {hashlib.sha256(docs.texts[i]).digest() for i in train}
    kept = [i for i in held if hashlib.sha256(docs.texts[i]).digest() not in train_digests]
    return train, kept, len(held) - len(kept)


def pack(docs: Documents, tokenizer: Tokenizer,
         holdout_fraction: float) -> PackedSplits:
    """Tokenize and pack the documents into a training and a held-out stream."""
    if not docs.names:
        raise DataError("no documents to pack")
    ids = tokenizer.encode_many(list(docs.texts))
    eos = np.array([tokenizer.eos_id], dtype=tokenizer.dtype)

    def stream(indices: Sequence[int]) -> np.ndarray:
        parts = []
        for i in indices:
            parts += [ids[i], eos]
        return np.concatenate(parts).astype(tokenizer.dtype) if parts else np.zeros(0, tokenizer.dtype)

    if len(docs.names) == 1:  # one document: hold out its tail
        whole = stream([0])
        cut = int(round(len(whole) * (1.0 - holdout_fraction)))
        return PackedSplits(whole[:cut], whole[cut:], docs.names, (), 0)
    train, held, dropped = split_names(docs, holdout_fraction)
    return PackedSplits(stream(train), stream(held), tuple(docs.names[i] for i in train),
                        tuple(docs.names[i] for i in held), dropped)


class PackedDataset(Dataset):
    """Windows at uniform offsets of a packed training or held-out stream."""

    def __init__(self, cfg: DataConfig, seed: int, splits: PackedSplits, tokenizer, source: str,
                 content_sha256: str, n_documents: int, **extra_info):
        super().__init__(cfg, seed)
        self.splits = splits
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size
        n = cfg.seq_len + 1
        for name, arr, fix in [
            ("training", splits.train_N, "add documents or lower data.seq_len"),
            ("held-out", splits.eval_N, "raise data.holdout_fraction, add documents or lower data.seq_len"),
        ]:
            if len(arr) < n:
                raise DataError(f"data.source {source!r}: the {name} split has {len(arr)} tokens, fewer than "
                                f"data.seq_len + 1 = {n} that one sequence needs; {fix}")
        self._offsets = np.arange(n, dtype=np.int64)
        self.info = base_info(source, tokenizer.name, sha256=content_sha256, n_documents=n_documents,
                              n_train_tokens=int(len(splits.train_N)), n_eval_tokens=int(len(splits.eval_N)),
                              n_train_documents=len(splits.train_names),
                              n_eval_documents=len(splits.eval_names),
                              n_eval_duplicates_dropped=splits.dropped_duplicates, **extra_info)

    def windows(self, keys_B: np.ndarray, split: Split) -> Batch:
        stream = self.splits.train_N if split == "train" else self.splits.eval_N
        starts_B = sampler.integers(keys_B, 1, len(stream) - self.seq_len)[:, 0]
        return {"tokens": stream[starts_B[:, None] + self._offsets[None, :]]}
