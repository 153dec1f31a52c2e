"""Joining a multi-process job (seismo.train.mesh.maybe_initialize_distributed): the GPUs each
SLURM task trains on, from the variables SLURM sets (simulated here; `jax.distributed.
initialize` is replaced by a recorder, so nothing is joined), and a `mesh.multihost: on` with
no job to join, which is one sentence and exit 2 through the CLI."""

import subprocess
import sys

import jax
import pytest

from seismo import config
from seismo.config import ConfigError
from seismo.train import mesh as mesh_lib


def slurm(ntasks, procid, localid, nodes, **extra):
    return {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[001-004]", "SLURM_NTASKS": str(ntasks),
            "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(localid), "SLURM_STEP_NUM_NODES": str(nodes),
            "SLURM_NNODES": str(nodes), **extra}


@pytest.mark.parametrize("env, expected", [
    # one task per node, 8 GPUs each: all 8 (JAX alone would give [0], one GPU per node)
    (slurm(2, 1, 0, 2, SLURM_NTASKS_PER_NODE="1", SLURM_GPUS_ON_NODE="8"), list(range(8))),
    (slurm(2, 1, 0, 2, SLURM_TASKS_PER_NODE="1(x2)", CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7"), list(range(8))),
    # one task per GPU, each seeing all 8: its own
    (slurm(16, 13, 5, 2, SLURM_NTASKS_PER_NODE="8", SLURM_GPUS_ON_NODE="8"), [5]),
    (slurm(16, 13, 5, 2, SLURM_TASKS_PER_NODE="8(x2)", CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7"), [5]),
    # one task per GPU, each bound to its own (--gpus-per-task=1): the one it sees is its device 0
    (slurm(16, 13, 5, 2, SLURM_NTASKS_PER_NODE="8", SLURM_GPUS_ON_NODE="8", CUDA_VISIBLE_DEVICES="5"), [0]),
    # two tasks per node share 8 GPUs in blocks of 4
    (slurm(4, 3, 1, 2, SLURM_NTASKS_PER_NODE="2", SLURM_GPUS_ON_NODE="8"), [4, 5, 6, 7]),
    # uneven nodes: this node (SLURM_NODEID 2) runs 1 task of 3 in all
    (slurm(7, 6, 0, 3, SLURM_TASKS_PER_NODE="3(x2),1", SLURM_NODEID="2", SLURM_GPUS_ON_NODE="4"), [0, 1, 2, 3]),
    # no GPU known (a CPU job): JAX decides
    (slurm(2, 0, 0, 2, SLURM_NTASKS_PER_NODE="1", SLURM_GPUS_ON_NODE="0"), None),
    # JAX_LOCAL_DEVICE_IDS given: JAX reads it
    (slurm(2, 0, 0, 2, SLURM_NTASKS_PER_NODE="1", SLURM_GPUS_ON_NODE="8", JAX_LOCAL_DEVICE_IDS="0,1"), None),
    # not SLURM
    ({"CUDA_VISIBLE_DEVICES": "0,1"}, None),
])
def test_slurm_local_device_ids(env, expected):
    assert mesh_lib.slurm_local_device_ids(env) == expected


def test_slurm_gpus_that_cannot_be_shared_equally_are_a_config_error():
    with pytest.raises(ConfigError, match="3 tasks on this node but it has 8 GPUs"):
        mesh_lib.slurm_local_device_ids(slurm(3, 0, 0, 1, SLURM_NTASKS_PER_NODE="3", SLURM_GPUS_ON_NODE="8"))


def test_expand_slurm_counts():
    assert mesh_lib._expand_slurm_counts("4(x2),3,2(x1)") == [4, 4, 3, 2]


@pytest.fixture
def recorded(monkeypatch):
    """jax.distributed.initialize replaced by a recorder of its arguments; the environment
    cleared of every variable that describes a job."""
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    import os

    for k in list(os.environ):
        if k.startswith(("SLURM_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "TPU_",
                         "JAX_LOCAL_DEVICE_IDS", "CUDA_VISIBLE_DEVICES")):
            monkeypatch.delenv(k)
    return calls


def test_one_slurm_task_per_node_is_given_all_its_gpus(monkeypatch, recorded):
    for k, v in slurm(4, 2, 0, 4, SLURM_NTASKS_PER_NODE="1", SLURM_GPUS_ON_NODE="8").items():
        monkeypatch.setenv(k, v)
    assert mesh_lib.maybe_initialize_distributed(config.MeshConfig()) is True
    assert recorded == [((), {"local_device_ids": list(range(8))})]


def test_one_slurm_task_per_gpu_is_given_its_own(monkeypatch, recorded):
    for k, v in slurm(16, 10, 2, 2, SLURM_NTASKS_PER_NODE="8", SLURM_GPUS_ON_NODE="8").items():
        monkeypatch.setenv(k, v)
    assert mesh_lib.maybe_initialize_distributed(config.MeshConfig()) is True
    assert recorded == [((), {"local_device_ids": [2]})]


def test_explicit_coordinator_inside_slurm_still_shares_the_gpus(monkeypatch, recorded):
    for k, v in {**slurm(2, 1, 0, 2, SLURM_NTASKS_PER_NODE="1", SLURM_GPUS_ON_NODE="4"),
                 "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}.items():
        monkeypatch.setenv(k, v)
    assert mesh_lib.maybe_initialize_distributed(config.MeshConfig()) is True
    assert recorded == [(("10.0.0.1:1234", 2, 1), {"local_device_ids": [0, 1, 2, 3]})]


def test_no_job_and_auto_joins_nothing(recorded):
    assert mesh_lib.maybe_initialize_distributed(config.MeshConfig()) is False
    assert recorded == []


@pytest.mark.parametrize("env, match", [
    ({}, "mesh.multihost is 'on' but this process is not part of a multi-process job"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "2"}, "JAX_PROCESS_ID are not both whole"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
     "JAX_PROCESS_ID=2 is not one of the 2 processes"),
])
def test_misconfigured_multihost_is_a_config_error(monkeypatch, recorded, env, match):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=match):
        mesh_lib.maybe_initialize_distributed(config.MeshConfig(multihost="on"))
    assert recorded == []


@pytest.mark.multiprocess
def test_cli_multihost_on_without_a_cluster_is_one_sentence_and_exit_2(tmp_path):
    import os

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "TPU_"))}
    p = subprocess.run([sys.executable, "-m", "seismo.cli", "train", "tiny", "--set", "mesh.multihost=on",
                        "--run-dir", str(tmp_path / "run")], env={**env, "JAX_PLATFORMS": "cpu"},
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-3000:]
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "mesh.multihost is 'on'" in lines[0] and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "run").exists()


