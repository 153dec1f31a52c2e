"""Ahead-of-time compilation of the real train step for a TPU slice, from a machine without one.

    report = compile_for_topology(cfg, "v5e:2x2")      # needs `pip install -e '.[tpu]'` (libtpu)
    print(format_report(report))

libtpu can describe a TPU slice it is not running on (`jax.experimental.topologies.
get_topology_desc`): it hands out compile-only devices with the slice's chip kind, coordinates
and hosts. The train step is the one training runs: `seismo.train.engine.build` makes it for
both (same model, optimizer, logical-axis shardings from `seismo.train.mesh`, donated state);
here it is traced with abstract arguments (`jax.ShapeDtypeStruct` with shardings: nothing is
allocated) and compiled by the TPU compiler for those devices. What comes back is what the compiler knows about one device:

* memory (`Compiled.memory_analysis()`): bytes of arguments, outputs, aliased (donated)
  buffers, temporaries and program; their sum minus the aliases bounds the HBM a device needs.
  A program that cannot fit is refused by the TPU compiler itself ("RESOURCE_EXHAUSTED: Ran out
  of memory on HBM ...") and the report says so, with the compiler's numbers (`verdict`).
* FLOPs and bytes accessed per device, by XLA's cost analysis of the compiled step with every
  loop iteration counted (`cost_for_compiled`): XLA's own `Compiled.cost_analysis()` counts the
  body of a loop once, so a scanned 12-layer step reads as about one layer there (kept as
  `flops_once`). The PaLM count `model_flops_per_step` is the model's arithmetic alone.

The same functions compile for any list of devices (`compile_for_devices`), e.g. the CPU in
tests; only `topology_devices` needs libtpu. HBM sizes and peak rates are Google Cloud's
published per-chip figures (cloud.google.com/tpu/docs/system-architecture-tpu-vm and the
per-generation pages); the compiler reserves a little of the HBM (v5e: 15.75 of 16 GiB usable).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from seismo import config as config_lib
from seismo import models
from seismo.config import Config
from seismo.train import engine as engine_lib
from seismo.train import flops as flops_lib
from seismo.train import mesh as mesh_lib
from seismo.train.flops import model_flops_per_step  # noqa: F401 - the PaLM count, also seismo.train.aot's

GiB = 1024**3


class LibtpuUnavailable(RuntimeError):
    """libtpu (the TPU compiler) is not installed in this Python environment."""


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation: what libtpu calls it, and its published per-chip figures."""

    generation: str  # the topology prefix libtpu accepts: v5e, v4, ...
    device_kind: str  # jax Device.device_kind
    hbm_bytes: int  # HBM per chip
    peak_bf16_flops: float  # dense bf16 FLOP/s per chip
    cores_per_chip: int  # TensorCores per chip
    accelerator_counts_cores: bool | None  # Cloud type 'v4-8' counts cores (True), chips (False), n/a (None)
    dims: int  # 2-D or 3-D torus
    chip_config: str | None  # chip_config_name that Cloud TPU VMs run with (jax's aot_test)


def _bf16(device_kind: str) -> float:
    peak = flops_lib.chip_peak(device_kind)
    assert peak is not None, device_kind
    return peak.bfloat16


# Figures per chip from Google Cloud's TPU system-architecture pages (peaks: seismo.train.flops).
CHIPS: dict[str, Chip] = {c.generation: c for c in [
    Chip("v2", "TPU v2", 16 * GiB, _bf16("TPU v2"), 2, True, 2, None),
    Chip("v3", "TPU v3", 32 * GiB, _bf16("TPU v3"), 2, True, 2, None),
    Chip("v4", "TPU v4", 32 * GiB, _bf16("TPU v4"), 2, True, 3, "megacore"),
    Chip("v5e", "TPU v5 lite", 16 * GiB, _bf16("TPU v5 lite"), 1, False, 2, None),
    Chip("v5p", "TPU v5", 96 * GiB, _bf16("TPU v5"), 2, True, 3, "megachip_tccontrol"),  # docs: 95 GB; 95.74 GiB usable
    Chip("v6e", "TPU v6 lite", 32 * GiB, _bf16("TPU v6 lite"), 1, False, 2, "megachip_tccontrol"),
    Chip("tpu7x", "TPU7x", 192 * GiB, _bf16("TPU7x"), 2, None, 3, None),
]}
# Other spellings of a generation (Cloud accelerator types, libtpu's own names).
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v5": "v5p", "v6": "v6e", "v7x": "tpu7x", "tpu7": "tpu7x"}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A parsed slice name: `topology_name` is what libtpu is given ('v5e:2x2')."""

    name: str  # as the user wrote it
    chip: Chip
    shape: tuple[int, ...]  # chips along each torus axis

    @property
    def topology_name(self) -> str:
        return f"{self.chip.generation}:{'x'.join(map(str, self.shape))}"

    @property
    def n_chips(self) -> int:
        return math.prod(self.shape)


