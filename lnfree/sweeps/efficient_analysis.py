"""The removal-methods study's analysis (issue 41; experiments/efficient/README.md): per arm, the gap at every budget,
the tokens to a 1% and 2% gap (T*) and their ratio to today's schedule, each with a 95% interval, and a verdict.

    python -m lnfree.sweeps.efficient_analysis      # experiments/efficient/runs.jsonl -> efficient.json, .md, .png
    python -m lnfree.sweeps.efficient_analysis --records R --protocol P --out DIR

Reads only the runner's records (lnfree.sweeps.efficient: per arm run and evaluation set, the 64 per-block mean
gaps arm - control in nats and the control's CE) and the protocol. Every number is relative to the control of the
same seed and budget: a seed's relative block gaps are its block gaps over its control's CE.

- Gap at a budget: the mean over seeds of the relative gap, with lnfree.analysis.stats.seeds_and_text's interval
  (seeds and the shared evaluation text; one seed: no interval). The same for the near- and far-domain sets, and
  the mean over seeds of the 99th percentile of the per-token CE difference.
- Against the baseline at a budget (arm and baseline share the seed, its data order and its control, so they are
  paired): the difference of their relative block gaps per seed with seeds_and_text ("vs_baseline"), and the ratio
  of their gaps with the interval that inverts seeds_and_text (Fieller's: every r for which seeds_and_text of
  arm - r * baseline covers 0; gap_ratio_interval). "Half the gap at equal tokens" at a budget: its upper end <= 0.5.
- T*: the tokens at which the arm's seed-mean gap curve first comes down to the threshold, by log-log
  interpolation between the two budgets that bracket that crossing (the bracket is the censored fit's,
  lnfree.analysis.censored.crossing_intervals). A crossing outside the budgets is never extrapolated: its value is
  None and the interval gives the bound (censored: "above" the largest budget or "below" the smallest). (The
  data-scaling study reads T* off a power-law fit to the 4 budgets nearest the threshold, stats.t_star; on this
  study's 4 budgets that fit would take the whole curve, 25 steps included, a few steps after the last removal
  event, where the gap need not follow the later budgets' power law; interpolation uses only the two budgets
  around the crossing, and is exact on a power law.)
- The intervals of T* and of the ratio T*(arm) / T*(baseline): a parametric bootstrap (draws) of the seed-mean
  gap at every (arm, budget) cell at once. A draw is the observed means plus a seed part (the seeds' deviations
  from their mean, jointly over cells, so that a seed's offsets at every budget and in both arms move together,
  as a multivariate t with seeds - 1 df) plus a text part (the cross-seed covariance of the blocks, jointly over
  cells: the text every seed, budget and arm shares; t with blocks - 1 df): seeds_and_text's two sources of error,
  with their correlation across cells. A draw whose crossing lies outside the budgets counts at its bound on the
  side it is censored (lower end: the bound, upper end: no bound), so a bound is never narrower than the data
  allow. Coverage tested on simulated studies of this design (tests/test_coverage.py): 0.98-0.99 for a
  nominal 95% (conservative: the seeds' part has 2 degrees of freedom).
- Verdict per arm, from the ratio's interval at each threshold: "meets the goal (ratio <= 0.5)" when its upper
  end is <= 0.5, "fewer tokens than the baseline" when < 1, "more tokens" when its lower end is > 1, else "not
  established"; and the budgets at which half the gap at equal tokens is established. A family with one budget
  (Llama, NeoX) has no curve: its verdict compares the gap with the baseline's at that budget.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import yaml
from scipy import stats as sps

from ..analysis.censored import censoring, crossing, open_end
from ..analysis.stats import seeds_and_text
from ..errors import user_errors_as_messages
from ..records import RecordError, read_jsonl, write_text_atomic

STUDY = Path("experiments/efficient")
LEVEL = 0.95
N_DRAWS = 4000  # bootstrap draws per arm: the 2.5% and 97.5% quantiles to about +-0.01 in log T*
RECORD_KEYS = ("family", "arm", "budget", "seed", "tokens", "val_ce")
HALF = 0.5  # the goal: the same gap with half the tokens, or half the gap with the same tokens


# -- per-record data ----------------------------------------------------------------------------------------------
def relative_blocks(rec: dict, set_name: str) -> np.ndarray:
    """A run's relative block gaps on one evaluation set: its block gaps (nats) over its control's CE."""
    s = rec["sets"][set_name]
    return np.asarray(s["block_gaps"], np.float64) / s["control_ce"]


def interval(summary: dict) -> dict:
    """seeds_and_text's result as {value, ci_low, ci_high} (no interval with one seed)."""
    lo, hi = summary.get("ci95", (None, None))
    return {"value": summary["mean"], "ci_low": lo, "ci_high": hi}


