"""scripts/launch_tpu_pod.sh, offline: `--dry-run` prints the gcloud commands it would run,
one per line (shell-quoted), and they are checked here word by word: queued resources with a
reservation, spot or best-effort capacity, multislice (node count and prefix), the direct
`tpu-vm create` path, every worker of every slice reached at once, gs:// run directories,
log collection from all workers, the stop as SIGTERM to the recorded pids, and `check`
through this checkout's venv. A missing or wrong setting is one line on stderr and exit 2."""

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "launch_tpu_pod.sh"
BASE = {"TPU_NAME": "seismo", "ZONE": "us-west4-a", "PROJECT": "proj", "ACCELERATOR": "v5litepod-16",
        "BUCKET": "bkt", "CONFIG": "configs/tiny.yaml", "RUN": "r1"}

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def launch(cmd: str, **env: str) -> subprocess.CompletedProcess:
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", cmd], env={**keep, **BASE, **env},
                          capture_output=True, text=True, timeout=60, cwd=SCRIPT.parents[1])


def commands(cmd: str, **env: str) -> list[list[str]]:
    p = launch(cmd, **env)
    assert p.returncode == 0, p.stderr
    return [shlex.split(line) for line in p.stdout.splitlines() if line.strip()]


def flag(words: list[str], name: str) -> str | None:
    return next((w.split("=", 1)[1] for w in words if w.startswith(name + "=")), None)


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_create_from_a_reservation_as_a_queued_resource():
    (c,) = commands("create", CAPACITY="reserved")
    assert c[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "seismo-qr"]
    assert flag(c, "--node-id") == "seismo" and "--reserved" in c
    assert flag(c, "--accelerator-type") == "v5litepod-16" and flag(c, "--runtime-version") == "v2-alpha-tpuv5-lite"
    assert flag(c, "--zone") == "us-west4-a" and flag(c, "--project") == "proj"
    assert "--spot" not in c and not any(w.startswith("--node-count") for w in c)
    (named,) = commands("create", CAPACITY="reserved", RESERVATION="my-res", VALID_FOR="6h")
    assert named[:2] == ["gcloud", "alpha"] and flag(named, "--reservation") == "my-res"
    assert flag(named, "--valid-until-duration") == "6h"


def test_multislice_spot_and_best_effort():
    (c,) = commands("create", NUM_SLICES="2", CAPACITY="spot")
    assert flag(c, "--node-count") == "2" and flag(c, "--node-prefix") == "seismo" and "--spot" in c
    assert not any(w.startswith("--node-id") for w in c)
    (b,) = commands("create", CAPACITY="best-effort")
    assert "--best-effort" in b
    (d,) = commands("create", QUEUED="0", SPOT="1")  # the direct path, one slice
    assert d[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "seismo"] and "--spot" in d
    assert flag(d, "--version") == "v2-alpha-tpuv5-lite"


def test_train_and_sweep_reach_every_worker_of_every_slice_with_a_gs_run_dir():
    (t,) = commands("train", NUM_SLICES="2", SETS="--set optimizer.lr=3e-3")
    assert t[:6] == ["gcloud", "compute", "tpus", "queued-resources", "ssh", "seismo-qr"]
    assert "--node=all" in t and "--worker=all" in t
    remote = shlex.split(flag(t, "--command").replace(";", " ; "))
    i = remote.index(".venv/bin/seismo")
    assert remote[i + 1:i + 9] == ["train", "configs/tiny.yaml", "--run-dir", "gs://bkt/runs/r1",
                                   "--set", "mesh.multihost=on", "--set", "optimizer.lr=3e-3"]
    assert "logs/r1.pid" in flag(t, "--command")  # the pid `stop` signals
    (s,) = commands("sweep", SWEEP="configs/studies/qk_layernorm.yaml")
    assert "seismo sweep configs/studies/qk_layernorm.yaml --out gs://bkt/sweeps/r1 --set mesh.multihost=on" \
        in " ".join(shlex.split(flag(s, "--command").replace(";", " ; ")))
    (direct,) = commands("train", QUEUED="0")
    assert direct[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "seismo"] and "--worker=all" in direct
    assert "--node=all" not in direct


def test_logs_collect_stop_delete_status():
    (logs,) = commands("logs", LINES="5")
    assert "tail -n 5 seismo/logs/r1.log" in flag(logs, "--command") and "hostname" in flag(logs, "--command")
    mkdir, collect = commands("collect")
    assert mkdir == ["mkdir", "-p", "logs/r1"]
    assert flag(collect, "--output-directory") == "logs/r1" and "--worker=all" in collect and "--node=all" in collect
    assert flag(collect, "--command") == "cat seismo/logs/r1.log"
    (stop,) = commands("stop")
    assert "kill -TERM $(cat seismo/logs/r1.pid)" in flag(stop, "--command")
    (delete,) = commands("delete")
    assert delete[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "seismo-qr"] and "--force" in delete
    (status,) = commands("wait")
    assert status[4] == "describe" and flag(status, "--format") == "value(state.state)"


def test_setup_ships_the_checkout_and_installs_the_tpu_and_gcs_extras():
    archive, copy, install = commands("setup")
    assert archive[:2] == ["git", "archive"]
    assert copy[4] == "scp" and copy[-2:] == ["--node=all", "--worker=all"]
    assert "pip install -q -c requirements.lock -e '.[tpu,gcs]'" in flag(install, "--command")


def test_check_compiles_with_the_checkouts_venv():
    (c,) = commands("check", NUM_SLICES="2", SETS="--set model.remat=full", TPU_NAME="", ZONE="")
    assert c == [".venv/bin/seismo", "compile", "configs/tiny.yaml", "--topology", "v5litepod-16",
                 "--num-slices", "2", "--set", "model.remat=full"]


@pytest.mark.parametrize("cmd, env, words", [
    ("create", {"TPU_NAME": ""}, "set TPU_NAME"),
    ("create", {"ACCELERATOR": ""}, "set ACCELERATOR"),
    ("train", {"BUCKET": ""}, "set BUCKET"),
    ("create", {"CAPACITY": "cheap"}, "CAPACITY must be"),
    ("create", {"QUEUED": "0", "NUM_SLICES": "2"}, "needs a queued resource"),
    ("create", {"QUEUED": "0", "CAPACITY": "reserved"}, "needs a queued resource"),
    ("create", {"NUM_SLICES": "two"}, "NUM_SLICES must be"),
    ("sweep", {}, "set SWEEP"),
    ("launch", {}, "unknown command"),
])
def test_bad_settings_are_one_line_and_exit_2(cmd, env, words):
    p = launch(cmd, **env)
    assert p.returncode == 2 and p.stdout.strip() == ""
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(f"launch_tpu_pod.sh {cmd}: ") and words in last
