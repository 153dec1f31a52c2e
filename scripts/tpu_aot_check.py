#!/usr/bin/env python
"""Does this config compile and fit on a TPU slice? Answered on a CPU machine, no TPU needed.

    python scripts/tpu_aot_check.py configs/tiny.yaml --topology v5e:2x2
    python scripts/tpu_aot_check.py configs/tiny.yaml --topology v4-8 --topology v5litepod-16 \\
        --set model=gpt2_small --set data.batch_size=64 --mesh fsdp=4 --json aot.json

Compiles seismo's real train step (and the probe step when run.probe_every > 0) ahead of time
for the slice with the TPU compiler from libtpu, and prints per-device memory (arguments,
outputs, donated, temporaries, program), FLOPs, and a verdict: fits / tight / does not fit.
Needs libtpu in the environment: `pip install -e '.[tpu]'` (see TPU_SETUP.md). A GPT-2-small
step takes one to three minutes of one CPU core to compile; the tiny config seconds.

Exit status: 0 every topology fits, 1 some topology is tight or does not fit, 2 bad input or
no libtpu.
"""

from __future__ import annotations

import os

# The check needs no accelerator: keep JAX on the CPU (on a TPU VM this also leaves the
# chips to a training job that holds them).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

try:
    import seismo  # noqa: F401
except ImportError:  # a source checkout that was not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from seismo import config as config_lib  # noqa: E402
from seismo.train import aot  # noqa: E402


def _mesh(text: str) -> dict[str, int]:
    out = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key.strip() not in ("data", "fsdp", "tensor") or not value.strip().lstrip("-").isdigit():
            raise argparse.ArgumentTypeError(f"--mesh {text!r}: write e.g. data=2,fsdp=4 (axes data, fsdp, tensor)")
        out[key.strip()] = int(value)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config file, e.g. configs/tiny.yaml")
    p.add_argument("--topology", action="append", required=True, metavar="NAME",
                   help="TPU slice: generation:shape in chips (v5e:2x2, v4:2x2x1, v5p:2x2x2, v6e:4x4, "
                        "tpu7x:2x2x1) or a Cloud accelerator type (v5litepod-16, v4-8, v5p-32); repeatable")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set data.batch_size=64 (repeatable)")
    p.add_argument("--mesh", type=_mesh, default=None, metavar="AXIS=N,...",
                   help="mesh sizes, e.g. fsdp=4 or data=2,fsdp=2,tensor=1 (same as --set mesh.fsdp=4)")
    p.add_argument("--chip-config", default=None,
                   help="libtpu chip_config_name (default: what Cloud TPU VMs run, e.g. megacore on v4)")
    p.add_argument("--num-slices", type=int, default=1, help="multislice: number of slices (DCN)")
    probe = p.add_mutually_exclusive_group()
    probe.add_argument("--probe", dest="probes", action="store_true", default=None,
                       help="also compile the instrumented step even if run.probe_every is 0")
    probe.add_argument("--no-probe", dest="probes", action="store_false",
                       help="compile only the plain train step")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the reports as JSON")
    args = p.parse_args(argv)

    try:
        cfg = config_lib.load(args.config, args.overrides)
        for t in args.topology:
            aot.parse_topology(t)
    except (config_lib.ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not aot.libtpu_available():
        print("error: libtpu is not installed in this environment, so there is no TPU compiler to ask. "
              "Install it with `pip install -e '.[tpu]'` (best in its own virtualenv); see TPU_SETUP.md.",
              file=sys.stderr)
        return 2

    reports, status = [], 0
    for topology in args.topology:
        try:
            report = aot.compile_for_topology(cfg, topology, mesh=args.mesh, chip_config=args.chip_config,
                                              num_slices=args.num_slices, probes=args.probes)
        except (config_lib.ConfigError, ValueError) as e:
            print(f"{topology}: error: {e}", file=sys.stderr)
            status = 2
            continue
        print(aot.format_report(report), flush=True)
        reports.append(report)
        if not report["fits"] and status == 0:
            status = 1
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=1) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
