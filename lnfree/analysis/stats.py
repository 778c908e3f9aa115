"""Statistics for comparisons that hold up: paired gaps with bootstrap CIs, aggregation over seeds (and over the
shared evaluation text), and the data-scaling fit (T* per size from a fit of gap against budget, the exponent of
T* ~ N^b with an interval from the fit's residuals, leave-one-size-out fits and the decision rule). Every
interval's coverage is tested on simulated data (tests/test_coverage.py, docs/statistics.md).

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
    """Mean of per-seed results with a Student-t interval (correct quantile for any number of seeds). It covers
    the variation between seeds only: for results measured on one shared evaluation set use seeds_and_text."""
    v = np.asarray(values, dtype=np.float64)
    out = {"mean": float(v.mean()), "values": [float(x) for x in v], "n": int(len(v))}
    if len(v) > 1:
        half = sps.t.ppf(0.5 + level / 2, df=len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
        out["ci95"] = [float(v.mean() - half), float(v.mean() + half)]
    return out


def seeds_and_text(chunk_values: np.ndarray, level: float = 0.95) -> dict:
    """Mean over seeds of per-seed results measured on the same chunks of text, chunk_values [seed, chunk] (each
    seed's per-chunk gap; its mean over chunks is that seed's gap), with an interval that covers both sources of
    error: the seeds (se_seeds: sd of the per-seed means / sqrt(seeds), Student t with seeds - 1 df) and the
    text, which every seed shares (se_text: sqrt of the mean cross-seed covariance of the chunk values / chunks,
    the part of the text's noise that averaging over seeds does not remove; t with chunks - 1 df). The two
    half-widths add in quadrature. With one seed there is no interval.

    Why: per-chunk gaps of different seeds are strongly correlated (0.69-0.81 in experiments/builtin_eval), so
    the seed mean carries a text error that a t interval over 3 seed values cannot see: on simulated evaluations
    with the measured structure it covered 0.94, with a 3x smaller seed spread 0.87, with none 0.68; this one
    0.96-0.98 (conservative; a Welch-Satterthwaite t on the summed variance covered 0.93-0.94). See
    docs/statistics.md."""
    x = np.asarray(chunk_values, dtype=np.float64)
    n_seeds, n_chunks = x.shape
    seed_means = x.mean(1)
    out = {"mean": float(seed_means.mean()), "values": [float(v) for v in seed_means], "n": int(n_seeds)}
    if n_seeds > 1:
        se_seeds = seed_means.std(ddof=1) / math.sqrt(n_seeds)
        c = x - x.mean(1, keepdims=True)
        cov = np.mean([(c[i] * c[j]).sum() / (n_chunks - 1) for i in range(n_seeds) for j in range(i + 1, n_seeds)])
        se_text = math.sqrt(max(float(cov), 0.0) / n_chunks)
        q = 0.5 + level / 2
        half = math.hypot(sps.t.ppf(q, df=n_seeds - 1) * se_seeds, sps.t.ppf(q, df=n_chunks - 1) * se_text)
        out.update(ci95=[float(out["mean"] - half), float(out["mean"] + half)], se_seeds=float(se_seeds),
                   se_text=se_text)
    return out


def paired_over_seeds(ce_a: list, ce_b: list, n_boot: int = 2000, seed: int = 0) -> dict:
    """Paired gaps a[i] - b[i] for every seed i (per-token arrays [chunks, positions] on the same tokens): each
    seed's paired_gap and, over seeds, the absolute and relative gaps with seeds_and_text intervals."""
    per_seed = [paired_gap(a, b, n_boot, seed) for a, b in zip(ce_a, ce_b)]
    chunk_gaps = np.stack([(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean(1)
                           for a, b in zip(ce_a, ce_b)])  # [seed, chunk]
    base = np.array([r["reference_ce"] for r in per_seed])
    return {"per_seed": per_seed, "gap_over_seeds": seeds_and_text(chunk_gaps),
            # relative: each seed's chunk gaps over its reference CE (the reference's own noise, ~0.3% of it,
            # is left out)
            "relative_gap_over_seeds": seeds_and_text(chunk_gaps / base[:, None])}


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


def power_law(n, t, level: float = 0.95) -> dict:
    """Least squares of log T* on log N over sizes: the exponent b with a Student-t interval from the fit's
    residuals (df = sizes - 2), and R^2. The residuals hold everything that moves one size's T* independently of
    the others: the lack of fit of the power law, the pretraining run(s) of the size and the fine-tuning seeds'
    noise in its T*, so the interval accounts for all three without modelling them separately. Needs 3 sizes
    for an interval (2 give a value only)."""
    x, y = np.log(np.asarray(n, float)), np.log(np.asarray(t, float))
    k = len(x)
    out = {"value": None, "ci_low": None, "ci_high": None, "r2": None, "df": max(k - 2, 0)}
    if k < 2:
        return out
    b, a = np.polyfit(x, y, 1)
    out["value"] = float(b)
    if k >= 3:
        resid = y - (a + b * x)
        sxx = ((x - x.mean()) ** 2).sum()
        se = math.sqrt((resid ** 2).sum() / (k - 2) / sxx)
        half = sps.t.ppf(0.5 + level / 2, df=k - 2) * se
        sst = ((y - y.mean()) ** 2).sum()
        out.update(ci_low=float(b - half), ci_high=float(b + half),
                   r2=float(1 - (resid ** 2).sum() / sst) if sst > 0 else None)
    return out


def exponent(names, n, t, level: float = 0.95) -> dict:
    """power_law over the sizes plus every leave-one-size-out fit ([{dropped, value, ci_low, ci_high}])."""
    out = power_law(n, t, level)
    out["sizes"] = list(names)
    out["leave_one_out"] = []
    if len(names) >= 3:
        for i, name in enumerate(names):
            keep = [j for j in range(len(names)) if j != i]
            f = power_law([n[j] for j in keep], [t[j] for j in keep], level)
            out["leave_one_out"].append({"dropped": name, "value": f["value"], "ci_low": f["ci_low"],
                                         "ci_high": f["ci_high"]})
    return out


def size_t_star(budgets, gaps, threshold: float) -> dict:
    """T* of one size from gaps [pretrained][budget][seed]: per pretrained model the crossing of its seed-mean
    gap (t_star), and the size's T* as their geometric mean (None if any pretrained model has no crossing)."""
    per = [t_star(budgets, np.asarray(g, float).mean(axis=1), threshold) for g in gaps]
    value = None if any(v is None for v in per) else float(np.exp(np.mean(np.log(per))))
    return {"value": value, "per_pretrained": per}


def t_star_interval(budgets, gaps, threshold: float, n_boot: int = 1000, seed: int = 0) -> list:
    """A 95% percentile interval of a size's T* from a two-level bootstrap: its pretrained models, then the seeds
    within each (resampled together at every budget). With one pretrained model it covers seed noise only, and
    with 3 seeds a resample has at most 10 distinct seed sets: read it as a spread, not as a tested interval
    (the exponent's interval is the tested one). No crossing in a resample counts as beyond every budget."""
    rng = np.random.default_rng(seed)
    g = np.asarray(gaps, float)  # [pretrained, budget, seed]
    n_p, _, n_s = g.shape
    boots = []
    for _ in range(n_boot):
        pick = g[rng.integers(0, n_p, n_p)]
        pick = np.stack([x[:, rng.integers(0, n_s, n_s)] for x in pick])
        v = size_t_star(budgets, pick, threshold)["value"]
        boots.append(np.inf if v is None else v)
    return [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))]


