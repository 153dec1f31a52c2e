"""`seismo analyze` over a real four-update run (checkpoints 0, 1, 2, 4), checked against
numpy on the taps of a checkpoint restored independently (the whole TrainState, not
analyze's partial restore), plus re-run idempotence, probe selection, `probe` without a run
directory and the Eq. 9 table.

One tiny ReLU run is trained and analysed once per module; the tests share it and the
compiled statistics function."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import scipy.stats

from seismo import analysis, cli, config, data, models
from seismo.analysis import checkpoints as analyze
from seismo.config import ConfigError
from seismo.instrument import sparsity, tables
from seismo.instrument.dynamics_fit import massive_dynamics
from seismo.train import checkpoint as ckpt_lib
from seismo.train import optimizer as opt_lib
from seismo.train.loop import train
from seismo.train.step import TrainState

TINY = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=32", "model.activation=relu",
    "data.batch_size=4", "data.seq_len=16", "data.eval_sequences=8",
    "optimizer.lr=3e-3", "optimizer.warmup_steps=1",
    "run.steps=4", "run.checkpoint_every=2", "run.checkpoint_log_until=1", "run.progress=off",
    "run.checkpoint_async=false",
]
N_EVAL = 16  # analyze_run's default: more sequences than the run's own eval set (a prefix-stable stream)
pytestmark = pytest.mark.xdist_group("analyze")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run_dir, cfg, steps, tables): the trained run and its analysis with default settings."""
    run_dir = tmp_path_factory.mktemp("analyze") / "run"
    cfg = config.load(None, TINY)
    train(cfg, run_dir)
    steps = ckpt_lib.Checkpointer(run_dir / "checkpoints", async_save=False).steps()
    out = analyze.analyze_run(run_dir, progress=False)
    assert out == run_dir / "analysis"
    tabs = {g: analyze.read_table(run_dir, g) for g in tables.GROUPS}
    return run_dir, cfg, steps, tabs


@pytest.fixture(scope="module")
def restored(run):
    """Params of the last checkpoint restored as a whole TrainState (not analyze's partial
    restore), and float64 numpy taps of an eager forward pass on the eval set."""
    run_dir, cfg, steps, _ = run
    model = models.build(cfg.model)

    def init(rng):
        params = model.init(rng, jnp.zeros((1, cfg.data.seq_len), jnp.int32))
        tx = opt_lib.build(cfg.optimizer, cfg.model, params, cfg.run.steps)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    target = jax.eval_shape(init, jax.random.PRNGKey(0))
    state, _ = ckpt_lib.Checkpointer(run_dir / "checkpoints", async_save=False).restore(steps[-1], target)
    params = jax.device_put(state.params, jax.devices()[0])  # analyze's placement: its compilations are reused
    batch = data.build(dataclasses.replace(cfg.data, eval_sequences=N_EVAL), cfg.run.seed).eval_set()
    logits, taps = model.apply(params, jnp.asarray(batch["inputs"]), taps=True)
    return model, params, batch, logits, {k: np.asarray(v, np.float64) for k, v in taps.items()}


def metric(df: pd.DataFrame, step: int, name: str, **where) -> np.ndarray:
    """Values of one metric at one step, ordered by layer then head (rows where `where`)."""
    sel = df[(df["step"] == step) & (df["metric"] == name)]
    for col, v in where.items():
        sel = sel[sel[col].isna()] if v is None else sel[sel[col] == v]
    return sel.sort_values([c for c in ("layer", "head", "rank") if c in sel]).loc[:, "value"].to_numpy(float)


# ----------------------------------------------------------------------------- the tables


