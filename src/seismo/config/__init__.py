"""Typed, frozen configuration: YAML files plus dotted overrides, validated before anything compiles.

A config is a tree of frozen dataclasses (`Config` with sections `model`, `loss`, `data`,
`optimizer`, `run`, `mesh`). It is built from

* a YAML file (safe-loaded). A file may start from others with `base: [path, ...]`
  (paths relative to the file); later files and keys win, mappings merge key by key.
* presets: a section given as a string names a file in `configs/<section>s/`
  (`model: tiny` reads `configs/models/tiny.yaml`), and a mapping may carry
  `preset: tiny` plus keys that change it.
* overrides `a.b=c` (values parsed as YAML scalars: `1e-3`, `true`, `[1, 2]`).
* `run.plugins`: the user's modules (`import_plugins`), imported as the config is built, so
  what they register (an activation, a data source) exists before any name is checked.

Unknown keys fail naming the full key path and the nearest valid name; wrong types name
the key, the expected type and the value; inconsistent combinations fail with a sentence
that says what to change. All of it happens in `load`/`from_dict`, before any JAX work.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.resources
import importlib.util
import math
import os
import sys
import types
import typing
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from seismo import rundir, typecheck
from seismo.registry import nearest


class ConfigError(ValueError):
    """A config that cannot be used. The message says what, where and what to do."""


# --------------------------------------------------------------------------- sections


# `model.scan_layers: auto` scans the blocks (nn.scan) from this many layers on and unrolls them
# below. Measured on a 2-core CPU (benchmarks/RESULTS.md, `benchmarks/run.py layers`): at 2-4
# layers the unrolled step takes 7-17% less CPU and compiles faster; from 6 layers on the scan
# compiles faster (0.3-0.7x the time) and, at the proxy_256 width, runs as fast or faster (the
# unrolled step costs 30% more at 12 layers). It depends on the depth alone, never on the
# backend, because the checkpoint layout follows it ('blocks' stacked, or 'block_0', ...).
SCAN_LAYERS_FROM = 6


def resolve_scan_layers(n_layers: int) -> bool:
    """What `model.scan_layers: auto` becomes for a model of `n_layers` blocks."""
    return n_layers >= SCAN_LAYERS_FROM


def resolve_scan_unroll(n_layers: int) -> int:
    """What `model.scan_unroll: auto` becomes: the whole scan unrolled below SCAN_LAYERS_FROM
    layers (the scanned layout, and the speed of a Python loop over the blocks), one layer per
    iteration from there on (compile time flat in depth)."""
    return n_layers if n_layers < SCAN_LAYERS_FROM else 1


@dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer. Defaults follow Wortsman et al. 2023 (docs/methods.md §1.1)
    except `qk_norm`, which presets turn on explicitly."""

    vocab_size: int = 256  # bytes by default (the byte tokenizer uses id 0 as EOS)
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    head_dim: int | None = None  # None: d_model // n_heads
    d_ff: int | None = None  # None: 4 * d_model
    max_seq_len: int = 128  # learned positions, sigmoid-attention bias, clipped softmax
    positions: Literal["rope", "alibi", "learned", "none"] = "rope"
    rope_base: float = 10_000.0
    tie_embeddings: bool = False
    use_bias: bool = False
    # norms
    norm: str = "layernorm"  # registry: seismo.models.norms.NORMS
    norm_eps: float = 1e-6
    norm_placement: Literal["pre", "post", "hybrid"] = "pre"
    layerscale: bool = False
    layerscale_init: float = 1e-4
    # attention
    attention: str = "softmax"  # registry: softmax | sigmoid | clipped_softmax | gated
    qk_norm: bool = False
    sigmoid_bias: float | None = None  # None: -log(max_seq_len) (Ramapuram et al. 2024)
    clip_gamma: float = -0.025  # clipped softmax lower stretch (Bondarenko et al. 2023, BERT)
    clip_zeta: float = 1.0  # clipped softmax upper stretch
    gate_bias_init: float = -1.0986122886681098  # logit(0.25), gated attention (OPT-125m)
    attn_bias: bool = False  # explicit attention bias k', v' (Sun et al. 2024)
    n_kv_heads: int | None = None  # key/value heads; None: n_heads; fewer: grouped-query (1: multi-query)
    # how attention is computed (same numbers, different memory and speed; docs/design.md):
    # explicit | blockwise | dot_product | pallas | auto (the fastest correct one here)
    attention_impl: Literal["auto", "explicit", "blockwise", "dot_product", "pallas"] = "auto"
    attention_block: int = 512  # query and key block length of the blockwise and Pallas kernels
    # MLP and activation
    mlp: Literal["dense", "gated"] = "dense"
    activation: str = "gelu"  # registry: seismo.models.activations
    activation_kwargs: Mapping[str, Any] = field(default_factory=dict)
    # init and parametrisation
    init_std: float | None = None  # None: truncated normal 1/sqrt(fan_in)
    embed_init_std: float | None = None  # None: 1/sqrt(d_model)
    mup: Literal["off", "simple", "full"] = "off"  # muParam (docs/methods.md §1.5)
    mup_base_width: int = 256
    # execution
    # 'auto': scan from SCAN_LAYERS_FROM layers on, a Python loop below; resolved to a bool when
    # the config is made (the same on every backend), so config.yaml records it and a run keeps
    # one checkpoint layout
    scan_layers: bool | Literal["auto"] = True
    # layers per iteration of the scan (jax.lax.scan's `unroll`; the parameters' layout and the
    # numbers are the same for every value); 'auto': resolve_scan_unroll(n_layers), when the
    # model is built (it decides no layout, so it follows the depth of the config it is in)
    scan_unroll: int | Literal["auto"] = "auto"
    remat: Literal["none", "full", "dots", "dots_no_batch", "attention"] = "none"
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype; params stay float32

    def __post_init__(self) -> None:
        if self.scan_layers == "auto":  # frozen: set once, here
            object.__setattr__(self, "scan_layers", resolve_scan_layers(self.n_layers))

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def resolved_kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def resolved_d_ff(self) -> int:
        return self.d_ff if self.d_ff is not None else 4 * self.d_model

    @property
    def resolved_sigmoid_bias(self) -> float:
        return self.sigmoid_bias if self.sigmoid_bias is not None else -math.log(self.max_seq_len)