def gap_ratio_interval(a: np.ndarray, b: np.ndarray, level: float = LEVEL) -> dict:
    """The ratio of two paired mean gaps, arm / baseline, from relative block gaps [seed, block] of the same seeds
    and blocks, with the interval that inverts seeds_and_text (Fieller's): every r whose seeds_and_text interval of
    a - r * b covers 0. Its half-width squared is quadratic in r (the seeds' variance of the seed means and the
    cross-seed covariance of the blocks, each quadratic in r; the text part unclipped), so the set is the solution
    of a quadratic inequality: bounded only when the baseline's gap is itself separated from 0 (else no interval).
    One seed: the value only."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n_s, n_b = a.shape
    ma, mb = a.mean(), b.mean()
    out = {"value": float(ma / mb) if mb != 0 else None, "ci_low": None, "ci_high": None}
    if n_s < 2:
        return out
    q = 0.5 + level / 2
    qs2, qt2 = sps.t.ppf(q, n_s - 1) ** 2, sps.t.ppf(q, n_b - 1) ** 2
    seed_cov = np.cov(np.stack([a.mean(1), b.mean(1)]), ddof=1) / n_s
    ca, cb = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    pairs = [(i, j) for i in range(n_s) for j in range(i + 1, n_s)]

    def cross(x, y):  # the cross-seed covariance of two block series (symmetrised), over blocks, as seeds_and_text
        return np.mean([((x[i] * y[j]).sum() + (y[i] * x[j]).sum()) / 2 / (n_b - 1) for i, j in pairs]) / n_b

    taa, tab, tbb = cross(ca, ca), cross(ca, cb), cross(cb, cb)
    # (ma - r mb)^2 <= qs2 (Vaa - 2 r Vab + r^2 Vbb) + qt2 (Taa - 2 r Tab + r^2 Tbb):  A r^2 + B r + C <= 0
    qa = mb ** 2 - qs2 * seed_cov[1, 1] - qt2 * tbb
    qb = -2 * ma * mb + 2 * qs2 * seed_cov[0, 1] + 2 * qt2 * tab
    qc = ma ** 2 - qs2 * seed_cov[0, 0] - qt2 * taa
    disc = qb ** 2 - 4 * qa * qc
    if qa > 0 and disc >= 0:
        r1, r2 = sorted(((-qb - math.sqrt(disc)) / (2 * qa), (-qb + math.sqrt(disc)) / (2 * qa)))
        out.update(ci_low=float(r1), ci_high=float(r2))
    return out


# -- T* ---------------------------------------------------------------------------------------------------------
def draws(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Parametric bootstrap of the seed-mean gaps of every cell at once: x [cell, seed, block] (the same seeds and
    blocks in every cell) -> [n, cell]. Seed part: the seeds' joint deviations from their mean, weighted by normal
    draws and scaled by one chi-square draw (a multivariate t with seeds - 1 df whose covariance is the seed means'
    sample covariance / seeds). Text part: the cells' cross-seed block covariance / blocks (projected onto the
    positive semi-definite matrices), a multivariate t with blocks - 1 df. seeds_and_text's two terms per cell."""
    x = np.asarray(x, np.float64)
    n_c, n_s, n_b = x.shape
    if n_s < 2:
        raise ValueError("a bootstrap of seeds needs at least 2 seeds")
    seed_means = x.mean(2)
    mean = seed_means.mean(1)
    dev = seed_means - mean[:, None]  # [cell, seed]
    seed_part = rng.standard_normal((n, n_s)) @ dev.T / math.sqrt(n_s * (n_s - 1))
    seed_part /= np.sqrt(rng.chisquare(n_s - 1, n) / (n_s - 1))[:, None]
    c = x - x.mean(2, keepdims=True)
    cov = np.mean([c[:, i] @ c[:, j].T for i in range(n_s) for j in range(n_s) if i != j], 0) / (n_b - 1) / n_b
    w, v = np.linalg.eigh((cov + cov.T) / 2)
    root = v * np.sqrt(np.clip(w, 0, None))
    text_part = rng.standard_normal((n, n_c)) @ root.T
    text_part /= np.sqrt(rng.chisquare(n_b - 1, n) / (n_b - 1))[:, None]
    return mean + seed_part + text_part


