"""Max-logit extrapolation (Wortsman et al. 2023, arXiv 2309.14322, Fig. 9); the in-run trend warning is
tested in tests/instrument/test_trend.py."""

import math

import numpy as np
import pandas as pd
import pytest

from seismo.analysis import extrapolate_logits

SIZES = [1e6, 3e6, 1e7, 3e7, 1e8]
# planted: log10(logit) = c0 + c1 x + c2 x^2 with x = log10(N); LR 1e-2 reaches ~1e5 at N = 1e9, LR 1e-3 stays low
PLANTED = {1e-2: (11.0, -3.0, 0.25), 1e-3: (1.0, -0.3, 0.05)}


def planted_logit(lr, n):
    c0, c1, c2 = PLANTED[lr]
    x = math.log10(n)
    return 10 ** (c0 + c1 * x + c2 * x * x)


def results_table(step=2000):
    rows = [{"optimizer.lr": lr, "n_params": n, "attn_logit_max_l0": planted_logit(lr, n), "attn_logit_step": step}
            for lr in PLANTED for n in SIZES]
    return pd.DataFrame(rows)


def test_recovers_planted_quadratic_and_flags_crossing():
    fits = extrapolate_logits(results_table(), 2000, 1e9).set_index("optimizer.lr")
    for lr in PLANTED:
        assert fits.loc[lr, "predicted_logit"] == pytest.approx(planted_logit(lr, 1e9), rel=1e-6)
        np.testing.assert_allclose(fits.loc[lr, "coefs"], PLANTED[lr][::-1], atol=1e-6)
        assert fits.loc[lr, "n_sizes"] == 5 and fits.loc[lr, "rmse"] < 1e-8
    assert fits.loc[1e-2, "predicted_logit"] > 1e4 and fits.loc[1e-2, "crosses_threshold"]
    assert not fits.loc[1e-3, "crosses_threshold"]


def test_linear_space_and_several_targets():
    rows = [{"optimizer.lr": 1e-2, "n_params": n, "attn_logit_max_l0": 5 + 2e-7 * n + 3e-15 * n * n} for n in SIZES]
    fits = extrapolate_logits(pd.DataFrame(rows), None, [1e9, 2e9], space="linear")
    expected = [5 + 2e-7 * t + 3e-15 * t * t for t in (1e9, 2e9)]
    np.testing.assert_allclose(fits["predicted_logit"], expected, rtol=1e-6)
    assert list(fits["crosses_threshold"]) == [False, True]  # 3205 at 1e9, 12405 at 2e9


def test_step_filter_groups_and_too_few_sizes():
    res = results_table()
    res.loc[res["n_params"] == 1e8, "attn_logit_step"] = 1500  # read elsewhere (e.g. diverged earlier): left out
    fits = extrapolate_logits(res, 2000, 1e9)
    assert set(fits["n_sizes"]) == {4}
    res["model.qk_norm"] = False
    res = pd.concat([res, res.assign(**{"model.qk_norm": True, "attn_logit_max_l0": 3.0})])
    grouped = extrapolate_logits(res, None, 1e9, group_by=["model.qk_norm"])
    assert len(grouped) == 4
    flat = grouped[grouped["model.qk_norm"]]
    np.testing.assert_allclose(flat["predicted_logit"], 3.0, rtol=1e-6)
    one = extrapolate_logits(results_table().head(1), None, 1e9)
    assert one["degree"].iloc[0] == -1 and math.isnan(one["predicted_logit"].iloc[0])
    two = extrapolate_logits(results_table().head(2), None, 1e9)
    assert two["degree"].iloc[0] == 1, "two sizes give a power law"
    with pytest.raises(KeyError, match="n_params"):
        extrapolate_logits(results_table().drop(columns="n_params"), None, 1e9)
