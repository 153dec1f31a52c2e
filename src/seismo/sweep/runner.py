"""`seismo sweep SWEEP.yaml`: run every point of a grid, then tabulate.

Each point is a normal run directory under `<sweep dir>/runs/<point name>/`. Points run one
after another (`sequential`), in separate processes (`parallel`, `workers` at a time), or
`vmap`ped: points that differ only in scalar hyperparameters train as one program
(seismo.train.loop.train_group, the same loop as a single run, with a points axis). An interrupted sweep started again skips finished (and diverged)
runs and resumes unfinished ones from their checkpoints. At the end, `results.csv` (one row
per run) and `summary.csv` (LR sensitivity per group, Wortsman et al. 2023, arXiv
2309.14322, section 2.2) are written to the sweep directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from seismo import rundir
from seismo.config import ConfigError, import_plugins
from seismo.config.sweepfile import (
    Point,
    SweepError,
    SweepSpec,
    expand,
    load_sweep_spec,
    run_dir,
    vmap_groups,
    write_spec,
)
from seismo.train.metrics import duration, read_status

DONE = ("finished", "diverged")


def is_done(path: Path) -> bool:
    status = read_status(path)
    return status is not None and status.get("status") in DONE


def run_sweep(path: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, overrides: Iterable[str] = (),
              execution: str | None = None, workers: int | None = None, imports: Sequence[str] = ()) -> Path:
    """Run (or resume) the sweep in `path`; returns the sweep directory. `imports` are the
    user's modules (`--import`): imported here first, and by every worker process."""
    import_plugins(imports, where="--import")  # before any point's config is read
    imports = [_portable(m) for m in imports]
    spec = load_sweep_spec(path, overrides, execution=execution, workers=workers)
    points = expand(spec)  # every point's config is validated here, before anything trains
    sweep_dir = rundir.path(out) if out is not None else Path("runs") / spec.name  # a path or a gs:// URL
    _check_points(points, sweep_dir, path)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_spec(spec, sweep_dir)
    todo = [p for p in points if not is_done(run_dir(sweep_dir, p))]
    print(f"sweep {spec.name}: {len(points)} points, {len(points) - len(todo)} already done, "
          f"{len(todo)} to run ({spec.execution}) -> {sweep_dir}", flush=True)
    for p in points:
        if p not in todo:
            print(f"    {p.name}: skipped ({(read_status(run_dir(sweep_dir, p)) or {}).get('status')} already)", flush=True)
    t0 = time.perf_counter()
    if spec.execution == "vmap":
        complete = _run_vmapped(todo, sweep_dir)
    elif spec.execution == "parallel":
        complete = _run_parallel(todo, sweep_dir, spec.workers or os.cpu_count() or 1, imports)
    else:
        complete = _run_sequential(todo, sweep_dir)
    if not complete:
        print(f"sweep {spec.name}: stopped after {time.perf_counter() - t0:.0f} s (preempted); "
              f"the same command resumes it", flush=True)
        return sweep_dir
    print(f"sweep {spec.name}: trained in {time.perf_counter() - t0:.0f} s", flush=True)
    write_tables(sweep_dir, spec)
    return sweep_dir


def _check_points(points: Sequence[Point], sweep_dir: Path, path: Any) -> None:
    """Before any point trains: every point's registered names, data (each distinct data
    config is built once), mesh against this machine's devices, and the config its run
    directory already records. The first problem is a SweepError naming the point."""
    import jax

    from seismo import data as data_lib
    from seismo.train import mesh as mesh_lib
    from seismo.train import ownership
    from seismo.train.engine import check_config

    built: set[str] = set()
    for p in points:
        try:
            check_config(p.config)
            key = repr((p.config.data, p.config.run.seed))
            if key not in built:
                data_lib.build(p.config.data, p.config.run.seed)
                built.add(key)
            mesh_lib.mesh_shape(p.config.mesh, jax.device_count())
            ownership.check_config_matches(run_dir(sweep_dir, p), p.config)
        except (ConfigError, data_lib.DataError) as e:
            raise SweepError(f"{path}: sweep point {p.name}: {e}") from None


def write_tables(sweep_dir: Path, spec: SweepSpec) -> None:
    """results.csv (one row per run) and summary.csv (LR sensitivity per group)."""
    from seismo.analysis import collect_results

    collect_results(sweep_dir, spec, write=True)


class SweepProgress:
    """The sweep's own progress lines: each point (or vmapped group) as it starts and ends,
    and after each, how many points are done and an ETA: the wall time per point so far times
    the points left (for parallel workers, the rate at which points have been finishing)."""

    def __init__(self, total: int):
        self.total, self.done, self.t0 = total, 0, time.perf_counter()

    def finished(self, n: int = 1) -> str:
        """Count `n` more points done; the line that says where the sweep stands."""
        self.done += n
        elapsed = time.perf_counter() - self.t0
        left = self.total - self.done
        eta = f", ETA {duration(elapsed / self.done * left)}" if self.done and left else ""
        return f"{self.done}/{self.total} points done in {duration(elapsed)}{eta}"


