"""Ahead-of-time compilation for TPU slices (seismo.train.aot, `seismo compile`, and
scripts/tpu_aot_check.py, its wrapper).

Most of it runs everywhere: topology names, the chip table, the parsing of compiler
messages, the report and its printing, and the real train step compiled ahead of time for
CPU devices (the same code path as for a TPU slice). The compiles for TPU topologies need
libtpu (`pip install -e '.[tpu]'`), which CI's environment does not have: they skip there.
"""

import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import jax
import pytest

from seismo import cli, config
from seismo.train import aot, engine

GiB = 2**30
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "tpu_aot_check.py"
MICRO = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=16",
         "data.batch_size=4", "data.seq_len=16", "optimizer.warmup_steps=2", "run.steps=10"]
needs_libtpu = pytest.mark.skipif(
    not aot.libtpu_available(),
    reason="libtpu is not installed (CI's venv): the TPU compiler is needed to compile for a TPU "
           "topology; run in a venv with `pip install -e '.[tpu]'` to include these")


# --------------------------------------------------------------------------- names and tables


@pytest.mark.parametrize("name, topology, chips", [
    ("v5e:2x2", "v5e:2x2", 4), ("v5e:2x2x1", "v5e:2x2", 4), ("v5litepod-16", "v5e:4x4", 16),
    ("v5litepod-8", "v5e:2x4", 8), ("v6e-256", "v6e:16x16", 256), ("v4:2x2", "v4:2x2x1", 4),
    ("v4-8", "v4:2x2x1", 4), ("v4-32", "v4:2x2x4", 16), ("v5p-128", "v5p:4x4x4", 64),
    ("v3-32", "v3:4x4", 16), ("v2-8", "v2:2x2", 4), ("tpu7x:2x2x1", "tpu7x:2x2x1", 4),
    ("v7x:2x2x2", "tpu7x:2x2x2", 8),
])
def test_topology_names(name, topology, chips):
    t = aot.parse_topology(name)
    assert (t.topology_name, t.n_chips) == (topology, chips)


@pytest.mark.parametrize("name, words", [
    ("v9:2x2", "unknown TPU generation"), ("v5e:2x2x2", "2-D"), ("v4:2x0x1", "3-D"),
    ("v4-6", "power of two"), ("v4-7", "TensorCores"), ("tpu7x-8", "by shape"), ("a100", "not understood"),
])
def test_bad_topology_names_say_what_to_write(name, words):
    with pytest.raises(ValueError, match=words):
        aot.parse_topology(name)


def test_default_shapes_follow_cloud_slices():
    assert [aot.default_shape(n, 3) for n in (4, 8, 16, 32, 64, 128, 256, 512)] == [
        (2, 2, 1), (2, 2, 2), (2, 2, 4), (2, 4, 4), (4, 4, 4), (4, 4, 8), (4, 8, 8), (8, 8, 8)]
    assert [aot.default_shape(n, 2) for n in (1, 4, 8, 16, 32, 64, 128, 256)] == [
        (1, 1), (2, 2), (2, 4), (4, 4), (4, 8), (8, 8), (8, 16), (16, 16)]


def test_chip_table():
    # Published per-chip HBM (Cloud TPU system architecture); a wrong entry misjudges fits.
    hbm = {g: c.hbm_bytes // GiB for g, c in aot.CHIPS.items()}
    assert hbm == {"v2": 16, "v3": 32, "v4": 32, "v5e": 16, "v5p": 96, "v6e": 32, "tpu7x": 192}
    assert aot.chip_for_device_kind("TPU v5 lite").generation == "v5e"
    assert aot.chip_for_device_kind("TPU v4").chip_config == "megacore"
    assert aot.chip_for_device_kind("cpu") is None


def test_no_libtpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(aot, "libtpu_available", lambda: False)
    with pytest.raises(aot.LibtpuUnavailable, match=r"pip install -e '\.\[tpu\]'"):
        aot.topology_devices("v5e:2x2")


# --------------------------------------------------------------------------- compiler output


# The TPU compiler's refusals, verbatim from libtpu 0.0.42 (jax 0.10.2).
OOM = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
       "(19.14G) exceeds available HBM (15.75G).")


def test_parse_oom():
    got = aot.parse_oom(OOM)
    assert got["oom"] and got["required_for"] == "HLO temporaries"
    assert got["required_bytes"] == int(19.14 * GiB) and got["available_bytes"] == int(15.75 * GiB)
    assert aot.parse_oom("INVALID_ARGUMENT: something else") is None
    assert aot.parse_oom("RESOURCE_EXHAUSTED: worded differently") == {"oom": True}