def lower(x: np.ndarray, level: float = LEVEL) -> float:
    """The interval's lower end from draws: their (1 - level) / 2 quantile, rounded outwards (to the draw below:
    no interpolation between a finite draw and an open bound)."""
    return float(np.quantile(x, (1 - level) / 2, method="lower"))


def upper(x: np.ndarray, level: float = LEVEL) -> float:
    """The interval's upper end from draws: their (1 + level) / 2 quantile, rounded outwards (to the draw above)."""
    return float(np.quantile(x, (1 + level) / 2, method="higher"))


def t_star(tokens, mean_curve, boot_curves, threshold: float, level: float = LEVEL) -> dict:
    """T* of one arm: the crossing of its seed-mean curve (value None outside the budgets, `censored` says where),
    its interval from bootstrap curves [draw, budget] (None, one seed: no interval inside the budgets, the bound
    of the point's censoring outside them)."""
    value, low, high = (float(v) for v in crossing(tokens, mean_curve, threshold))
    inside = math.isfinite(value)
    out = {"value": value if inside else None, "ci_low": None if inside else open_end(low),
           "ci_high": None if inside else open_end(high), "censored": censoring(low, high)}
    if boot_curves is not None and inside:
        _, lo, hi = crossing(tokens, boot_curves, threshold)
        out.update(ci_low=open_end(lower(lo, level)), ci_high=open_end(upper(hi, level)))
    elif boot_curves is not None:  # a bound: the draws say how far inside the budgets the crossing may still be
        _, lo, hi = crossing(tokens, boot_curves, threshold)
        if out["censored"] == "above":
            out["ci_low"] = open_end(lower(lo, level))
        else:
            out["ci_high"] = open_end(upper(hi, level))
    return out


def ratio_bounds(arm: tuple, base: tuple) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) of T*(arm) / T*(base) from each one's crossing bounds (value, low, high): the ratio's range
    when each crossing may lie anywhere in its bound (0 and inf where a bound is open)."""
    _, a_lo, a_hi = arm
    _, b_lo, b_hi = base
    with np.errstate(divide="ignore", invalid="ignore"):
        low = np.where((a_lo == 0) | ~np.isfinite(b_hi), 0.0, a_lo / b_hi)
        high = np.where(~np.isfinite(a_hi) | (b_lo == 0), np.inf, a_hi / b_lo)
    return low, high


def t_star_ratio(tokens, arm_curve, base_curve, boot: np.ndarray | None, threshold: float,
                 level: float = LEVEL) -> dict:
    """T*(arm) / T*(baseline): the value when both crossings lie inside the budgets; the interval from joint
    bootstrap curves boot [draw, 2, budget] (arm, baseline), each draw's ratio at its low end for the lower
    quantile and at its high end for the upper (a draw censored on one side counts at its bound there); without
    draws (one seed), no interval when both crossings lie inside the budgets, else the bounds of the censoring."""
    point = [crossing(tokens, c, threshold) for c in (arm_curve, base_curve)]
    low, high = (float(v) for v in ratio_bounds(*point))
    both = all(math.isfinite(float(p[0])) for p in point)
    out = {"value": low if both else None, "ci_low": None if both else open_end(low),
           "ci_high": None if both else open_end(high),
           "censored": None if both else {"arm": censoring(float(point[0][1]), float(point[0][2])),
                                          "baseline": censoring(float(point[1][1]), float(point[1][2]))}}
    if boot is not None:
        low, high = ratio_bounds(crossing(tokens, boot[:, 0], threshold), crossing(tokens, boot[:, 1], threshold))
        out.update(ci_low=open_end(lower(low, level)), ci_high=open_end(upper(high, level)))
    return out


def ratio_verdict(r: dict) -> str:
    """The decision rule on T*(arm) / T*(baseline)'s interval."""
    lo, hi = r["ci_low"], r["ci_high"]
    if hi is not None and hi <= HALF:
        return f"meets the goal (ratio <= {HALF})"
    if hi is not None and hi < 1:
        return "fewer tokens than the baseline"
    if lo is not None and lo > 1:
        return "more tokens"
    return "not established"


