"""benchmarks/baseline.py, the independent trainer the benchmarks compare seismo with: it loads
no seismo code, and it is the same model (same parameter shapes) as seismo's presets."""

import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from seismo import config, models

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _baseline():
    sys.path.insert(0, str(BENCH))
    try:
        import baseline
    finally:
        sys.path.remove(str(BENCH))
    return baseline


def test_baseline_imports_no_seismo_code():
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import baseline; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'seismo'); assert not bad, bad; print('ok')")
    p = subprocess.run([sys.executable, "-c", code, str(BENCH)], capture_output=True, text=True, timeout=120,
                       env={"JAX_PLATFORMS": "cpu", "PATH": ""})
    assert p.returncode == 0 and "ok" in p.stdout, p.stderr[-2000:]


@pytest.mark.parametrize("preset", ["tiny", "proxy_256"])
def test_baseline_has_the_preset_shapes(preset):
    baseline = _baseline()
    spec = baseline.spec_from_preset(preset, batch_size=2, seq_len=16)
    shapes = jax.eval_shape(baseline.DecoderLM(spec).init, jax.random.PRNGKey(0), np.zeros((1, 16), np.int32))
    ours = config.load(None, [f"model={preset}"]).model
    assert baseline.param_count(shapes) == models.param_count(ours)
    got = sorted(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    want = sorted(int(np.prod(x.shape)) for x in jax.tree.leaves(
        jax.eval_shape(models.build(ours).init, jax.random.PRNGKey(0), np.zeros((1, 16), np.int32))))
    if not ours.scan_layers:
        assert got == want  # tensor by tensor
    assert spec.qk_norm == ours.qk_norm and spec.n_layers == ours.n_layers


def test_baseline_trains():
    baseline = _baseline()
    trainer = baseline.Trainer(baseline.spec_from_preset("tiny", batch_size=4, seq_len=16, log_every=1,
                                                         warmup_steps=2, lr=3e-3))
    trainer.run_steps(30)
    assert np.isfinite(trainer.losses).all() and trainer.losses[-1] < trainer.losses[0] - 0.5
