"""Tokenizers: bytes by default, SentencePiece when `data.tokenizer` names a `.model` file.

Both map a document to a 1-D numpy array of ids and reserve one id as the end-of-document
separator (EOS) that packing puts between documents:

* `ByteTokenizer`: ids are the UTF-8 bytes, vocabulary 256, EOS is id 0 (NUL never occurs
  in text; a NUL byte inside a document is dropped so that 0 only ever means EOS).
* `SentencePieceTokenizer`: ids from the model, vocabulary `get_piece_size()`, EOS is the
  model's `eos_id()` (SentencePiece trains one by default, id 2).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol

import numpy as np

from seismo.data.errors import DataError


class Tokenizer(Protocol):
    name: str  # what `Dataset.info['tokenizer']` records
    vocab_size: int
    eos_id: int
    dtype: type  # the narrowest numpy integer type that holds every id

    def encode(self, text: str | bytes) -> np.ndarray: ...

    def decode(self, ids: np.ndarray) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes; id 0 (NUL) is the EOS separator."""

    name = "bytes"
    vocab_size = 256
    eos_id = 0
    dtype = np.uint8

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        if b"\x00" in data:
            data = data.replace(b"\x00", b"")
        return np.frombuffer(data, dtype=np.uint8)

    def encode_many(self, texts: list[str | bytes]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: np.ndarray) -> str:
        ids_N = np.asarray(ids)
        return ids_N[ids_N != self.eos_id].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class SentencePieceTokenizer:
    """A trained SentencePiece model (https://github.com/google/sentencepiece)."""

    def __init__(self, path: str | Path):
        import sentencepiece as spm

        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise DataError(f"data.tokenizer: SentencePiece model {str(self.path)!r} does not exist; "
                            f"give the path of a .model file, or leave data.tokenizer unset for bytes")
        blob = self.path.read_bytes()
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=blob)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with C++ text
            raise DataError(f"data.tokenizer: {str(self.path)!r} is not a readable SentencePiece model ({e})") from None
        self.sha256 = hashlib.sha256(blob).hexdigest()
        self.name = f"sentencepiece:{self.path.name}@{self.sha256[:12]}"
        self.vocab_size = int(self._sp.get_piece_size())
        self.eos_id = int(self._sp.eos_id())
        if self.eos_id < 0:
            raise DataError(f"data.tokenizer: the SentencePiece model {str(self.path)!r} has no EOS piece "
                            f"(it was trained with eos_id=-1); seismo separates documents with EOS. "
                            f"Retrain it with an eos_id, e.g. the default --eos_id=2")
        self.dtype = np.uint16 if self.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32

    @staticmethod
    def _text(text: str | bytes) -> str:
        return text if isinstance(text, str) else bytes(text).decode("utf-8", errors="replace")

    def encode(self, text: str | bytes) -> np.ndarray:
        return np.asarray(self._sp.encode(self._text(text)), dtype=self.dtype)

    def encode_many(self, texts: list[str | bytes]) -> list[np.ndarray]:
        ids = self._sp.encode([self._text(t) for t in texts])
        return [np.asarray(x, dtype=self.dtype) for x in ids]

    def decode(self, ids: np.ndarray) -> str:
        ids_N = np.asarray(ids)
        return self._sp.decode([int(i) for i in ids_N if i != self.eos_id])

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({str(self.path)!r})"


def get_tokenizer(spec: str | None) -> Tokenizer:
    """`None`, 'bytes' or 'byte': bytes; a path to a `.model` file: SentencePiece."""
    if spec is None or spec in ("bytes", "byte"):
        return ByteTokenizer()
    if spec.endswith(".model"):
        return SentencePieceTokenizer(spec)
    raise DataError(f"data.tokenizer {spec!r}: expected the path of a SentencePiece .model file, "
                    f"or null (or 'bytes') for byte-level tokens")
