"""The `seismo` command: train, sweep, analyze, report, compile, config.

Every sub-command validates its config before anything compiles; errors are printed as one
plain sentence (no traceback) and exit with status 2. `seismo train` exits 0 when the run
finished or was preempted (SIGTERM/SIGINT: it saved and can be resumed), 3 when it diverged.
`seismo compile` exits 0 when every topology fits, 1 when one does not. `seismo config`
prints the resolved config and its parameter count, and trains nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2

EPILOG_TRAIN = """\
examples:
  seismo train configs/tiny.yaml
  seismo train configs/tiny.yaml --set optimizer.lr=3e-3 --set model.qk_norm=true
  seismo train configs/tiny.yaml --set model=proxy_256 --run-dir runs/proxy
  seismo train configs/tiny.yaml --import my_activations --set model.activation=softsign

The run directory holds config.yaml (resolved), metrics.jsonl (one JSON row per logged
step), status.json and checkpoints/. Starting again on the same directory resumes from
the newest checkpoint; a directory made by another config is refused (use another --run-dir,
or --restart to move the old run aside), except for a longer run.steps and changes of
cadence (log/eval/probe/checkpoint intervals) or mesh. Exit status: 0 finished or preempted
(resumable), 3 diverged (a non-finite loss; recorded in metrics.jsonl), 2 bad input or a
run directory that is in use or was made by another config.
"""


EPILOG_COMPILE = """\
examples:
  seismo compile configs/tiny.yaml --topology v5e:2x2
  seismo compile configs/tiny.yaml --set model=gpt2_small --set data.seq_len=1024 \\
      --set data.batch_size=32 --topology v5e:2x2 --topology v4-8 --json aot.json
  seismo compile configs/tiny.yaml --topology v5litepod-16 --mesh data=4,fsdp=4 --no-probe
  seismo compile configs/tiny.yaml --topology host