def _report(results: Sequence[Any], progress: SweepProgress | None = None) -> bool:
    """Print each run's outcome (and where the sweep stands); True when one was preempted (the
    sweep then stops: started again, it resumes there)."""
    for r in results:
        eval_part = f", eval loss {r.final_eval_loss:.4f}" if r.final_eval_loss is not None else ""
        print(f"    {r.run_dir.name}: {r.status} at step {r.step}{eval_part}", flush=True)
    if progress is not None:
        print(f"    sweep: {progress.finished(sum(r.status != 'preempted' for r in results))}", flush=True)
    return any(r.status == "preempted" for r in results)


def _run_sequential(points: Sequence[Point], sweep_dir: Path) -> bool:
    from seismo.train.loop import train

    progress = SweepProgress(len(points))
    for i, p in enumerate(points):
        print(f"[{i + 1}/{len(points)}] {p.name}: started", flush=True)
        if _report([train(p.config, run_dir(sweep_dir, p))], progress):
            return False
    return True


def _run_vmapped(points: Sequence[Point], sweep_dir: Path) -> bool:
    """Each group of vmappable points through the training loop at once (one group of one is
    a plain run)."""
    from seismo.train.loop import train, train_group

    groups = vmap_groups(points)
    progress = SweepProgress(len(points))
    for i, group in enumerate(groups):
        names = ", ".join(p.name for p in group)
        print(f"[group {i + 1}/{len(groups)}] {len(group)} points vmapped: {names}: started", flush=True)
        dirs = [run_dir(sweep_dir, p) for p in group]
        if len(group) == 1:
            results = [train(group[0].config, dirs[0])]
        else:
            results = train_group([p.config for p in group], dirs)
        if _report(results, progress):
            return False
    return True


def _portable(module: str) -> str:
    """A `--import` as a worker process finds it: a .py file by its absolute path."""
    return str(Path(module).expanduser().resolve()) if module.endswith(".py") or "/" in module else module


def _import_root(module: str) -> str | None:
    """The folder on the Python path that an imported module name was found in (None for a file)."""
    found = sys.modules.get(module)
    if module.endswith(".py") or found is None or not getattr(found, "__file__", None):
        return None
    path = Path(found.__file__).resolve()
    depth = module.count(".") + (1 if path.name == "__init__.py" else 0)
    return str(path.parents[depth])


def _run_parallel(points: Sequence[Point], sweep_dir: Path, workers: int, imports: Sequence[str] = ()) -> bool:
    """Each point in its own `seismo train` process; at most `workers` at once. Each process
    runs single-threaded XLA when there are no more cores than workers, so they do not fight.
    Each imports the sweep's `--import` modules (and its config's run.plugins) before it reads
    its config; the vmapped and sequential modes train in this process, which has them."""
    from seismo import config as config_lib

    queue = list(points)
    running: list[tuple[Point, subprocess.Popen]] = []
    env = dict(os.environ)
    roots = [r for r in map(_import_root, imports) if r is not None]
    if roots:  # a module this process found on a path it was given (a notebook's sys.path) is found there too
        env["PYTHONPATH"] = os.pathsep.join([*roots, *filter(None, [env.get("PYTHONPATH")])])
    if (os.cpu_count() or 1) <= workers:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
    failed = []
    progress, n_started = SweepProgress(len(points)), 0
    while queue or running:
        while queue and len(running) < workers:
            p = queue.pop(0)
            d = run_dir(sweep_dir, p)
            d.mkdir(parents=True, exist_ok=True)
            config_lib.dump(p.config, d / rundir.CONFIG_FILE)
            # a process writes its output to a local file: beside the run, or for a run on a
            # store (gs://), in the temporary folder of this machine
            log_path = d / "train.log" if not rundir.is_remote(d) else Path(tempfile.gettempdir()) / f"seismo-{p.name}.train.log"
            log = log_path.open("a")
            cmd = [sys.executable, "-m", "seismo.cli", "train", str(d / rundir.CONFIG_FILE), "--run-dir", str(d)]
            cmd += [arg for m in imports for arg in ("--import", m)]
            running.append((p, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)))
            n_started += 1
            print(f"[{n_started}/{len(points)}] {p.name}: started (log: {log_path})", flush=True)
        time.sleep(0.5)
        for p, proc in list(running):
            if proc.poll() is not None:
                running.remove((p, proc))
                status = (read_status(run_dir(sweep_dir, p)) or {}).get("status", "failed")
                print(f"    {p.name}: {status} (exit {proc.returncode}); sweep: {progress.finished()}", flush=True)
                if proc.returncode not in (0, 3):
                    failed.append(p.name)
    if failed:
        print(f"{len(failed)} runs failed; see their train.log: {', '.join(failed)}", file=sys.stderr)
    return True
