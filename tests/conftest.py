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


# --------------------------------------------------------------------------- xdist scheduling
# `make test` runs `pytest -n 2 --dist loadgroup`: the tests of one xdist_group go to one
# worker, so a module-scoped fixture (a reference run, an emulator) is built once. xdist marks a
# group by appending "@<group>" to each item's node id in the worker; pytest 9.2 keeps the id
# in `Item._id` and ignores xdist's write to `_nodeid`, which left every test a unit of its own
# (the groups split across both workers, each building the group's fixtures again). The hook
# below applies the suffix where xdist's did not take.
#
# The groups then go out longest first (xdist's default order is by number of tests, which
# put the multi-process groups last, one worker running them alone at the end): LONGEST lists
# the groups that take minutes, longest first, as measured on the 2-core development machine.
LONGEST = ["coordinated_stop", "notebooks", "sweep_runner", "train_loop", "multidevice", "gcs", "storage",
           "ownership", "progress", "trackers", "integrity", "signals", "analyze", "bad_input"]


def _groups(item) -> str:
    names = {str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in item.iter_markers("xdist_group")}
    return "_".join(sorted(names))


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # the controller's queue: collection order (below)
        config.option.loadscopereorder = False


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    if not getattr(config.option, "loadgroup", False):  # set in xdist workers under --dist loadgroup
        return
    for item in items:
        group = _groups(item)
        if group and not item.nodeid.endswith(f"@{group}"):
            from _pytest.nodeid import NodeId  # pytest >= 9.2, where xdist's suffix did not take

            item._id = NodeId.parse(f"{item.nodeid}@{group}")
    rank = {g: i for i, g in enumerate(LONGEST)}
    items.sort(key=lambda it: rank.get(_groups(it), len(LONGEST)))  # stable: the order within is kept