def test_every_table_has_its_columns_and_one_entry_per_checkpoint(run):
    _, _, steps, tabs = run
    assert steps == [0, 1, 2, 4]
    for group, df in tabs.items():
        assert tuple(df.columns) == tables.columns(group), group
        if group == "activation":  # ReLU has no learnable parameters: header only
            assert df.empty
            continue
        assert sorted(df["step"].unique()) == steps, group
        per_step = df.groupby("step").size()
        assert per_step.nunique() == 1, f"{group}: different row counts per step {per_step.to_dict()}"
        assert not df.duplicated([c for c in df.columns if c != "value"]).any(), group
    layered = tabs["massive"][tabs["massive"]["metric"] == "ratio"]
    assert sorted(layered["layer"].unique()) == [0, 1] and layered["head"].isna().all()
    heads = tabs["attention"][tabs["attention"]["metric"] == "entropy"].dropna(subset=["head"])
    assert sorted(heads["head"].unique()) == [0, 1]
    done = json.loads((run[0] / "analysis" / "done.json").read_text())
    assert done["settings"]["eval_sequences"] == N_EVAL
    assert all(done["steps"][g] == steps for g in tables.GROUPS)


def test_massive_matches_numpy(run, restored):
    _, _, steps, tabs = run
    h = restored[4]["resid"]  # [L, B, T, D]
    a = np.abs(h).reshape(h.shape[0], -1)
    df = tabs["massive"]
    np.testing.assert_allclose(metric(df, steps[-1], "max_abs", rank=None), a.max(1), rtol=1e-5)
    np.testing.assert_allclose(metric(df, steps[-1], "median_abs", rank=None), np.median(a, 1), rtol=1e-5)
    np.testing.assert_allclose(metric(df, steps[-1], "ratio", rank=None), a.max(1) / np.median(a, 1), rtol=1e-5)
    per_seq = np.abs(h).reshape(h.shape[0], h.shape[1], -1)
    want = (per_seq.max(2) / np.median(per_seq, 2)).mean(1)
    np.testing.assert_allclose(metric(df, steps[-1], "ratio_seq_mean"), want, rtol=1e-5)
    top = df[(df["step"] == steps[-1]) & (df["metric"] == "top_value") & (df["rank"] == 0)].sort_values("layer")
    for layer, row in zip(range(h.shape[0]), top.itertuples()):
        b, t, d = np.unravel_index(np.argmax(np.abs(h[layer])), h.shape[1:])
        assert (row.batch, row.position, row.dim) == (b, t, d)
        np.testing.assert_allclose(row.value, h[layer, b, t, d], rtol=1e-5)
    assert metric(df, steps[-1], "top_strict").sum() == 0  # a tiny model has no massive activations
    assert len(metric(df, steps[-1], "top_value")) == 2 * 5


def test_sparsity_matches_numpy_and_cett_is_consistent(run, restored):
    _, _, steps, tabs = run
    model, params, batch, logits, taps = restored
    m = taps["mlp_post"].reshape(2, -1, taps["mlp_post"].shape[-1])  # [L, N, F]
    df = tabs["sparsity"]
    np.testing.assert_allclose(metric(df, steps[-1], "zero_fraction"), (m == 0).mean((1, 2)), rtol=1e-6)
    np.testing.assert_allclose(metric(df, steps[-1], "dead_fraction"), (~(m > 0).any(1)).mean(1), rtol=1e-6)
    assert metric(df, steps[-1], "eval_tokens")[0] == m.shape[1] == N_EVAL * 16
    z = np.asarray(logits, np.float64)
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    dense = -np.take_along_axis(logp, batch["targets"][..., None], -1).mean()
    np.testing.assert_allclose(metric(df, steps[-1], "cett_loss_dense"), dense, rtol=1e-5)
    thr = metric(df, steps[-1], "cett_threshold")
    b = analyze._as_batch(batch)  # the compiled loss of the search, with the thresholds of the table
    sparse = float(tables.loss_fn(model)(params, b["inputs"], b["targets"], b["loss_mask"], jnp.asarray(thr, jnp.float32)))
    np.testing.assert_allclose(metric(df, steps[-1], "cett_loss_sparse"), sparse, rtol=1e-5)
    np.testing.assert_allclose(metric(df, steps[-1], "cett_ppl_ratio"), np.exp(sparse - dense), rtol=1e-5)
    w = np.asarray(params["blocks"]["mlp"]["down"]["kernel"], np.float64)  # [L, F, D]
    norms = np.abs(m) * np.linalg.norm(w, axis=-1)[:, None, :]
    # The threshold is one of the token-neuron norms themselves (the bisection lands on the
    # sorted norms), so the neuron that sets it sits exactly on it: float64 here and float32
    # in the code can put it on either side, and a CPU's rounding decides which. Count the
    # norms within float32 rounding of the threshold as either active or not.
    band = 4 * np.finfo(np.float32).eps * thr[:, None, None]
    at_least = (norms >= thr[:, None, None] + band).mean((1, 2))
    at_most = (norms >= thr[:, None, None] - band).mean((1, 2))
    got = metric(df, steps[-1], "cett_activation_ratio")
    assert np.all(at_least <= got + 1e-9) and np.all(got <= at_most + 1e-9), (at_least, got, at_most)
    assert np.all(at_most - at_least <= 2 / norms[0].size), "more than one tie per layer: not rounding"
    assert 0 < metric(df, steps[-1], "cett_target")[0] < 1