# -- the study --------------------------------------------------------------------------------------------------
def cells_of(records: list[dict]) -> dict:
    """{(family, arm): {budget: {seed: record}}}; two records of one run, or an arm that kept a norm, are
    refused."""
    out: dict = {}
    for r in records:
        if r.get("all_removed") is False and "sets" in r:  # an arm whose norms are not all gone measures nothing
            raise RecordError(f"{r['family']} {r['arm']} budget {r['budget']} seed {r['seed']}: not every norm was "
                              f"removed ({r.get('removed_sites')} sites); rerun it")
        per = out.setdefault((r["family"], r["arm"]), {}).setdefault(r["budget"], {})
        if r["seed"] in per:
            raise RecordError(f"two records of {r['family']} {r['arm']} budget {r['budget']} seed {r['seed']}")
        per[r["seed"]] = r
    return out


def _stack(runs: dict, seeds, set_name: str) -> np.ndarray:
    return np.stack([relative_blocks(runs[s], set_name) for s in seeds])


def arm_names(protocol: dict, cells: dict, family: str) -> list[str]:
    """The family's arms with records, in the protocol's order, the combination (or any other arm) after them."""
    have = {a for f, a in cells if f == family and a != protocol["control"]["name"]}
    return [a for a in protocol["arms"] if a in have] + sorted(have - set(protocol["arms"]))


def budget_entry(runs: dict, base_runs: dict | None, sets: list[str], steps: int) -> dict:
    """One (arm, budget): the gap on every set, the tail of the per-token difference, and against the baseline."""
    seeds = sorted(runs)
    tokens = {runs[s]["tokens"] for s in seeds}
    if len(tokens) > 1:
        raise RecordError(f"budget {steps}: seeds saw different numbers of tokens {sorted(tokens)}")
    out = {"steps": steps, "tokens": tokens.pop(), "seeds": seeds}
    for i, name in enumerate(sets):
        key = "gap_rel" if i == 0 else f"gap_rel_{name}"
        out[key] = interval(seeds_and_text(_stack(runs, seeds, name)))
        out[f"p99_token_diff_{name}"] = float(np.mean([runs[s]["sets"][name]["p99_token_diff"] for s in seeds]))
    if base_runs is not None:
        paired = sorted(set(seeds) & set(base_runs))
        if paired:
            a, b = _stack(runs, paired, sets[0]), _stack(base_runs, paired, sets[0])
            out["paired_seeds"] = paired
            out["vs_baseline"] = interval(seeds_and_text(a - b))
            out["gap_ratio"] = gap_ratio_interval(a, b)
    return out


def complete_seeds(per_budget: dict, budgets) -> list[int]:
    """The seeds with a record at every budget."""
    return sorted(set.intersection(*(set(per_budget.get(b, {})) for b in budgets))) if budgets else []


