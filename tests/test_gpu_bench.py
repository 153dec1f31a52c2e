"""benchmarks/gpu.py runs as its docstring says (PYTHONPATH=src, a fresh process), here on its
--cpu-smoke path: tiny shapes, Pallas interpret mode, a table on stdout and the JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"
pytestmark = pytest.mark.xdist_group("gpu_bench")  # the smoke run below, run once


def run_bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The docstring's `--cpu-smoke --json` command, every section (kernels, model) in one
    process: its stdout and the JSON it wrote."""
    out = tmp_path_factory.mktemp("gpu_bench") / "smoke.json"
    proc = run_bench("--cpu-smoke", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


@pytest.mark.multiprocess
def test_cpu_smoke_writes_table_and_json(smoke):
    stdout, result = smoke
    assert "| D | T | mode |" in stdout and "flash_sigmoid ms" in stdout

    assert result["cpu_smoke"] and result["machine"]["backend"] == "cpu"
    rows = result["kernels"]["rows"]
    by = {(r["impl"], r["mode"]): r for r in rows}
    for impl in ("flash_sigmoid", "softmax_pallas", "sigmoid_xla"):
        for mode in ("fwd", "fwd+bwd"):
            r = by[(impl, mode)]
            assert "error" not in r, r
            assert r["ms"] > 0 and r["tflops"] > 0 and r["dtype"] == "bfloat16"
    assert "error" in by[("softmax_cudnn", "fwd")]  # no GPU here: reported, not fatal
    check = result["kernels"]["check"]
    assert check["ok"], check


@pytest.mark.multiprocess
def test_unknown_section_is_an_error():
    proc = run_bench("--only", "nope", timeout=120)
    assert proc.returncode == 2 and "unknown section" in proc.stderr


@pytest.mark.multiprocess
def test_cpu_smoke_model_section(smoke):
    stdout, result = smoke
    assert "| preset | T | batch | impl |" in stdout
    rows = result["model"]["rows"]
    assert {r["impl"] for r in rows} == {"explicit", "blockwise", "dot_product"}
    for r in rows:
        assert "error" not in r, r
        assert r["tokens_per_s"] > 0 and r["model_flops"] > 0 and r["mfu"] is None  # no peak known on the CPU