def test_sigint_is_passed_on_to_the_sigterm_owner_once_jax_owns_sigterm(monkeypatch):
    """After jax.distributed.initialize() SIGTERM belongs to JAX's preemption notifier (a C++
    handler; here a Python stand-in that records it): SIGINT is passed on to it as a SIGTERM,
    and the flag's restore leaves SIGTERM's owner in place."""
    import os
    import signal
    import threading

    from seismo.train import stop as stop_lib

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers need the main thread")
    got = []
    old_term, old_int = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    monkeypatch.setitem(stop_lib._JAX, "owns_sigterm", False)
    flag = stop_lib.StopFlag()
    try:
        flag.install()
        notifier = lambda signum, frame: got.append(signum)  # noqa: E731
        signal.signal(signal.SIGTERM, notifier)  # what jax.distributed.initialize() does in C++
        flag.yield_sigterm_to_jax()
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(100):  # Python runs handlers between bytecodes, soon after delivery
            if got:
                break
        assert got == [signal.SIGTERM] and not flag.requested
        flag.restore()
        assert signal.getsignal(signal.SIGTERM) is notifier  # not taken back
        assert signal.getsignal(signal.SIGINT) == old_int
        again = stop_lib.StopFlag()
        again.install()  # a later run in the same process (a sweep) leaves SIGTERM alone too
        assert signal.getsignal(signal.SIGTERM) is notifier and again.forward_to_jax
        again.restore()
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)


def test_a_single_process_asks_nobody():
    from seismo.train import stop as stop_lib

    flag = stop_lib.StopFlag()
    agree = stop_lib.StopAgreement(flag)
    assert not agree.multi and not agree.sync and not agree(1) and not agree.at_start()
    flag.requested = True
    assert agree(2) and agree.at_start()
    assert stop_lib.any_process(True) and not stop_lib.any_process(False)
    assert stop_lib.processes_where_false(False) == [0] and stop_lib.all_processes(True)
    assert stop_lib.newest_everywhere(7) == 7