def arm_entry(protocol: dict, cells: dict, family: str, arm: str, n_draws: int, rng: np.random.Generator) -> dict:
    base_name = protocol["baseline"]
    sets = [s["name"] for s in protocol["evaluation"]["sets"]]
    per = cells[(family, arm)]
    base = cells.get((family, base_name), {}) if arm != base_name else None
    budgets = [b for b in protocol["families"][family]["budgets"] if b in per]
    any_run = next(iter(per[budgets[0]].values())) if budgets else {}
    out = {"name": arm, "family": family,
           "overrides": protocol["arms"].get(arm, any_run.get("overrides")),
           "budgets": [budget_entry(per[b], base.get(b) if base is not None else None, sets, b) for b in budgets]}
    grid = protocol["families"][family]["budgets"]
    seeds = complete_seeds(per, grid)
    out["seeds"] = sorted({s for b in budgets for s in per[b]})
    thresholds = [f"{t:g}" for t in protocol["thresholds"]]
    empty = {"value": None, "ci_low": None, "ci_high": None, "censored": None}
    out["t_star"] = {k: dict(empty) for k in thresholds}
    out["t_star_ratio"] = {k: dict(empty) for k in thresholds}
    out["curve"] = len(grid) >= 2  # a family with one budget is compared at equal tokens only
    if len(grid) < 2:
        out["t_star_note"] = f"one budget ({grid[0]} steps): no gap curve, compared at equal tokens"
        return out
    if not seeds:
        out["t_star_note"] = "no seed has every budget yet"
        return out
    tokens = [per[b][seeds[0]]["tokens"] for b in grid]
    x = np.stack([_stack(per[b], seeds, sets[0]) for b in grid])  # [budget, seed, block]
    boot = draws(x, n_draws, rng) if len(seeds) > 1 else None
    out["t_star_seeds"] = seeds
    for thr, k in zip(protocol["thresholds"], thresholds):
        out["t_star"][k] = t_star(tokens, x.mean((1, 2)), boot, thr)
    if base is None:
        out["t_star_note"] = "the baseline: every ratio divides by its T*"
        return out
    paired = [s for s in complete_seeds(base, grid) if s in seeds]
    if not paired:
        out["t_star_ratio_note"] = "the baseline has no seed of this arm at every budget yet"
        return out
    xa = np.stack([_stack(per[b], paired, sets[0]) for b in grid])
    xb = np.stack([_stack(base[b], paired, sets[0]) for b in grid])
    joint = draws(np.concatenate([xa, xb]), n_draws, rng).reshape(n_draws, 2, len(grid)) if len(paired) > 1 else None
    out["t_star_ratio_seeds"] = paired
    for thr, k in zip(protocol["thresholds"], thresholds):
        out["t_star_ratio"][k] = t_star_ratio(tokens, xa.mean((1, 2)), xb.mean((1, 2)), joint, thr)
    return out


def _pct(e: dict) -> str:
    if e is None or e.get("value") is None:
        return "-"
    ci = "" if e["ci_low"] is None else f" [{100 * e['ci_low']:.2f}, {100 * e['ci_high']:.2f}]"
    return f"{100 * e['value']:.2f}%{ci}"


def verdict(arm: dict, baseline: str) -> str:
    """One string per arm: the ratio rule at each threshold, and where half the gap at equal tokens holds (a
    family with one budget: its gap against the baseline's, paired over seeds)."""
    if arm["name"] == baseline:
        return "baseline (today's schedule)"
    parts = []
    if not arm["curve"]:
        e = arm["budgets"][0]
        d = e.get("vs_baseline")
        if d is None:
            return "not established: no baseline run of the same seed"
        said = ("lower gap than the baseline" if d["ci_high"] is not None and d["ci_high"] < 0 else
                "higher gap than the baseline" if d["ci_low"] is not None and d["ci_low"] > 0 else "not established")
        parts.append(f"{said} at {e['steps']} steps (arm - baseline {_pct(d)})")
    else:
        for k, r in arm["t_star_ratio"].items():
            ends = ("-" if r["ci_low"] is None else f"{r['ci_low']:.2f}", "-" if r["ci_high"] is None
                    else f"{r['ci_high']:.2f}")
            if r["value"] is None and r["censored"] is None:
                why = arm.get("t_star_ratio_note") or arm.get("t_star_note")
                parts.append(f"T* at {100 * float(k):g}%: not established ({why})")
                continue
            value = "a bound: a crossing outside the budgets" if r["value"] is None else f"{r['value']:.2f}"
            said = ratio_verdict(r) if len(arm["t_star_ratio_seeds"]) > 1 else "not established (one seed, no interval)"
            parts.append(f"T* at {100 * float(k):g}%: {said} (ratio {value} [{ends[0]}, {ends[1]}])")
    half = [e["steps"] for e in arm["budgets"] if (e.get("gap_ratio") or {}).get("ci_high") is not None
            and e["gap_ratio"]["ci_high"] <= HALF]
    parts.append("half the gap at equal tokens at " + (", ".join(f"{s}" for s in half) + " steps" if half
                                                       else "no budget"))
    return "; ".join(parts)


