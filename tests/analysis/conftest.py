"""Fake run directories in the exact run-directory format (.notes/COMMON.md): a real resolved
config.yaml (seismo.config.dump), metrics.jsonl rows of every kind, status.json. No training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from seismo import config as config_lib

GRAD_KEY = "grad_rms/blocks/mlp/up/kernel"


def logit_at(step: int, growth: float, layer: int = 0) -> float:
    """The planted layer-l max attention logit: 2 * exp(growth * step) / (l + 1)."""
    return 2.0 * math.exp(growth * step) / (layer + 1)


def write_run(path: Path, cfg: config_lib.Config | None = None, *, loss0: float = 5.5, final: float = 2.0,
              growth: float = 0.01, grad: float = 1e-3, diverge_at: int | None = None,
              stop_at: int | None = None, status_file: bool = True, partial_line: bool = False) -> Path:
    """A run of cfg.run.steps steps whose loss falls linearly from loss0 to final; probe rows every
    run.probe_every steps (layer-0 logit = logit_at(step, growth)); grad RMS of the first MLP kernel
    = grad * (1 + step / steps). `diverge_at`: a divergence row there and status 'diverged'.
    `stop_at`: the writer stops there (killed or preempted), status 'running'."""
    cfg = cfg or config_lib.load(None, ["run.steps=100", "run.probe_every=10", "run.eval_every=50",
                                        "run.log_every=10", "optimizer.warmup_steps=10"])
    path.mkdir(parents=True, exist_ok=True)
    config_lib.dump(cfg, path / "config.yaml")
    steps, n_layers = cfg.run.steps, cfg.model.n_layers
    rows: list[dict] = [{"step": 0, "eval_loss": loss0}]
    last = min(x for x in (steps, diverge_at, stop_at) if x is not None)
    for step in range(1, last + 1):
        loss = loss0 + (final - loss0) * step / steps
        if step == diverge_at:
            rows.append({"step": step, "diverged": True, "loss": None, "ce": None, "lr": 1e-3,
                         "last_probe/attn_logit_max": [logit_at(step - 1, growth, i) for i in range(n_layers)]})
            break
        if step % cfg.run.probe_every == 0:
            rows.append({"step": step, "probe": True,
                         "attn_logit_max": [logit_at(step, growth, i) for i in range(n_layers)],
                         "resid_rms": [1.0 + 0.01 * step * (i + 1) for i in range(n_layers)],
                         "logz_mean": -0.001 * step, "logz_max": 0.5,
                         GRAD_KEY: [grad * (1 + step / steps), 9.0],
                         "grad_rms/head/kernel": 5.0})
        if step % cfg.run.log_every == 0:
            rows.append({"step": step, "loss": loss, "lr": 1e-3, "grad_norm": 1.0, "param_norm": 10.0,
                         "tokens": step * 512, "step_time_s": 0.01, "tokens_per_s": 5e4, "ce": loss,
                         "z_loss": 0.0, "logz_mean": -0.001 * step, "logz_max": 0.5, "logit_mean": 0.0})
        if step % cfg.run.eval_every == 0 or step == steps:
            rows.append({"step": step, "eval_loss": loss + 0.05})
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if partial_line:
        text += '{"step": 999, "loss": 1.2'  # a writer killed mid-line
    (path / "metrics.jsonl").write_text(text)
    if status_file:
        status = "diverged" if diverge_at else ("running" if stop_at else "finished")
        final_eval = None if diverge_at or stop_at else final + 0.05
        (path / "status.json").write_text(json.dumps({"status": status, "step": last,
                                                      "final_eval_loss": final_eval}))
    return path


@pytest.fixture
def make_run():
    return write_run