@dataclass(frozen=True)
class LossConfig:
    z_loss: float = 0.0  # coefficient of mean(log Z^2); 0 is off, the paper uses 1e-4
    # sequence positions per chunk of the output head and cross-entropy: the [B, T, V] float32
    # logits are never materialised, only [B, chunk, V] at a time (recomputed in the backward
    # pass). 0: the whole sequence at once. Same numbers either way.
    chunk: int = 0


@dataclass(frozen=True)
class DataConfig:
    """Where tokens come from. Batches are a pure function of (seed, step, batch slice)."""

    source: str = "stdlib"  # stdlib | text:<glob> | tfds:<name>[/<config>] | synthetic:<task>
    batch_size: int = 8  # global batch, in sequences
    seq_len: int = 64
    tokenizer: str | None = None  # path to a SentencePiece model; None: bytes
    eval_sequences: int = 64  # fixed evaluation set size
    eval_seed: int = 1234
    holdout_fraction: float = 0.05  # stdlib/text: share of files held out for evaluation
    tfds_split: str = "train"
    tfds_eval_split: str | None = None  # None: hold out documents of tfds_split
    tfds_data_dir: str | None = None
    tfds_text_key: str = "text"
    synthetic_vocab: int = 64  # synthetic tasks: number of symbols
    synthetic_modulus: int = 97  # synthetic:modular_arithmetic


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW recipe of Wortsman et al. 2023 (docs/methods.md §1.1, 1.4, 1.8)."""

    lr: float = 1e-3  # the peak learning rate
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0  # global-norm clipping; 0 turns it off
    warmup_steps: int = 100
    schedule: Literal["cosine", "constant", "linear"] = "cosine"
    min_lr: float = 1e-5  # end of the cosine/linear decay
    weight_decay: float = 1e-4
    weight_decay_form: Literal["independent", "coupled"] = "independent"
    decay_exclude: Sequence[str] = ("norm", "bias", "activation", "attn_bias", "layerscale")  # not decayed
    grad_accum_steps: int = 1


@dataclass(frozen=True)
class RunConfig:
    steps: int = 200
    seed: int = 0
    log_every: int = 10
    eval_every: int = 50
    probe_every: int = 0  # 0 turns in-step probes off
    checkpoint_every: int = 100  # every N-th step is kept
    checkpoint_log_until: int = 1024  # keep steps 1, 2, 4, ... up to this bound
    checkpoint_log_points: int = 0  # also keep N distinct steps log-spaced from 1 to run.steps (0: off)
    checkpoint_async: bool = True
    progress: Literal["auto", "on", "lines", "off"] = "auto"  # a bar on a terminal, plain lines off one
    logit_warning_threshold: float = 1e4  # max attention logit predicted to cross -> warning
    # off a terminal (a log file, a pipe, nohup): a progress line at most this often (0: every row)
    log_seconds: float = 30.0
    # where metrics go besides metrics.jsonl (always written): tensorboard, wandb (seismo.train.trackers)
    trackers: Sequence[str] = ("jsonl",)
    profile_steps: Sequence[int] = ()  # [a, b]: a jax.profiler trace of steps a..b in <run_dir>/profile
    peak_flops: float | None = None  # peak FLOP/s per device for `mfu` (None: seismo.train.flops' table)
    # the user's modules imported before validation (their activations, data sources, ...):
    # dotted names on the Python path or in the current directory, or files ending in .py
    plugins: Sequence[str] = ()


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh. -1 infers the size from the device count (at most one axis)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    multihost: Literal["auto", "on", "off"] = "auto"
    # multislice: how many slices (joined by DCN) each axis spans; the rest of it lies within a slice
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1
    # how the axes are laid onto the devices (seismo.train.mesh.build_mesh); config.yaml records
    # what `auto` resolved to: physical, split (allow_split_physical_axes) or fallback (device order)
    layout: Literal["auto", "physical", "split", "fallback"] = "auto"


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    run: RunConfig = field(default_factory=RunConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def replace(self, **sections: Any) -> Config:
        return dataclasses.replace(self, **sections)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "loss": LossConfig,
    "data": DataConfig,
    "optimizer": OptimizerConfig,
    "run": RunConfig,
    "mesh": MeshConfig,
}

# The presets and studies that ship inside the package (seismo/configs, package data, so an
# installed wheel has them too; the checkout's top-level configs/ links there). SEISMO_CONFIGS
# points elsewhere.
CONFIG_ROOT = Path(os.environ.get("SEISMO_CONFIGS") or str(importlib.resources.files("seismo") / "configs"))


# --------------------------------------------------------------------------- public API


def load(path: str | os.PathLike[str] | None = None, overrides: Iterable[str] = ()) -> Config:
    """Read a YAML config (or the defaults when `path` is None), apply `a.b=c` overrides,
    validate, and return the frozen `Config`."""
    raw: dict[str, Any] = {}
    origin = "defaults"
    if path is not None and rundir.is_remote(path):  # a run directory's config.yaml on a store (resolved: no base)
        raw = yaml.safe_load(rundir.path(path).read_text()) or {}
        origin = str(path)
    elif path is not None:
        path = find_file(path)
        raw = read_yaml_tree(path)
        origin = str(path)
    raw = apply_overrides(raw, overrides)
    return from_dict(raw, origin=origin)


def find_file(path: str | os.PathLike[str]) -> Path:
    """`path` itself when it exists; else the file of that name among the configs that ship
    with seismo (`CONFIG_ROOT`, '.yaml' optional): `tiny`, `studies/qk_layernorm`. This is how
    an installed seismo, away from a checkout, finds its presets and studies."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    for candidate in (CONFIG_ROOT / p, CONFIG_ROOT / p.with_name(p.name + ".yaml")):
        if candidate.is_file():
            return candidate
    return p