def measured_noise(records: list[dict], set_name: str) -> dict:
    """The noise the coverage simulation assumes (analysis.simulate.StudyStructure), measured in the records:
    block_cv (sd over blocks / mean of one run's relative block gaps), shared (the mean cross-seed correlation of
    the block gaps of one cell) and seed_cv (sd over seeds of the log gap), each the median over the cells."""
    cells = cells_of([r for r in records if "sets" in r])
    cv, shared, seed = [], [], []
    for per in cells.values():
        for runs in per.values():
            x = _stack(runs, sorted(runs), set_name)
            m = x.mean(1)
            cv += [float(x[i].std(ddof=1) / m[i]) for i in range(len(m)) if m[i] > 0]
            if len(m) > 1:
                c = np.corrcoef(x)
                shared.append(float(c[np.triu_indices(len(m), 1)].mean()))
                if (m > 0).all():
                    seed.append(float(np.log(m).std(ddof=1)))
    def med(v):
        return float(np.median(v)) if v else None

    return {"block_cv": med(cv), "shared": med(shared), "seed_cv": med(seed), "runs": len(cv)}


def analyse(records: list[dict], protocol: dict, n_draws: int = N_DRAWS, seed: int = 0) -> dict:
    from ..analysis.simulate import StudyStructure

    cells = cells_of(records)
    arms = []
    for f, family in enumerate(protocol["families"]):
        for i, arm in enumerate(arm_names(protocol, cells, family)):
            arms.append(arm_entry(protocol, cells, family, arm, n_draws, np.random.default_rng([seed, f, i])))
    for a in arms:
        a["verdict"] = verdict(a, protocol["baseline"])
        a["meets_goal"] = a["name"] != protocol["baseline"] and (
            any(ratio_verdict(r).startswith("meets the goal") for r in a["t_star_ratio"].values())
            or any((e.get("gap_ratio") or {}).get("ci_high") is not None and e["gap_ratio"]["ci_high"] <= HALF
                   for e in a["budgets"]))
    goal = {f: [a["name"] for a in arms if a["family"] == f and a["meets_goal"]] for f in protocol["families"]}
    sets = [s["name"] for s in protocol["evaluation"]["sets"]]
    return {"baseline": protocol["baseline"], "control": protocol["control"]["name"],
            "thresholds": [f"{t:g}" for t in protocol["thresholds"]], "sets": sets,
            "records": len(records), "arms": arms,
            "verdict": {f"{a['family']}/{a['name']}": a["verdict"] for a in arms},
            "goal_met_by": goal,
            "measured_noise": measured_noise(records, sets[0]),
            "simulated_noise": {k: getattr(StudyStructure(), k) for k in ("block_cv", "shared", "seed_cv")},
            "method": "relative gaps per seed (block gaps / the control's CE of the same seed and budget); gap: "
                      "seeds_and_text; vs_baseline: seeds_and_text of the paired difference; gap_ratio: Fieller "
                      "(seeds_and_text inverted); T*: log-log interpolation between the bracketing budgets, a "
                      "bound outside them; T* and ratio intervals: parametric bootstrap of seeds and text jointly "
                      f"over budgets and arms ({n_draws} draws, censored draws at their bounds)"}


# -- output -----------------------------------------------------------------------------------------------------
def _tok(x) -> str:
    return f"{x / 1e3:,.0f}k"


def t_star_text(t: dict) -> str:
    """A T* as a table cell: the value [interval], or the bound where the crossing lies outside the budgets."""
    if t["value"] is None:
        if t["censored"] == "above":
            return "-" if t["ci_low"] is None else f"> {_tok(t['ci_low'])}"
        if t["censored"] == "below":
            return "-" if t["ci_high"] is None else f"< {_tok(t['ci_high'])}"
        return "-"
    ends = ("-" if e is None else _tok(e) for e in (t["ci_low"], t["ci_high"]))
    return f"{_tok(t['value'])} [{', '.join(ends)}]" if t["ci_low"] or t["ci_high"] else _tok(t["value"])


