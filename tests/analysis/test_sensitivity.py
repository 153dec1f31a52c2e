"""LR sensitivity (Wortsman et al. 2023, arXiv 2309.14322, §2.2) on hand-computed cases."""

import math

import numpy as np
import pandas as pd
import pytest

from seismo.analysis import clamp_losses, lr_sensitivity, sensitivity_table

NAN = float("nan")


def test_golden_value_research_9_1():
    got = lr_sensitivity([3.50, 3.40, 3.30, 3.35, 3.60, 7.00, NAN], 10.37664)
    assert got == pytest.approx(1.632377, abs=1e-6), (
        "docs/methods.md §9.1 golden value changed: the clamp (NaN -> l0) or the mean over the grid is off")


def test_diverged_nan_inf_and_none_count_as_loss_at_init():
    # clamped: [10, 10, 10, 3] -> l* = 3 -> mean([7, 7, 7, 0]) = 5.25
    assert lr_sensitivity([NAN, math.inf, None, 3.0], 10.0) == pytest.approx(5.25)
    np.testing.assert_allclose(clamp_losses([12.0, NAN, 2.0], 10.0), [10.0, 10.0, 2.0])


def test_ties_single_run_and_all_diverged():
    assert lr_sensitivity([3.0, 3.0, 4.0], 10.0) == pytest.approx(1 / 3)
    assert lr_sensitivity([3.3], 10.0) == 0.0
    assert lr_sensitivity([NAN, NAN, math.inf], 10.0) == 0.0


def test_per_run_loss_at_init_and_arrays():
    # clamped [10, 3] (each run its own l0) -> mean([7, 0])
    assert lr_sensitivity(np.array([NAN, 3.0]), np.array([10.0, 9.0])) == pytest.approx(3.5)
    assert lr_sensitivity(pd.Series([4.0, 3.0]), 10.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="loss_at_init"):
        lr_sensitivity([3.0], NAN)


def _results():
    rows = []
    for qk, losses in ((False, [3.5, 3.2, NAN]), (True, [3.4, 3.1, 3.0])):
        for lr, loss in zip([1e-3, 1e-2, 1e-1], losses):
            for seed in (0, 1):
                rows.append({"model.qk_norm": qk, "optimizer.lr": lr, "run.seed": seed, "final_eval_loss": loss,
                             "loss_at_init": 5.0, "diverged": not np.isfinite(loss), "status": "finished"})
    return pd.DataFrame(rows)


def test_sensitivity_table_groups_seeds_and_counts():
    res = _results()
    table = sensitivity_table(res, group_by=["model.qk_norm"]).set_index("model.qk_norm")
    # qk off: clamped [3.5, 3.2, 5.0], min 3.2 -> mean([0.3, 0, 1.8]) = 0.7; qk on: mean([0.4, 0.1, 0]) = 1/6
    assert table.loc[False, "lr_sensitivity"] == pytest.approx(0.7)
    assert table.loc[True, "lr_sensitivity"] == pytest.approx(0.5 / 3)
    assert table.loc[False, "best_lr"] == pytest.approx(1e-2)
    assert table.loc[True, "best_loss"] == pytest.approx(3.0)
    assert table.loc[False, "n_diverged"] == 2 and table.loc[True, "n_diverged"] == 0
    assert table.loc[False, "n_runs"] == 6 and table.loc[False, "n_lrs"] == 3


def test_sensitivity_table_single_group_and_unfinished():
    res = _results()
    res = res[res["model.qk_norm"]].copy()
    res.loc[res.index[-1], "status"] = "unfinished"
    table = sensitivity_table(res)
    assert len(table) == 1 and table["n_unfinished"].iloc[0] == 1
    # the unfinished seed of lr=0.1 is left out; the other seed still gives 3.0
    assert table["lr_sensitivity"].iloc[0] == pytest.approx(0.5 / 3)
    # a diverged flag wins over a finite last eval loss
    res2 = _results()
    res2.loc[0, "diverged"] = True
    t2 = sensitivity_table(res2, group_by=["model.qk_norm"]).set_index("model.qk_norm")
    assert t2.loc[False, "n_diverged"] == 3


def test_sensitivity_table_missing_column_names_it():
    with pytest.raises(KeyError, match="optimizer.lr"):
        sensitivity_table(pd.DataFrame({"final_eval_loss": [1.0], "loss_at_init": [2.0]}))
