"""Sweep files: parse, validate and expand a grid of training runs.

A sweep file is the small-scale proxy study of Wortsman et al. 2023 (arXiv 2309.14322) written
down: one base config, settings shared by every point (`set`), and a grid of dotted keys
(`grid`). Every point's config is built and validated with `seismo.config` when the file is
loaded, so a typo, an empty list or a non-numeric LR fails before anything trains. The format
is documented with a full example in docs/sweeps.md.

    name: qk_layernorm
    base: ../tiny.yaml            # a config file (relative to this file) or a name in configs/
    set: [run.steps=400]          # or a mapping {run.steps: 400}
    grid:
      model: [proxy_256, proxy_512]          # a whole section: preset names
      model.qk_norm: [false, true]
      optimizer.lr: [1e-3, 1e-2, 1e-1]
    execution: vmap               # sequential | parallel (with workers: N) | vmap
    report: {pair: ["model=proxy_256,qk_norm=false", "model=proxy_512,qk_norm=false"], logit_step: 200}

Config of a point = base, then the whole-section grid values (presets), then `set`, then the
dotted grid values; a key may not be both in `set` and in `grid`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from seismo import config as config_lib
from seismo import rundir, typecheck
from seismo.config import Config, ConfigError
from seismo.registry import nearest
from seismo.rundir import RUNS_DIR, SPEC_FILE

# Hyperparameters a vmapped group may vary: each is a traced scalar in one compiled step.
VMAPPABLE_KEYS = ("optimizer.lr", "optimizer.weight_decay", "loss.z_loss", "run.seed")
EXECUTION_MODES = ("sequential", "parallel", "vmap")
FILE_KEYS = ("name", "description", "base", "set", "grid", "execution", "workers", "report")
REPORT_KEYS = ("pair", "logit_step", "lr_key")
MAX_NAME = 180  # characters; file names stop at 255 bytes


class SweepError(ConfigError):
    """A sweep file that cannot be run. The message names the file, the key and the fix."""


@dataclass(frozen=True)
class ReportOptions:
    """What `seismo report` plots for a sweep."""

    pair: tuple[str, ...] = ()  # point selectors for the loss/logit-vs-step figure (Fig. 2)
    logit_step: int | str = "last"  # step at which the layer-0 max attention logit is read
    lr_key: str = "optimizer.lr"


@dataclass(frozen=True)
class SweepSpec:
    name: str
    path: Path | None  # the sweep file (None when built in code)
    base: Path | None  # the base config file (None: the config defaults)
    set: tuple[str, ...]  # 'a.b=c' overrides applied to every point
    grid: tuple[tuple[str, tuple[Any, ...]], ...]  # (dotted key, values), in file order
    execution: str = "sequential"
    workers: int | None = None  # parallel: processes (None: the runner decides)
    report: ReportOptions = field(default_factory=ReportOptions)
    description: str = ""

    @property
    def grid_keys(self) -> list[str]:
        return [k for k, _ in self.grid]

    @property
    def n_points(self) -> int:
        return int(np.prod([len(v) for _, v in self.grid])) if self.grid else 1


@dataclass(frozen=True)
class Point:
    name: str  # e.g. 'model=proxy_256__qk_norm=false__lr=1e-3'; unique within the sweep
    values: dict[str, Any]  # grid key -> value (numbers normalised: '3e-3' -> 0.003)
    overrides: tuple[str, ...]  # every 'a.b=c' applied to the base, in order (set included)
    index: int = 0  # position in the grid's product order
    config: Config | None = field(default=None, compare=False, repr=False)  # validated config


# --------------------------------------------------------------------------- loading


def load_sweep_spec(path: str | os.PathLike[str], overrides: Iterable[str] = (), *,
                    execution: str | None = None, workers: int | None = None,
                    validate: bool = True) -> SweepSpec:
    """Read and check a sweep file; with `validate`, build every point's config now.

    `overrides`, `execution` and `workers` come from the command line (`seismo sweep --set`)
    and win over the file. `path` may name a study that ships with seismo
    (`studies/qk_layernorm`, seismo.config.find_file)."""
    path = config_lib.find_file(path)
    raw = config_lib.read_yaml_mapping(path, "sweep file", "with base, grid, ...", SweepError)
    spec = spec_from_dict(raw, path=path, overrides=overrides, execution=execution, workers=workers)
    if validate:
        expand(spec)
    return spec


def spec_from_dict(raw: Mapping[str, Any], path: Path | None = None, overrides: Iterable[str] = (),
                   execution: str | None = None, workers: int | None = None) -> SweepSpec:
    where = str(path) if path else "sweep"
    for key in raw:
        if key not in FILE_KEYS:
            raise SweepError(_unknown(where, "top-level key", str(key), FILE_KEYS))
    folder = path.parent if path else Path.cwd()
    base = _resolve_base(raw.get("base"), folder, where)
    set_ = _parse_set(raw.get("set"), where) + tuple(_check_override(o, where, "--set") for o in overrides)
    grid = _parse_grid(raw.get("grid"), where)
    for o in set_:
        key = o.split("=", 1)[0].strip()
        if key in dict(grid):
            raise SweepError(f"{where}: {key!r} is both in 'set' and in 'grid'; keep it in one of them")
    mode, n_workers = _parse_execution(raw.get("execution", "sequential"), raw.get("workers"), where)
    mode = execution if execution is not None else mode
    if mode not in EXECUTION_MODES:
        raise SweepError(_unknown(where, "execution mode", str(mode), EXECUTION_MODES))
    n_workers = workers if workers is not None else n_workers
    name = str(raw.get("name") or (path.stem if path else "sweep"))
    spec = SweepSpec(name=name, path=path, base=base, set=set_, grid=grid, execution=mode,
                     workers=n_workers, report=ReportOptions(), description=str(raw.get("description") or ""))
    return dataclasses.replace(spec, report=_parse_report(raw.get("report"), spec, where))


def _unknown(where: str, what: str, name: str, valid: Sequence[str]) -> str:
    hint = nearest(name, list(valid))
    return (f"{where}: unknown {what} {name!r}." + (f" Did you mean {hint!r}?" if hint else "")
            + f" Valid: {', '.join(valid)}")


def _resolve_base(base: Any, folder: Path, where: str) -> Path | None:
    """A config file relative to the sweep file, or a name in configs/ (e.g. 'tiny')."""
    if base is None:
        return None
    if not isinstance(base, str) or not base:
        raise SweepError(f"{where}: 'base' must be a config file path or a config name, got {base!r}")
    candidate = (folder / base).resolve()
    if candidate.is_file():
        return candidate
    if Path(base).suffix in (".yaml", ".yml") or "/" in base:
        raise SweepError(f"{where}: base config {base!r} not found (looked for {candidate}); "
                         "paths are relative to the sweep file")
    named = config_lib.CONFIG_ROOT / f"{base}.yaml"
    if named.is_file():
        return named.resolve()
    known = sorted(p.stem for p in config_lib.CONFIG_ROOT.glob("*.yaml"))
    raise SweepError(_unknown(where, f"base config (no file {candidate} and no {named})", base, known)
                     if known else f"{where}: base config {base!r} not found (looked for {candidate} and {named})")


def _check_key(key: str, where: str, what: str) -> str:
    """A dotted config key or a section name; unknown keys name the nearest valid one."""
    parts = key.split(".")
    valid = config_lib.keys()
    if len(parts) == 1:
        if key in config_lib.SECTIONS:
            return key
    elif ".".join(parts[:2]) in valid:
        return key
    hint = nearest(key, valid + list(config_lib.SECTIONS))
    raise SweepError(f"{where}: {what} {key!r} is not a config key." + (f" Did you mean {hint!r}?" if hint else "")
                     + " Keys are section.field, e.g. optimizer.lr, model.qk_norm (or a section name for presets)")


def _check_override(text: Any, where: str, what: str) -> str:
    if not isinstance(text, str) or "=" not in text:
        raise SweepError(f"{where}: {what} entry {text!r} must look like key=value, e.g. run.steps=400")
    key, value = text.split("=", 1)
    key = _check_key(key.strip(), where, f"{what} key")
    return f"{key}={value}"


def _parse_set(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, Mapping):
        return tuple(_check_override(f"{k}={format_override_value(v)}", where, "set") for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return tuple(_check_override(v, where, "set") for v in value)
    raise SweepError(f"{where}: 'set' must be a list of key=value strings or a mapping, got {value!r}")


def _parse_grid(value: Any, where: str) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    if not isinstance(value, Mapping) or not value:
        raise SweepError(f"{where}: 'grid' must be a non-empty mapping of config keys to lists of values, "
                         "e.g. grid: {optimizer.lr: [1e-3, 1e-2]}")
    grid = []
    for key, values in value.items():
        key = _check_key(str(key), where, "grid key")
        if not isinstance(values, (list, tuple)):
            raise SweepError(f"{where}: grid.{key} must be a list of values, e.g. [{values!r}], got {values!r}")
        if not values:
            raise SweepError(f"{where}: grid.{key} is an empty list; give at least one value")
        norm = tuple(normalize_value(key, v, where) for v in values)
        seen = [json.dumps(v, sort_keys=True, default=str) for v in norm]
        dup = sorted({s for s in seen if seen.count(s) > 1})
        if dup:
            raise SweepError(f"{where}: grid.{key} lists {', '.join(dup)} more than once")
        grid.append((key, norm))
    return tuple(grid)


def _parse_execution(value: Any, workers: Any, where: str) -> tuple[str, int | None]:
    if isinstance(value, Mapping):  # execution: {mode: parallel, workers: 4}
        workers = value.get("workers", workers)
        value = value.get("mode", "sequential")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise SweepError(f"{where}: 'workers' must be a positive integer, got {workers!r}")
    return str(value), workers


def _parse_report(value: Any, spec: SweepSpec, where: str) -> ReportOptions:
    if value is None:
        return ReportOptions()
    if not isinstance(value, Mapping):
        raise SweepError(f"{where}: 'report' must be a mapping (pair, logit_step, lr_key), got {value!r}")
    for key in value:
        if key not in REPORT_KEYS:
            raise SweepError(_unknown(where, "report option", str(key), REPORT_KEYS))
    pair = value.get("pair") or ()
    if isinstance(pair, (str, Mapping)) or len(pair) not in (0, 2):
        raise SweepError(f"{where}: report.pair must be a list of two point selectors, "
                         f"e.g. ['model=proxy_256,qk_norm=false', 'model=proxy_512,qk_norm=false']; got {pair!r}")
    pair = tuple(_selector_text(s) for s in pair)
    points = expand(spec, validate=False)
    for sel in pair:
        if not [p for p in points if matches(p.values, sel)]:
            raise SweepError(f"{where}: report.pair selector {sel!r} matches no point of the grid; "
                             f"keys are {', '.join(spec.grid_keys)} (or their last part, e.g. lr)")
    step = value.get("logit_step", "last")
    if step != "last" and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise SweepError(f"{where}: report.logit_step must be a step number or 'last', got {step!r}")
    lr_key = _check_key(str(value.get("lr_key", "optimizer.lr")), where, "report.lr_key")
    return ReportOptions(pair=pair, logit_step=step, lr_key=lr_key)


# --------------------------------------------------------------------------- values and names


def _field_type(key: str) -> Any:
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in config_lib.SECTIONS:
        return Any
    return typing.get_type_hints(config_lib.SECTIONS[parts[0]]).get(parts[1], Any)


def normalize_value(key: str, value: Any, where: str = "sweep") -> Any:
    """A grid value checked against its field's type (seismo.typecheck, the check configs
    use) and converted where lossless: '3e-3', which YAML reads as a string, becomes 0.003.
    Whole sections (preset names) and list or mapping values are checked when each point's
    config is built."""
    tp = _field_type(key)
    if tp is Any or typing.get_origin(tp) in (Sequence, Mapping, list, tuple, dict):
        return value
    try:
        return typecheck.coerce(value, tp, key)
    except typecheck.TypeMismatch as e:
        raise SweepError(f"{where}: {e}") from None


def format_override_value(value: Any) -> str:
    """A value as YAML that `seismo.config` parses back to the same value."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text[:-3].strip() if text.endswith("...") else text