def ratio_text(r: dict) -> str:
    """A ratio [interval] as a table cell; "bound" for a value outside the budgets; "[no bound]" where there is no
    interval (one seed, draws open at both ends, or a Fieller set that is not bounded)."""
    if r["ci_low"] is None and r["ci_high"] is None:
        return "-" if r["value"] is None else f"{r['value']:.2f} [no bound]"
    ends = ("0" if r["ci_low"] is None else f"{r['ci_low']:.2f}", "inf" if r["ci_high"] is None
            else f"{r['ci_high']:.2f}")
    value = "bound" if r["value"] is None else f"{r['value']:.2f}"
    return f"{value} [{ends[0]}, {ends[1]}]"


def summary_table(res: dict) -> str:
    """Per arm: the relative in-domain gap at each budget, T* and its ratio to the baseline, the verdict (the
    generated table of docs/removal_methods.md)."""
    steps = sorted({e["steps"] for a in res["arms"] for e in a["budgets"]})
    keys = res["thresholds"]
    lines = ["| family | arm | " + " | ".join(f"gap at {s} steps" for s in steps) + " | "
             + " | ".join(f"T* ({100 * float(k):g}%)" for k in keys) + " | "
             + " | ".join(f"ratio ({100 * float(k):g}%)" for k in keys) + " | verdict |",
             "|---|---|" + "---|" * (len(steps) + 2 * len(keys) + 1)]
    for a in res["arms"]:
        by = {e["steps"]: e for e in a["budgets"]}
        lines.append(f"| {a['family']} | {a['name']} | " + " | ".join(_pct(by[s]["gap_rel"]) if s in by else "-"
                                                                     for s in steps)
                     + " | " + " | ".join(t_star_text(a["t_star"][k]) for k in keys) + " | "
                     + " | ".join(ratio_text(a["t_star_ratio"][k]) for k in keys) + f" | {a['verdict']} |")
    if not res["arms"]:
        lines.append("| - | no records yet |" + " |" * (len(steps) + 2 * len(keys) + 1))
    return "\n".join(lines)


