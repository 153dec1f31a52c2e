"""Config: YAML + presets + overrides, and every error the issue promises, before compiling."""

import dataclasses
import textwrap

import pytest

from seismo import config
from seismo.config import ConfigError
from seismo.train.engine import check_config


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_defaults_and_overrides():
    cfg = config.load(None, ["model.n_layers=4", "optimizer.lr=3e-3", "model.qk_norm=true", "run.steps=700"])
    assert cfg.model.n_layers == 4 and cfg.optimizer.lr == pytest.approx(3e-3)
    assert cfg.model.qk_norm is True and cfg.run.steps == 700
    # frozen: configs are values
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.n_layers = 3  # type: ignore[misc]


def test_contract_keys_exist():
    """The shared vocabulary of the CLI and notebooks (issue 2, public contract)."""
    required = """run.steps run.seed run.log_every run.eval_every run.probe_every run.checkpoint_every
    optimizer.lr optimizer.warmup_steps optimizer.weight_decay model.n_layers model.d_model
    model.n_heads model.attention model.qk_norm model.activation model.norm model.norm_placement
    loss.z_loss data.source data.batch_size data.seq_len""".split()
    assert set(required) <= set(config.keys())


def test_yaml_base_and_relative_paths(tmp_path):
    write(tmp_path, "base.yaml", """
        model: {d_model: 32, n_heads: 2}
        run: {steps: 1000}
    """)
    p = write(tmp_path, "child.yaml", """
        base: base.yaml
        model: {n_layers: 3}
    """)
    cfg = config.load(p)
    assert (cfg.model.d_model, cfg.model.n_heads, cfg.model.n_layers, cfg.run.steps) == (32, 2, 3, 1000)


def test_yaml_float_strings_and_int_to_float(tmp_path):
    p = write(tmp_path, "c.yaml", "optimizer: {lr: 1e-3, eps: 1}\n")  # YAML reads 1e-3 as a string
    cfg = config.load(p)
    assert cfg.optimizer.lr == 1e-3 and isinstance(cfg.optimizer.eps, float)


@pytest.mark.parametrize(
    "override, words",
    [
        ("model.n_layyers=3", ["unknown key 'model.n_layyers'", "Did you mean 'model.n_layers'"]),
        ("modle.d_model=3", ["unknown key 'modle'", "Did you mean 'model'"]),
        ("optimizer.learning_rate=1", ["unknown key 'optimizer.learning_rate'"]),
        ("model.n_layers=two", ["model.n_layers must be int", "'two'"]),
        ("model.qk_norm=3", ["model.qk_norm must be bool"]),
        ("model.norm_placement=hybird", ["one of", "Did you mean 'hybrid'"]),
        ("model.d_model=65", ["not divisible by model.n_heads"]),
        ("data.seq_len=1000", ["exceeds model.max_seq_len"]),
        ("optimizer.lr=-1", ["optimizer.lr must be a positive number"]),
        ("optimizer.warmup_steps=100000", ["longer than run.steps"]),
        ("data.source=tfsd:c4", ["unknown data source 'tfsd'", "Did you mean 'tfds'"]),
        ("mesh.tensor=0", ["mesh.tensor must be a positive size"]),
        ("optimizer.decay_exclude=[norms]", ["unknown group 'norms'", "did you mean 'norm'"]),
    ],
)
def test_errors_name_the_key(override, words):
    """Schema errors come from config.load; registered names (the data source here) from the
    layer that owns them, through check_config, which train and sweep call first."""
    with pytest.raises(ConfigError) as e:
        check_config(config.load(None, [override]))
    for w in words:
        assert w in str(e.value), str(e.value)


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    p = write(tmp_path, "bad.yaml", "model:\n  n_head: 4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'model.n_head'. Did you mean 'model.n_heads'"):
        config.load(p)


def test_override_needs_equals():
    with pytest.raises(ConfigError, match="key=value"):
        config.load(None, ["model.n_layers"])


def test_missing_preset_suggests(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny.yaml").write_text("model: {d_model: 32, n_heads: 2}\n")
    monkeypatch.setattr(config, "CONFIG_ROOT", tmp_path)
    assert config.load(None, ["model=tiny"]).model.d_model == 32
    cfg = config.from_dict({"model": {"preset": "tiny", "n_layers": 5}})
    assert (cfg.model.d_model, cfg.model.n_layers) == (32, 5)
    with pytest.raises(ConfigError, match="Did you mean 'tiny'"):
        config.load(None, ["model=tiyn"])


def test_dump_roundtrip(tmp_path):
    cfg = config.load(None, ["model.n_layers=3", "optimizer.decay_exclude=[norm, bias]"])
    config.dump(cfg, tmp_path / "c.yaml")
    assert config.load(tmp_path / "c.yaml") == cfg
    assert config.with_overrides(cfg, ["run.steps=500"]).run.steps == 500
    assert config.get(cfg, "model.n_layers") == 3


def test_a_preset_switch_applies_before_field_overrides_whatever_the_order():
    after = config.load(None, ["model.qk_norm=false", "model=proxy_256"])
    before = config.load(None, ["model=proxy_256", "model.qk_norm=false"])
    preset = config.load(None, ["model=proxy_256"])
    assert preset.model.qk_norm is True, "the test needs a preset that turns qk_norm on"
    assert after == before and after.model.qk_norm is False and after.model.d_model == preset.model.d_model


def test_version(capsys):
    from seismo import __version__, cli

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith(f"seismo {__version__} (jax ")


def test_top_level_names_are_the_lazy_ones_and_resolve():
    import seismo

    assert set(seismo.__all__) == {*seismo._SUBMODULES, *seismo._FUNCTIONS, "__version__"}
    assert all(getattr(seismo, name) is not None for name in seismo.__all__)


def test_scan_layers_auto_is_resolved_by_depth_when_the_config_is_made(tmp_path):
    """`model.scan_layers: auto` becomes a bool at load (config.yaml records it; a run keeps one
    checkpoint layout), by the depth alone: the same on every backend."""
    deep_n = config.SCAN_LAYERS_FROM
    shallow = config.load(None, ["model.scan_layers=auto", f"model.n_layers={deep_n - 1}"])
    deep = config.load(None, ["model.scan_layers=auto", f"model.n_layers={deep_n}"])
    assert shallow.model.scan_layers is False and deep.model.scan_layers is True
    assert config.load(None).model.scan_layers is True  # the default stays the scan
    assert config.load(None, ["model.n_layers=2", "model.scan_layers=false"]).model.scan_layers is False
    path = tmp_path / "config.yaml"
    config.dump(shallow, path)
    assert "scan_layers: false" in path.read_text() and "scan_layers: auto" not in path.read_text()
    assert config.load(path) == shallow  # a resumed run compares equal to its record
    assert config.with_overrides(shallow, ["model.scan_layers=auto", f"model.n_layers={deep_n}"]) == deep
    # a depth sweep from a base that says auto: each point at its own depth
    base = write(tmp_path, "base.yaml", "model:\n  scan_layers: auto\n")
    assert [config.load(base, [f"model.n_layers={n}"]).model.scan_layers for n in (1, deep_n, 2 * deep_n)] == [
        False, True, True]
    assert config.ModelConfig(scan_layers="auto", n_layers=deep_n).scan_layers is True  # made in code too
    with pytest.raises(ConfigError, match="model.scan_layers must be bool or 'auto'"):
        config.load(None, ["model.scan_layers=sometimes"])