def verdicts(exponents: dict) -> dict:
    """The decision rule, one string per threshold (exponents: {threshold: exponent()}): "sublinear" only if the
    upper bound of b is below 1 at every threshold and in every leave-one-size-out fit; "grows with size" only
    if the lower bound is above 0; otherwise what was not established and why."""
    def below_one(e):
        return (e["ci_high"] is not None and e["ci_high"] < 1 and len(e["leave_one_out"]) > 0
                and all(x["ci_high"] is not None and x["ci_high"] < 1 for x in e["leave_one_out"]))

    sublinear = len(exponents) > 0 and all(below_one(e) for e in exponents.values())
    out = {}
    for thr, e in exponents.items():
        if e["ci_low"] is None:
            out[thr] = (f"not established: {len(e['sizes'])} size(s) with a measured crossing, an interval needs 3")
            continue
        b = f"b = {e['value']:.2f} [{e['ci_low']:.2f}, {e['ci_high']:.2f}]"
        grows = e["ci_low"] > 0
        fails = []
        if not sublinear:
            if e["ci_high"] >= 1:
                fails.append(f"upper bound {e['ci_high']:.2f} >= 1")
            bad = [x for x in e["leave_one_out"] if x["ci_high"] is None or x["ci_high"] >= 1]
            if bad:
                fails.append("leave-one-size-out upper bound >= 1 without " + ", ".join(x["dropped"] for x in bad))
            if not fails:
                fails.append("another threshold fails")
        if not grows:
            fails.append(f"lower bound {e['ci_low']:.2f} <= 0")
        said = [w for w, ok in (("sublinear", sublinear), ("grows with size", grows)) if ok]
        out[thr] = (" and ".join(said) if said else "not established") + f": {b}" + (
            f"; not established: {'; '.join(fails)}" if fails and said else (f"; {'; '.join(fails)}" if fails else ""))
    return out


def interval_text(e: dict) -> str:
    """An estimate's 95% interval as text: [low, high], or - where it has none."""
    return "-" if e.get("ci_low") is None else f"[{e['ci_low']:.2f}, {e['ci_high']:.2f}]"
