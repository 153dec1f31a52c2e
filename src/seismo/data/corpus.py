"""Local corpora: the Python standard library (the default, no download) and text files.

`stdlib`: the `.py` files of the standard library of the running interpreter
(`sysconfig.get_paths()['stdlib']`), without `site-packages`/`dist-packages`, without the
test suites (`test/`, `tests/`, `idle_test/`: Debian and others strip them, and they hold
deliberately odd files) and without the build-specific `config-*` folder. About 750 files
and 12 MB of text on CPython 3.11. Each file is a document named by its path relative to
the stdlib root. The content hash in `info['sha256']` tells corpora of different Python
versions apart; `info['python']` records the version.

`text:<glob>`: the files matching a glob (relative to the working directory or absolute,
`**` allowed), each a document named by its path relative to the glob's fixed prefix.

Both are byte-level unless `data.tokenizer` names a SentencePiece model, and are packed
into a training and a held-out stream by `seismo.data.packed`. Files are read once per
build; tokenizing and packing are cached in-process by (content hash, tokenizer,
holdout_fraction), so a sweep that builds many datasets in one process pays once.
"""

from __future__ import annotations

import functools
import glob as globlib
import os
import sys
import sysconfig
from pathlib import Path

from seismo.config import DataConfig
from seismo.data.errors import DataError
from seismo.data.packed import Documents, PackedDataset, PackedSplits, pack
from seismo.data.tokenizers import get_tokenizer

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The stdlib `.py` files that make the corpus, sorted by relative path."""
    root = stdlib_root() if root is None else root
    out = []
    for folder, subdirs, files in os.walk(root):
        rel = Path(folder).relative_to(root)
        # prune skipped folders (the test suites are most of the stdlib's files)
        subdirs[:] = [d for d in subdirs if d not in _SKIP_DIRS and not (rel == Path(".") and d.startswith("config-"))]
        out += [Path(folder) / f for f in files if f.endswith(".py")]
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


@functools.lru_cache(maxsize=2)
def stdlib_documents(root: str | None = None) -> Documents:
    """The stdlib corpus as documents (cached: the stdlib does not change under a process)."""
    base = stdlib_root() if root is None else Path(root)
    files = stdlib_files(base)
    if not files:
        raise DataError(f"data.source 'stdlib': found no .py files under {base} (sysconfig's stdlib path); "
                        f"this Python ships without its standard library sources. Use text:<glob> instead")
    return Documents(tuple(p.relative_to(base).as_posix() for p in files),
                     tuple(p.read_bytes() for p in files))


def _glob_base(pattern: str) -> Path:
    """The longest leading part of a glob without wildcards (names are relative to it)."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts[:-1]:
        if globlib.has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def text_documents(pattern: str) -> Documents:
    if not pattern:
        raise DataError("data.source 'text:' needs a glob after the colon, e.g. text:data/*.txt "
                        "or text:/abs/path/**/*.md")
    expanded = os.path.expanduser(pattern)
    files = sorted(p for p in globlib.glob(expanded, recursive=True) if os.path.isfile(p))
    if not files:
        where = "" if os.path.isabs(expanded) else f" (relative to the working directory {os.getcwd()})"
        raise DataError(f"data.source 'text:{pattern}': the glob {pattern!r} matched no files{where}. "
                        f"Check the path; use ** to search subfolders")
    base = _glob_base(expanded)
    names = tuple(Path(os.path.relpath(p, base)).as_posix() for p in files)
    return Documents(names, tuple(Path(p).read_bytes() for p in files))


_PACKED: dict[tuple[str, str, float], PackedSplits] = {}
_PACKED_MAX = 4  # a few corpora x tokenizers; each is a few tens of MB at most


def _packed(docs: Documents, sha: str, tokenizer, holdout_fraction: float) -> PackedSplits:
    key = (sha, tokenizer.name, float(holdout_fraction))
    if key not in _PACKED:
        if len(_PACKED) >= _PACKED_MAX:
            _PACKED.pop(next(iter(_PACKED)))
        _PACKED[key] = pack(docs, tokenizer, holdout_fraction)
    return _PACKED[key]


def _dataset(docs: Documents, cfg: DataConfig, seed: int, source: str, **extra) -> PackedDataset:
    tokenizer = get_tokenizer(cfg.tokenizer)
    sha = docs.sha256
    splits = _packed(docs, sha, tokenizer, cfg.holdout_fraction)
    return PackedDataset(cfg, seed, splits, tokenizer, source, sha, n_documents=len(docs.names), **extra)


def stdlib_source(arg: str, cfg: DataConfig, seed: int) -> PackedDataset:
    """`stdlib`: the running interpreter's standard library, byte-level by default."""
    if arg:
        raise DataError(f"data.source 'stdlib:{arg}': stdlib takes no argument; write data.source=stdlib")
    docs = stdlib_documents()
    version = ".".join(map(str, sys.version_info[:3]))
    return _dataset(docs, cfg, seed, "stdlib", python=f"{sys.implementation.name} {version}",
                    root=str(stdlib_root()))


def text_source(arg: str, cfg: DataConfig, seed: int) -> PackedDataset:
    """`text:<glob>`: local text files, one document per file."""
    docs = text_documents(arg)
    return _dataset(docs, cfg, seed, f"text:{arg}", glob_base=str(_glob_base(os.path.expanduser(arg)).resolve()))
