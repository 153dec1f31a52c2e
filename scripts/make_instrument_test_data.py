#!/usr/bin/env python
"""Extracts the small test data of tests/instrument/data/ from real runs (see its README.md).

    # the layer-0 max attention logit of every probe row of the demo's runs (make demo):
    python scripts/make_instrument_test_data.py logits runs/qk_layernorm
    # the per-layer massive-activation ratio over checkpoints of four tiny runs: trains
    # tests/instrument/data/massive_dynamics_sweep.yaml into SWEEP_DIR if it is not there,
    # runs `seismo analyze --probes massive --eval-sequences N` on each run (N: 64 unless
    # --eval-sequences says otherwise), and keeps ratio_seq_mean:
    python scripts/make_instrument_test_data.py massive runs/massive_dynamics
    # the same from another sweep file (the high-LR, qk-layernorm runs), into another file:
    python scripts/make_instrument_test_data.py massive runs/massive_dynamics_high_lr \
        --sweep tests/instrument/data/massive_dynamics_sweep_high_lr.yaml \
        --out tests/instrument/data/massive_ratio_tiny_high_lr.json

Each writes one JSON file into tests/instrument/data/ (a few KB) and prints its path.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "instrument" / "data"
SWEEP_FILE = DATA / "massive_dynamics_sweep.yaml"
MASSIVE_OUT = DATA / "massive_ratio_tiny.json"
MASSIVE_EVAL_SEQUENCES = 64  # sequences the ratio is averaged over (the paper: 10; seismo analyze: 16)


def _rows(run: Path) -> list[dict]:
    rows = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line of an interrupted run
            pass
    return rows


def _seismo() -> list[str]:
    return [sys.executable, "-m", "seismo.cli"]


def logits(sweep_dir: Path) -> Path:
    import yaml

    out = {"source": f"seismo sweep configs/studies/qk_layernorm.yaml --out {sweep_dir.name}",
           "metric": "attn_logit_max, layer 0, every probe row", "runs": {}}
    for run in sorted((sweep_dir / "runs").iterdir()):
        if not (run / "metrics.jsonl").is_file():
            continue
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        status = json.loads((run / "status.json").read_text())
        if status["status"] not in ("finished", "diverged"):
            print(f"{run.name}: {status['status']}, left out", file=sys.stderr)
            continue
        probes = [r for r in _rows(run) if r.get("kind") == "probe" and "attn_logit_max" in r]
        out["runs"][run.name] = {
            "qk_norm": cfg["model"]["qk_norm"], "lr": cfg["optimizer"]["lr"], "steps": cfg["run"]["steps"],
            "probe_every": cfg["run"]["probe_every"], "status": status["status"], "last_step": status["step"],
            "probe_rows": [[r["step"], float(r["attn_logit_max"][0])] for r in probes],
        }
    path = DATA / "qk_layernorm_logits.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    return path


def _shown(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def massive(sweep_dir: Path, eval_sequences: int = MASSIVE_EVAL_SEQUENCES,
            sweep_file: Path = SWEEP_FILE, out_path: Path = MASSIVE_OUT) -> Path:
    import pandas as pd

    if not (sweep_dir / "runs").is_dir():
        subprocess.run([*_seismo(), "sweep", str(sweep_file), "--out", str(sweep_dir)], check=True)
    analyze = ["--probes", "massive", "--eval-sequences", str(eval_sequences)]
    out = {"source": f"seismo sweep {_shown(sweep_file)}; seismo analyze RUN {' '.join(analyze)}",
           "metric": "ratio_seq_mean (massive table: top-1 / median |h| per sequence, mean over sequences)",
           "eval_sequences": eval_sequences, "runs": {}}
    for run in sorted((sweep_dir / "runs").iterdir()):
        status = json.loads((run / "status.json").read_text())["status"] if (run / "status.json").is_file() else "?"
        if status != "finished":  # a diverged or unfinished run is not a training curve to fit
            print(f"{run.name}: {status}, left out", file=sys.stderr)
            continue
        subprocess.run([*_seismo(), "analyze", str(run), *analyze], check=True)
        df = pd.read_csv(run / "analysis" / "massive.csv")
        df = df[(df["metric"] == "ratio_seq_mean") & df["head"].isna() & df["rank"].isna()]
        out["runs"][run.name] = {
            str(int(layer)): [[int(s), float(v)] for s, v in g.sort_values("step")[["step", "value"]].to_numpy()]
            for layer, g in df.groupby("layer")
        }
    out_path.write_text(json.dumps(out, indent=1) + "\n")
    return out_path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["logits", "massive"])
    p.add_argument("sweep_dir", type=Path)
    p.add_argument("--eval-sequences", type=int, default=MASSIVE_EVAL_SEQUENCES,
                   help=f"massive: sequences the ratio is averaged over (default {MASSIVE_EVAL_SEQUENCES})")
    p.add_argument("--sweep", type=Path, default=SWEEP_FILE,
                   help=f"massive: the sweep file trained if SWEEP_DIR/runs is missing (default {_shown(SWEEP_FILE)})")
    p.add_argument("--out", type=Path, default=MASSIVE_OUT,
                   help=f"massive: the JSON file written (default {_shown(MASSIVE_OUT)})")
    a = p.parse_args()
    if a.what == "massive" and not a.sweep.is_file():
        print(f"--sweep {a.sweep}: no such file", file=sys.stderr)
        sys.exit(2)
    if a.what == "massive" and not a.out.parent.is_dir():
        print(f"--out {a.out}: directory {a.out.parent} not found", file=sys.stderr)
        sys.exit(2)
    if a.what == "logits" and not (a.sweep_dir / "runs").is_dir():
        sys.exit(f"{a.sweep_dir}/runs not found: run `make demo` (or seismo sweep configs/studies/qk_layernorm.yaml)")
    if a.eval_sequences < 1:
        print(f"--eval-sequences must be at least 1, got {a.eval_sequences}", file=sys.stderr)
        sys.exit(2)
    print(logits(a.sweep_dir) if a.what == "logits" else massive(a.sweep_dir, a.eval_sequences, a.sweep, a.out))


if __name__ == "__main__":
    main()
