#!/usr/bin/env python
"""The AOT fit check from a source checkout: the same as `seismo compile` (seismo.cli), kept
so that commands written against it go on working.

    python scripts/tpu_aot_check.py configs/tiny.yaml --topology v5e:2x2
    # is: seismo compile configs/tiny.yaml --topology v5e:2x2

See `seismo compile --help` and TPU_SETUP.md. Exit status: 0 every topology fits, 1 some
topology does not fit, 2 bad input or no libtpu.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# The check needs no accelerator: keep JAX on the CPU before it is imported (on a TPU VM this
# also leaves the chips to a training job that holds them).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

try:
    import seismo  # noqa: F401
except ImportError:  # a source checkout that was not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from seismo import cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return cli.main(["compile", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
