"""The same training on 1 device, on 8 fake CPU devices as (data=2, fsdp=2, tensor=2), and on
two processes over loopback (gloo collectives). Each sharded run is its own process, since
the device count is fixed when JAX starts."""

import json
import os
import socket
import subprocess
import sys

import pytest

from seismo import config
from seismo.train.loop import train

pytestmark = [pytest.mark.multiprocess, pytest.mark.xdist_group("multidevice")]

OVERRIDES = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=32", "model.vocab_size=256",
    "data.batch_size=8", "data.seq_len=16", "data.eval_sequences=8",
    "optimizer.lr=3e-3", "optimizer.warmup_steps=2",
    "run.steps=6", "run.log_every=1", "run.eval_every=6", "run.checkpoint_every=6",
    "run.checkpoint_log_until=0", "run.progress=off", "run.checkpoint_async=false",
]


def losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [r["eval_loss"] for r in rows if "eval_loss" in r]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return {**env, "JAX_PLATFORMS": "cpu", **extra}


def _seismo_train(cfg_path, run_dir, env, mesh):
    args = [sys.executable, "-m", "seismo.cli", "train", str(cfg_path), "--run-dir", str(run_dir)]
    for k, v in mesh.items():
        args += ["--set", f"mesh.{k}={v}"]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    d = tmp_path_factory.mktemp("one")
    cfg = config.load(None, OVERRIDES)
    config.dump(cfg, d / "cfg.yaml")
    train(cfg, d / "run")
    return d / "cfg.yaml", losses(d / "run")


def test_eight_fake_devices_match_one(one_device, tmp_path):
    cfg_path, (ref_loss, ref_eval) = one_device
    env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=8")
    p = _seismo_train(cfg_path, tmp_path / "run", env, {"data": 2, "fsdp": 2, "tensor": 2})
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    loss, ev = losses(tmp_path / "run")
    assert loss == pytest.approx(ref_loss, rel=1e-4, abs=1e-5)
    assert ev == pytest.approx(ref_eval, rel=1e-4, abs=1e-5)


def test_two_processes_over_loopback_match_one(one_device, tmp_path):
    cfg_path, (ref_loss, ref_eval) = one_device
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for pid in range(2):
        env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                   JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
        procs.append(_seismo_train(cfg_path, tmp_path / "run", env, {"data": -1, "fsdp": 2, "tensor": 1}))
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    loss, ev = losses(tmp_path / "run")  # written by process 0 only
    assert loss == pytest.approx(ref_loss, rel=1e-4, abs=1e-5)
    assert ev == pytest.approx(ref_eval, rel=1e-4, abs=1e-5)


def test_vmapped_group_on_eight_fake_devices_matches_one_device_run(one_device, tmp_path):
    """A vmapped group keeps every axis's sharding of a single run and adds an unsharded points
    axis, so each point on (data=2, fsdp=2, tensor=2) trains like the run on one device."""
    import yaml

    from seismo.sweep import expand, load_sweep_spec, run_dir

    cfg_path, (ref_loss, ref_eval) = one_device
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"name": "mesh", "base": str(cfg_path), "execution": "vmap",
                                     "set": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
                                     "grid": {"optimizer.lr": [3e-3, 1e-2]}}))
    env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=8")
    p = subprocess.run([sys.executable, "-m", "seismo.cli", "sweep", str(sweep), "--out", str(tmp_path / "out")],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "2 points vmapped" in p.stdout, p.stdout
    point = next(q for q in expand(load_sweep_spec(sweep)) if q.values["optimizer.lr"] == 3e-3)
    loss, ev = losses(run_dir(tmp_path / "out", point))
    assert loss == pytest.approx(ref_loss, rel=1e-4, abs=1e-5)
    assert ev == pytest.approx(ref_eval, rel=1e-4, abs=1e-5)
