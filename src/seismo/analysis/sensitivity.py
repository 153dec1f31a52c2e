"""Learning-rate sensitivity, the summary number of Wortsman et al. 2023 (arXiv 2309.14322, §2.2).

    LR_sensitivity = E_{η in grid} [ min(ℓ(A(η)), ℓ0) − ℓ* ],   ℓ* = min_η min(ℓ(A(η)), ℓ0)

ℓ(A(η)) is the final validation loss of the run trained with peak LR η, ℓ0 the loss at
initialisation. A diverged run (NaN or inf loss) counts as ℓ0: that is what the clamp is for.
The expectation is the plain mean over the LR grid (docs/methods.md §1.2). The paper's caveat
holds: read it beside the LR-vs-loss curves, never alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

ArrayLike = Sequence[float] | np.ndarray | pd.Series | float


def clamp_losses(final_losses: ArrayLike, loss_at_init: ArrayLike) -> np.ndarray:
    """min(final loss, ℓ0) per run; NaN, inf and missing (None) final losses become ℓ0.

    `loss_at_init` is a scalar or one value per run (each run's own step-0 eval loss)."""
    final = np.asarray(pd.to_numeric(pd.Series(np.ravel(np.asarray(final_losses, dtype=object))),
                                     errors="coerce"), dtype=np.float64)
    init = np.broadcast_to(np.asarray(loss_at_init, dtype=np.float64), final.shape)
    if not np.all(np.isfinite(init)):
        raise ValueError(f"loss_at_init must be finite for every run, got {init.tolist()}: "
                         "it is the step-0 eval loss, which a run records before its first step")
    return np.where(np.isfinite(final), np.minimum(final, init), init)


def lr_sensitivity(final_losses: ArrayLike, loss_at_init: ArrayLike) -> float:
    """The LR sensitivity of one group of runs that differ only in the peak LR.

    >>> round(lr_sensitivity([3.50, 3.40, 3.30, 3.35, 3.60, 7.00, float("nan")], 10.37664), 6)
    1.632377
    """
    clamped = clamp_losses(final_losses, loss_at_init)
    if clamped.size == 0:
        raise ValueError("lr_sensitivity needs at least one run")
    return float(np.mean(clamped - clamped.min()))


def sensitivity_table(
    results: pd.DataFrame,
    group_by: Sequence[str] = (),
    lr_key: str = "optimizer.lr",
    loss_key: str = "final_eval_loss",
    init_key: str = "loss_at_init",
) -> pd.DataFrame:
    """One row per group (all columns of `group_by`) with the LR sensitivity over its LRs.

    Columns: the group keys, `lr_sensitivity`, `best_lr`, `best_loss` (clamped), `n_runs`,
    `n_diverged` (a non-finite final loss or a `diverged` flag), `n_lrs`. Runs whose `status`
    is 'unfinished' are left out (they have no final loss) and counted in `n_unfinished`.
    Several runs at one LR (seeds) are averaged after clamping, so the mean stays one over
    the LR grid."""
    group_by = [g for g in group_by if g != lr_key]
    missing = [c for c in [lr_key, loss_key, init_key, *group_by] if c not in results.columns]
    if missing:
        raise KeyError(f"sensitivity_table: the results have no column(s) {missing}; "
                       f"columns are {list(results.columns)}")
    rows = []
    grouped = results.groupby(list(group_by), sort=False, dropna=False) if group_by else [((), results)]
    for key, df in grouped:
        key = key if isinstance(key, tuple) else (key,)
        unfinished = df["status"].eq("unfinished") if "status" in df else pd.Series(False, index=df.index)
        done = df[~unfinished]
        row = dict(zip(group_by, key))
        final = pd.to_numeric(done[loss_key], errors="coerce")
        diverged = ~np.isfinite(final.to_numpy(dtype=float))
        if "diverged" in done:
            diverged |= done["diverged"].fillna(False).astype(bool).to_numpy()
        row.update(n_runs=len(done), n_diverged=int(diverged.sum()), n_unfinished=int(unfinished.sum()))
        if len(done) == 0:
            row.update(lr_sensitivity=np.nan, best_lr=np.nan, best_loss=np.nan, n_lrs=0)
            rows.append(row)
            continue
        final = final.where(~diverged)  # a diverged run's last eval does not count: it is ℓ0
        clamped = pd.Series(clamp_losses(final, done[init_key]), index=done.index)
        per_lr = clamped.groupby(done[lr_key]).mean().sort_index()
        best = per_lr.idxmin()
        row.update(lr_sensitivity=float(np.mean(per_lr - per_lr.min())), best_lr=float(best),
                   best_loss=float(per_lr[best]), n_lrs=len(per_lr))
        rows.append(row)
    cols = [*group_by, "lr_sensitivity", "best_lr", "best_loss", "n_lrs", "n_runs", "n_diverged", "n_unfinished"]
    return pd.DataFrame(rows, columns=cols)
