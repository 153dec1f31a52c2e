"""`tfds:<name>[/<config>][:<version>]`: a prepared TensorFlow Datasets dataset, read with
random access through `tfds.data_source` (ArrayRecord files; no TensorFlow needed).

seismo never downloads or prepares data: it calls `tfds.data_source(..., download=False)`
and, when the dataset is not on disk in ArrayRecord format, says where it looked and how to
prepare it (`tfds build <name> --file_format=array_record --data_dir=DIR` on a machine with
internet, then copy DIR and set data.tfds_data_dir, or TFDS_DATA_DIR).

Sampling (designed for pods: nothing at start-up reads more than a handful of records, and
each row costs a few random reads):

* a row key (`sampler.row_keys`) drives a counter stream of draws; draw 2k picks the k-th
  document uniformly by index in the split's range, draw 2k+1 the offset in the first one;
* the row is the first document's tokens from that offset, then whole further documents,
  each followed by EOS, until T + 1 tokens; the rest is cut off.
* documents are chosen uniformly by index, so a token of a short document is likelier to
  be seen than one of a long document (a packed stream would weigh them equally); exact
  length weighting needs a pass over the data, which start-up on C4 cannot afford.

Held-out data: `data.tfds_eval_split` when given (e.g. 'validation'), else the last
`holdout_fraction` of the indices of `data.tfds_split` (TFDS shuffles examples when it
writes them, so the tail is a random sample); training rows never draw from it.

`info['sha256']` is a fingerprint, not a content hash (that would need a full pass): the
SHA-256 of the dataset's full name, split names and sizes and the text of its first, middle
and last records. Token counts are unknown (None) for the same reason.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import numpy as np

from seismo.config import DataConfig
from seismo.data import sampler
from seismo.data.dataset import Batch, Dataset, Split, base_info
from seismo.data.errors import DataError
from seismo.data.tokenizers import get_tokenizer

_CACHE_DOCS = 8192  # tokenized documents kept in memory (LRU)
_DRAWS = 32  # draws fetched at a time per row (2 per document)


def open_source(name: str, split: str, data_dir: str | None) -> Any:
    """`tfds.data_source(name, split)` from disk only, with plain-words errors."""
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False, try_gcs=False)
    except Exception as e:  # tfds raises many types here (not found, wrong format, bad split)
        from tensorflow_datasets.core import constants

        where = data_dir or constants.DATA_DIR
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(
            f"data.source 'tfds:{name}': could not open split {split!r} of {name!r} from {where} "
            f"({type(e).__name__}: {reason}). seismo never downloads data. On a machine with internet run\n"
            f"    tfds build {name.split(':')[0]} --file_format=array_record --data_dir=DIR\n"
            f"(or tfds.builder({name!r}, data_dir=DIR, file_format='array_record').download_and_prepare()), "
            f"copy DIR here and set data.tfds_data_dir=DIR (or TFDS_DATA_DIR). Check data.tfds_split / "
            f"data.tfds_eval_split name splits that exist") from e


class TfdsDataset(Dataset):
    """Rows of documents sampled by index from tfds ArrayRecord data sources."""

    def __init__(self, cfg: DataConfig, seed: int, name: str):
        super().__init__(cfg, seed)
        self.name = name
        self.tokenizer = get_tokenizer(cfg.tokenizer)
        self.vocab_size = self.tokenizer.vocab_size
        self._train_src = open_source(name, cfg.tfds_split, cfg.tfds_data_dir)
        n = len(self._train_src)
        if cfg.tfds_eval_split:
            self._eval_src = open_source(name, cfg.tfds_eval_split, cfg.tfds_data_dir)
            self._train_range = (0, n)
            self._eval_range = (0, len(self._eval_src))
        else:
            n_eval = max(1, int(round(n * cfg.holdout_fraction)))
            if n - n_eval < 1:
                raise DataError(f"data.source 'tfds:{name}': split {cfg.tfds_split!r} has {n} records, too few to "
                                f"hold out {cfg.holdout_fraction:.0%} of them; set data.tfds_eval_split")
            self._eval_src = self._train_src
            self._train_range, self._eval_range = (0, n - n_eval), (n - n_eval, n)
        if self._eval_range[1] <= self._eval_range[0]:
            raise DataError(f"data.source 'tfds:{name}': the evaluation split {cfg.tfds_eval_split!r} is empty")
        self._docs: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self.info = base_info(
            f"tfds:{name}", self.tokenizer.name, sha256=self._fingerprint(), n_documents=n,
            dataset=str(getattr(getattr(self._train_src, "dataset_info", None), "full_name", name)),
            split=cfg.tfds_split, eval_split=cfg.tfds_eval_split or f"{cfg.tfds_split} (last {cfg.holdout_fraction:g})",
            n_train_documents=self._train_range[1] - self._train_range[0],
            n_eval_documents=self._eval_range[1] - self._eval_range[0],
            data_dir=cfg.tfds_data_dir)

    # ------------------------------------------------------------------ documents

    def _text(self, src: Any, index: int) -> str | bytes:
        example = src[int(index)]
        key = self.cfg.tfds_text_key
        if not isinstance(example, dict) or key not in example:
            keys = sorted(example) if isinstance(example, dict) else type(example).__name__
            raise DataError(f"data.source 'tfds:{self.name}': records have no {key!r} field "
                            f"(data.tfds_text_key); fields: {keys}")
        value = example[key]
        if isinstance(value, np.ndarray):
            value = value.item()
        if isinstance(value, (str, bytes)):
            return value
        raise DataError(f"data.source 'tfds:{self.name}': field {key!r} holds {type(value).__name__}, not text")

    def document(self, split: Split, index: int) -> np.ndarray:
        """Tokens of one document followed by EOS (LRU-cached)."""
        cache_key = (split, int(index))
        tokens = self._docs.get(cache_key)
        if tokens is None:
            src = self._train_src if split == "train" else self._eval_src
            ids = self.tokenizer.encode(self._text(src, index))
            tokens = np.concatenate([ids, np.array([self.tokenizer.eos_id], ids.dtype)])
            self._docs[cache_key] = tokens
            if len(self._docs) > _CACHE_DOCS:
                self._docs.popitem(last=False)
        else:
            self._docs.move_to_end(cache_key)
        return tokens

    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        full = getattr(getattr(self._train_src, "dataset_info", None), "full_name", self.name)
        h.update(f"{full}|{self.cfg.tfds_split}|{self._train_range}|{self.cfg.tfds_eval_split}|"
                 f"{self._eval_range}".encode())
        lo, hi = self._train_range
        for split, i in [("train", lo), ("train", (lo + hi) // 2), ("train", hi - 1), ("eval", self._eval_range[0])]:
            text = self._text(self._train_src if split == "train" else self._eval_src, i)
            h.update(text.encode("utf-8") if isinstance(text, str) else text)
        return h.hexdigest()

    # ------------------------------------------------------------------ rows

    def windows(self, keys_B: np.ndarray, split: Split) -> Batch:
        lo, hi = self._train_range if split == "train" else self._eval_range
        rows = [self._row(keys_B[i:i + 1], split, lo, hi) for i in range(len(keys_B))]
        return {"tokens": np.stack(rows) if rows else np.zeros((0, self.seq_len + 1), np.int32)}

    def row_documents(self, key: np.ndarray, split: Split) -> list[int]:
        """The document indices that the row with this key is made of (for tests and audits)."""
        lo, hi = self._train_range if split == "train" else self._eval_range
        return self._row(key, split, lo, hi, want_indices=True)

    def _row(self, key_1: np.ndarray, split: Split, lo: int, hi: int, want_indices: bool = False):
        need = self.seq_len + 1
        parts: list[np.ndarray] = []
        indices: list[int] = []
        have, k = 0, 0
        draws = sampler.draws(key_1, _DRAWS)[0]
        while have < need:  # every document adds at least its EOS, so this ends
            if 2 * k + 1 >= len(draws):
                draws = np.concatenate([draws, sampler.draws(key_1, _DRAWS, start=len(draws))[0]])
            index = lo + int(draws[2 * k] % np.uint64(hi - lo))
            tokens = self.document(split, index)
            if k == 0:  # start anywhere in the first document
                tokens = tokens[int(draws[1] % np.uint64(len(tokens))):]
            parts.append(tokens)
            indices.append(index)
            have += len(tokens)
            k += 1
        if want_indices:
            return indices
        return np.concatenate(parts)[:need]


def tfds_source(arg: str, cfg: DataConfig, seed: int) -> TfdsDataset:
    """`tfds:<name>[/<config>]`: random access to a prepared TFDS dataset."""
    if not arg:
        raise DataError("data.source 'tfds:' needs a dataset name, e.g. tfds:lm1b or tfds:c4/en")
    return TfdsDataset(cfg, seed, arg)
