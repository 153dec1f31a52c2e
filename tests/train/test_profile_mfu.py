"""MFU in every train row and `run.profile_steps` traces (seismo.train.flops, seismo.train.profile).

MFU is checked against the PaLM formula computed by hand from the model's shapes and the
row's own tokens/s; the peak table against the published figures it cites."""

import gzip
import json

import jax
import pytest

from seismo import config
from seismo.train import aot, flops
from seismo.train.loop import train

D, L, H, F, V, T, B = 16, 1, 2, 64, 256, 8, 4
TINY = [f"model.d_model={D}", f"model.n_layers={L}", f"model.n_heads={H}", "model.max_seq_len=16",
        f"data.batch_size={B}", f"data.seq_len={T}", "data.eval_sequences=2", "optimizer.warmup_steps=1",
        "run.steps=4", "run.log_every=1", "run.eval_every=4", "run.progress=off", "run.checkpoint_async=false"]


def hand_flops_per_token(d=D, layers=L, heads=H, ff=F, vocab=V, seq=T, tied=False):
    n = layers * (4 * d * d + 2 * d * ff) + (0 if tied else d * vocab) + (d * vocab if tied else 0)
    return 6 * n + 12 * layers * heads * (d // heads) * seq


def _params(cfg):
    from seismo import models

    return jax.eval_shape(lambda: models.build(cfg.model).init(jax.random.PRNGKey(0), jax.numpy.zeros((1, T), "int32")))


@pytest.mark.parametrize("extra", [[], ["model.tie_embeddings=true"], ["model.n_layers=3", "model.d_ff=48"]])
def test_model_flops_by_hand(extra):
    cfg = config.load(None, TINY + extra)
    m = cfg.model
    want = hand_flops_per_token(layers=m.n_layers, ff=m.d_ff or 4 * D, tied=m.tie_embeddings) * B * T
    assert flops.model_flops_per_step(cfg, _params(cfg)) == want
    assert aot.model_flops_per_step is flops.model_flops_per_step  # one count, used by the AOT report too


def test_peak_table():
    dev = lambda kind: type("D", (), {"device_kind": kind})()
    assert flops.peak_flops_per_device(dev("TPU v5 lite")) == 197e12
    assert flops.peak_flops_per_device(dev("TPU v4"), "float32") == 275e12  # f32 matmuls: one bf16 pass
    assert flops.peak_flops_per_device(dev("TPU v3")) == 123e12 / 2  # one device per TensorCore
    assert flops.peak_flops_per_device(dev("TPU v6 lite")) == 918e12
    assert flops.peak_flops_per_device(dev("TPU v5")) == 459e12  # v5p
    assert flops.peak_flops_per_device(dev("NVIDIA H100 80GB HBM3")) == 989e12
    assert flops.peak_flops_per_device(dev("NVIDIA H100 80GB HBM3"), "float32") == 494.7e12  # TF32
    assert flops.peak_flops_per_device(dev("NVIDIA H100 PCIe")) == 756e12
    assert flops.peak_flops_per_device(dev("NVIDIA H200")) == 989e12
    assert flops.peak_flops_per_device(dev("NVIDIA A100-SXM4-80GB"), "float32") == 156e12
    assert flops.peak_flops_per_device(dev("NVIDIA A10G")) == 125e12
    assert flops.peak_flops_per_device(dev("cpu")) is None
    assert flops.peak_flops_per_device(dev("cpu"), override=3e9) == 3e9
    assert flops.mfu(1e12, 0.5, 4, 1e12) == pytest.approx(0.5)
    assert flops.mfu(1e12, 0.5, 4, None) is None
    for chip in aot.CHIPS.values():  # the AOT report's chips take their peaks from the same table
        assert chip.peak_bf16_flops == flops.chip_peak(chip.device_kind).bfloat16


def test_rows_have_mfu_and_the_trace_is_written(tmp_path):
    """Steps 2..3 traced into <run>/profile (TensorBoard's xplane and a Perfetto trace, with
    the steps marked); every train row's mfu is the hand formula from its own tokens/s."""
    peak = 1e9
    cfg = config.load(None, TINY + [f"run.peak_flops={peak}", "run.profile_steps=[2, 3]"])
    train(cfg, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("kind", "train") == "train" and "tokens_per_s" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert r["mfu"] == pytest.approx(hand_flops_per_token() * r["tokens_per_s"] / (jax.device_count() * peak),
                                         rel=1e-6)
    traces = list((tmp_path / "run" / "profile" / "plugins" / "profile").glob("*/*"))
    assert any(p.name.endswith(".xplane.pb") for p in traces), traces
    (perfetto,) = [p for p in traces if p.name == "perfetto_trace.json.gz"]
    events = json.loads(gzip.decompress(perfetto.read_bytes()))
    events = events["traceEvents"] if isinstance(events, dict) else events
    steps = {int(e["args"]["step_num"]) for e in events if e.get("name") == "train" and "step_num" in e.get("args", {})}
    assert steps == {2, 3}


def test_no_peak_known_gives_no_mfu():
    """The table has no CPU: a CPU run without run.peak_flops writes mfu null in its rows."""
    assert flops.peak_flops_per_device(jax.devices()[0], "float32") is None


@pytest.mark.parametrize("steps, words", [("[3, 2]", "1 <= first <= last"), ("[0, 2]", "1 <= first"),
                                          ("[1]", "\\[first, last\\]")])
def test_bad_profile_steps(steps, words):
    with pytest.raises(config.ConfigError, match=words):
        config.load(None, [f"run.profile_steps={steps}"])
    with pytest.raises(config.ConfigError, match="run.peak_flops must be a positive"):
        config.load(None, ["run.peak_flops=-1"])