def test_cett_thresholds_are_cett_threshold_at_the_target_found(run, restored):
    """The search sorts each layer's neuron outputs once per checkpoint and looks every target
    up in its precomputed CETT curve; at the target it found, its thresholds are exactly those
    of `cett_threshold` (one target: a sort and a masked matmul per CETT evaluation)."""
    _, _, steps, tabs = run
    model, params, batch, _, _ = restored
    acts = tables.stats_fn(model, ("sparsity",))(params, jnp.asarray(batch["inputs"]))["_acts"]
    w = params["blocks"]["mlp"]["down"]["kernel"]
    target = metric(tabs["sparsity"], steps[-1], "cett_target")[0]
    want = [np.float32(sparsity.cett_threshold(acts[layer], w[layer], target)) for layer in range(2)]
    np.testing.assert_array_equal(metric(tabs["sparsity"], steps[-1], "cett_threshold"), want)


def test_outliers_attention_rank_weights_match_numpy(run, restored):
    _, _, steps, tabs = run
    _, params, _, _, taps = restored
    s = steps[-1]
    for tap in ("resid", "mlp_out", "attn_out"):
        x = taps[tap].reshape(2, -1, taps[tap].shape[-1])
        k = scipy.stats.kurtosis(x, axis=-1, fisher=False)
        np.testing.assert_allclose(metric(tabs["outliers"], s, f"{tap}_kurtosis_mean"), k.mean(1), rtol=1e-4)
        np.testing.assert_allclose(metric(tabs["outliers"], s, f"{tap}_kurtosis_max"), k.max(1), rtol=1e-4)
        np.testing.assert_allclose(metric(tabs["outliers"], s, f"{tap}_inf_norm"), np.abs(x).max((1, 2)), rtol=1e-6)

    p = taps["attn_probs"]  # [L, B, H, T, S]; no attention bias: S = T
    ent = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), -1).mean((1, 3))  # [L, H]
    att = tabs["attention"]
    np.testing.assert_allclose(metric(att[att["head"].notna()], s, "entropy"), ent.ravel(), rtol=1e-5)
    np.testing.assert_allclose(metric(att, s, "entropy", head=None), ent.mean(1), rtol=1e-5)
    sink = p[..., 0].mean((1, 3))  # every query sees position 0
    np.testing.assert_allclose(metric(att, s, "sink_score"), sink.ravel(), rtol=1e-5)
    np.testing.assert_allclose(metric(att, s, "sink_fraction", head=None, layer=None), (sink > 0.3).mean())
    logits = taps["attn_logits"]
    causal = np.tril(np.ones(logits.shape[-2:], bool))
    want = np.where(causal, np.abs(logits), 0).max((1, 3, 4))  # [L, H]
    np.testing.assert_allclose(metric(att, s, "logit_max"), want.ravel(), rtol=1e-5)

    h = taps["resid"]
    res = h - h.mean(2, keepdims=True)
    rc = (np.linalg.norm(res.reshape(2, h.shape[1], -1), axis=-1) / np.linalg.norm(h.reshape(2, h.shape[1], -1), axis=-1))
    np.testing.assert_allclose(metric(tabs["rank"], s, "rank_collapse_residual"), rc.mean(1), rtol=1e-5)

    wdf = tabs["weights"]
    assert set(wdf["param"]) == {"blocks/attn/query/kernel", "blocks/attn/key/kernel", "blocks/attn/value/kernel",
                                 "blocks/attn/out/kernel", "blocks/mlp/up/kernel", "blocks/mlp/down/kernel",
                                 "embed/embedding", "head/kernel"}
    up = np.asarray(params["blocks"]["mlp"]["up"]["kernel"], np.float64)
    sv = np.linalg.svd(up, compute_uv=False)  # [L, min]
    got = metric(wdf[wdf["param"] == "blocks/mlp/up/kernel"], s, "condition_number")
    np.testing.assert_allclose(got, sv[:, 0] / sv[:, -1], rtol=1e-3)
    q = sv / sv.sum(-1, keepdims=True)
    got = metric(wdf[wdf["param"] == "blocks/mlp/up/kernel"], s, "effective_rank")
    np.testing.assert_allclose(got, np.exp(-(q * np.log(q)).sum(-1)), rtol=1e-4)
    emb = wdf[(wdf["param"] == "embed/embedding") & (wdf["step"] == s)]
    assert emb["layer"].isna().all() and len(emb) == 5  # one value per metric, no layer


