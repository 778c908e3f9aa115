"""Statistics for comparisons that hold up: paired gaps with bootstrap CIs, aggregation over seeds, and the
data-scaling fit (T* per size from a fit of gap against budget, the exponent of T* ~ N^b) with a CI from a
bootstrap over seeds that carries the T* uncertainty into the exponent.

Pure functions on arrays (numpy, scipy): tested on synthetic inputs with known answers.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps

from .metrics import bootstrap_ci


# -- paired gaps -----------------------------------------------------------------------------------------
def paired_gap(ce_a: np.ndarray, ce_b: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean CE gap a - b on the same tokens, per-token arrays [chunks, positions]; CI from a bootstrap that
    resamples chunks (tokens of one chunk are correlated), the same chunks for both models (paired)."""
    ce_a, ce_b = np.asarray(ce_a, dtype=np.float64), np.asarray(ce_b, dtype=np.float64)
    if ce_a.shape != ce_b.shape:
        raise ValueError(f"paired gap needs the same tokens: shapes {ce_a.shape} vs {ce_b.shape}")
    diff = (ce_a - ce_b).mean(axis=1)  # per chunk
    base = ce_b.mean()
    lo, hi = bootstrap_ci(diff, n_boot=n_boot, seed=seed)
    return {"gap": float(diff.mean()), "ci95": [lo, hi], "relative_gap": float(diff.mean() / base),
            "relative_ci95": [lo / base, hi / base], "reference_ce": float(base), "n_chunks": int(len(diff))}


def over_seeds(values: list[float], level: float = 0.95) -> dict:
    """Mean of per-seed results with a Student-t interval (correct quantile for any number of seeds)."""
    v = np.asarray(values, dtype=np.float64)
    out = {"mean": float(v.mean()), "values": [float(x) for x in v], "n": int(len(v))}
    if len(v) > 1:
        half = sps.t.ppf(0.5 + level / 2, df=len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
        out["ci95"] = [float(v.mean() - half), float(v.mean() + half)]
    return out


# -- data scaling ----------------------------------------------------------------------------------------
def fit_loglog(x, y) -> tuple[float, float]:
    """Least squares of log y on log x: (slope, intercept)."""
    slope, intercept = np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)
    return float(slope), float(intercept)


def t_star(budgets, gaps, threshold: float, near: int = 4) -> float | None:
    """Budget at which a power-law fit of the gap against the budget crosses `threshold` (the fit uses the
    `near` budgets whose gaps are closest to the threshold).

    gaps: mean relative gap per budget. Only positive gaps enter the log-log fit (a gap at or below zero is
    already within any threshold). None when the fit does not decrease (no crossing to read off)."""
    b, g = np.asarray(budgets, float), np.asarray(gaps, float)
    keep = g > 0
    if keep.sum() < 2:
        return None
    b, g = b[keep], g[keep]
    if len(g) > near:  # the gap is a power law only locally: fit the budgets whose gaps are nearest the threshold
        idx = np.sort(np.argsort(np.abs(np.log(g) - math.log(threshold)))[:near])
        b, g = b[idx], g[idx]
    slope, intercept = fit_loglog(b, g)
    if slope >= 0:
        return None
    return float(math.exp((math.log(threshold) - intercept) / slope))


def scaling_fit(sizes: dict, threshold: float, n_boot: int = 2000, seed: int = 0) -> dict:
    """sizes: {name: {"n": non-embedding params, "budgets": [B], "gaps": [[gap per seed] per budget]}} with the
    same seeds (columns) at every budget. Returns T* per size and the exponent b of T* ~ N^b, each with a 95%
    percentile CI from one bootstrap that resamples seeds within every size, so that the exponent's interval
    carries the uncertainty of every T*."""
    rng = np.random.default_rng(seed)
    names = list(sizes)
    n = np.array([sizes[k]["n"] for k in names], float)
    gaps = {k: np.asarray(sizes[k]["gaps"], float) for k in names}  # [budgets, seeds]

    def estimate(g):
        ts = [t_star(sizes[k]["budgets"], g[k].mean(axis=1), threshold) for k in names]
        ok = [t is not None for t in ts]
        b = fit_loglog(n[ok], np.array(ts, dtype=object)[ok].astype(float))[0] if sum(ok) >= 2 else None
        return ts, b

    point_t, point_b = estimate(gaps)
    boot_t, boot_b = [[] for _ in names], []
    for _ in range(n_boot):
        g = {k: v[:, rng.integers(0, v.shape[1], v.shape[1])] for k, v in gaps.items()}
        ts, b = estimate(g)
        for i, t in enumerate(ts):
            boot_t[i].append(np.inf if t is None else t)  # no crossing: beyond every budget
        if b is not None:
            boot_b.append(b)

    def ci(samples):
        s = np.asarray(samples, float)
        return [float(np.percentile(s, 2.5)), float(np.percentile(s, 97.5))] if len(s) else [None, None]

    out_sizes = []
    for i, k in enumerate(names):
        lo, hi = ci(boot_t[i])
        out_sizes.append({"name": k, "non_embedding_params": int(n[i]),
                          "t_star": {"value": point_t[i], "ci_low": lo, "ci_high": hi}})
    lo, hi = ci(boot_b)
    return {"threshold": threshold, "sizes": out_sizes,
            "exponent": {"value": point_b, "ci_low": lo, "ci_high": hi,
                         "bootstrap_valid": len(boot_b), "bootstrap": n_boot}}
