"""Run in a subprocess by test_gcs_rundir.py, with the environment pointing gcsfs and
tensorstore at a local GCS emulator:

    python gcs_driver.py preempt URL ARGS...   `seismo train ARGS --run-dir URL`, with SIGTERM sent
                                              to itself as the step-4 checkpoint is saved (as a
                                              preemption would: the loop saves and exits 0)
    python gcs_driver.py finish URL ARGS...    `seismo analyze URL ARGS`, then `seismo report URL`
    python gcs_driver.py sweep URL SWEEP       `seismo sweep SWEEP --out URL`, then `seismo report URL`

Each then prints a JSON summary of what the run directory holds, read back through seismo's
own readers (one process per phase: jax starts three times, not six).
"""

import json
import os
import signal
import sys


def preempt(url: str, args: list[str]) -> int:
    from seismo import cli
    from seismo.train import checkpoint as ckpt_lib

    real = ckpt_lib.Checkpointer.save

    def save(self, step, state, record=None):
        real(self, step, state, record)
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    ckpt_lib.Checkpointer.save = save
    code = cli.main(["train", *args, "--run-dir", url])
    return code or inspect(url)


def finish(url: str, args: list[str]) -> int:
    from seismo import cli

    return cli.main(["analyze", url, *args]) or cli.main(["report", url]) or inspect(url)


def sweep(url: str, args: list[str]) -> int:
    from seismo import cli, rundir
    from seismo.analysis import load_sweep

    code = cli.main(["sweep", args[0], "--out", url]) or cli.main(["report", url])
    if code:
        return code
    d = rundir.path(url)
    sw = load_sweep(url)
    out = {"files": sorted(p.name for p in d.iterdir()),
           "runs": {name: (run.status_file or {}).get("status") for name, run in sw.runs.items()},
           "results_rows": len(sw.results), "report": (d / "report.md").read_text()}
    print("INSPECT " + json.dumps(out))
    return 0


def inspect(url: str) -> int:
    from seismo import rundir
    from seismo.analysis import load_run
    from seismo.analysis.checkpoints import read_table

    d = rundir.path(url)
    run = load_run(url)
    aside = d / rundir.METRICS_ASIDE_FILE
    out = {
        "type": type(d).__name__,
        "files": sorted(p.name for p in d.iterdir()),
        "status": run.status_file,
        "losses": {int(r["step"]): r["loss"] for r in run.rows if rundir.row_kind(r) == "train"},
        "kinds": sorted({rundir.row_kind(r) for r in run.rows}),
        "checkpoints": sorted(p.name for p in (d / rundir.CHECKPOINTS_DIR).iterdir()),
        "analysis": sorted(p.name for p in (d / rundir.ANALYSIS_DIR).iterdir()) if (d / rundir.ANALYSIS_DIR).exists() else [],
        "massive_steps": sorted(set(read_table(url, "massive")["step"].astype(int))) if (d / rundir.ANALYSIS_DIR).exists() else [],
        "figures": sorted(p.name for p in (d / rundir.FIGURES_DIR).iterdir()) if (d / rundir.FIGURES_DIR).exists() else [],
        "report": (d / "report.md").read_text() if (d / "report.md").exists() else None,
        "aside": aside.read_text() if aside.exists() else None,
    }
    print("INSPECT " + json.dumps(out))
    return 0


if __name__ == "__main__":
    mode, url, *rest = sys.argv[1:]
    sys.exit({"preempt": preempt, "finish": finish, "sweep": sweep}[mode](url, rest))