# ----------------------------------------------------------------------------- re-runs


def _count_restores(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = analyze._restore_params
    monkeypatch.setattr(analyze, "_restore_params", lambda ckpt, step, abstract: calls.append(step) or real(ckpt, step, abstract))
    return calls


def test_rerun_is_idempotent_and_does_not_recompute(run, monkeypatch):
    run_dir = run[0]
    before = {p.name: p.read_bytes() for p in (run_dir / "analysis").glob("*.csv")}
    calls = _count_restores(monkeypatch)
    analyze.analyze_run(run_dir, progress=False)
    assert calls == []
    assert {p.name: p.read_bytes() for p in (run_dir / "analysis").glob("*.csv")} == before
    recorded = config.load(run_dir / "config.yaml")  # the model as trained (attention_impl resolved)
    assert tables.stats_fn(models.build(recorded.model), tables.check_groups(None))._cache_size() == 1  # one compile


def test_new_or_interrupted_checkpoint_is_appended_once(run, tmp_path, monkeypatch):
    """done.json without the last step but its rows already written (an interrupted analysis):
    only that step is recomputed, and the tables come out exactly as before."""
    run_dir, _, steps, tabs = run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    done_path = copy / "analysis" / "done.json"
    done = json.loads(done_path.read_text())
    done["steps"] = {g: [s for s in v if s != steps[-1]] for g, v in done["steps"].items()}
    done_path.write_text(json.dumps(done))
    calls = _count_restores(monkeypatch)
    analyze.analyze_run(copy, progress=False)
    assert calls == [steps[-1]]
    for group, want in tabs.items():
        got = analyze.read_table(copy, group)
        pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=1e-6)


def test_one_probe_group_writes_only_its_table(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run[0], copy, ignore=shutil.ignore_patterns("analysis"))
    analyze.analyze_run(copy, probes=["rank"], progress=False)
    assert sorted(p.name for p in (copy / "analysis").iterdir()) == ["done.json", "rank.csv"]
    pd.testing.assert_frame_equal(analyze.read_table(copy, "rank"), run[3]["rank"], check_exact=False, rtol=1e-6)
    with pytest.raises(ConfigError, match="eval_sequences=16 \\(now 4\\)"):
        analyze.analyze_run(copy, probes=["rank"], eval_sequences=4, progress=False)