A step fits when it compiles and its buffers (arguments + outputs - donated + temporaries +
code) are within the memory a device may use; the verdict says by how much either way: "fits
with X% headroom" or "does not fit by Y GiB". Exit status: 0 every topology fits, 1 some
topology does not fit, 2 bad input (a config or topology name, no libtpu for a TPU slice).
See TPU_SETUP.md.
"""

EXIT_DOES_NOT_FIT = 1
HOST_TOPOLOGIES = ("host", "cpu")


def _mesh_sizes(text: str) -> dict[str, int]:
    out = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key.strip() not in ("data", "fsdp", "tensor") or not value.strip().lstrip("-").isdigit():
            raise argparse.ArgumentTypeError(f"--mesh {text!r}: write e.g. data=2,fsdp=4 (axes data, fsdp, tensor)")
        out[key.strip()] = int(value)
    return out


def _positive(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of at least 1")
    return int(text)


def _rate(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        x = -1.0
    if not 0 < x < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive FLOP/s per device, e.g. 1.97e14")
    return x


def _fraction(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        x = -1.0
    if not 0 < x <= 1:
        raise argparse.ArgumentTypeError(f"--mfu {text!r}: give a fraction in (0, 1], e.g. 0.4")
    return x


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    import seismo

    try:
        jax_version = version("jax")
    except PackageNotFoundError:
        jax_version = "not installed"
    return f"seismo {seismo.__version__} (jax {jax_version}, Python {sys.version.split()[0]})"


def _analysis_names() -> tuple[str, ...]:
    from seismo.instrument.tables import GROUPS  # the registry of checkpoint-analysis tables

    return GROUPS.ordered()


def add_import_flag(parser: argparse.ArgumentParser) -> None:
    """`--import MODULE` (repeatable) on a sub-command: the user's modules, imported before the
    config is read, so what they register (an activation, a data source) can be named in it.
    `main` imports them for every sub-command that has the flag; one line adds it to another."""
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import a module of your own first, for what it registers (an activation, "
                             "a data source): a dotted name on the Python path or in the current "
                             "directory, or a file.py (repeatable); run.plugins in a config does the same")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="seismo",
        description="Training-dynamics studies of transformer language models: train, sweep, analyse, report.",
    )
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train one model from a YAML config", epilog=EPILOG_TRAIN,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train one model. Keys are documented in the README (config table).")
    t.add_argument("config", help="YAML config file, e.g. configs/tiny.yaml")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optimizer.lr=3e-3 (repeatable)")
    t.add_argument("--run-dir", default=None,
                   help="where the run is written (default: runs/<config name>); an existing run resumes")
    t.add_argument("--restart", action="store_true",
                   help="start over: move an existing run directory aside (<dir>.aside-<time>, never deleted)")
    add_import_flag(t)

    s = sub.add_parser("sweep", help="run a grid of training runs from a sweep file",
                       description="Run every point of a sweep file's grid; finished points are skipped "
                                   "and unfinished ones resume. Writes results.csv and summary.csv.")
    s.add_argument("sweep", help="sweep YAML file, e.g. configs/studies/qk_layernorm.yaml")
    s.add_argument("--out", default=None, help="sweep directory (default: runs/<sweep name>)")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key for every point (repeatable)")
    s.add_argument("--execution", choices=["sequential", "parallel", "vmap"], default=None,
                   help="override the sweep file's execution mode")
    s.add_argument("--workers", type=int, default=None, help="processes for --execution parallel")
    add_import_flag(s)

    a = sub.add_parser("analyze", help="analyse every saved checkpoint of a run",
                       description="Heavy statistics over every checkpoint on the fixed evaluation set "
                                   "(massive activations, sparsity, kurtosis, sinks, spectra). Writes "
                                   "RUN_DIR/analysis/*.csv; re-running skips analysed checkpoints.")
    a.add_argument("run_dir", help="a run directory written by seismo train")
    a.add_argument("--probes", nargs="*", default=None, metavar="NAME",
                   help="analyses to run, of: " + ", ".join(_analysis_names()) + " (default: all)")
    a.add_argument("--eval-sequences", type=int, default=None, help="evaluation sequences (default: 16)")
    add_import_flag(a)

    r = sub.add_parser("report", help="figures and report.md for a run or a sweep",
                       description="Write figures/*.png and report.md for a run directory or a sweep directory.")
    r.add_argument("path", help="a run directory or a sweep directory")

    c = sub.add_parser("compile", help="does a config fit a TPU slice (or this machine)? compile ahead of time",
                       epilog=EPILOG_COMPILE, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Compile the real train step (and the probe step when run.probe_every > 0) "
                                   "ahead of time and report memory per device against HBM, FLOPs per step, the "
                                   "step time at a stated MFU and a verdict. TPU slices need libtpu "
                                   "(pip install -e '.[tpu]'), no TPU; --topology host needs nothing.")
    c.add_argument("config", help="YAML config file, e.g. configs/tiny.yaml")
    c.add_argument("--topology", action="append", required=True, metavar="NAME",
                   help="TPU slice: generation:shape in chips (v5e:2x2, v4:2x2x1, v5p:2x2x2, v6e:4x4, tpu7x:2x2x1) "
                        "or a Cloud accelerator type (v5litepod-16, v4-8, v5p-32); or 'host' (also 'cpu'): this "
                        "machine's own devices; repeatable")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set data.batch_size=64 (repeatable)")
    c.add_argument("--mesh", type=_mesh_sizes, default=None, metavar="AXIS=N,...",
                   help="mesh sizes, e.g. fsdp=4 or data=2,fsdp=2,tensor=1 (same as --set mesh.fsdp=4)")
    c.add_argument("--mfu", type=_fraction, default=None, metavar="FRACTION",
                   help="the model FLOPs utilisation at which to state the step time (default 0.4)")
    c.add_argument("--peak-flops", type=_rate, default=None, metavar="FLOP/S",
                   help="peak FLOP/s per device, instead of seismo's table (same as --set run.peak_flops=...)")
    c.add_argument("--chip-config", default=None,
                   help="libtpu chip_config_name (default: what Cloud TPU VMs run, e.g. megacore on v4)")
    c.add_argument("--num-slices", type=_positive, default=1, help="multislice: number of slices joined by DCN")
    probe = c.add_mutually_exclusive_group()
    probe.add_argument("--probe", dest="probes", action="store_true", default=None,
                       help="also compile the instrumented step even if run.probe_every is 0")
    probe.add_argument("--no-probe", dest="probes", action="store_false", help="compile only the plain train step")
    c.add_argument("--json", default=None, metavar="PATH", help="also write the reports as JSON")
    add_import_flag(c)

    k = sub.add_parser("config", help="print the resolved config and its parameter count, then exit",
                       description="Resolve a config as `seismo train` does (base files, presets, --set overrides, "
                                   "validation, registered names) and print it as the YAML that config.yaml would "
                                   "record (model.attention_impl: auto as it resolves on this machine), then the "
                                   "parameter count as a YAML comment. Nothing is trained or written.")
    k.add_argument("config", help="YAML config file, e.g. configs/tiny.yaml")
    k.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set model=proxy_256 (repeatable)")
    add_import_flag(k)
    return p


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    if words and words[0] in ("train", "sweep"):
        from seismo.train import stop  # standard library only: a stop from now on is remembered

        stop.install_early()
    args = _parser().parse_args(argv)
    from seismo import config as config_lib
    from seismo.config import ConfigError
    from seismo.data import DataError
    from seismo.registry import UnknownNameError
    from seismo.rundir import StorageUnavailable

    try:
        config_lib.import_plugins(getattr(args, "imports", ()), where="--import")  # before any config is read
        code = _dispatch(args)
        if args.command in ("train", "sweep"):
            _ignore_sigterm_from_here()
        return code
    except (ConfigError, DataError, UnknownNameError, StorageUnavailable, FileNotFoundError) as e:
        return _fail(args.command, str(e))
    except OSError as e:  # a read-only run directory, a full disk: nothing is lost, the same command resumes
        if e.strerror is None:  # seismo's own (seismo.train.loop.RunDirUnwritable) says what to do already
            return _fail(args.command, str(e))
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        return _fail(args.command, f"{e.strerror or e}{where}; if a folder is read-only or the disk is full, fix "
                                   "that (or choose another --run-dir) and run the same command again: it resumes")


def _ignore_sigterm_from_here() -> None:
    """Once a run has saved and returned, a SIGTERM until the process ends is ignored. In a
    multi-host job a stop reaches the hosts at different moments: a host may get its own
    SIGTERM after the agreed stop, while it exits. JAX's preemption notifier handles SIGTERM
    until then, but CPython resets to the default action, when it finalises, every signal
    that Python code ever set a handler for (our early handler, before JAX took SIGTERM over):
    a SIGTERM in that window would kill a process that saved and exits 0. An ignored signal
    is left as it is."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _fail(command: str, message: str) -> int:
    """One line on stderr, exit status 2."""
    print(f"seismo {command}: {' '.join(message.split())}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "train":
        from seismo import config as config_lib
        from seismo.train.loop import train

        cfg = config_lib.load(args.config, args.overrides)  # validated before anything compiles
        run_dir = args.run_dir or str(Path("runs") / Path(args.config).stem)  # a path or a gs:// URL, kept as given
        result = train(cfg, run_dir, restart=args.restart)
        print(f"{result.status} at step {result.step}: {run_dir}"
              + (f" (eval loss {result.final_eval_loss:.4f})" if result.final_eval_loss is not None else ""))
        return result.exit_code
    if args.command == "sweep":
        from seismo.sweep.runner import run_sweep

        out = run_sweep(args.sweep, out=args.out, overrides=args.overrides,
                        execution=args.execution, workers=args.workers, imports=args.imports)
        print(f"sweep written to {out}")
        return 0
    if args.command == "analyze":
        from seismo.analysis.checkpoints import analyze_run

        out = analyze_run(args.run_dir, probes=args.probes, eval_sequences=args.eval_sequences)
        print(f"analysis tables written to {out}")
        skipped = json.loads((out / "done.json").read_text()).get("skipped", {})
        if skipped:
            print(f"skipped {len(skipped)} unreadable checkpoint(s): " + "; ".join(f"step {k}: {v}" for k, v in skipped.items()))
        return 0
    if args.command == "report":
        from seismo.analysis import report

        out = report(args.path)
        print(f"report written to {out}")
        return 0
    if args.command == "compile":
        return _compile(args)
    if args.command == "config":
        return _config(args)
    raise AssertionError(args.command)


def _config(args: argparse.Namespace) -> int:
    """`seismo config`: the resolved config (as config.yaml records it) and the parameter count."""
    import yaml

    from seismo import config as config_lib
    from seismo import models
    from seismo.train import mesh as mesh_lib
    from seismo.train.engine import check_config

    cfg = config_lib.load(args.config, args.overrides)  # ConfigError: one line, exit 2
    check_config(cfg)  # registered names and the trackers' packages, as `seismo train` checks them
    _, layout = mesh_lib.build_mesh(cfg.mesh)  # the mesh on this machine's devices, as `seismo train` lays it out
    # what `auto` becomes here (attention kernel, mesh layout), as config.yaml records it
    cfg = models.resolve_attention(cfg.replace(mesh=layout.resolve(cfg.mesh)))
    print(yaml.safe_dump(config_lib.to_dict(cfg), sort_keys=False), end="")
    n, body = models.param_count(cfg.model), models.param_count(cfg.model, non_embedding=True)
    print(f"# parameters: {n:,} ({body:,} non-embedding: without the token embedding, learned positions and head)")
    return 0


def _compile(args: argparse.Namespace) -> int:
    """`seismo compile`: one report per topology; 0 all fit, 1 one does not, 2 bad input."""
    import jax

    from seismo import config as config_lib
    from seismo.train import aot

    tpu = [t for t in args.topology if t.lower() not in HOST_TOPOLOGIES]
    if tpu and len(tpu) == len(args.topology) and "JAX_PLATFORMS" not in os.environ:
        jax.config.update("jax_platforms", "cpu")  # a TPU slice needs no accelerator: leave the chips alone
    cfg = config_lib.load(args.config, args.overrides)  # ConfigError: one line, exit 2
    for t in tpu:
        try:
            aot.parse_topology(t)
        except ValueError as e:
            return _fail("compile", str(e))
    if tpu and not aot.libtpu_available():
        return _fail("compile", "libtpu is not installed in this environment, so there is no TPU compiler to ask. "
                                "Install it with `pip install -e '.[tpu]'` (best in its own virtualenv; see "
                                "TPU_SETUP.md), or use --topology host for this machine's own devices.")
    kw = {"mesh": args.mesh, "probes": args.probes, "peak_flops": args.peak_flops,
          "mfu": aot.DEFAULT_MFU if args.mfu is None else args.mfu}
    reports, status = [], 0
    for topology in args.topology:
        try:
            if topology.lower() in HOST_TOPOLOGIES:
                report = aot.compile_for_host(cfg, **kw)
            else:
                report = aot.compile_for_topology(cfg, topology, chip_config=args.chip_config,
                                                  num_slices=args.num_slices, **kw)
        except (config_lib.ConfigError, ValueError) as e:
            _fail("compile", f"{topology}: {e}")
            status = EXIT_BAD_INPUT
            continue
        print(aot.format_report(report), flush=True)
        reports.append(report)
        if not report["fits"] and status == 0:
            status = EXIT_DOES_NOT_FIT
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=1) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