def test_memory_and_cost_reports():
    stats = types.SimpleNamespace(argument_size_in_bytes=100, output_size_in_bytes=90, alias_size_in_bytes=80,
                                  temp_size_in_bytes=1000, generated_code_size_in_bytes=7)
    mem = aot.memory_report(stats)
    assert mem["peak_bytes"] == 100 + 90 - 80 + 1000 + 7
    assert aot.cost_report({"flops": 12.0, "bytes accessed": 3.0}) == {"flops": 12.0, "bytes_accessed": 3.0}
    assert aot.cost_report([{"flops": 5}]) == {"flops": 5.0, "bytes_accessed": None}
    assert aot.cost_report(None) == {"flops": None, "bytes_accessed": None}


def test_verdicts():
    assert aot.verdict({"compiled": True, "peak_bytes": 10}, 10) == "fits"
    assert aot.verdict({"compiled": True, "peak_bytes": 11}, 10) == "does not fit"  # never "tight"
    assert aot.verdict({"compiled": True, "peak_bytes": 11}, None) == "fits"
    assert aot.verdict({"compiled": False}, 10) == "does not fit"


HBM = int(15.75 * GiB)


def _report(**steps):
    rep = {"topology": "v5e:2x2", "platform": "tpu", "n_devices": 4, "device_kind": "TPU v5 lite", "n_hosts": 1,
           "mesh": {"data": 4, "fsdp": 1, "tensor": 1}, "mesh_layout": "physical", "mesh_dcn": [1, 1, 1],
           "hbm_bytes_per_device": HBM, "params": 162_220_000, "global_batch": 16, "seq_len": 1024,
           "tokens_per_step": 16384, "model_flops_per_step": 1.4e13, "peak_flops_per_device": 197e12,
           "step_s_at_peak": 1.4e13 / (4 * 197e12), "mfu_assumed": 0.4, "step_s_at_mfu": 1.4e13 / (4 * 197e12 * 0.4),
           "tokens_per_s_at_mfu": 16384 * 4 * 197e12 * 0.4 / 1.4e13, "steps": steps,
           "fits": all(s["verdict"] == "fits" for s in steps.values())}
    rep["verdict"] = aot.overall_verdict(rep)
    return rep


def _step(peak, compiled=True):
    if not compiled:
        rep = {"compiled": False, **aot.parse_oom(OOM)}
    else:
        rep = {"compiled": True, "argument_bytes": GiB, "output_bytes": GiB, "alias_bytes": GiB,
               "temp_bytes": peak - GiB, "code_bytes": 0, "peak_bytes": peak, "flops": 1e12, "compile_s": 100.0}
    aot._judge(rep, HBM)
    return rep


def test_verdict_says_by_how_much():
    fits = _step(12 * GiB)
    assert fits["verdict"] == "fits" and fits["headroom_bytes"] == HBM - 12 * GiB
    assert _report(train=fits)["verdict"] == (
        f"fits with {100 * (15.75 - 12) / 15.75:.1f}% headroom (3.75 GiB of 15.75 GiB per device free in the train step)")
    over = _step(17 * GiB)  # the compiler accepted it, the buffers add up to more: no
    assert over["verdict"] == "does not fit" and over["over_bytes"] == 17 * GiB - HBM
    assert _report(train=fits, probe=over)["verdict"].startswith("does not fit by 1.25 GiB per device (the probe step")
    refused = _step(0, compiled=False)
    assert refused["over_bytes"] == int(19.14 * GiB) - HBM
    text = _report(train=refused, probe=over)["verdict"]
    assert text.startswith("does not fit by 3.39 GiB per device (the train step; the compiler ran out of memory")


def test_format_report():
    text = aot.format_report(_report(train=_step(12 * GiB)))
    assert "v5e:2x2: 4 x TPU v5 lite" in text and "data=4 x fsdp=1 x tensor=1 (physical layout)" in text
    assert "peak 12.00 GiB (76.2% of HBM)" in text and text.endswith("verdict: fits with 23.8% headroom "
                                                                     "(3.75 GiB of 15.75 GiB per device free in the train step)")
    assert "step time at 40% MFU: 44.4 ms" in text and "tight" not in text
    text = aot.format_report(_report(train=_step(0, compiled=False), probe=_step(17 * GiB)))
    assert "DOES NOT FIT: needs 19.14 GiB of 15.75 GiB available (HLO temporaries)" in text
    assert "verdict: does not fit by 3.39 GiB per device" in text


