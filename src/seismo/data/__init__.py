"""Data: batches as a pure function of (seed, step, rows of the global batch).

    ds = seismo.data.build(cfg.data, seed=cfg.run.seed)
    batch = ds.batch(step, rows=slice(0, 4))   # {'inputs', 'targets'} int32[4, T] (+ 'loss_mask')
    ev = ds.eval_set()                          # data.eval_sequences rows from the held-out split
    ds.vocab_size, ds.info                      # info: source, sha256, n_documents, token counts, tokenizer

Sources (`data.source`): `stdlib` (the default: the Python standard library, bytes),
`text:<glob>`, `tfds:<name>[/<config>]`, `synthetic:<task>`. See docs/data.md.
"""

from seismo.data.dataset import Batch, Dataset
from seismo.data.errors import DataError
from seismo.data.sources import SOURCES, batch_fields, build, check_config
from seismo.data.synthetic import TASKS
from seismo.data.tokenizers import ByteTokenizer, SentencePieceTokenizer, Tokenizer, get_tokenizer

__all__ = [
    "SOURCES", "TASKS", "Batch", "ByteTokenizer", "DataError", "Dataset", "SentencePieceTokenizer", "Tokenizer",
    "batch_fields", "build", "check_config", "get_tokenizer",
]
