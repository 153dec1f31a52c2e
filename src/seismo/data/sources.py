"""The registry of data sources, keyed by the scheme of `data.source` (`scheme[:argument]`).

A source is one function `(argument: str, cfg: DataConfig, seed: int) -> Dataset` plus one
line below. `build` parses `data.source`, looks the scheme up and calls the function.
"""

from __future__ import annotations

from collections.abc import Callable

from seismo.config import DataConfig
from seismo.data.corpus import stdlib_source, text_source
from seismo.data.dataset import Dataset
from seismo.data.errors import DataError
from seismo.data.synthetic import synthetic_source
from seismo.data.tfds_source import tfds_source
from seismo.registry import Registry

SourceFn = Callable[[str, DataConfig, int], Dataset]

SOURCES: Registry[SourceFn] = Registry("data source")
SOURCES.register("stdlib", stdlib_source)
SOURCES.register("text", text_source)
SOURCES.register("tfds", tfds_source)
SOURCES.register("synthetic", synthetic_source)


def build(cfg: DataConfig, seed: int) -> Dataset:
    """The dataset that `cfg.source` names; batches are a pure function of (seed, step, rows)."""
    scheme, _, arg = cfg.source.partition(":")
    if scheme not in SOURCES:
        raise DataError(f"data.source {cfg.source!r}: {SOURCES.unknown_message(scheme)}. "
                        f"Write stdlib, text:<glob>, tfds:<name>[/<config>] or synthetic:<task>")
    return SOURCES.get(scheme)(arg, cfg, seed)