def test_model_flops_is_the_palm_count():
    cfg = config.load(None, MICRO)
    params = jax.eval_shape(lambda: aot.models.build(cfg.model).init(jax.random.PRNGKey(0),
                                                                    jax.numpy.zeros((1, 16), "int32")))
    D, F, V, L, T, tokens = 32, 128, 256, 2, 16, 4 * 16
    n = L * (4 * D * D + 2 * D * F) + D * V  # attention q,k,v,o + MLP in/out per layer, and the head
    assert aot.model_flops_per_step(cfg, params) == 6 * n * tokens + 12 * L * D * T * tokens


# --------------------------------------------------------------------------- the real step, on CPU


def test_batch_that_the_mesh_cannot_split_fails_before_compiling():
    cfg = config.load(None, MICRO + ["data.batch_size=6"])
    mesh = types.SimpleNamespace(shape={"data": 4, "fsdp": 1, "tensor": 1})  # checked before any use
    with pytest.raises(config.ConfigError, match=r"data.batch_size \(6\) must be divisible by mesh data\*fsdp \(4\)"):
        engine.build(cfg, mesh)


SHARDINGS_MATCH_TRAINER = """
import json
import jax
import optax
from seismo import config
from seismo.train import aot, engine, mesh
cfg = config.load(None, {overrides!r})
built = engine.build(cfg, mesh.make_mesh(cfg.mesh))  # what training runs, and what aot compiles
sh = built.state_shardings
assert any(s.spec != jax.sharding.PartitionSpec() for s in jax.tree.leaves(sh.params)), "nothing is sharded"
adam = optax.tree_utils.tree_get(sh.opt_state, "ScaleByAdamState")
assert jax.tree.leaves(adam.mu) == jax.tree.leaves(sh.params), "Adam's moments are not sharded like the params"
report = aot.compile_for_devices(cfg, jax.devices(), hbm_bytes_per_device=2**30)
assert report["mesh"] == {{"data": 2, "fsdp": 2, "tensor": 1}} and report["n_devices"] == 4, report
assert set(report["steps"]) == {{"train"}} and report["fits"], report  # probe step only with run.probe_every
train = report["steps"]["train"]
assert train["compiled"] and train["verdict"] == "fits" and train["flops"] > 0, train
# the state is donated: the new state reuses its buffers
assert 0 < train["alias_bytes"] <= train["argument_bytes"] and train["peak_bytes"] < 2**30, train
json.dumps(report)  # the script writes it as JSON
print("ok")
"""


@pytest.mark.multiprocess
def test_sharded_step_matches_the_trainer_on_fake_devices(tmp_path):
    """The whole path except libtpu, on 4 fake CPU devices as (data=2, fsdp=2): the AOT step has
    the engine's shardings (the training step's), compiles ahead of time, and reports memory and FLOPs."""
    code = SHARDINGS_MATCH_TRAINER.format(overrides=MICRO + ["mesh.data=2", "mesh.fsdp=2"])
    env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "ok" in p.stdout, p.stderr[-3000:]


# --------------------------------------------------------------------------- seismo compile (and the script)


def _script_main():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tpu_aot_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("main", [lambda a: cli.main(["compile", *a]), "script"], ids=["seismo compile", "script"])
def test_compile_bad_input_exits_2(tmp_path, capsys, main):
    main = _script_main() if main == "script" else main
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  d_model: 32\n")
    assert main([str(cfg), "--topology", "v9:2x2"]) == 2
    assert "unknown TPU generation 'v9'" in capsys.readouterr().err
    assert main([str(cfg), "--topology", "v5e:2x2", "--set", "model.d_modl=3"]) == 2
    assert "Did you mean 'model.d_model'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([str(cfg), "--topology", "host", "--mfu", "1.5"])
    assert e.value.code == 2 and "--mfu '1.5': give a fraction in (0, 1]" in capsys.readouterr().err
    for flag, value, words in [("--peak-flops", "-1", "positive FLOP/s"), ("--num-slices", "0", "at least 1")]:
        with pytest.raises(SystemExit) as e:
            main([str(cfg), "--topology", "host", flag, value])
        assert e.value.code == 2 and words in capsys.readouterr().err