def chip_for_device_kind(device_kind: str) -> Chip | None:
    for chip in CHIPS.values():
        if chip.device_kind == device_kind:
            return chip
    return None


def _generation(text: str) -> Chip:
    key = ALIASES.get(text.lower(), text.lower())
    if key not in CHIPS:
        raise ValueError(f"unknown TPU generation {text!r}; known: {', '.join(CHIPS)} "
                         f"(also {', '.join(ALIASES)})")
    return CHIPS[key]


def default_shape(n_chips: int, dims: int) -> tuple[int, ...]:
    """The slice shape Cloud TPU gives a chip count: 2-D 2x4, 4x4, 4x8, ... (v5e, v6e, v2, v3);
    3-D 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, ... (v4, v5p), doubling the last smallest axis."""
    if n_chips < 1 or n_chips & (n_chips - 1):
        raise ValueError(f"{n_chips} chips is not a power of two; give the shape, e.g. v4:2x2x3")
    if dims == 2:
        k = n_chips.bit_length() - 1
        return (2 ** (k // 2), 2 ** (k - k // 2))
    if n_chips < 4:
        raise ValueError(f"3-D slices start at 4 chips (2x2x1), got {n_chips}")
    shape = [2, 2, 1]
    while math.prod(shape) < n_chips:
        low = min(shape)
        i = max(j for j, s in enumerate(shape) if s == low)
        shape[i] *= 2
    return tuple(shape)


def parse_topology(name: str) -> Topology:
    """'v5e:2x2', 'v4:2x2x1' (generation:shape in chips), or a Cloud accelerator type
    'v5litepod-16', 'v4-8', 'v5p-32' (cores for v2/v3/v4/v5p, chips for v5e/v6e/tpu7x)."""
    text = name.strip()
    m = re.fullmatch(r"([A-Za-z0-9]+)[:=]([0-9]+(?:x[0-9]+)*)", text)
    if m:
        chip = _generation(m.group(1))
        shape = tuple(int(s) for s in m.group(2).split("x"))
        if len(shape) == 3 and chip.dims == 2 and shape[2] == 1:
            shape = shape[:2]
        elif len(shape) == 2 and chip.dims == 3:
            shape = (*shape, 1)
        if len(shape) != chip.dims or 0 in shape:
            raise ValueError(f"topology {name!r}: {chip.generation} slices are {chip.dims}-D, "
                             f"e.g. {chip.generation}:{'x'.join(['2'] * chip.dims)}")
        return Topology(text, chip, shape)
    m = re.fullmatch(r"([A-Za-z0-9]+)-([0-9]+)", text)
    if m:
        chip = _generation(m.group(1))
        count = int(m.group(2))
        if chip.accelerator_counts_cores is None:
            raise ValueError(f"{name!r}: give {chip.generation} slices by shape, e.g. {chip.generation}:2x2x1")
        if chip.accelerator_counts_cores:
            if count % chip.cores_per_chip:
                raise ValueError(f"{name!r}: {chip.generation}-N counts TensorCores ({chip.cores_per_chip} per chip)")
            count //= chip.cores_per_chip
        return Topology(text, chip, default_shape(count, chip.dims))
    raise ValueError(f"topology {name!r} not understood: write generation:shape (v5e:2x2, v4:2x2x1) "
                     f"or a Cloud accelerator type (v5litepod-16, v4-8)")


def libtpu_available() -> bool:
    """Whether the TPU compiler can be loaded (libtpu installed, e.g. by `pip install jax[tpu]`)."""
    return importlib.util.find_spec("libtpu") is not None


def topology_devices(topology: str | Topology, *, chip_config: str | None = None,
                     num_slices: int = 1) -> list[jax.Device]:
    """Compile-only devices of a TPU slice (libtpu needed, no TPU). `chip_config` defaults to
    what Cloud TPU VMs run (v4: 'megacore', one device per chip)."""
    topo = parse_topology(topology) if isinstance(topology, str) else topology
    if not libtpu_available():
        raise LibtpuUnavailable(
            "compiling for a TPU topology needs libtpu, which is not installed here; install it "
            "with `pip install -e '.[tpu]'` (jax[tpu]) in a separate environment, see TPU_SETUP.md")
    from jax.experimental import topologies

    # libtpu takes a lock file (/tmp/libtpu_lockfile) so that two processes do not drive the same
    # chips; compile-only devices drive none, so let several checks (parallel tests, a check on a
    # TPU VM beside a running job) load it at once. Read when libtpu loads, i.e. on first use.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    kwargs: dict[str, Any] = {}
    if chip_config or topo.chip.chip_config:
        kwargs["chip_config_name"] = chip_config or topo.chip.chip_config
    if num_slices > 1:
        kwargs["num_slices"] = num_slices
    return list(topologies.get_topology_desc(topology_name=topo.topology_name, platform="tpu", **kwargs).devices)


# --------------------------------------------------------------------------- compile and measure


MEMORY_FIELDS = {  # report key -> CompiledMemoryStats attribute
    "argument_bytes": "argument_size_in_bytes",
    "output_bytes": "output_size_in_bytes",
    "alias_bytes": "alias_size_in_bytes",
    "temp_bytes": "temp_size_in_bytes",
    "code_bytes": "generated_code_size_in_bytes",
}
_OOM = re.compile(r"memory required for ([^()]*?) \(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)")
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def memory_report(stats: Any) -> dict[str, int]:
    """Per-device bytes from `Compiled.memory_analysis()`; `peak_bytes` = arguments + outputs
    - aliased (donated state is reused for the new state) + temporaries + program."""
    out = {key: int(getattr(stats, attr, 0) or 0) for key, attr in MEMORY_FIELDS.items()}
    out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                         + out["temp_bytes"] + out["code_bytes"])
    return out


def cost_report(cost: Any) -> dict[str, float | None]:
    """FLOPs and bytes accessed per device from `Compiled.cost_analysis()` (a dict, or a list
    with one dict in older jax)."""
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    cost = cost or {}
    get = lambda k: float(cost[k]) if k in cost and cost[k] is not None else None
    return {"flops": get("flops"), "bytes_accessed": get("bytes accessed")}


# --------------------------------------------------------------------------- loops counted in full
#
# XLA's cost analysis walks a compiled module once: the body of a while loop (the layer scan
# of `model.scan_layers`, its transpose in the backward pass, the microbatch scan of
# `optimizer.grad_accum_steps`) is counted once, whatever its trip count (a 12-layer scanned
# step reads as about one layer's FLOPs). `loop_cost` counts every iteration: it reads the
# optimized module's text, takes each while loop's trip count (XLA records it as
# `known_trip_count`), asks the same cost analysis for each loop body alone (the module
# re-entered at the body), and adds (trips - 1) more of it, nested loops multiplied out. This
# is the cost model's own count of the program that runs, not an estimate of another one.

_COMPUTATION = re.compile(r"^(ENTRY )?(%[^\s(]+) ")
_CALLED = re.compile(r"\b(?:calls|to_apply|branch_computations)=\{?(%[^\s,}]+(?:, %[^\s,}]+)*)\}?")
_WHILE = re.compile(r"\swhile\(.*\bbody=(%[^\s,]+)")
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CONDITION = re.compile(r"\bcondition=(%[^\s,]+)")
_OPERAND = re.compile(r"\swhile\((%[^\s,)]+)\)")
_DEF = re.compile(r"^\s*(?:ROOT )?(%\S+) = .*? ([\w-]+)\((.*?)\)(?:, (.*))?$")
_METADATA_ID = re.compile(r",? ?stack_frame_id=\d+")


@dataclasses.dataclass
class _Hlo:
    """An HLO module's text cut into computations: header line, {name: lines}, the entry."""

    header: str
    computations: dict[str, list[str]]
    entry: str

    @classmethod
    def parse(cls, text: str) -> _Hlo:
        lines = _METADATA_ID.sub("", text).splitlines()
        comps: dict[str, list[str]] = {}
        current, entry = None, ""
        for line in lines[1:]:
            m = _COMPUTATION.match(line) if current is None else None
            if m and line.rstrip().endswith("{"):
                current = m.group(2)
                comps[current] = [line[len("ENTRY "):] if m.group(1) else line]
                entry = current if m.group(1) else entry
            elif current is not None:
                comps[current].append(line)
                if line.rstrip() == "}":
                    current = None
        return cls(lines[0].split(",")[0], comps, entry)

    def module_at(self, root: str) -> str:
        """The module's text with `root` as its entry computation."""
        parts = [self.header, ""]
        for name, lines in self.computations.items():
            parts += ([f"ENTRY {lines[0]}"] if name == root else [lines[0]]) + lines[1:] + [""]
        return "\n".join(parts)

    def loops(self, comp: str) -> list[tuple[str, int | None]]:
        """(body, trip count or None) of the while loops `comp` runs itself or through the
        computations it calls (not those inside another loop's body)."""
        out, seen, todo = [], set(), [comp]
        while todo:
            name = todo.pop()
            if name in seen or name not in self.computations:
                continue
            seen.add(name)
            for line in self.computations[name][1:]:
                w = _WHILE.search(line)
                if w:
                    out.append((w.group(1), self.trip_count(name, line)))
                    continue
                for group in _CALLED.findall(line):
                    todo += [c.strip() for c in group.split(",")]
        return out


    def _defs(self, comp: str) -> dict[str, tuple[str, list[str], str]]:
        """{instruction: (opcode, operands, attributes)} of a computation."""
        out = {}
        for line in self.computations[comp][1:]:
            m = _DEF.match(line)
            if m:
                out[m.group(1)] = (m.group(2), [a.strip() for a in m.group(3).split(",")], m.group(4) or "")
        return out

    def _constant(self, comp: str, name: str) -> int | None:
        defs = self._defs(comp)
        while name in defs and defs[name][0] == "copy":
            name = defs[name][1][0]
        if name in defs and defs[name][0] == "constant":
            try:
                return int(defs[name][1][0])
            except ValueError:
                return None
        return None

    def trip_count(self, comp: str, line: str) -> int | None:
        """The trip count of the while loop at `line` of `comp`: XLA's `known_trip_count` (the
        CPU and GPU compilers record it), or read off a loop of the shape JAX's scans and
        fori_loops lower to (the TPU compiler records none): the condition is `i < N` on
        tuple element k, with N and the initial value of element k constants; i steps by 1."""
        known = _TRIPS.search(line)
        if known:
            return int(known.group(1))
        cond, operand = _CONDITION.search(line), _OPERAND.search(line)
        if not cond or not operand or cond.group(1) not in self.computations:
            return None
        cdefs = self._defs(cond.group(1))
        root = next((ln for ln in self.computations[cond.group(1)] if ln.lstrip().startswith("ROOT ")), "")
        m = _DEF.match(root)
        if not m or m.group(2) != "compare" or "direction=LT" not in (m.group(4) or ""):
            return None
        lhs, rhs = m.group(3).split(", ")[:2]
        if cdefs.get(lhs, ("",))[0] != "get-tuple-element":
            return None
        index = re.search(r"index=(\d+)", cdefs[lhs][2])
        bound = self._constant(cond.group(1), rhs)
        tuple_def = self._defs(comp).get(operand.group(1))
        if index is None or bound is None or tuple_def is None or tuple_def[0] != "tuple":
            return None
        k = int(index.group(1))
        start = self._constant(comp, tuple_def[1][k]) if k < len(tuple_def[1]) else None
        return None if start is None else max(bound - start, 0)


COST_KEYS = {"flops": "flops", "bytes_accessed": "bytes accessed"}


def loop_cost(hlo_text: str, client: Any = None) -> dict[str, Any]:
    """Cost of a compiled module with every loop iteration counted (see above). Returns
    `flops` and `bytes_accessed` counted in full, the same counted once (`*_once`, what
    `Compiled.cost_analysis()` says), `loops` [(trip count, body flops)] of the outermost
    level, and `unknown_trips` (loops whose trip count XLA does not know: counted once).
    `client`: whose cost model to use (default: the CPU client); cost_for_compiled scales
    it to the compiling backend's own count."""
    from jax._src.lib import _jax
    from jaxlib import _hlo

    client = client or jax.local_devices(backend="cpu")[0].client
    hlo = _Hlo.parse(hlo_text)
    memo: dict[str, dict[str, float]] = {}
    unknown: list[str] = []

    def once(comp: str) -> dict[str, float]:
        if comp not in memo:
            ca = _jax.hlo_module_cost_analysis(client, _hlo.hlo_module_from_text(hlo.module_at(comp)))
            memo[comp] = {k: float(ca.get(v, 0.0)) for k, v in COST_KEYS.items()}
        return memo[comp]

    def full(comp: str) -> dict[str, float]:
        total = dict(once(comp))
        for body, trips in hlo.loops(comp):
            if trips is None:
                unknown.append(body)
                continue
            inner, single = full(body), once(body)
            for k in total:
                total[k] += trips * inner[k] - single[k]
        return total

    counted = full(hlo.entry)
    base = once(hlo.entry)
    return {**counted, **{f"{k}_once": v for k, v in base.items()},
            "loops": [(trips, once(body)["flops"]) for body, trips in hlo.loops(hlo.entry)],
            "unknown_trips": len(unknown)}


def cost_for_compiled(compiled: Any) -> dict[str, Any]:
    """`cost_report` of a compiled step with every loop iteration counted: the backend's own
    FLOPs and bytes (`Compiled.cost_analysis()`, loop bodies once, kept as `flops_once` and
    `bytes_accessed_once`) times the ratio of the full count to the single count of the same
    module (`loop_cost`). On a loop-free module the ratio is 1; on CPU the product is
    `loop_cost` itself. When the module cannot be re-read, the single count is returned with
    `loops_counted` False."""
    out: dict[str, Any] = cost_report(compiled.cost_analysis())
    once = dict(out)
    try:
        full = loop_cost(compiled.as_text())
    except Exception as e:  # noqa: BLE001 - a text the parser does not take: keep XLA's own count
        return {**out, **{f"{k}_once": v for k, v in once.items()}, "loops_counted": False,
                "loops_error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
    for k in COST_KEYS:
        if out[k] is not None and full[f"{k}_once"] > 0:
            out[k] = out[k] * full[k] / full[f"{k}_once"]
    return {**out, **{f"{k}_once": v for k, v in once.items()}, "loops_counted": True,
            "loop_trips": [t for t, _ in full["loops"]], "unknown_trips": full["unknown_trips"]}


def parse_oom(message: str) -> dict[str, Any] | None:
    """The numbers of a TPU compiler out-of-HBM error, or None if `message` is another error."""
    m = _OOM.search(message)
    if "RESOURCE_EXHAUSTED" not in message and m is None:
        return None
    out: dict[str, Any] = {"oom": True}
    if m:
        out["required_bytes"] = int(float(m.group(2)) * _UNITS[m.group(3)])
        out["available_bytes"] = int(float(m.group(4)) * _UNITS[m.group(5)])
        out["required_for"] = m.group(1).strip()
    return out


def compile_one(fn: Any, args: Sequence[Any]) -> dict[str, Any]:
    """Lower and compile `fn(*args)`; memory and cost per device, or the compiler's refusal."""
    t0 = time.perf_counter()
    lowered = fn.lower(*args)
    try:
        compiled = lowered.compile()
    except Exception as e:  # XlaRuntimeError / JaxRuntimeError
        msg = str(e)
        oom = parse_oom(msg)
        if oom is None:
            raise
        return {"compiled": False, "error": msg.splitlines()[0][:500], **oom,
                "compile_s": time.perf_counter() - t0}
    out: dict[str, Any] = {"compiled": True, "compile_s": time.perf_counter() - t0}
    out.update(memory_report(compiled.memory_analysis()))
    out.update(cost_for_compiled(compiled))
    return out


LOOP_NOTE = ("XLA's cost analysis counts the body of a loop once; here some loop's trip count is unknown "
             "(or the compiled module could not be re-read), so the compiled FLOPs count its body once; "
             "model_flops_per_step is the full count")


def verdict(step: Mapping[str, Any], hbm_bytes: int | None) -> str:
    """'fits' when the step compiled and `peak_bytes` (arguments + outputs - donated +
    temporaries + code) is within `hbm_bytes`; 'does not fit' when the compiler ran out of
    memory, or when it accepted the program but those buffers add up to more than
    `hbm_bytes` (counted as not fitting: the sum is the figure the report can stand behind).
    With no memory limit known, compiling is fitting."""
    if not step.get("compiled"):
        return "does not fit"
    if hbm_bytes and step["peak_bytes"] > hbm_bytes:
        return "does not fit"
    return "fits"


def _judge(rep: dict[str, Any], hbm_bytes: int | None) -> None:
    """`verdict` and the margin of one step: `headroom_bytes` (HBM left, negative when over)
    and `hbm_fraction` for a compiled step; `over_bytes` when it does not fit."""
    if rep.get("compiled") and hbm_bytes:
        rep["hbm_fraction"] = rep["peak_bytes"] / hbm_bytes
        rep["headroom_bytes"] = hbm_bytes - rep["peak_bytes"]
    rep["verdict"] = verdict(rep, hbm_bytes)
    if rep["verdict"] == "does not fit":
        if rep.get("compiled"):
            rep["over_bytes"] = rep["peak_bytes"] - hbm_bytes
        elif rep.get("required_bytes") is not None and rep.get("available_bytes") is not None:
            rep["over_bytes"] = rep["required_bytes"] - rep["available_bytes"]


def overall_verdict(report: Mapping[str, Any]) -> str:
    """One sentence: 'fits with X% headroom (...)' or 'does not fit by Y GiB (...)', from the
    step with the least room."""
    hbm = report.get("hbm_bytes_per_device")
    steps = report["steps"]
    bad = {n: r for n, r in steps.items() if r["verdict"] != "fits"}
    if bad:
        name, worst = max(bad.items(), key=lambda kv: kv[1].get("over_bytes") or 0)
        over = worst.get("over_bytes")
        if over is None:
            return f"does not fit (the {name} step: the compiler ran out of memory: {worst.get('error', '?')})"
        how = ("the compiler ran out of memory" if not worst.get("compiled") else
               "the compiler accepted it, but its buffers add up to more than the usable memory")
        return f"does not fit by {_bytes(over)} per device (the {name} step; {how})"
    if not hbm:
        return "fits (compiled; no memory limit known for these devices)"
    name, tightest = min(steps.items(), key=lambda kv: kv[1]["headroom_bytes"])
    share = math.floor(1000 * tightest["headroom_bytes"] / hbm) / 10  # rounded down: 99.96% is not 100%
    return (f"fits with {share:.1f}% headroom ({_bytes(tightest['headroom_bytes'])} "
            f"of {_bytes(hbm)} per device free in the {name} step)")


DEFAULT_MFU = 0.4  # the utilisation at which `seismo compile` states a step time


def compile_for_devices(cfg: Config, devices: Sequence[jax.Device], *, hbm_bytes_per_device: int | None = None,
                        peak_flops_per_device: float | None = None, probes: bool | None = None,
                        mfu: float = DEFAULT_MFU) -> dict[str, Any]:
    """Compile the train step (and the probe step) of `cfg` for `devices`; a report dict
    (see `compile_for_topology`). Works for any platform; `hbm_bytes_per_device` is the
    memory limit the verdicts use, `peak_flops_per_device` the rate the step times use."""
    mesh, layout = mesh_lib.build_mesh(cfg.mesh, devices)
    engine = engine_lib.build(cfg, mesh, probes=probes)
    steps = {name: compile_one(fn, args) for name, (fn, args) in engine.lowerable().items()}
    for rep in steps.values():
        _judge(rep, hbm_bytes_per_device)
    model_flops = flops_lib.model_flops_per_step(cfg, engine.params_shape)
    d0 = devices[0]
    peak_all = peak_flops_per_device * len(devices) if peak_flops_per_device else None
    report = {
        "platform": d0.platform,
        "device_kind": d0.device_kind,
        "n_devices": len(devices),
        "n_hosts": len({d.process_index for d in devices}),
        "mesh": dict(mesh.shape),
        "mesh_layout": layout.layout,
        "mesh_dcn": list(layout.dcn),
        "mesh_note": layout.note,
        "hbm_bytes_per_device": hbm_bytes_per_device,
        "params": models.param_count(engine.params_shape),
        "global_batch": cfg.data.batch_size,
        "seq_len": cfg.data.seq_len,
        "tokens_per_step": cfg.data.batch_size * cfg.data.seq_len,
        "model_flops_per_step": model_flops,
        "peak_flops_per_device": peak_flops_per_device,
        # perfect split over the devices at the peak rate: a lower bound on the step time
        "step_s_at_peak": model_flops / peak_all if peak_all else None,
        "mfu_assumed": mfu,
        "step_s_at_mfu": model_flops / (peak_all * mfu) if peak_all else None,
        "tokens_per_s_at_mfu": cfg.data.batch_size * cfg.data.seq_len * peak_all * mfu / model_flops if peak_all else None,
        "flops_note": LOOP_NOTE if any(r.get("compiled") and (not r.get("loops_counted") or r.get("unknown_trips"))
                                       for r in steps.values()) else None,
        "steps": steps,
        "fits": all(r["verdict"] == "fits" for r in steps.values()),
    }
    report["verdict"] = overall_verdict(report)
    return report


def host_memory_bytes(device: jax.Device, n_local: int) -> int | None:
    """The memory one local device may use: its allocator's limit (GPUs, TPUs), or on a CPU the
    machine's physical memory shared by its `n_local` devices; None when neither is known."""
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - some backends do not implement it
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(n_local, 1)
        except (ValueError, OSError, AttributeError):
            return None
    return None


def compile_for_host(cfg: Config, *, mesh: Mapping[str, int] | None = None, probes: bool | None = None,
                     peak_flops: float | None = None, mfu: float = DEFAULT_MFU) -> dict[str, Any]:
    """Compile the real train step of `cfg` for this machine's own devices (`jax.devices()`:
    a CPU, its GPUs, a TPU VM's chips), judged against their memory (`host_memory_bytes`) and
    their peak (seismo.train.flops; `peak_flops` or run.peak_flops overrides it)."""
    if mesh:
        cfg = config_lib.with_overrides(cfg, [f"mesh.{k}={v}" for k, v in mesh.items()])
    devices = jax.devices()
    peak = flops_lib.peak_flops_per_device(devices[0], cfg.model.dtype, peak_flops or cfg.run.peak_flops)
    report = compile_for_devices(cfg, devices, hbm_bytes_per_device=host_memory_bytes(devices[0], jax.local_device_count()),
                                 peak_flops_per_device=peak, probes=probes, mfu=mfu)
    return {"topology": "host", "num_slices": 1, "n_chips": len(devices), "hbm_nominal_bytes_per_device": None,
            **report}


def usable_hbm_bytes(device: jax.Device) -> int | None:
    """The HBM the TPU compiler lets one program use on `device` (a little under the chip's
    HBM: v5e 15.75 of 16 GiB): read off its refusal of a 1 TiB argument (a compile of well
    under a second). None when the compiler does not say."""
    sharding = jax.sharding.SingleDeviceSharding(device)
    huge = jax.ShapeDtypeStruct((2**38,), jnp.float32, sharding=sharding)
    try:
        jax.jit(lambda x: x[:1]).lower(huge).compile()
    except Exception as e:
        oom = parse_oom(str(e))
        return oom.get("available_bytes") if oom else None
    return None


def compile_for_topology(cfg: Config, topology: str, *, mesh: Mapping[str, int] | None = None,
                         chip_config: str | None = None, num_slices: int = 1, probes: bool | None = None,
                         peak_flops: float | None = None, mfu: float = DEFAULT_MFU) -> dict[str, Any]:
    """Compile the real train step of `cfg` for a TPU slice named `topology` ('v5e:2x2',
    'v4-8', ...) without a TPU. `mesh` overrides mesh.data/fsdp/tensor, e.g. {'fsdp': 4}.

    The report: topology, device_kind, n_devices, n_hosts, mesh sizes, HBM per device (the
    compiler's usable figure, and the published one), params, tokens per step, the PaLM
    model-FLOPs count, the step time it takes at the peak rate (a lower bound) and at `mfu`
    (`step_s_at_mfu`, `tokens_per_s_at_mfu`); the mesh layout used (`mesh_layout`, `mesh_dcn`,
    `mesh_note` for a fallback); per compiled step ('train', and 'probe' when
    run.probe_every > 0) the per-device bytes (argument/output/alias/temp/code and their sum
    `peak_bytes`), XLA's FLOPs and bytes accessed, the fraction of HBM and the `headroom_bytes`,
    compile seconds and a `verdict` ('fits' or 'does not fit', see `verdict`; `over_bytes` by
    how much); when the compiler ran out of HBM, compiled=False with its numbers. `fits` is True
    when every step fits; `verdict` (the report's) is the sentence of `overall_verdict`."""
    topo = parse_topology(topology)
    if mesh:
        cfg = config_lib.with_overrides(cfg, [f"mesh.{k}={v}" for k, v in mesh.items()])
    devices = topology_devices(topo, chip_config=chip_config, num_slices=num_slices)
    chip = chip_for_device_kind(devices[0].device_kind) or topo.chip
    per_chip = 1 + max(getattr(d, "core_on_chip", 0) for d in devices)  # devices sharing one chip
    nominal = chip.hbm_bytes // per_chip
    usable = usable_hbm_bytes(devices[0])
    peak = flops_lib.peak_flops_per_device(devices[0], cfg.model.dtype, peak_flops or cfg.run.peak_flops,
                                           devices_per_chip=per_chip)
    report = compile_for_devices(cfg, devices, hbm_bytes_per_device=usable or nominal,
                                 peak_flops_per_device=peak, probes=probes, mfu=mfu)
    return {"topology": topo.topology_name, "num_slices": num_slices, "n_chips": topo.n_chips * num_slices,
            "hbm_nominal_bytes_per_device": nominal, **report}


# --------------------------------------------------------------------------- printing


def _bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _seconds(x: float) -> str:
    for unit, size in (("s", 1.0), ("ms", 1e-3)):
        if x >= size:
            return f"{x / size:.3g} {unit}"
    return f"{x * 1e6:.3g} µs"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def format_report(report: Mapping[str, Any]) -> str:
    """A few lines a person reads: the slice, the mesh, per step memory and FLOPs, the step time
    at the stated MFU, and the verdict."""
    mesh = " x ".join(f"{k}={v}" for k, v in report["mesh"].items())
    layout = report.get("mesh_layout")
    if layout:
        dcn = report.get("mesh_dcn") or [1, 1, 1]
        mesh += f" ({layout} layout" + (f", slices per axis {'x'.join(map(str, dcn))})" if math.prod(dcn) > 1 else ")")
    head = report.get("topology", report["platform"])
    if report.get("num_slices", 1) > 1:
        head = f"{report['num_slices']} slices x {head}"
    mem_word = "HBM" if report["platform"] == "tpu" else "memory"
    lines = [
        f"{head}: {report['n_devices']} x {report['device_kind']} on {report['n_hosts']} host(s); "
        f"mesh {mesh}; {mem_word}/device {_bytes(report.get('hbm_bytes_per_device'))} usable",
        f"  model {report['params'] / 1e6:.2f}M params; batch {report['global_batch']} x {report['seq_len']} "
        f"= {report['tokens_per_step']} tokens/step; model FLOPs/step {_num(report['model_flops_per_step'])}",
    ]
    if report.get("step_s_at_mfu"):
        lines.append(f"  step time at {100 * report['mfu_assumed']:.3g}% MFU: {_seconds(report['step_s_at_mfu'])} "
                     f"({_num(report['tokens_per_s_at_mfu'])} tokens/s; peak {_num(report['peak_flops_per_device'])} "
                     f"FLOP/s per device; >= {_seconds(report['step_s_at_peak'])} at 100%)")
    else:
        lines.append("  step time: no peak FLOP/s known for this device (give one with --peak-flops or run.peak_flops)")
    if report.get("mesh_note"):
        lines.append(f"  warning: {report['mesh_note']}")
    for name, r in report["steps"].items():
        if not r.get("compiled"):
            lines.append(f"  {name:5s}: DOES NOT FIT: needs {_bytes(r.get('required_bytes'))} of "
                         f"{_bytes(r.get('available_bytes'))} available ({r.get('required_for', r.get('error'))})")
            continue
        frac = f" ({100 * r['hbm_fraction']:.3g}% of {mem_word})" if r.get("hbm_fraction") is not None else ""
        lines.append(
            f"  {name:5s}: peak {_bytes(r['peak_bytes'])}{frac} = args {_bytes(r['argument_bytes'])} + out "
            f"{_bytes(r['output_bytes'])} - donated {_bytes(r['alias_bytes'])} + temp {_bytes(r['temp_bytes'])} "
            f"+ code {_bytes(r['code_bytes'])}; XLA FLOPs/device {_num(r['flops'])}; compiled in {r['compile_s']:.1f}s")
    lines.append(f"  verdict: {report.get('verdict') or overall_verdict(report)}")
    return "\n".join(lines)