def markdown(res: dict) -> str:
    sets = res["sets"]
    lines = [f"Removal-methods study: {res['records']} records; gaps relative to the vanilla control of the same "
             f"seed and budget (mean over seeds [95% interval of seeds and text]); T* in tokens [95% interval; > or "
             f"<: a bound, the crossing lies outside the budgets]; ratio = T*(arm) / T*({res['baseline']}) [95% "
             f"interval].", "", summary_table(res), "",
             f"Per budget: the gap on every set, arm - {res['baseline']} (paired over seeds), gap ratio arm / "
             f"{res['baseline']} [Fieller], and the mean over seeds of the per-token CE difference's 99th percentile "
             f"(nats):", "",
             "| family | arm | steps | seeds | " + " | ".join(sets) + f" | arm - {res['baseline']} | gap ratio | "
             + " | ".join(f"p99 {s}" for s in sets) + " |", "|---|---|---|---|" + "---|" * (2 * len(sets) + 2)]
    for a in res["arms"]:
        for e in a["budgets"]:
            gaps = [e["gap_rel"]] + [e[f"gap_rel_{s}"] for s in sets[1:]]
            g = e.get("gap_ratio")
            lines.append(f"| {a['family']} | {a['name']} | {e['steps']} | {len(e['seeds'])} | "
                         + " | ".join(_pct(x) for x in gaps) + f" | {_pct(e.get('vs_baseline'))} | "
                         + ("-" if g is None or g["value"] is None else ratio_text(g)) + " | "
                         + " | ".join(f"{e[f'p99_token_diff_{s}']:.3f}" for s in sets) + " |")
    n, s = res["measured_noise"], res["simulated_noise"]
    lines += ["", "Noise measured in these records (median over cells, from " + f"{n['runs']} runs) and assumed by the "
              "coverage test's simulated studies: " + "; ".join(
                  f"{k} {'-' if n[k] is None else f'{n[k]:.3f}'} (simulated {s[k]:.3f})" for k in s) + "."]
    if res.get("depth_family"):
        from .efficient_depth import markdown as depth_markdown

        lines += ["", depth_markdown(res["depth_family"]).rstrip()]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path):
    """Gap vs tokens per arm on log axes, one panel per evaluation set (non-positive gaps are not drawn), 95%
    intervals as error bars; colour = arm, marker = family (the one-budget families' points set slightly apart in
    tokens so that they do not hide each other); the thresholds as dotted lines on the in-domain panel."""
    from matplotlib.lines import Line2D

    from ..analysis.plots import figure_row, save_figure

    sets = res["sets"]
    fig, axes = figure_row(len(sets))
    families = list(dict.fromkeys(a["family"] for a in res["arms"]))
    markers = dict(zip(families, "osD^v<>"))
    colours = {name: f"C{i}" for i, name in enumerate(dict.fromkeys(a["name"] for a in res["arms"]))}
    dodge = {f: 1 + 0.04 * i for i, f in enumerate(families)}
    for ax, name in zip(axes, sets):
        key = "gap_rel" if name == sets[0] else f"gap_rel_{name}"
        for a in res["arms"]:
            pts = [e[key] for e in a["budgets"] if e[key]["value"] > 0]
            if not pts:
                continue
            x = np.array([e["tokens"] for e in a["budgets"] if e[key]["value"] > 0], float) * dodge[a["family"]]
            y = np.array([p["value"] for p in pts])
            low = np.array([p["ci_low"] if p["ci_low"] is not None and p["ci_low"] > 0 else p["value"] for p in pts])
            high = np.array([p["ci_high"] if p["ci_high"] is not None else p["value"] for p in pts])
            ax.errorbar(x, y, yerr=[y - low, high - y], color=colours[a["name"]], marker=markers[a["family"]],
                        capsize=2, ls="-" if len(pts) > 1 else "none")
        if name == sets[0]:
            for t in res["thresholds"]:
                ax.axhline(float(t), color="gray", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("fine-tuning tokens")
        ax.set_ylabel("relative gap to the vanilla control")
        ax.set_title(name)
    handles = ([Line2D([], [], color=c, label=n) for n, c in colours.items()]
               + [Line2D([], [], color="gray", marker=m, ls="none", label=f) for f, m in markers.items()])
    if handles:
        axes[-1].legend(handles=handles, fontsize=7)
    save_figure(fig, path)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", default=str(STUDY / "runs.jsonl"), help="the runner's records")
    ap.add_argument("--protocol", default=str(STUDY / "protocol.yaml"))
    ap.add_argument("--out", default=str(STUDY), help="where efficient.json, .md and .png go")
    ap.add_argument("--draws", type=int, default=N_DRAWS, help="bootstrap draws per arm")
    ap.add_argument("--depth-records", default=str(STUDY / "depth_runs.jsonl"),
                    help="the depth-and-width part's records (lnfree.sweeps.efficient_depth); absent: no such part")
    ap.add_argument("--depth-protocol", default=str(STUDY / "depth_protocol.yaml"))
    a = ap.parse_args(argv)
    with user_errors_as_messages():
        records = read_jsonl(a.records, RECORD_KEYS, ("val_ce",))
        res = analyse(records, yaml.safe_load(Path(a.protocol).read_text()), a.draws)
        if Path(a.depth_records).exists():
            from . import efficient_depth
            from .run_missing import DEPTH_RECORDS

            res["depth_family"] = efficient_depth.analyse(
                read_jsonl(a.depth_records), read_jsonl(DEPTH_RECORDS),
                efficient_depth.read_protocol(a.depth_protocol), tuple(float(t) for t in res["thresholds"]))
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "efficient.json", json.dumps(res, indent=1) + "\n")
        write_text_atomic(out / "efficient.md", markdown(res))
        plot(res, out / "efficient.png")
    for name, v in res["verdict"].items():
        print(f"[efficient] {name}: {v}")
    return res


if __name__ == "__main__":
    main()
