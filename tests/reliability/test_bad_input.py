"""Every bad input is one line on stderr and exit 2, before anything is written or compiled:
malformed files (binary, empty, deeply nested, duplicate keys, wrong shapes), impossible or
non-finite values for every kind of key, integer bounds, unknown names, data that cannot be
found, a mesh the devices cannot form, a model that cannot fit, and sweeps whose points have
any of these. Table-driven: each case is the command line a user would type."""

import textwrap

import pytest

from seismo import cli

pytestmark = pytest.mark.xdist_group("bad_input")

GOOD = textwrap.dedent("""\
    model: {d_model: 32, n_layers: 1, n_heads: 2, max_seq_len: 16}
    data: {batch_size: 4, seq_len: 16, eval_sequences: 4}
    optimizer: {warmup_steps: 1}
    run: {steps: 2, progress: "off"}
    """)

# (id, config file text or bytes (None: GOOD), overrides, words the one line must contain)
FILE_CASES = [
    ("binary", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", [], "not a text file"),
    ("nul byte", "model: {d_model: 32}\n\x00\n", [], "not a text file"),
    ("deep nesting", "a: " + "[" * 5000 + "]" * 5000 + "\n", [], "nested too deeply"),
    ("empty", "", [], "is empty"),
    ("only comments", "# nothing here\n", [], "is empty"),
    ("duplicate section", GOOD + "model: {d_model: 64}\n", [], "appears twice"),
    ("duplicate key", "model: {d_model: 32, d_model: 64}\n", [], "appears twice"),
    ("invalid yaml", "model: {d_model: 32\n", [], "not valid YAML"),
    ("list at top", "- model\n- data\n", [], "must be a mapping"),
    ("scalar at top", "5\n", [], "must be a mapping"),
    ("unknown section", GOOD + "modle: {d_model: 3}\n", [], "unknown key 'modle'"),
    ("unknown key", "model: {n_layyers: 3}\n", [], "Did you mean 'model.n_layers'"),
    ("section as number", "run: 5\n", [], "must be a mapping"),
    ("scalar section then key", "run: 5\n", ["run.steps=3"], "run is 5 in the config"),
    ("wrong int", "model: {n_layers: two}\n", [], "model.n_layers must be int"),
    ("wrong bool", "model: {qk_norm: 3}\n", [], "model.qk_norm must be bool"),
    ("literal typo", "model: {norm_placement: hybird}\n", [], "Did you mean 'hybrid'"),
    ("unknown preset", "model: tinyy\n", [], "no preset named 'tinyy'"),
    ("missing base", "base: nowhere.yaml\n", [], "does not exist"),
    ("python tag", "model: !!python/object/apply:os.system ['echo hi']\n", [], "not valid YAML"),
]

# (id, overrides on GOOD, words)
OVERRIDE_CASES = [
    ("no equals", ["optimizer.lr"], "must look like key=value"),
    ("no key", ["=3"], "has no key"),
    ("lr nan", ["optimizer.lr=nan"], "optimizer.lr must be a finite number"),
    ("lr inf", ["optimizer.lr=inf"], "optimizer.lr"),
    ("lr negative", ["optimizer.lr=-1"], "optimizer.lr must be a positive number"),
    ("min_lr nan", ["optimizer.min_lr=nan"], "optimizer.min_lr must be a finite number"),
    ("min_lr above lr", ["optimizer.min_lr=1"], "must lie between 0 and optimizer.lr"),
    ("eps nan", ["optimizer.eps=nan"], "optimizer.eps must be a finite number"),
    ("eps negative", ["optimizer.eps=-1e-8"], "must not be negative"),
    ("weight decay inf", ["optimizer.weight_decay=inf"], "optimizer.weight_decay must be a finite number"),
    ("clip inf", ["optimizer.clip_norm=inf"], "optimizer.clip_norm must be a finite number"),
    ("b1 nan", ["optimizer.b1=nan"], "optimizer.b1 must be a finite number"),
    ("b2 is one", ["optimizer.b2=1.0"], "must lie in [0, 1)"),
    ("z-loss nan", ["loss.z_loss=nan"], "loss.z_loss must be a finite number"),
    ("z-loss negative", ["loss.z_loss=-1"], "must not be negative"),
    ("norm eps nan", ["model.norm_eps=nan"], "model.norm_eps must be a finite number"),
    ("norm eps zero", ["model.norm_eps=0"], "model.norm_eps must be positive"),
    ("rope base zero", ["model.rope_base=0"], "model.rope_base must be greater than 1"),
    ("rope base nan", ["model.rope_base=nan"], "model.rope_base must be a finite number"),
    ("init std nan", ["model.init_std=nan"], "model.init_std must be a finite number"),
    ("embed std inf", ["model.embed_init_std=inf"], "model.embed_init_std must be a finite number"),
    ("layerscale inf", ["model.layerscale_init=inf"], "model.layerscale_init must be a finite number"),
    ("gate bias -inf", ["model.gate_bias_init=-inf"], "model.gate_bias_init must be a finite number"),
    ("sigmoid bias nan", ["model.sigmoid_bias=nan"], "model.sigmoid_bias must be a finite number"),
    ("clip gamma nan", ["model.clip_gamma=nan"], "model.clip_gamma must be a finite number"),
    ("holdout nan", ["data.holdout_fraction=nan"], "data.holdout_fraction"),
    ("holdout one", ["data.holdout_fraction=1"], "strictly between 0 and 1"),
    ("warning threshold nan", ["run.logit_warning_threshold=nan"], "run.logit_warning_threshold must be a finite"),
    ("steps past int32", ["run.steps=1.0e+21"], "past the largest value"),
    ("steps as text", ["run.steps=1e21"], "run.steps must be int"),  # YAML 1.1 reads 1e21 as a string
    ("steps negative", ["run.steps=-1"], "run.steps must be 0 or more"),
    ("seed past int32", ["run.seed=1099511627776"], "run.seed is 1099511627776, past the largest"),
    ("eval sequences zero", ["data.eval_sequences=0"], "data.eval_sequences must be at least 1"),
    ("batch zero", ["data.batch_size=0"], "data.batch_size must be at least 1"),
    ("heads do not divide", ["model.d_model=33"], "not divisible by model.n_heads"),
    ("odd rope head dim", ["model.n_heads=32"], "rope needs an even head dimension"),
    ("seq beyond table", ["data.seq_len=64"], "exceeds model.max_seq_len"),
    ("warmup beyond run", ["optimizer.warmup_steps=10"], "longer than run.steps"),
    ("log every zero", ["run.log_every=0"], "run.log_every must be at least 1"),
    ("accum does not divide", ["optimizer.grad_accum_steps=3"], "divisible by optimizer.grad_accum_steps"),
    ("decay group", ["optimizer.decay_exclude=[norms]"], "unknown group 'norms'"),
    ("mesh cannot split", ["mesh.data=3"], "mesh: data*fsdp*tensor = 3 but 1 devices"),
    ("mesh zero", ["mesh.data=0"], "mesh.data must be a positive size"),
    ("mesh two inferred", ["mesh.data=-1", "mesh.fsdp=-1"], "at most one of mesh.data"),
    ("tensor and heads", ["mesh.tensor=3"], "must be divisible by mesh.tensor"),
    ("multihost typo", ["mesh.multihost=maybe"], "must be one of"),
    ("unknown activation", ["model.activation=swishh"], "unknown activation 'swishh'"),
    ("unknown norm", ["model.norm=batchnorm"], "unknown norm 'batchnorm'"),
    ("unknown attention", ["model.attention=linear"], "unknown attention"),
    ("activation argument", ["model.activation=gelu", "model.activation_kwargs={approx: true}"],
     "has no argument 'approx'"),
    ("activation argument type", ["model.activation=pau", "model.activation_kwargs={version: Z}"],
     "argument 'version'"),
    ("unknown source", ["data.source=tfsd:c4"], "unknown data source 'tfsd'"),
    ("missing text glob", ["data.source=text:/nonexistent/dir/*.txt"], "/nonexistent/dir"),
    ("missing tokenizer", ["data.tokenizer=/nonexistent/sp.model"], "/nonexistent/sp.model"),
    ("unknown synthetic task", ["data.source=synthetic:nosuchtask"], "nosuchtask"),
    ("vocab too small", ["model.vocab_size=100"], "set model.vocab_size=256 or larger"),
    ("model cannot fit", ["model.d_model=65536", "model.n_heads=4"], "more than the"),
    ("positions typo", ["model.positions=rotary"], "must be one of"),
    ("dtype typo", ["model.dtype=float16"], "must be one of"),
]


def _run(capsys, argv):
    capsys.readouterr()
    rc = cli.main(argv)
    return rc, capsys.readouterr().err


def _assert_one_line(rc, err, words, run_dir):
    lines = err.strip().splitlines()
    assert rc == 2, f"exit {rc}, stderr: {err[-500:]}"
    assert len(lines) == 1 and lines[0].startswith("seismo train: "), err
    assert "Traceback" not in err and words in lines[0], lines[0]
    assert not run_dir.exists(), "nothing may be written for bad input"


@pytest.mark.parametrize("name, text, overrides, words", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_bad_config_file(capsys, tmp_path, name, text, overrides, words):
    path = tmp_path / "cfg.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    args = ["train", str(path), "--run-dir", str(tmp_path / "run")]
    for o in overrides:
        args += ["--set", o]
    rc, err = _run(capsys, args)
    _assert_one_line(rc, err, words, tmp_path / "run")


@pytest.mark.parametrize("name, overrides, words", OVERRIDE_CASES, ids=[c[0] for c in OVERRIDE_CASES])
def test_bad_value(capsys, tmp_path, name, overrides, words):
    path = tmp_path / "cfg.yaml"
    path.write_text(GOOD)
    args = ["train", str(path), "--run-dir", str(tmp_path / "run")]
    for o in overrides:
        args += ["--set", o]
    rc, err = _run(capsys, args)
    _assert_one_line(rc, err, words, tmp_path / "run")


def test_config_path_is_a_folder(capsys, tmp_path):
    rc, err = _run(capsys, ["train", str(tmp_path), "--run-dir", str(tmp_path / "run")])
    _assert_one_line(rc, err, "is a folder", tmp_path / "run")


def test_missing_config_file(capsys, tmp_path):
    rc, err = _run(capsys, ["train", str(tmp_path / "nowhere.yaml"), "--run-dir", str(tmp_path / "run")])
    _assert_one_line(rc, err, "does not exist", tmp_path / "run")


@pytest.mark.parametrize("name, grid, words", [
    ("missing data in one point", {"data.source": ["stdlib", "text:/nonexistent/*.txt"]}, "/nonexistent"),
    ("mesh in one point", {"mesh.data": [1, 3]}, "data*fsdp*tensor = 3 but 1 devices"),
    ("name in one point", {"model.activation": ["gelu", "swishh"]}, "unknown activation 'swishh'"),
    ("non-finite in one point", {"optimizer.lr": [1e-3, "nan"]}, "optimizer.lr"),
])
def test_a_sweep_checks_every_point_before_training_any(capsys, tmp_path, name, grid, words):
    import yaml

    (tmp_path / "base.yaml").write_text(GOOD)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", "base": "base.yaml", "grid": grid}))
    capsys.readouterr()
    rc = cli.main(["sweep", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("seismo sweep: ") and "Traceback" not in err, err
    assert words in lines[0], lines[0]
    assert not (tmp_path / "out").exists(), "no point may train before every point is checked"


def test_empty_and_duplicate_key_sweep_files(capsys, tmp_path):
    for text, words in [("", "is empty"), ("name: a\nname: b\ngrid: {optimizer.lr: [1e-3]}\n", "appears twice")]:
        path = tmp_path / "sweep.yaml"
        path.write_text(text)
        capsys.readouterr()
        rc = cli.main(["sweep", str(path), "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert rc == 2 and len(err.strip().splitlines()) == 1 and words in err, err


def test_sigterm_during_start_up_exits_zero_and_writes_nothing(tmp_path):
    """A stop that arrives while JAX loads is remembered from the first moment of the command:
    exit 0, no traceback, nothing to save and nothing written."""
    import os
    import signal
    import subprocess
    import sys
    import time

    path = tmp_path / "cfg.yaml"
    path.write_text(GOOD)
    p = subprocess.Popen([sys.executable, "-m", "seismo.cli", "train", str(path), "--run-dir", str(tmp_path / "run")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    time.sleep(0.5)  # the interpreter is up, JAX is still loading
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0 and "Traceback" not in err, err[-2000:]
    assert "preempted" in out and not (tmp_path / "run").exists()