def from_dict(raw: Mapping[str, Any], origin: str = "config") -> Config:
    """Build and validate a `Config` from a nested mapping (presets resolved here)."""
    raw = resolve_presets(dict(raw))
    sections: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in SECTIONS:
            raise _unknown_key(key, list(SECTIONS), origin)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{origin}: {key!r} must be a mapping of settings, got {value!r}")
        sections[key] = _build(SECTIONS[key], value, prefix=key, origin=origin)
    cfg = Config(**sections)
    import_plugins(cfg.run.plugins, where=f"{origin}: run.plugins")  # registrations before any name is checked
    validate(cfg, origin=origin)
    return cfg


def import_plugins(names: Iterable[str], where: str = "--import") -> list[types.ModuleType]:
    """Import the user's modules, whose registrations (an activation, a data source, a probe)
    must exist before a config naming them is checked: `run.plugins` in a config, `--import`
    on the command line. Each name is a dotted module name, looked up on the Python path and
    then in the current directory (what `python -m` would find), or a file ending in `.py`
    (relative to the current directory). Importing again is free (one module per name or
    file). A module that cannot be imported, or that fails while importing, is a ConfigError
    naming it and the reason."""
    modules = []
    for name in names:
        name = str(name).strip()
        try:
            modules.append(_import_plugin(name))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        except ModuleNotFoundError as e:
            if e.name is not None and (name == e.name or name.startswith(e.name + ".")):
                raise ConfigError(f"{where}: no module named {name!r} (looked on the Python path and in the "
                                  f"current directory {os.getcwd()}); give a module name or a path to a .py file") from None
            raise ConfigError(f"{where}: importing {name!r} failed: {e}") from None
        except Exception as e:  # the user's module raised while it ran: say which and why, in one line
            raise ConfigError(f"{where}: importing {name!r} failed: {type(e).__name__}: {e}") from None
    return modules


