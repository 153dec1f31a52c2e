"""Sweep files: grid expansion, point names, vmap groups, and bad files failing before training."""

from pathlib import Path

import pytest
import yaml

from seismo import config as config_lib
from seismo.config.sweepfile import _labels, format_value
from seismo.sweep import (
    SweepError,
    expand,
    load_sweep_spec,
    matches,
    run_dir,
    vmap_groups,
    write_spec,
)

BASE = {"run": {"steps": 40, "eval_every": 20}, "optimizer": {"warmup_steps": 5}}
LRS = ["3e-4", 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1]


def write(tmp_path: Path, sweep: dict, base: dict | None = BASE, name: str = "sweep.yaml") -> Path:
    if base is not None:
        (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    path = tmp_path / name
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


@pytest.fixture
def presets(tmp_path, monkeypatch):
    """configs/ with two model presets and a named base config."""
    root = tmp_path / "configs"
    (root / "models").mkdir(parents=True)
    (root / "models" / "small.yaml").write_text(yaml.safe_dump({"d_model": 32, "n_layers": 1, "n_heads": 2}))
    (root / "models" / "big.yaml").write_text(yaml.safe_dump({"d_model": 64, "n_layers": 2, "n_heads": 4}))
    (root / "tiny.yaml").write_text(yaml.safe_dump(BASE))
    monkeypatch.setattr(config_lib, "CONFIG_ROOT", root)
    return root


def test_grid_expansion_count_names_and_configs(tmp_path):
    path = write(tmp_path, {"base": "base.yaml", "grid": {"model.qk_norm": [False, True], "optimizer.lr": LRS,
                                                          "run.seed": [0, 1]}})
    spec = load_sweep_spec(path)
    points = expand(spec)
    assert len(points) == spec.n_points == 2 * 7 * 2
    names = [p.name for p in points]
    assert len(set(names)) == len(names)
    assert names == [p.name for p in expand(load_sweep_spec(path))], "names must be stable across loads"
    assert names[0] == "qk_norm=false__lr=3e-4__seed=0"
    assert names[-1] == "qk_norm=true__lr=0.3__seed=1"
    first = points[0]
    assert first.values == {"model.qk_norm": False, "optimizer.lr": 3e-4, "run.seed": 0}  # '3e-4' -> float
    assert first.config.optimizer.lr == 3e-4 and first.config.run.steps == 40
    assert config_lib.load(spec.base, first.overrides) == first.config
    assert run_dir(tmp_path, first) == tmp_path / "runs" / first.name


def test_value_formatting_and_label_clashes():
    assert [format_value(v) for v in (0.003, 0.01, 0.1, 0.3, 0.25, 1e-4, 1e-8, 1000.0, 2, True, None)] == [
        "3e-3", "1e-2", "0.1", "0.3", "0.25", "1e-4", "1e-8", "1e3", "2", "true", "none"]
    assert format_value("tfds:c4/en") == "tfds-c4-en"
    assert _labels(["a.lr", "b.lr", "model.qk_norm"]) == {"a.lr": "a.lr", "b.lr": "b.lr", "model.qk_norm": "qk_norm"}


def test_section_presets_set_order_and_named_base(tmp_path, presets):
    path = write(tmp_path, {"base": "tiny", "set": {"model.qk_norm": True},
                            "grid": {"model": ["small", "big"], "optimizer.lr": [1e-3, 1e-2]}}, base=None)
    points = expand(load_sweep_spec(path))
    assert [p.name for p in points][:2] == ["model=small__lr=1e-3", "model=small__lr=1e-2"]
    assert points[0].config.model.d_model == 32 and points[-1].config.model.d_model == 64
    assert all(p.config.model.qk_norm for p in points), "set must apply on top of the preset"
    assert points[0].overrides == ("model=small", "model.qk_norm=true", "optimizer.lr=0.001")


def test_vmap_groups_split_on_non_scalar_keys(tmp_path):
    path = write(tmp_path, {"base": "base.yaml", "grid": {"model.qk_norm": [False, True], "optimizer.lr": [1e-3, 1e-2],
                                                          "run.seed": [0, 1, 2]}})
    points = expand(load_sweep_spec(path))
    groups = vmap_groups(points)
    assert [len(g) for g in groups] == [6, 6]
    assert {p.values["model.qk_norm"] for p in groups[0]} == {False}
    no_configs = vmap_groups(expand(load_sweep_spec(path, validate=False), validate=False))
    assert [[p.name for p in g] for g in no_configs] == [[p.name for p in g] for g in groups]


def test_execution_report_and_cli_overrides(tmp_path):
    path = write(tmp_path, {"base": "base.yaml", "execution": {"mode": "parallel", "workers": 3},
                            "grid": {"model.qk_norm": [False, True], "optimizer.lr": [1e-3, 1e-2]},
                            "report": {"pair": ["qk_norm=false,lr=1e-3", {"qk_norm": True, "lr": 0.001}],
                                       "logit_step": 20}})
    spec = load_sweep_spec(path)
    assert (spec.execution, spec.workers, spec.report.logit_step) == ("parallel", 3, 20)
    hits = [p.name for p in expand(spec) if matches(p.values, spec.report.pair[1])]
    assert hits == ["qk_norm=true__lr=1e-3"]
    spec2 = load_sweep_spec(path, ["run.steps=60"], execution="vmap")
    assert spec2.execution == "vmap" and expand(spec2)[0].config.run.steps == 60


def test_write_spec_round_trips(tmp_path):
    path = write(tmp_path, {"name": "demo", "base": "base.yaml", "set": ["run.steps=60"],
                            "grid": {"optimizer.lr": [1e-3, 1e-2]}})
    spec = load_sweep_spec(path)
    out = tmp_path / "out"
    copy = load_sweep_spec(write_spec(spec, out))
    assert copy.name == "demo" and copy.base == spec.base and copy.set == spec.set
    assert [p.config for p in expand(copy)] == [p.config for p in expand(spec)]


@pytest.mark.parametrize("sweep, message", [
    ({"grid": {"optimizer.lrr": [1e-3]}}, r"'optimizer.lrr' is not a config key\. Did you mean 'optimizer.lr'"),
    ({"grid": {"model.qk_nrom": [True]}}, r"Did you mean 'model.qk_norm'"),
    ({"grids": {"optimizer.lr": [1e-3]}}, r"unknown top-level key 'grids'\. Did you mean 'grid'"),
    ({"grid": {"optimizer.lr": []}}, r"grid.optimizer.lr is an empty list"),
    ({"grid": {"optimizer.lr": 1e-3}}, r"grid.optimizer.lr must be a list"),
    ({"grid": {}}, r"'grid' must be a non-empty mapping"),
    ({"grid": {"optimizer.lr": [1e-3, "fast"]}}, r"optimizer.lr must be float, got 'fast'"),
    ({"grid": {"optimizer.lr": [1e-3, 0.001]}}, r"lists 0.001 more than once"),
    ({"grid": {"optimizer.lr": [1e-3]}, "execution": "vmapp"}, r"unknown execution mode 'vmapp'\. Did you mean 'vmap'"),
    ({"grid": {"optimizer.lr": [1e-3]}, "workers": 0}, r"'workers' must be a positive integer"),
    ({"grid": {"optimizer.lr": [1e-3]}, "set": {"optimizer.lr": 1e-2}}, r"both in 'set' and in 'grid'"),
    ({"grid": {"optimizer.lr": [1e-3]}, "set": ["run.steps"]}, r"must look like key=value"),
    ({"grid": {"optimizer.lr": [1e-3]}, "report": {"pair": ["lr=1e-2", "lr=1e-3"]}}, r"matches no point"),
    ({"grid": {"optimizer.lr": [1e-3]}, "report": {"pair": ["lr=1e-3"]}}, r"list of two point selectors"),
    ({"grid": {"optimizer.lr": [-1.0]}}, r"optimizer.lr must be a positive number.*sweep point lr=-1"),
    ({"grid": {"optimizer.warmup_steps": [5, 500]}}, r"longer than run.steps.*sweep point warmup_steps=500"),
])
def test_bad_sweep_files_fail_before_training(tmp_path, sweep, message):
    path = write(tmp_path, {"base": "base.yaml", **sweep})
    with pytest.raises(SweepError, match=message):
        load_sweep_spec(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.yaml", "sweep.yaml"], "nothing may be written"


def test_missing_base_and_missing_sweep_file(tmp_path, presets):
    path = write(tmp_path, {"base": "nope.yaml", "grid": {"optimizer.lr": [1e-3]}}, base=None)
    with pytest.raises(SweepError, match=r"base config 'nope.yaml' not found.*relative to the sweep file"):
        load_sweep_spec(path)
    path = write(tmp_path, {"base": "tiyn", "grid": {"optimizer.lr": [1e-3]}}, base=None)
    with pytest.raises(SweepError, match=r"Did you mean 'tiny'"):
        load_sweep_spec(path)
    with pytest.raises(SweepError, match="does not exist"):
        load_sweep_spec(tmp_path / "absent.yaml")
    path = write(tmp_path, {"grid": {"model": ["small", "huge"]}}, base=None)
    with pytest.raises(SweepError, match=r"no preset named 'huge'"):
        load_sweep_spec(path)


def test_names_stay_unique_and_short():
    from seismo.config.sweepfile import spec_from_dict

    spec = spec_from_dict({"grid": {"data.source": ["text:a/b", "text:a-b"], "run.seed": list(range(3))}})
    names = [p.name for p in expand(spec, validate=False)]
    assert len(set(names)) == 6 and all(n.startswith("source=text-a-b__seed=") for n in names)
    long = spec_from_dict({"grid": {"data.source": ["text:" + "x" * 300]}})
    (point,) = expand(long, validate=False)
    assert len(point.name) <= 180