def format_value(value: Any) -> str:
    """Short, filesystem-safe text for a value in a point name: 0.003 -> '3e-3', 0.01 -> '1e-2',
    0.1 -> '0.1', 0.25 -> '0.25', True -> 'true'; other text keeps [A-Za-z0-9._+-] and turns the rest into '-'."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if not np.isfinite(value):
            return str(value)
        pos = np.format_float_positional(value, unique=True, trim="-")
        sci = np.format_float_scientific(value, unique=True, trim="-")
        mant, exp = sci.split("e")
        sci = f"{mant}e{int(exp)}"
        small = abs(value) < 0.1 or abs(value) >= 1000  # ties go to 1e-2 in LR grids, to 0.1 at 0.1
        return sci if len(sci) < len(pos) or (len(sci) == len(pos) and small) else pos
    text = value if isinstance(value, str) else format_override_value(value)
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "-"


def _labels(keys: Sequence[str]) -> dict[str, str]:
    """The last part of each dotted key ('optimizer.lr' -> 'lr'), or the whole key where two
    grid keys share their last part."""
    last = [k.split(".")[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def point_name(values: Mapping[str, Any], labels: Mapping[str, str]) -> str:
    name = "__".join(f"{labels[k]}={format_value(v)}" for k, v in values.items())
    if len(name) > MAX_NAME:
        name = name[:MAX_NAME - 10] + "__" + _digest(name)
    return name


def matches(values: Mapping[str, Any], selector: str | Mapping[str, Any]) -> bool:
    """Whether a point's grid values satisfy a selector like 'model=proxy_256,qk_norm=false'.

    Keys are grid keys or their last part ('lr'); values compare by their name text, so
    'lr=1e-3' matches 0.001."""
    wanted = _parse_selector(selector)
    labels = _labels(list(values))
    by_label = {**{labels[k]: k for k in values}, **{k: k for k in values}}
    for key, text in wanted.items():
        if key not in by_label:
            return False
        if format_value(values[by_label[key]]) != format_value(normalize_value(by_label[key], text)):
            return False
    return True


def _selector_text(selector: Any) -> str:
    if isinstance(selector, Mapping):
        return ",".join(f"{k}={format_override_value(v)}" for k, v in selector.items())
    if not isinstance(selector, str) or "=" not in selector:
        raise SweepError(f"a point selector must look like 'key=value,key=value', got {selector!r}")
    return selector


def _parse_selector(selector: str | Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for part in _selector_text(selector).split(","):
        key, _, value = part.partition("=")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    return out


# --------------------------------------------------------------------------- expansion


def expand(spec: SweepSpec, validate: bool = True) -> list[Point]:
    """Every point of the grid (product in file order, the first key varying slowest), each
    with its validated config. A point whose config is invalid fails naming the point."""
    keys = spec.grid_keys
    labels = _labels(keys)
    combos = list(itertools.product(*[values for _, values in spec.grid])) if spec.grid else [()]
    names = [point_name(dict(zip(keys, combo)), labels) for combo in combos]
    if len(set(names)) < len(names):  # two values with the same short text (e.g. 'a/b', 'a-b')
        names = [f"{n}__{_digest(json.dumps(c, default=str))}" for n, c in zip(names, combos)]
    where = str(spec.path) if spec.path else "sweep"
    raw = config_lib.read_yaml_tree(spec.base) if (validate and spec.base is not None) else {}
    points = []
    for i, (name, combo) in enumerate(zip(names, combos)):
        values = dict(zip(keys, combo))
        sections = [f"{k}={format_override_value(v)}" for k, v in values.items() if "." not in k]
        dotted = [f"{k}={format_override_value(v)}" for k, v in values.items() if "." in k]
        overrides = (*sections, *spec.set, *dotted)
        cfg = None
        if validate:
            try:
                cfg = config_lib.from_dict(config_lib.apply_overrides(raw, overrides), origin=f"{where} [{name}]")
            except ConfigError as e:
                raise SweepError(f"{e} (sweep point {name}; nothing has trained)") from None
        points.append(Point(name=name, values=values, overrides=overrides, index=i, config=cfg))
    return points


def point_config(spec: SweepSpec, point: Point) -> Config:
    """The validated config of one point (what `expand` stores in `point.config`)."""
    if point.config is not None:
        return point.config
    return config_lib.load(spec.base, point.overrides)


def vmap_groups(points: Sequence[Point]) -> list[list[Point]]:
    """Points partitioned into groups that differ only in VMAPPABLE_KEYS (one compiled,
    vmapped program per group), in order of first appearance."""
    groups: dict[str, list[Point]] = {}
    for p in points:
        if p.config is not None:
            d = config_lib.to_dict(p.config)
            for key in VMAPPABLE_KEYS:
                section, name = key.split(".")
                d[section].pop(name, None)
        else:
            d = {k: v for k, v in p.values.items() if k not in VMAPPABLE_KEYS}
        groups.setdefault(json.dumps(d, sort_keys=True, default=str), []).append(p)
    return list(groups.values())


def run_dir(sweep_dir: str | os.PathLike[str], point: Point | str) -> Path:
    """Where a point's run lives: <sweep dir>/runs/<point name>/ (a local path or a gs:// URL)."""
    return rundir.path(sweep_dir) / RUNS_DIR / (point if isinstance(point, str) else point.name)


def spec_to_dict(spec: SweepSpec) -> dict[str, Any]:
    """A self-contained copy of the spec (base as an absolute path), as a sweep file."""
    out: dict[str, Any] = {"name": spec.name}
    if spec.description:
        out["description"] = spec.description
    if spec.base is not None:
        out["base"] = str(Path(spec.base).resolve())
    if spec.set:
        out["set"] = list(spec.set)
    out["grid"] = {k: list(v) for k, v in spec.grid}
    out["execution"] = spec.execution
    if spec.workers is not None:
        out["workers"] = spec.workers
    r = spec.report
    report: dict[str, Any] = {"logit_step": r.logit_step, "lr_key": r.lr_key}
    if r.pair:
        report["pair"] = list(r.pair)
    out["report"] = report
    return out


def write_spec(spec: SweepSpec, sweep_dir: str | os.PathLike[str]) -> Path:
    """Write <sweep dir>/sweep.yaml, which `seismo.analysis.load_sweep` reads back."""
    path = rundir.path(sweep_dir) / SPEC_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec_to_dict(spec), sort_keys=False))
    return path
