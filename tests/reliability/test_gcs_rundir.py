"""A run directory on object storage, against a real GCS API: `gcp-storage-emulator`, started
here on 127.0.0.1 (a free port, in memory, one bucket). gcsfs (seismo's `gcs` extra: config,
metrics, status, lock, analysis tables, figures) and tensorstore (Orbax's checkpoint arrays)
are pointed at it by their documented variables, STORAGE_EMULATOR_HOST and
TENSORSTORE_GCS_HTTP_URL (the emulator lacks one response header tensorstore reads; see
gcs_emulator.py, which adds it). Train on gs://, preempt it (SIGTERM at the step-4 checkpoint), resume
it with `seismo train`, then `seismo analyze` and `seismo report`, all on the same URL: the
resumed losses equal those of one uninterrupted local run, and everything is read back from
the bucket. A scheme seismo cannot serve is refused before training (exit 2, one line)."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from seismo import rundir
from seismo.train.loop import train
from tiny_run import TINY_RUN, tiny_run

pytest.importorskip("gcsfs", reason="the gcs extra (gcsfs) is not installed")
pytest.importorskip("gcp_storage_emulator", reason="gcp-storage-emulator (dev extra) is not installed")
pytestmark = [pytest.mark.multiprocess, pytest.mark.slow, pytest.mark.xdist_group("gcs")]

HERE = Path(__file__).parent
DRIVER = HERE / "gcs_driver.py"
BUCKET = "seismo-test"
ARGS = ["tiny", *(a for kv in TINY_RUN for a in ("--set", kv))]
TIMEOUT = 240  # seconds per command; a hang fails the test instead of blocking CI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs_env(tmp_path_factory):
    port = _free_port()
    log = (tmp_path_factory.mktemp("gcs") / "emulator.log").open("w")
    proc = subprocess.Popen([sys.executable, str(HERE / "gcs_emulator.py"), "start", "--host", "127.0.0.1",
                             "--port", str(port), "--default-bucket", BUCKET, "--in-memory", "--quiet"],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the GCS emulator did not start (exit {proc.poll()})")
            time.sleep(0.2)
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ,
           "STORAGE_EMULATOR_HOST": url,  # gcsfs (and google-cloud-storage) talk to the emulator
           "TENSORSTORE_GCS_HTTP_URL": url,  # so does tensorstore, which writes Orbax's arrays
           "FSSPEC_GCS_TOKEN": "anon", "FSSPEC_GS_TOKEN": "anon",  # gcsfs: no credentials to look for
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # no gRPC bucket-type probe (60 s against an emulator)
           "GCE_METADATA_HOST": "127.0.0.1:1", "GCE_METADATA_IP": "127.0.0.1:1", "NO_GCE_CHECK": "true",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(HERE.parent)}
    yield env
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _run(env, *cmd: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, *cmd], env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(cmd[:3])} hung for {TIMEOUT} s: {(e.stderr or b'')[-2000:]!r}")


def _seismo(env, *args: str) -> subprocess.CompletedProcess:
    return _run(env, "-m", "seismo.cli", *args)


def _driver(env, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    p = _run(env, str(DRIVER), *args)
    assert p.returncode == 0, p.stderr[-3000:]
    line = next(x for x in p.stdout.splitlines() if x.startswith("INSPECT "))
    return p, json.loads(line[len("INSPECT "):])


def test_train_preempt_resume_analyze_report_on_gs(gcs_env, tmp_path):
    url = f"gs://{BUCKET}/runs/tiny"
    p, mid = _driver(gcs_env, "preempt", url, *ARGS)
    assert "preempted at step" in p.stdout, p.stdout
    assert not Path("gs:").exists()  # nothing went to a local ./gs:/ folder
    assert mid["type"] == "PosixGPath"
    stopped = mid["status"]["step"]  # the next step boundary after the signal (the loop's stop decision)
    assert mid["status"]["status"] == "preempted" and 4 <= stopped < 8
    assert sorted(int(k) for k in mid["losses"]) == list(range(1, stopped + 1))  # every row, on the bucket
    assert "preemption" in mid["kinds"]
    assert {"0", "4", str(stopped)} <= set(mid["checkpoints"])
    assert ".seismo.lock" not in mid["files"]  # released on the way out
    assert {"config.yaml", "metrics.jsonl", "status.json"} <= set(mid["files"])

    p = _seismo(gcs_env, "train", *ARGS, "--run-dir", url)  # the same command resumes
    assert p.returncode == 0, p.stderr[-3000:]
    assert "finished at step 8" in p.stdout, p.stdout

    p, end = _driver(gcs_env, "finish", url, "--probes", "massive", "weights", "--eval-sequences", "2")
    assert "analysis tables written to gs://" in p.stdout and "report written to gs://" in p.stdout, p.stdout
    ref_dir = tmp_path / "local"
    train(tiny_run(), ref_dir)  # the same run, never interrupted, on a local disk
    ref = {r["step"]: r["loss"] for r in map(json.loads, (ref_dir / rundir.METRICS_FILE).read_text().splitlines())
           if r["kind"] == "train"}
    got = {int(k): v for k, v in end["losses"].items()}
    assert sorted(got) == list(range(1, 9))
    for s in ref:  # the resume on gs:// continues exactly (same batches, restored state)
        assert got[s] == pytest.approx(ref[s], rel=1e-6, abs=1e-7)
    assert end["status"]["status"] == "finished" and end["status"]["step"] == 8
    assert "preemption" not in end["kinds"]  # the resume set the preemption row aside ...
    assert end["aside"] is not None and '"kind": "preemption"' in end["aside"]  # ... never deleted
    saved = sorted(int(c) for c in end["checkpoints"] if c.isdigit())
    assert {0, 4, stopped, 8} <= set(saved)  # the preemption's checkpoint is kept, like any other
    assert {"massive.csv", "weights.csv", "done.json"} <= set(end["analysis"])
    assert end["massive_steps"] == saved  # every checkpoint analysed, read back from the bucket
    assert end["figures"] and all(f.endswith(".png") for f in end["figures"])
    assert end["report"] is not None and "figures/" in end["report"]
    assert ".seismo.lock" not in end["files"]


def test_a_vmapped_sweep_and_its_report_on_gs(gcs_env, tmp_path):
    spec = tmp_path / "lr.yaml"
    spec.write_text("name: lr\nbase: tiny\nexecution: vmap\n"
                    f"set: {json.dumps([*(kv for kv in TINY_RUN if not kv.startswith('optimizer.lr')), 'run.steps=2', 'run.eval_every=2'])}\n"
                    "grid:\n  optimizer.lr: [1.0e-3, 3.0e-3]\n")
    url = f"gs://{BUCKET}/sweeps/lr"
    p, out = _driver(gcs_env, "sweep", url, str(spec))
    assert "sweep written to gs://" in p.stdout and "report written to gs://" in p.stdout, p.stdout
    assert {"sweep.yaml", "results.csv", "summary.csv", "report.md", "runs", "figures"} <= set(out["files"])
    assert sorted(out["runs"].values()) == ["finished", "finished"] and out["results_rows"] == 2
    assert "figures/" in out["report"]


def test_a_second_writer_is_refused_and_restart_sets_aside_on_gs(gcs_env):
    url = f"gs://{BUCKET}/runs/locked"
    code = ("import sys; from seismo import rundir; from seismo.train.ownership import RunLock, set_aside\n"
            "a = RunLock(sys.argv[1]).acquire()\n"
            "b = RunLock(sys.argv[1])\n"
            "b.me = {**b.me, 'pid': b.me['pid'] + 1, 'host': 'another-host'}\n"
            "try:\n    b.acquire()\nexcept Exception as e:\n    print('REFUSED', type(e).__name__, e)\n"
            "a.release()\nc = RunLock(sys.argv[1]).acquire()\nprint('AFTER', c.held)\nc.release()\n"
            "d = rundir.path(sys.argv[1])\n(d / 'checkpoints' / '4').mkdir(parents=True, exist_ok=True)\n"
            "(d / 'checkpoints' / '4' / 'x').write_text('state')\n(d / 'config.yaml').write_text('cfg')\n"
            "moved = set_aside(sys.argv[1])\n"
            "print('ASIDE', moved.name, d.exists(), (moved / 'checkpoints' / '4' / 'x').read_text(),"
            " (moved / 'config.yaml').read_text())\n")
    p = _run(gcs_env, "-c", code, url)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "REFUSED RunDirConflict" in p.stdout and "in use by" in p.stdout, p.stdout
    assert "AFTER True" in p.stdout  # released, then free again
    # --restart's set-aside on a store: every object moved under <name>.aside-<time>, nothing deleted
    aside = next(x for x in p.stdout.splitlines() if x.startswith("ASIDE ")).split()
    assert aside[1].startswith("locked.aside-") and aside[2:] == ["False", "state", "cfg"], p.stdout


@pytest.mark.parametrize("url", ["s3://bucket/run", "az://container/run"])
def test_an_unservable_scheme_fails_before_training(url, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    p = subprocess.run([sys.executable, "-m", "seismo.cli", "train", *ARGS, "--run-dir", url], env=env,
                       capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    line = p.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert url.split(":")[0] + "://" in line and "seismo[gcs]" in line
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a local ./s3:/ folder


def test_gs_without_gcsfs_names_the_extra(monkeypatch):
    real = rundir.importlib.util.find_spec
    monkeypatch.setattr(rundir.importlib.util, "find_spec", lambda name, *a: None if name == "gcsfs" else real(name, *a))
    with pytest.raises(rundir.StorageUnavailable, match=r"pip install 'seismo\[gcs\]'"):
        rundir.path("gs://bucket/run")
    assert rundir.path("runs/x") == Path("runs/x")  # local paths need nothing
    assert rundir.path("file:///tmp/x") == Path("/tmp/x")


def test_paths_local_and_remote(tmp_path):
    assert type(rundir.path(tmp_path / "x")) is type(tmp_path) and rundir.path("a/b") == Path("a/b")
    remote = rundir.path("GS://bucket/runs/x")  # schemes are case-insensitive
    assert str(remote) == "gs://bucket/runs/x" and rundir.is_remote(remote)
    assert rundir.path(remote) is remote and str(remote / "config.yaml") == "gs://bucket/runs/x/config.yaml"
    assert not rundir.is_remote("./gs:/bucket") and rundir.scheme("file:///tmp/x") is None


def test_the_local_writes_keep_their_posix_meaning(tmp_path):
    f = tmp_path / "status.json"
    rundir.write_atomic(f, "one")
    rundir.write_atomic(f, "two")
    assert f.read_text() == "two" and sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]
    rundir.append_text(tmp_path / "m.jsonl", "a\n")
    rundir.append_text(tmp_path / "m.jsonl", "b\n")
    assert (tmp_path / "m.jsonl").read_text() == "a\nb\n"
    assert rundir.create_exclusive(tmp_path / "lock", "me") is True
    assert rundir.create_exclusive(tmp_path / "lock", "you") is False and (tmp_path / "lock").read_text() == "me"