def test_compile_without_libtpu_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(aot, "libtpu_available", lambda: False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  d_model: 32\n")
    assert cli.main(["compile", str(cfg), "--topology", "v5e:2x2"]) == 2
    err = capsys.readouterr().err
    assert "pip install -e '.[tpu]'" in err and "--topology host" in err and len(err.strip().splitlines()) == 1


def test_compile_host_end_to_end(tmp_path, capsys, monkeypatch):
    """`seismo compile --topology host`: the real step compiled for this machine; the verdict,
    the headroom and the step time at the stated MFU from the report's own numbers; a limit
    below the step's buffers turns it into 'does not fit' and exit status 1."""
    cfg = tmp_path / "c.yaml"
    config.dump(config.load(None, MICRO + ["model.n_layers=1"]), cfg)
    out = tmp_path / "r.json"
    args = ["compile", str(cfg), "--topology", "host", "--peak-flops", "1e12", "--mfu", "0.5", "--json", str(out)]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    (rep,) = json.loads(out.read_text())
    train = rep["steps"]["train"]
    assert rep["topology"] == "host" and rep["fits"] and train["verdict"] == "fits" and set(rep["steps"]) == {"train"}
    limit = rep["hbm_bytes_per_device"]
    assert train["headroom_bytes"] == limit - train["peak_bytes"] > 0
    assert rep["step_s_at_mfu"] == pytest.approx(rep["model_flops_per_step"] / (rep["n_devices"] * 1e12 * 0.5))
    assert rep["tokens_per_s_at_mfu"] == pytest.approx(rep["tokens_per_step"] / rep["step_s_at_mfu"])
    assert f"verdict: fits with {math.floor(1000 * train['headroom_bytes'] / limit) / 10:.1f}% headroom" in text
    assert "step time at 50% MFU" in text

    monkeypatch.setattr(aot, "host_memory_bytes", lambda device, n: 4096)
    assert cli.main(args) == 1
    (rep,) = json.loads(out.read_text())
    train = rep["steps"]["train"]
    assert not rep["fits"] and train["over_bytes"] == train["peak_bytes"] - 4096
    assert "verdict: does not fit by" in capsys.readouterr().out


# --------------------------------------------------------------------------- TPU topologies (libtpu)


@needs_libtpu
def test_topology_devices():
    v4 = aot.topology_devices("v4-8")
    assert len(v4) == 4 and v4[0].device_kind == "TPU v4"  # megacore: one device per chip, as on Cloud
    assert len(aot.topology_devices("v4-8", chip_config="default")) == 8  # one per TensorCore
    v5e = aot.topology_devices("v5e:4x4")
    assert len(v5e) == 16 and len({d.process_index for d in v5e}) == 4  # 4 hosts of 4 chips
    assert aot.usable_hbm_bytes(v5e[0]) == int(15.75 * GiB)


@needs_libtpu
def test_compile_tiny_for_v5e_2x2():
    cfg = config.load(None, MICRO + ["data.batch_size=8", "run.probe_every=5"])
    report = aot.compile_for_topology(cfg, "v5e:2x2", mesh={"fsdp": 2})
    assert report["topology"] == "v5e:2x2" and report["device_kind"] == "TPU v5 lite"
    assert report["n_devices"] == 4 and report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    assert report["hbm_bytes_per_device"] == int(15.75 * GiB) and report["hbm_nominal_bytes_per_device"] == 16 * GiB
    assert report["fits"] and set(report["steps"]) == {"train", "probe"}
    for step in report["steps"].values():
        assert step["compiled"] and step["verdict"] == "fits"
        assert 0 < step["peak_bytes"] < 64 * 2**20 and step["alias_bytes"] > 0 and step["flops"] > 0
    assert report["step_s_at_peak"] == pytest.approx(report["model_flops_per_step"] / 4 / 197e12)
    assert report["step_s_at_mfu"] == pytest.approx(report["step_s_at_peak"] / aot.DEFAULT_MFU)
    assert report["mesh_layout"] == "physical" and report["verdict"].startswith("fits with 99.9% headroom")
    assert "verdict: fits with" in aot.format_report(report)


@needs_libtpu
def test_out_of_hbm_is_reported_not_raised(tmp_path):
    """A batch far beyond one v5e chip: the compiler refuses; the script (seismo compile) prints it and exits 1."""
    cfg = tmp_path / "c.yaml"
    config.dump(config.load(None, MICRO), cfg)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    p = subprocess.run([sys.executable, str(SCRIPT), str(cfg), "--topology", "v5e:2x2", "--set",
                        "data.batch_size=1048576", "--json", str(tmp_path / "r.json")],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 1, p.stderr[-3000:]
    assert "DOES NOT FIT" in p.stdout and "verdict: does not fit by" in p.stdout
    (report,) = json.loads((tmp_path / "r.json").read_text())
    train = report["steps"]["train"]
    assert not train["compiled"] and train["required_bytes"] > train["available_bytes"] == int(15.75 * GiB)