def test_unknown_probe_fails_clearly(run, capsys):
    with pytest.raises(ConfigError, match="unknown analysis 'masive'; valid analyses: massive, sparsity, outliers"):
        analyze.analyze_run(run[0], probes=["masive"])
    assert cli.main(["analyze", str(run[0]), "--probes", "nope"]) == 2
    assert "valid analyses" in capsys.readouterr().err


def test_missing_run_or_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        analyze.analyze_run(tmp_path)


# ----------------------------------------------------------------------------- probe and the fit


def test_probe_without_run_dir_gives_the_same_tables(run, restored):
    _, _, steps, tabs = run
    model, params, batch, _, _ = restored
    assert analysis.probe is analyze.probe  # exported for notebooks
    got = analyze.probe(model, params, batch["inputs"], cett_p=None)  # same shapes: no new compile
    assert set(got) == set(tables.GROUPS)
    for group, df in got.items():
        if group == "sparsity":  # without targets the CETT rows differ; the rest must agree
            want = tabs[group][(tabs[group]["step"] == steps[-1]) & ~tabs[group]["metric"].str.startswith("cett")]
            pd.testing.assert_frame_equal(df, want.drop(columns="step").reset_index(drop=True))
            continue
        assert tuple(df.columns) == tables.columns(group)[1:]
        want = tabs[group][tabs[group]["step"] == steps[-1]].drop(columns="step").reset_index(drop=True)
        pd.testing.assert_frame_equal(df, want, check_exact=False, rtol=1e-5)


def test_probe_learnable_activation_parameters():
    cfg = config.load(None, [*TINY, "model.activation=swish_beta"])
    model = models.build(cfg.model)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    params = jax.tree.map(lambda s: jnp.arange(np.prod(s.shape), dtype=s.dtype).reshape(s.shape), shapes)
    df = analyze.probe(model, params, jnp.zeros((1, 8), jnp.int32), probes="activation")["activation"]
    beta = np.asarray(params["blocks"]["mlp"]["activation"]["beta"]).reshape(2, -1)
    assert set(df["param"]) == {"blocks/mlp/activation/beta"} and set(df["metric"]) == {"beta"}
    np.testing.assert_allclose(df.sort_values(["layer", "index"])["value"], beta.ravel())


def test_fit_massive_dynamics_table(tmp_path):
    truth = dict(A=40.0, lam=0.3, gamma=2e-3, t0=1.5, K=5.0)
    steps = np.array([0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 1500, 2000])
    rows = [{"step": s, "layer": 0, "metric": "ratio_seq_mean", "value": massive_dynamics(s, **truth)} for s in steps]
    rows += [{"step": s, "layer": 1, "metric": "ratio_seq_mean", "value": 3.0 + s} for s in steps[:5]]  # too few
    rows += [{"step": 0, "layer": 0, "metric": "ratio", "value": 1.0}]
    (tmp_path / "analysis").mkdir()
    pd.DataFrame(rows, columns=list(tables.columns("massive"))).to_csv(tmp_path / "analysis" / "massive.csv",
                                                                       index=False)
    path = analyze.fit_massive_dynamics_table(tmp_path)
    fit = pd.read_csv(path)
    assert tuple(fit.columns) == analyze.FIT_COLUMNS
    assert fit["layer"].tolist() == [0] and fit["n_points"].tolist() == [len(steps)]
    assert fit["r2"][0] > 0.999
    pred = massive_dynamics(steps, *(fit[k][0] for k in ("A", "lam", "gamma", "t0", "K")))
    np.testing.assert_allclose(pred, massive_dynamics(steps, **truth), rtol=1e-3)
