"""Shared test setup: JAX on CPU, tiny configs, deterministic numpy."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The tests compile the same tiny programs many times, in this process, in xdist workers and in
# the subprocesses they start (which inherit these variables). JAX's persistent compilation
# cache, keyed by the program itself, compiles each once: the executable is the same, so are
# the numbers. It lives in .pytest_cache (ignored by git); a fresh clone starts it empty.
_CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "jax")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