def _import_plugin(name: str) -> types.ModuleType:
    if not name:
        raise ConfigError("an empty module name cannot be imported; give a module name or a path to a .py file")
    if name.endswith(".py") or os.sep in name or "/" in name:
        path = Path(name).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"no file {name!r} (looked for {path})")
        loaded = _loaded_from(path)
        if loaded is not None:
            return loaded
        key = f"seismo_plugin_{path.stem}_{zlib.crc32(str(path).encode()):08x}"
        spec = importlib.util.spec_from_file_location(key, path)
        if spec is None or spec.loader is None:
            raise ConfigError(f"{name!r} cannot be loaded as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[key]
            raise
        return module
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path:
        sys.path.append(here)  # after everything installed: a local file never shadows a package
    if name not in sys.modules:
        spec = importlib.util.find_spec(name)
        loaded = _loaded_from(Path(spec.origin).resolve()) if spec is not None and spec.origin else None
        if loaded is not None:  # that file was imported by its path already: the same module, not a second one
            sys.modules[name] = loaded
    return importlib.import_module(name)


def _loaded_from(path: Path) -> types.ModuleType | None:
    """The module already imported from the file `path`, if any."""
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if file and os.path.basename(file) == path.name and Path(file).resolve() == path:
            return module
    return None


def to_dict(obj: Any) -> Any:
    """A plain-data (YAML/JSON-safe) copy of a config or section."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def dump(cfg: Config, path: str | os.PathLike[str]) -> None:
    """Write the fully resolved config as YAML (what a run directory records)."""
    rundir.path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))  # a local path or a gs:// URL


def with_overrides(cfg: Config, overrides: Iterable[str]) -> Config:
    """A new validated config: `cfg` with `a.b=c` overrides applied."""
    return from_dict(apply_overrides(to_dict(cfg), overrides), origin="overrides")


def keys() -> list[str]:
    """Every valid dotted key, e.g. 'model.n_layers'."""
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def get(cfg: Config, dotted: str) -> Any:
    """The value at a dotted key, e.g. get(cfg, 'optimizer.lr')."""
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


# --------------------------------------------------------------------------- YAML, presets, overrides


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} appears twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml_mapping(path: Path, kind: str = "config file", shape: str = "of sections",
                      error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    """Safe-load a YAML file that must hold a mapping; missing, binary, empty, too deeply
    nested and invalid files, a key given twice and other shapes fail with `error`, naming
    the file."""
    if not path.exists():
        raise error(f"{kind} {path} does not exist")
    if path.is_dir():
        raise error(f"{kind} {path} is a folder, not a YAML file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:
        raise error(f"{path}: not a text file (binary data); a {kind} is YAML text")
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise error(f"{path}: nested too deeply to be a {kind}") from None
    if data is None:
        raise error(f"{path}: the {kind} is empty; give it at least one setting (e.g. `model: tiny`)")
    if not isinstance(data, dict):
        raise error(f"{path}: a {kind} must be a mapping {shape}, got {type(data).__name__}")
    return data


def read_yaml_tree(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML file and merge the files its `base:` names (relative to it) underneath."""
    path = path.resolve()
    if path in _seen:
        raise ConfigError(f"{path}: 'base' files include each other in a loop: {' -> '.join(map(str, _seen))}")
    data = read_yaml_mapping(path)
    bases = data.pop("base", None) or []
    if isinstance(bases, str):
        bases = [bases]
    merged: dict[str, Any] = {}
    for b in bases:
        merged = deep_merge(merged, read_yaml_tree((path.parent / b), _seen + (path,)))
    return deep_merge(merged, _relative_presets(data, path.parent))


def _relative_presets(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    # A section written as a path to a YAML file is read relative to the file that names it.
    out = dict(data)
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, str) and value.endswith((".yaml", ".yml")):
            out[key] = str((folder / value).resolve())
    return out


def deep_merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """`b` over `a`, recursively for mappings; a preset string in `b` replaces a mapping in `a`."""
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def preset_path(section: str, name: str) -> Path:
    """The file of a named preset: configs/<section>s/<name>.yaml, or a path to a YAML file."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml"):
        return p
    folder = CONFIG_ROOT / f"{section}s"
    path = folder / f"{name}.yaml"
    if not path.exists():
        known = sorted(q.stem for q in folder.glob("*.yaml")) if folder.exists() else []
        hint = nearest(name, known)
        msg = f"{section}: no preset named {name!r} in {folder}."
        if hint:
            msg += f" Did you mean {hint!r}?"
        raise ConfigError(msg + (f" Presets: {', '.join(known)}" if known else ""))
    return path


def resolve_presets(raw: dict[str, Any]) -> dict[str, Any]:
    """Replace `section: name` and `section: {preset: name, ...}` by the preset's settings."""
    out = dict(raw)
    for section in SECTIONS:
        value = out.get(section)
        name, extra = None, {}
        if isinstance(value, str):
            name = value
        elif isinstance(value, Mapping) and "preset" in value:
            name, extra = value["preset"], {k: v for k, v in value.items() if k != "preset"}
        if name is None:
            continue
        data = read_yaml_tree(preset_path(section, str(name)))
        body = data.get(section, data) if set(data) <= set(SECTIONS) else data
        if not isinstance(body, Mapping):
            raise ConfigError(f"preset {name!r} for {section!r} must hold a mapping of settings")
        out[section] = deep_merge(body, extra)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. model.n_layers=4")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has no key before '='")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.split("."), parsed


