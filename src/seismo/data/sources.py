"""The registry of data sources, keyed by the scheme of `data.source` (`scheme[:argument]`).

A source is one function `(argument: str, cfg: DataConfig, seed: int) -> Dataset` plus one
line below. `build` parses `data.source`, looks the scheme up and calls the function.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from seismo.config import Config, ConfigError, DataConfig
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


HINT = "Use stdlib, text:<glob>, tfds:<name>[/<config>] or synthetic:<task>"


def check_config(cfg: Config) -> None:
    """The data source's scheme is registered. Raises seismo.config.ConfigError."""
    scheme = cfg.data.source.split(":", 1)[0]
    if scheme not in SOURCES:
        raise ConfigError(f"data.source {cfg.data.source!r}: {SOURCES.unknown_message(scheme)}. {HINT}")


def batch_fields(cfg: DataConfig) -> dict[str, np.dtype]:
    """The arrays of a batch and their dtypes: inputs and targets, and the loss mask of the
    synthetic tasks (seismo.data.dataset)."""
    fields = {"inputs": np.dtype(np.int32), "targets": np.dtype(np.int32)}
    if cfg.source.split(":", 1)[0] == "synthetic":
        fields["loss_mask"] = np.dtype(np.float32)
    return fields


def build(cfg: DataConfig, seed: int) -> Dataset:
    """The dataset that `cfg.source` names; batches are a pure function of (seed, step, rows)."""
    scheme, _, arg = cfg.source.partition(":")
    if scheme not in SOURCES:
        raise DataError(f"data.source {cfg.source!r}: {SOURCES.unknown_message(scheme)}. "
                        f"{HINT}")
    return SOURCES.get(scheme)(arg, cfg, seed)