def apply_overrides(raw: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """`raw` with `a.b=c` overrides. A whole-section override (a preset switch such as
    `model=proxy_256`) applies before the field overrides, whatever the order they are given
    in, so `model.qk_norm=false model=proxy_256` keeps qk_norm false."""
    out = resolve_presets(dict(raw))
    parsed = [(text, *parse_override(text)) for text in overrides]
    parsed = [p for p in parsed if len(p[1]) == 1] + [p for p in parsed if len(p[1]) > 1]
    for text, parts, value in parsed:
        if len(parts) == 1:  # a whole section: a preset name
            out[parts[0]] = value
            out = resolve_presets(out)
            continue
        node = out
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is not None and not isinstance(nxt, Mapping):
                where = ".".join(parts[:i + 1])
                raise ConfigError(f"override {text!r}: {where} is {nxt!r} in the config, not a mapping of settings; "
                                  f"write {where} as a mapping (or a preset name) first")
            if not isinstance(nxt, dict):
                nxt = dict(nxt) if isinstance(nxt, Mapping) else {}
                node[p] = nxt
            node = nxt
        node[parts[-1]] = value
    return out


# --------------------------------------------------------------------------- typing


def _unknown_key(key: str, valid: list[str], where: str, prefix: str = "") -> ConfigError:
    full = f"{prefix}.{key}" if prefix else key
    hint = nearest(key, valid)
    msg = f"{where}: unknown key {full!r}."
    if hint:
        msg += f" Did you mean {(prefix + '.' if prefix else '') + hint!r}?"
    return ConfigError(msg + f" Valid keys here: {', '.join(valid)}")


def _build(cls: type, values: Mapping[str, Any], prefix: str, origin: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise _unknown_key(str(key), names, origin, prefix)
        kwargs[key] = _coerce(value, hints[key], f"{prefix}.{key}", origin)
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, key: str, origin: str) -> Any:
    try:
        return typecheck.coerce(value, tp, key)
    except typecheck.TypeMismatch as e:
        raise ConfigError(f"{origin}: {e}") from None


# --------------------------------------------------------------------------- consistency


def validate(cfg: Config, origin: str = "config") -> None:
    """Checks that need more than one field. Raises ConfigError. (Registered names, such as
    the activation, are checked by the layer that owns them: seismo.train.engine.check_config.)"""
    m, d, o, r, mesh = cfg.model, cfg.data, cfg.optimizer, cfg.run, cfg.mesh

    def fail(msg: str) -> None:
        raise ConfigError(f"{origin}: {msg}")

    for name, value in [
        ("model.d_model", m.d_model), ("model.n_layers", m.n_layers), ("model.n_heads", m.n_heads),
        ("model.vocab_size", m.vocab_size), ("model.max_seq_len", m.max_seq_len),
        ("data.batch_size", d.batch_size), ("data.seq_len", d.seq_len),
        ("optimizer.grad_accum_steps", o.grad_accum_steps), ("run.log_every", r.log_every),
        ("run.eval_every", r.eval_every), ("run.checkpoint_every", r.checkpoint_every),
    ]:
        if value < 1:
            fail(f"{name} must be at least 1, got {value}")
    for name, value in [("run.steps", r.steps), ("run.probe_every", r.probe_every),
                        ("optimizer.warmup_steps", o.warmup_steps), ("run.checkpoint_log_points", r.checkpoint_log_points)]:
        if value < 0:
            fail(f"{name} must be 0 or more, got {value}")
    if r.checkpoint_log_points > r.steps:
        fail(f"run.checkpoint_log_points ({r.checkpoint_log_points}) exceeds run.steps ({r.steps}): "
             "at most one checkpoint per step; use at most run.steps points, or 0 to turn them off")
    if d.eval_sequences < 1:
        fail(f"data.eval_sequences must be at least 1 (the evaluation set), got {d.eval_sequences}")
    for section, obj in [("model", m), ("loss", cfg.loss), ("data", d), ("optimizer", o), ("run", r), ("mesh", mesh)]:
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                fail(f"{section}.{f.name} must be a finite number, got {v}")
            if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_INT:
                fail(f"{section}.{f.name} is {v}, past the largest value seismo counts in (2^31 - 1 = {MAX_INT}); "
                     "steps, sizes and seeds are int32 on the device")
    if not isinstance(m.scan_layers, bool):  # 'auto' is resolved when the ModelConfig is made
        fail(f"model.scan_layers must be true, false or auto, got {m.scan_layers!r}")
    if m.scan_unroll != "auto" and (isinstance(m.scan_unroll, bool) or not isinstance(m.scan_unroll, int)
                                    or m.scan_unroll < 1):
        fail(f"model.scan_unroll must be a whole number of layers >= 1 or auto, got {m.scan_unroll!r}")
    if m.rope_base <= 1 and m.positions == "rope":
        fail(f"model.rope_base must be greater than 1 (10000 is usual), got {m.rope_base}")
    if m.head_dim is None and m.d_model % m.n_heads:
        fail(f"model.d_model ({m.d_model}) is not divisible by model.n_heads ({m.n_heads}); "
             f"change one of them or set model.head_dim explicitly")
    if m.positions == "rope" and m.resolved_head_dim % 2:
        fail(f"rope needs an even head dimension, got {m.resolved_head_dim}; change model.d_model or model.n_heads")
    if d.seq_len > m.max_seq_len:
        fail(f"data.seq_len ({d.seq_len}) exceeds model.max_seq_len ({m.max_seq_len}); "
             f"raise model.max_seq_len (sigmoid-attention bias and learned positions depend on it) or shorten data.seq_len")
    if m.attention == "sigmoid" and m.sigmoid_bias is None and m.max_seq_len < 2:
        fail("sigmoid attention needs model.max_seq_len (its bias is -log(max_seq_len)) or an explicit model.sigmoid_bias")
    if m.attention == "clipped_softmax" and not (m.clip_gamma <= 0 and m.clip_zeta >= 1):
        fail(f"clipped softmax needs model.clip_gamma <= 0 and model.clip_zeta >= 1, got {m.clip_gamma}, {m.clip_zeta}")
    if m.norm_eps <= 0:
        fail(f"model.norm_eps must be positive, got {m.norm_eps}")
    if m.mup != "off" and m.mup_base_width < 1:
        fail(f"model.mup_base_width must be at least 1 (the width of the smallest model), got {m.mup_base_width}")
    if o.lr <= 0 or not math.isfinite(o.lr):
        fail(f"optimizer.lr must be a positive number, got {o.lr}")
    if o.min_lr < 0 or o.min_lr > o.lr and o.schedule != "constant":
        fail(f"optimizer.min_lr ({o.min_lr}) must lie between 0 and optimizer.lr ({o.lr})")
    if o.warmup_steps > r.steps and r.steps > 0:
        fail(f"optimizer.warmup_steps ({o.warmup_steps}) is longer than run.steps ({r.steps}); shorten the warmup")
    if not 0 <= o.b1 < 1 or not 0 <= o.b2 < 1:
        fail(f"optimizer.b1 and optimizer.b2 must lie in [0, 1), got {o.b1}, {o.b2}")
    if o.eps < 0 or o.weight_decay < 0 or o.clip_norm < 0 or cfg.loss.z_loss < 0:
        fail("optimizer.eps, optimizer.weight_decay, optimizer.clip_norm and loss.z_loss must not be negative")
    for group in o.decay_exclude:
        if group not in DECAY_GROUPS:
            hint = nearest(group, list(DECAY_GROUPS))
            fail(f"optimizer.decay_exclude has unknown group {group!r}" + (f"; did you mean {hint!r}?" if hint else "")
                 + f" Groups: {', '.join(DECAY_GROUPS)}")
    for name in r.trackers:
        if name not in TRACKERS:
            hint = nearest(str(name), list(TRACKERS))
            fail(f"run.trackers has unknown tracker {name!r}" + (f"; did you mean {hint!r}?" if hint else "")
                 + f" Trackers: {', '.join(TRACKERS)}")
    if r.log_seconds < 0:
        fail(f"run.log_seconds must be 0 (a line at every row) or more seconds, got {r.log_seconds}")
    if d.batch_size % o.grad_accum_steps:
        fail(f"data.batch_size ({d.batch_size}) must be divisible by optimizer.grad_accum_steps ({o.grad_accum_steps})")
    if not 0 < d.holdout_fraction < 1:
        fail(f"data.holdout_fraction must lie strictly between 0 and 1, got {d.holdout_fraction}")
    if sum(1 for v in (mesh.data, mesh.fsdp, mesh.tensor) if v == -1) > 1:
        fail("at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1 (inferred)")
    for name, v in [("mesh.data", mesh.data), ("mesh.fsdp", mesh.fsdp), ("mesh.tensor", mesh.tensor)]:
        if v == 0 or v < -1:
            fail(f"{name} must be a positive size or -1 (inferred), got {v}")
    for name, v, size in [("mesh.dcn_data", mesh.dcn_data, mesh.data), ("mesh.dcn_fsdp", mesh.dcn_fsdp, mesh.fsdp),
                          ("mesh.dcn_tensor", mesh.dcn_tensor, mesh.tensor)]:
        if v < 1 or (size != -1 and size % v):
            fail(f"{name} ({v}) must be a positive number of slices that divides {name.replace('dcn_', '')} ({size})")
    if r.profile_steps and not (len(r.profile_steps) == 2 and 1 <= r.profile_steps[0] <= r.profile_steps[1]):
        fail(f"run.profile_steps must be [first, last] with 1 <= first <= last (steps to trace), got "
             f"{list(r.profile_steps)}")
    if r.peak_flops is not None and r.peak_flops <= 0:
        fail(f"run.peak_flops must be a positive FLOP/s per device (e.g. 1.97e14 for a v5e chip), got {r.peak_flops}")
    if mesh.tensor > 1 and m.n_heads % mesh.tensor:
        fail(f"model.n_heads ({m.n_heads}) must be divisible by mesh.tensor ({mesh.tensor})")
    if m.n_kv_heads is not None and not (1 <= m.n_kv_heads <= m.n_heads and m.n_heads % m.n_kv_heads == 0):
        fail(f"model.n_kv_heads ({m.n_kv_heads}) must divide model.n_heads ({m.n_heads}): each key/value head "
             "serves the same number of query heads (1 is multi-query attention)")
    if mesh.tensor > 1 and m.resolved_kv_heads % mesh.tensor:
        fail(f"model.n_kv_heads ({m.resolved_kv_heads}) must be divisible by mesh.tensor ({mesh.tensor}): "
             "key/value heads are split over the tensor axis")
    if m.attention_block < 8:
        fail(f"model.attention_block must be at least 8 positions, got {m.attention_block}")
    if cfg.loss.chunk < 0:
        fail(f"loss.chunk must be 0 (no chunking) or a number of sequence positions, got {cfg.loss.chunk}")


MAX_INT = 2**31 - 1  # the step counter, sizes and seeds are int32 on the device

# Parameter groups (seismo.models.param_groups) that optimizer.decay_exclude may name.
DECAY_GROUPS = ("kernel", "embedding", "norm", "bias", "activation", "attn_bias", "layerscale")

# Where run.trackers may send metrics (seismo.train.trackers); metrics.jsonl is always written.
TRACKERS = ("jsonl", "tensorboard", "wandb")
