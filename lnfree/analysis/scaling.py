"""Data needed to remove LayerNorm vs model size, from a sweep's run summaries or committed records.

    make scaling      # = the sweep's missing runs (python -m lnfree.sweeps.run_missing), then this module
    python -m lnfree.analysis.scaling SWEEP_DIR [--out DIR]   # any Hydra multirun dir; no --out: a new dir
                                                              # outputs/scaling/<time> (never experiments/)
    python -m lnfree.analysis.scaling experiments/data_scaling/runs.jsonl --out DIR  # from the committed records
    python -m lnfree.analysis.scaling experiments/data_scaling/runs.jsonl multirun/data_scaling/resume \
        --records experiments/data_scaling/runs.jsonl   # committed records + the runs that finished a sweep
    make scaling-depth-analysis   # the depth-and-width grid: --lr-json (each size's probed LR), --schedule (arm),
                                  # --max-steps (the fixed grid without a later extension), --family-json

Every (pretrained model, seed, budget) has an LN-free run and its vanilla control with the same seed (same data
order). Gap = (CE_LN-free - CE_vanilla) / CE_vanilla (relative) or CE_LN-free - CE_vanilla (nats). Per pretrained
model, T* = the budget at which a power-law fit of the seed-mean gap against the budget crosses a threshold
(relative 0.5%, 1%, 2% and one absolute threshold in nats); a size's T* is the geometric mean over its pretrained
models (records with a `size` group a size's pretrained replicates). Then T* ~ N^b over the sizes whose crossings
have at least BRACKET measured budgets on each side (N = non-embedding parameters), with a t interval from the fit's
residuals, R^2 and leave-one-size-out fits (analysis/stats.py), the decision rule's verdict per threshold, and the
interval's coverage on simulated sweeps with the noise measured in these records (analysis/simulate.py).
docs/statistics.md describes the method and its tested coverage. Records are read strictly (lnfree/records.py): a
half-written line, a record without one of RECORD_KEYS, a val_ce that is not a finite number, or one run with two
results is refused, naming the file and line; `--records` only adds to its file (never drops a record there).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from ..errors import user_errors_as_messages
from ..records import RecordError, append_jsonl, check_fields, output_dir, read_json, read_jsonl
from .censored import PAPER_B
from .simulate import SweepStructure, sweep
from .stats import exponent, interval_text, over_seeds, size_t_star, t_star_interval, verdicts

THRESHOLDS = (0.005, 0.01, 0.02)  # relative gaps
ABSOLUTE_NATS = 0.04  # about 1% of the families' CE (4.3-4.6 nats)
N_SIMULATIONS = 1000  # simulated sweeps of the coverage check: binomial sd 0.007 at 0.95 (0.015 at the 200)
PAPER_EXPONENT = PAPER_B  # the paper's released budgets grow as N^0.37 (reference line in the figure)


RECORD_KEYS = ("model", "removes", "seed", "tokens", "val_ce", "n_nonemb")  # what every run record must hold
FINITE_KEYS = ("tokens", "val_ce", "n_nonemb")


def run_key(r: dict) -> tuple:
    return (r["model"], r.get("pretrained", r["model"]), r.get("schedule"), r["removes"], r["seed"], r["tokens"],
            r.get("lr"))


def size_name(r: dict) -> str:
    """The size a run belongs to: its record's `size` (a family with replicates per size, e.g. l4w128 for the
    runs of l4w128_s1 and l4w128_s2), else its model (one pretrained model per size)."""
    return r.get("size") or r["model"]


def at_chosen_lr(runs: list[dict], lrs: dict) -> list[dict]:
    """The runs at each size's fine-tuning LR. lrs: lr.json's "sizes" ({model option, e.g. builtin_l1w32: {"lr"}},
    lnfree.sweeps.lr_probe). The probe's runs at the other LRs are left out, and so is every size
    the probe has not chosen an LR for."""
    chosen = {k.removeprefix("builtin_"): v["lr"] for k, v in lrs.items()}
    return [r for r in runs if size_name(r).removeprefix("builtin_") in chosen
            and math.isclose(r["lr"], chosen[size_name(r).removeprefix("builtin_")], rel_tol=1e-9)]


def load_sources(sources) -> list[dict]:
    """The runs of several sweep dirs / runs.jsonl files, one record per (pretrained model, schedule, arm, seed,
    budget). The same run found twice (a records file and the sweep dir it came from) must agree; two different
    results fail."""
    seen: dict[tuple, dict] = {}
    for src in sources:
        for r in load_runs(src):
            key = run_key(r)
            if key in seen and abs(seen[key]["val_ce"] - r["val_ce"]) > 1e-6:
                raise RecordError(f"two different results for {key}: val_ce {seen[key]['val_ce']} and {r['val_ce']} "
                                  f"(in {[str(x) for x in sources]}); keep one")
            seen[key] = r
    return list(seen.values())


def load_runs(sweep_dir: str | Path) -> list[dict]:
    """One record per run, from a sweep dir's summary.json files or from a runs.jsonl written by `--records`."""
    if Path(sweep_dir).is_file():
        return read_jsonl(sweep_dir, RECORD_KEYS, FINITE_KEYS)
    runs = []
    for f in sorted(Path(sweep_dir).glob("**/summary.json")):
        s = read_json(f, ("config", "tokens_seen", "val_ce", "n_params_non_embedding", "all_removed"),
                      ("tokens_seen", "val_ce"))
        c = s["config"]
        shape = c["model"].get("shape") or {}
        source = c["model"].get("source") or c["model"]["name"]
        runs.append({"model": c["model"]["name"], "pretrained": source.removeprefix("builtin:"),
                     "n_layer": shape.get("n_layer"), "n_embd": shape.get("n_embd"),
                     "removes": c["schedule"]["remove"], "seed": c["seed"],
                     "tokens": s["tokens_seen"], "val_ce": s["val_ce"], "n_nonemb": s["n_params_non_embedding"],
                     "all_removed": s["all_removed"], "fit_fraction": c["schedule"].get("fit_fraction")})
        check_fields(runs[-1], str(f), RECORD_KEYS, FINITE_KEYS)
    if not runs:
        raise FileNotFoundError(f"no summary.json under {sweep_dir}")
    bad = [r for r in runs if r["removes"] and not r["all_removed"]]
    if bad:
        raise ValueError(f"{len(bad)} LN-free run(s) did not remove every site, e.g. {bad[0]}")
    return runs


def gap_table(runs: list[dict], schedule: str | None = None) -> dict:
    """{size: {"n", "n_layer", "n_embd", "pretrained": [ids], "budgets", "seeds", "gaps_by_pretrained"
    [pretrained][budget][seed] (relative), "abs_gaps_by_pretrained" (nats), "gaps" [budget][seed] (mean over
    pretrained models), "vanilla", "lnfree", "removal_fraction", "incomplete_budgets", "vanilla_only"}}. Runs pair
    LN-free vs vanilla by (pretrained model, seed, budget); kept: the pretrained models with LN-free runs of the
    schedule (a variant arm runs on some of them only; the others are listed in "vanilla_only"), the seeds with at
    least one pair, and the budgets where every (pretrained model, seed) has both arms (an unfinished sweep leaves
    the largest budgets incomplete). schedule: the LN-free arm's schedule when records name several (a variant
    arm); vanilla runs always pair. Runs of one size at several LRs are refused (at_chosen_lr picks one)."""
    lnfree_schedules = {r.get("schedule") for r in runs if r["removes"]}
    if schedule is None and len(lnfree_schedules) > 1:
        raise ValueError(f"LN-free runs of several schedules {sorted(map(str, lnfree_schedules))}: pick one")
    runs = [r for r in runs if not r["removes"] or schedule is None or r.get("schedule") == schedule]
    out = {}
    for size in sorted({size_name(r) for r in runs},
                       key=lambda m: next(r["n_nonemb"] for r in runs if size_name(r) == m)):
        mine = [r for r in runs if size_name(r) == size]
        lrs = {r.get("lr") for r in mine}
        if len(lrs) > 1:
            raise ValueError(f"runs of {size} at several LRs {sorted(lrs)}: keep one per size (at_chosen_lr, "
                             f"--lr-json)")
        with_arm = {r.get("pretrained", r["model"]) for r in mine if r["removes"]}
        vanilla_only = sorted({r.get("pretrained", r["model"]) for r in mine} - with_arm)
        mine = [r for r in mine if r.get("pretrained", r["model"]) in with_arm]
        if not mine:
            continue
        pre = sorted(with_arm)
        arm = {(r.get("pretrained", r["model"]), r["removes"], r["tokens"], r["seed"]): r["val_ce"] for r in mine}
        all_budgets = {r["tokens"] for r in mine}
        seeds = sorted(s for s in {r["seed"] for r in mine}
                       if any((p, True, b, s) in arm and (p, False, b, s) in arm for p in pre for b in all_budgets))
        budgets = sorted(b for b in all_budgets
                         if all((p, a, b, s) in arm for p in pre for a in (True, False) for s in seeds))
        van = [[[arm[(p, False, b, s)] for s in seeds] for b in budgets] for p in pre]
        lnf = [[[arm[(p, True, b, s)] for s in seeds] for b in budgets] for p in pre]
        v, x = np.asarray(van, float).reshape(len(pre), len(budgets), len(seeds)), \
            np.asarray(lnf, float).reshape(len(pre), len(budgets), len(seeds))
        fractions = {r["fit_fraction"] for r in mine if r["removes"]}
        out[size] = {"n": mine[0]["n_nonemb"], "n_layer": mine[0].get("n_layer"), "n_embd": mine[0].get("n_embd"),
                      "pretrained": pre, "budgets": budgets, "seeds": seeds,
                      "gaps_by_pretrained": ((x - v) / v).tolist(), "abs_gaps_by_pretrained": (x - v).tolist(),
                      "gaps": ((x - v) / v).mean(0).tolist(), "vanilla": v.mean(0).tolist(),
                      "lnfree": x.mean(0).tolist(),
                      "removal_fraction": fractions.pop() if len(fractions) == 1 else None,
                      "incomplete_budgets": sorted(all_budgets - set(budgets)), "vanilla_only": vanilla_only}
    return out


# size_ordering's verdict on a pair of adjacent sizes, as the tables say it: the larger size's gap is ...
ORDER_WORDS = {"ordered": "smaller", "reversed": "larger", "overlap": "not separated"}
ORDER_LEVEL = 0.05  # each (larger model, smaller model) pair's Welch test; all pairs must pass (intersection-union)


def _welch_p(x, y) -> float:
    """Two-sided Welch t test p of two seeds' gaps; seeds that agree exactly (no noise: p 0 if the means differ)."""
    from scipy.stats import ttest_ind

    if np.var(x) + np.var(y) == 0:
        return 0.0 if np.mean(x) != np.mean(y) else 1.0
    return float(ttest_ind(x, y, equal_var=False).pvalue)


def size_ordering(table: dict) -> dict:
    """What a grid says about size without any fit: at every budget that all sizes measured, is the gap smaller for
    the larger model? Adjacent sizes (by N) are "ordered" when, for every pretrained model of the larger size and
    every pretrained model of the smaller one, the larger's seed-mean relative gap is below the smaller's and a
    Welch t test over their seeds' gaps gives p < ORDER_LEVEL (an intersection-union test: the claim "every model of
    the larger size lies below every model of the smaller" at level 0.05 with no correction); "reversed" for the
    opposite; "overlap" otherwise (not separated from seed noise, or the pretraining spread crosses over; with one
    seed nothing is separated). If the gaps fall with the budget, a larger size ordered below a smaller one at every
    budget reaches every threshold no later: T* does not grow with N there."""
    sizes = list(table)  # gap_table orders sizes by N
    common = sorted(set.intersection(*(set(m["budgets"]) for m in table.values())))
    out = {}
    for b in common:
        runs = {s: [np.asarray(p[table[s]["budgets"].index(b)], float) for p in table[s]["gaps_by_pretrained"]]
                for s in sizes}
        per = {s: [float(r.mean()) for r in runs[s]] for s in sizes}
        pairs = []
        for small, large in zip(sizes, sizes[1:]):
            below = max(per[large]) < min(per[small])
            above = min(per[large]) > max(per[small])
            p_max = (max(_welch_p(x, y) for x in runs[large] for y in runs[small])
                     if min(len(x) for x in runs[large] + runs[small]) >= 2 else None)
            separated = p_max is not None and p_max < ORDER_LEVEL
            order = "ordered" if below and separated else "reversed" if above and separated else "overlap"
            pairs.append({"smaller": small, "larger": large, "order": order, "welch_p_max": p_max})
        out[str(b)] = {"per_pretrained": per, "pairs": pairs,
                       "all_ordered": bool(pairs) and all(p["order"] == "ordered" for p in pairs)}
    return {"budgets": out, "all_ordered_at": [int(b) for b, v in out.items() if v["all_ordered"]],
            "rule": "adjacent sizes ordered at a budget when every pretrained model of the larger size has a smaller "
                    "seed-mean gap than every pretrained model of the smaller size and every such pair's Welch t test "
                    f"over seeds gives p < {ORDER_LEVEL} (intersection-union test)"}


def threshold_keys(thresholds, absolute: float | None) -> dict:
    """{key: (threshold, which gaps)}: relative thresholds keyed as written ("0.01"), the absolute one "0.04nats"."""
    keys = {f"{t:g}": (t, "gaps_by_pretrained") for t in thresholds}
    if absolute is not None:
        keys[f"{absolute:g}nats"] = (absolute, "abs_gaps_by_pretrained")
    return keys


BRACKET = 2  # a reported crossing has at least this many measured budgets on each side (issue 24)


def t_stars(table: dict, thresholds, absolute: float | None, n_boot: int = 0) -> dict:
    """{threshold key: {size: {value, per_pretrained, extrapolated, bracketed[, ci_low, ci_high]}}}: a T* outside
    the measured budgets is an extrapolation; only a bracketed one (at least BRACKET measured budgets at or below
    it and at or above it) is a measured crossing and enters the exponent."""
    out = {}
    for key, (thr, which) in threshold_keys(thresholds, absolute).items():
        out[key] = {}
        for model, m in table.items():
            if not m["seeds"] or len(m["budgets"]) < 2:
                continue
            t = size_t_star(m["budgets"], m[which], thr)
            v = t["value"]
            t["extrapolated"] = bool(v is not None and not min(m["budgets"]) <= v <= max(m["budgets"]))
            t["bracketed"] = bool(v is not None and sum(b <= v for b in m["budgets"]) >= BRACKET
                                  and sum(b >= v for b in m["budgets"]) >= BRACKET)
            if n_boot:
                t["ci_low"], t["ci_high"] = t_star_interval(m["budgets"], m[which], thr, n_boot)
            out[key][model] = t
    return out


def exponents(table: dict, stars: dict) -> dict:
    """{threshold key: exponent()} over the sizes whose crossing was measured (bracketed)."""
    out = {}
    for key, per in stars.items():
        inside = [m for m in table if m in per and per[m]["bracketed"]]
        out[key] = exponent(inside, [table[m]["n"] for m in inside], [per[m]["value"] for m in inside])
    return out


def measured_noise(table: dict, lo: float = 0.005, hi: float = 0.04) -> dict:
    """Noise of the sweep for the simulation, from the budgets where every seed's gap lies in [lo, hi] (near the
    thresholds): seed_cv = the sd over seeds of log(relative gap), pooled over (pretrained model, budget) (the root
    of the mean variance: a median of 3-seed sds would fall 17% short of the true sd);
    slope = the median over pretrained models of the gap's log-log slope against the budget; pretrain_sd (with
    two or more pretrained models per size) = the spread between a size's pretrained models in log T*: at each
    such budget the variance over pretrained models of log(seed-mean gap), less what the seeds' noise puts in a
    mean of n seeds (seed_cv^2 / n), averaged over (size, budget), square-rooted and divided by the slope (a
    shift d in log gap is a shift d / slope in log T*). None where the records cannot tell."""
    variances, slopes, between = [], [], []
    for m in table.values():
        g = np.asarray(m["gaps_by_pretrained"], float)  # [pretrained, budget, seed]
        if g.size == 0 or g.shape[2] < 2:
            continue
        for p in g:
            near = [(b, row) for b, row in zip(m["budgets"], p) if np.all((row >= lo) & (row <= hi))]
            variances += [float(np.log(row).var(ddof=1)) for _, row in near]
            if len(near) >= 3:
                slopes.append(-np.polyfit(np.log([b for b, _ in near]), np.log([row.mean() for _, row in near]),
                                          1)[0])
        if g.shape[0] >= 2:
            near = [j for j in range(g.shape[1]) if np.all((g[:, j] >= lo) & (g[:, j] <= hi))]
            between += [(float(np.log(g[:, j].mean(1)).var(ddof=1)), g.shape[2]) for j in near]
    seed_cv = math.sqrt(float(np.mean(variances))) if variances else None
    slope = float(np.median(slopes)) if slopes else None
    pretrain_sd = None
    if between and seed_cv is not None and slope:
        pretrain_sd = math.sqrt(max(float(np.mean([v - seed_cv ** 2 / n for v, n in between])), 0.0)) / slope
    return {"seed_cv": seed_cv, "slope": slope, "pretrain_sd": pretrain_sd, "n_seed_sets": len(variances),
            "n_pretrain_sets": len(between)}


def exponent_coverage(structure: SweepStructure, thresholds=THRESHOLDS, absolute: float | None = ABSOLUTE_NATS,
                      n_sim: int = N_SIMULATIONS, seed: int = 0) -> dict:
    """The exponent's interval on n_sim simulated sweeps with a known b (analysis/simulate.py), through the same
    analysis as real records (gap_table, t_stars, exponents): the fraction of intervals that cover b, per threshold
    and over all (nominal 0.95)."""
    rng = np.random.default_rng(seed)
    hits = {k: 0 for k in threshold_keys(thresholds, absolute)}
    fitted = dict.fromkeys(hits, 0)
    for _ in range(n_sim):
        table = gap_table(sweep(rng, structure, thresholds))
        for key, e in exponents(table, t_stars(table, thresholds, absolute)).items():
            if e["ci_low"] is not None:
                fitted[key] += 1
                hits[key] += e["ci_low"] <= structure.b <= e["ci_high"]
    per = {k: hits[k] / fitted[k] if fitted[k] else None for k in hits}  # None: no simulated sweep had a fit
    measured = [v for v in per.values() if v is not None]
    return {"nominal": 0.95, "simulations": n_sim, "covered": min(measured) if measured else None,
            "per_threshold": per,
            "fits": fitted, "structure": asdict(structure)}


def simulated_design(table: dict, exps: dict, thresholds, noise: dict) -> SweepStructure:
    """The coverage check's simulated sweep with this sweep's design: the sizes in the fit at the middle threshold
    (all sizes where fewer than 3 are), its pretrained models per size and seeds, and the noise measured here
    (measured_noise: seeds, slope and, with replicates, pretraining; the defaults where not measured)."""
    measured = {k: v for k, v in noise.items() if k in ("seed_cv", "slope", "pretrain_sd") and v is not None}
    fitted = max((e["sizes"] for e in exps.values()), key=len) if exps else []
    mid = exps.get(f"{sorted(thresholds)[len(thresholds) // 2]:g}")
    fitted = mid["sizes"] if mid and len(mid["sizes"]) >= 3 else fitted
    return replace(SweepStructure(), n_pretrained=max(min(len(m["pretrained"]) for m in table.values()), 1),
                   n_seeds=max(len(m["seeds"]) for m in table.values()),
                   sizes_n=tuple(float(table[m]["n"]) for m in (fitted if len(fitted) >= 3 else table)), **measured)


def seed_mean_curves(runs: list[dict], schedule: str | None = None) -> dict:
    """{size: {"n", "pretrained", "budgets", "seeds" (per budget), "gaps_by_pretrained" / "abs_gaps_by_pretrained"
    [pretrained][budget] (seed means)}}: like gap_table, but a budget is kept with whatever seeds every pretrained
    model of the size has both arms of (stage 2 runs seed 1 of every cell first), so the censored fit can use every
    measured budget. The seed-mean gap of a budget with fewer seeds is noisier; the fit reads only which side of
    the threshold it lies on."""
    runs = [r for r in runs if not r["removes"] or schedule is None or r.get("schedule") == schedule]
    out = {}
    for size in sorted({size_name(r) for r in runs},
                       key=lambda m: next(r["n_nonemb"] for r in runs if size_name(r) == m)):
        mine = [r for r in runs if size_name(r) == size]
        pre = sorted({r.get("pretrained", r["model"]) for r in mine if r["removes"]})
        arm = {(r.get("pretrained", r["model"]), r["removes"], r["tokens"], r["seed"]): r["val_ce"] for r in mine}
        budgets, seeds = [], []
        for b in sorted({r["tokens"] for r in mine}):
            s = sorted(x for x in {r["seed"] for r in mine}
                       if all((p, a, b, x) in arm for p in pre for a in (True, False)))
            if s:
                budgets.append(b)
                seeds.append(s)
        if not pre or not budgets:
            continue
        rel = [[float(np.mean([(arm[(p, True, b, x)] - arm[(p, False, b, x)]) / arm[(p, False, b, x)] for x in s]))
                for b, s in zip(budgets, seeds)] for p in pre]
        nats = [[float(np.mean([arm[(p, True, b, x)] - arm[(p, False, b, x)] for x in s]))
                 for b, s in zip(budgets, seeds)] for p in pre]
        out[size] = {"n": mine[0]["n_nonemb"], "pretrained": pre, "budgets": budgets, "seeds": seeds,
                     "gaps_by_pretrained": rel, "abs_gaps_by_pretrained": nats}
    return out


def design_matches(design: dict, curves: dict) -> bool:
    """Whether a coverage record's simulated design (SweepStructure as a dict) is the one these seed-mean curves
    were measured on: the same number of sizes and pretrained models, each size's budgets (the fixed grid plus its
    stage-2 budgets) and, at a stage-2 budget, the designed number of seeds."""
    sizes = sorted(curves, key=lambda s: curves[s]["n"])
    stage2 = design.get("stage2_budgets") or [()] * len(sizes)
    if (len(design["sizes_n"]) != len(sizes) or len(stage2) != len(sizes)
            or design["n_pretrained"] != max(len(curves[s]["pretrained"]) for s in sizes)):
        return False
    for i, s in enumerate(sizes):
        extra = {int(b) for b in stage2[i]}
        if [int(b) for b in curves[s]["budgets"]] != sorted({*(int(b) for b in design["budgets"]), *extra}):
            return False
        if any(int(b) in extra and len(x) != design.get("stage2_seeds", 1)
               for b, x in zip(curves[s]["budgets"], curves[s]["seeds"])):
            return False
    return True


def censored_exponents(curves: dict, thresholds, absolute: float | None, coverage_records=()) -> dict:
    """{threshold key: the censored fit (analysis/censored.py)}: each pretrained model's crossing interval on its
    seed-mean curve, b's envelope interval (the union over the lack of fit's profile interval) and its verdict, b's
    interval at each fixed lack of fit, the sizes with a censored model, and the envelope's coverage measured on
    this design (coverage_records: experiments/data_scaling/censored_coverage*.json; the lowest over the truths of
    the record whose design is this one, design_matches; None where none is)."""
    from .censored import LACK_OF_FIT_SDS, crossing_intervals, fit, verdict

    sizes = list(curves)
    n_pre = max(len(curves[s]["pretrained"]) for s in sizes)
    coverage_record = next((r for r in coverage_records if design_matches(r["design"], curves)), None)
    tested = coverage_record is not None

    def num(v):
        v = float(v)
        return None if math.isnan(v) else v

    out = {}
    for key, (thr, which) in threshold_keys(thresholds, absolute).items():
        bounds = np.full((len(sizes), n_pre, 2), np.nan)
        for i, s in enumerate(sizes):
            iv = crossing_intervals(curves[s]["budgets"], curves[s][which], thr)
            bounds[i, :len(iv)] = iv
        f = fit([curves[s]["n"] for s in sizes], bounds)
        env = f["envelope"]
        lo, hi = num(env["ci_low"]), num(env["ci_high"])
        prof = f["profile_envelope"]
        out[key] = {"value": num(env["value"]), "ci_low": lo, "ci_high": hi, "verdict": verdict(lo, hi),
                    "lack_of_fit_ci": [float(f["tau_ci"][0]), float(f["tau_ci"][1])],
                    "profile_envelope": {"ci_low": num(prof["ci_low"]), "ci_high": num(prof["ci_high"]),
                                         "verdict": verdict(num(prof["ci_low"]), num(prof["ci_high"]))},
                    "lack_of_fit": {f"{t:g}": {"value": num(f["per_tau"][t]["value"]),
                                               "ci_low": num(f["per_tau"][t]["ci_low"]),
                                               "ci_high": num(f["per_tau"][t]["ci_high"]),
                                               "verdict": verdict(num(f["per_tau"][t]["ci_low"]),
                                                                  num(f["per_tau"][t]["ci_high"]))}
                                    for t in LACK_OF_FIT_SDS},
                    "coverage": (coverage_record["lowest_envelope_coverage"].get(key) if tested else None),
                    "sizes_censored": [s for i, s in enumerate(sizes) if np.any(np.isinf(bounds[i, :, 1])
                                                                                | (bounds[i, :, 0] == 0))],
                    # per pretrained model (lo, hi] in tokens; hi None: right-censored, lo 0: left-censored
                    "intervals": {s: [[float(lo_), None if math.isinf(hi_) else float(hi_)] for lo_, hi_ in bounds[i]]
                                  for i, s in enumerate(sizes)}}
    return out


def stages(curves: dict, max_steps: int | None, runs: list[dict]) -> dict:
    """{size: {"fixed_grid": [tokens], "stage2": [tokens], "seeds": {tokens: [seeds]}}}: which budgets each size
    has, split at the fixed grid's largest budget (max_steps)."""
    steps = {(size_name(r), r["tokens"]): r["steps"] for r in runs if "steps" in r}
    out = {}
    for s, c in curves.items():
        grid = [b for b in c["budgets"] if max_steps is None or steps.get((s, b), 0) <= max_steps]
        out[s] = {"fixed_grid": grid, "stage2": [b for b in c["budgets"] if b not in grid],
                  "seeds": {str(b): x for b, x in zip(c["budgets"], c["seeds"])}}
    return out


def analyse(sweep_dir, out_dir: str | Path, thresholds=THRESHOLDS, absolute: float | None = ABSOLUTE_NATS,
            n_boot: int = 1000, n_sim: int = N_SIMULATIONS, family: str | None = None, family_json: str | None = None,
            schedule: str | None = None, lr_json: str | None = None, max_steps: int | None = None,
            coverage_json: str | list[str] | None = None) -> dict:
    """sweep_dir: a sweep dir or runs.jsonl, or a list of them (merged by load_sources). lr_json: the LR probe's
    choice per size (only the runs at it are analysed). max_steps: only the runs of at most this many steps (the
    fixed grid); the censored fit is also reported with every budget measured beyond it ("censored_extended",
    stage 2). coverage_json: the censored fit's coverage records (experiments/data_scaling/censored_coverage.json
    for the fixed grid, censored_coverage_stage2.json for the grid with stage 2); each fit quotes the one whose
    design is its own. Writes scaling.json, scaling.md and scaling.png to out_dir."""
    sources = list(sweep_dir) if isinstance(sweep_dir, (list, tuple)) else [sweep_dir]
    runs = load_sources(sources)
    if lr_json:
        runs = at_chosen_lr(runs, read_json(lr_json, ("sizes",))["sizes"])
    every_budget = runs
    if max_steps is not None:  # a grid analysed without the budgets added to it later (records carry "steps")
        runs = [r for r in runs if r["steps"] <= max_steps]
    table = {k: v for k, v in gap_table(runs, schedule).items() if v["seeds"]}
    if not table:
        raise ValueError(f"no paired runs to analyse in {[str(x) for x in sources]}")
    stars = t_stars(table, thresholds, absolute, n_boot)
    exps = exponents(table, stars)
    noise = measured_noise(table)
    n_pre = min(len(m["pretrained"]) for m in table.values())
    structure = simulated_design(table, exps, thresholds, noise)
    coverage = exponent_coverage(structure, thresholds, absolute, n_sim) if n_sim else None
    records = [json.loads(Path(f).read_text()) for f in ([coverage_json] if isinstance(coverage_json, str)
                                                          else coverage_json or [])]
    censored = censored_exponents(seed_mean_curves(runs, schedule), thresholds, absolute, records)
    extended = {size: c for size, c in seed_mean_curves(every_budget, schedule).items() if size in table}
    beyond = len(every_budget) > len(runs)
    fam = _family_entries(family_json)
    sizes = []
    for model, m in table.items():
        sizes.append({"name": model, "n_layer": m["n_layer"], "n_embd": m["n_embd"], "non_embedding_params": m["n"],
                      "pretrained": [fam.get(p, fam.get(model, {"id": p})) | {"id": p} for p in m["pretrained"]],
                      "budgets": m["budgets"], "incomplete_budgets": m["incomplete_budgets"],
                      "vanilla_only_pretrained": m["vanilla_only"],
                      "removal_fraction": m["removal_fraction"],
                      "t_star": {k: stars[k].get(model) for k in stars},
                      "gap_by_budget": {str(b): over_seeds(g) for b, g in zip(m["budgets"], m["gaps"])}})
    res = {"family": family or "unnamed", "sources": [str(x) for x in sources], "schedule": schedule,
           "lr": ({k: v["lr"] for k, v in read_json(lr_json, ("sizes",))["sizes"].items()} if lr_json
                  else None), "bracket": BRACKET, "max_steps": max_steps,
           "thresholds": list(thresholds), "absolute_threshold_nats": absolute,
           "seeds": sorted({s for m in table.values() for s in m["seeds"]}),
           "pretrained_per_size": n_pre,
           "pretraining_variation": ("measured: >= 2 pretrained models per size" if n_pre >= 2 else
                                     "not measured: one pretrained model per size, so pretraining variation is not "
                                     "separated from the lack of fit; it enters the exponent's interval only through "
                                     "the residuals about the power law"),
           "sizes": sizes, "exponent": exps, "verdict": verdicts(exps), "size_ordering": size_ordering(table),
           "measured_noise": noise,
           "coverage": coverage,
           "censored": censored,
           "censored_extended": censored_exponents(extended, thresholds, absolute, records) if beyond else None,
           "stage": stages(extended, max_steps, every_budget),
           "method": "T* per pretrained model from a local power-law fit of the seed-mean gap (4 budgets nearest the "
                     "threshold), geometric mean per size; b from least squares of log T* on log N with a t interval "
                     "from the residuals (df = sizes - 2); T* intervals: two-level bootstrap (pretrained models, "
                     "seeds), untested spreads; censored: maximum likelihood on each pretrained model's crossing "
                     "interval (analysis/censored.py, docs/statistics.md)"}
    out = output_dir(out_dir, "scaling")
    (out / "scaling.json").write_text(json.dumps(res, indent=1))
    (out / "scaling.md").write_text(markdown(res))
    from .plots import plot_scaling  # matplotlib only when a figure is drawn

    plot_scaling(res, table, out / "scaling.png", PAPER_EXPONENT)
    return res


def _family_entries(path) -> dict:
    """{pretrained id or model name: {seed, val_ce, converged}} from a family JSON: one model per size
    (experiments/builtin_family) or replicates per size under "pretrained" (experiments/depth_family)."""
    if not path:
        return {}
    out = {}
    for s in read_json(path).get("sizes", []):
        for m in s.get("pretrained") or [s]:
            entry = {"seed": m.get("seed", (m.get("recipe") or {}).get("seed")), "val_ce": m.get("val_ce"),
                     "converged": m.get("converged", (m.get("convergence") or {}).get("met"))}
            for k in (m["name"], m["name"].removeprefix("builtin_"), m.get("id")):
                if k:
                    out[k] = entry
    return out


def _k(x) -> str:
    return "-" if x is None else ("inf" if x == float("inf") else f"{x / 1e3:,.0f}k")


def b_interval_text(e: dict) -> str:
    """b [low, high], "no bound" where the likelihood is flat (both ends open: the MLE means nothing)."""
    def end(x, open_text):
        return open_text if x is None else f"{x:+.2f}"
    if e["ci_low"] is None and e["ci_high"] is None:
        return "no bound"
    return ("" if e.get("value") is None else f"{e['value']:+.2f} ") + (f"[{end(e['ci_low'], '-inf')}, "
                                                                         f"{end(e['ci_high'], '+inf')}]")


def censored_lines(block: dict, today: dict, name: str) -> list[str]:
    """The censored fit (scaling.json's "censored" or "censored_extended") as a table, today's rule beside it."""
    from .censored import B_RANGE, VERDICT_TAU_MAX

    sds = list(next(iter(block.values()))["lack_of_fit"])
    lines = [f"Censored maximum likelihood, {name} (every pretrained model, its crossing interval- or right-censored "
             f"on its seed-mean curve; docs/statistics.md): b's 95% profile interval at each fixed lack-of-fit sd "
             f"(in log T*); the union over every sd inside the lack of fit's own profile interval (\"profile union\")"
             f"; and the verdict's interval, the union over that interval and every sd up to {VERDICT_TAU_MAX} (an "
             f"end at +-inf: not reached within b in {list(B_RANGE)}); its lowest coverage over the simulated truths "
             f"of this design; today's rule (measured crossings only) beside it:", "",
             "| threshold | verdict (censored) | b [union over sd] | sd profile interval | profile union | "
             + " | ".join(f"b at sd {t}" for t in sds) + " | sizes censored | coverage on this design | "
             "today's rule |", "|---|---|---|---|---|" + "---|" * len(sds) + "---|---|---|"]
    for key, c in block.items():
        cov = "not tested" if c["coverage"] is None else f"{c['coverage']:.3f}"
        per_sd = " | ".join(b_interval_text(c["lack_of_fit"][t]) for t in sds)
        lines.append(f"| {key} | {c['verdict']} | {b_interval_text(c)} | [{c['lack_of_fit_ci'][0]:g}, "
                     f"{c['lack_of_fit_ci'][1]:g}] | {b_interval_text(c['profile_envelope'])} | {per_sd} "
                     f"| {', '.join(c['sizes_censored']) or '-'} | {cov} | {today[key].split(':')[0]} |")
    return lines


def markdown(res: dict) -> str:
    """The result as tables: the verdict and exponent per threshold, T* per size, the gap at every budget."""
    keys = list(res["exponent"])
    lines = [f"Family: {res['family']}. Seeds {res['seeds']}; pretrained models per size: {res['pretrained_per_size']}"
             f" (pretraining variation {res['pretraining_variation']}).", "",
             "| threshold | verdict | b [95% CI] | R^2 | sizes in the fit | leave-one-size-out b [95% CI] |",
             "|---|---|---|---|---|---|"]
    for k in keys:
        e = res["exponent"][k]
        loo = "; ".join(f"w/o {x['dropped']}: " + ("-" if x["value"] is None else f"{x['value']:.2f}")
                        + f" {interval_text(x)}" for x in e["leave_one_out"]) or "-"
        val = "-" if e["value"] is None else f"{e['value']:.2f} {interval_text(e)}"
        r2 = "-" if e["r2"] is None else f"{e['r2']:.2f}"
        lines.append(f"| {k} | {res['verdict'][k]} | {val} | {r2} | {', '.join(e['sizes'])} "
                     f"| {loo} |")
    c = res.get("coverage")
    if c and c["covered"] is None:
        lines += ["", f"Coverage of the exponent's interval: not measured (no simulated sweep of this design, "
                  f"{len(c['structure']['sizes_n'])} sizes, has an interval to test)."]
    elif c:
        lines += ["", f"Tested coverage of the exponent's nominal 95% interval: {c['covered']:.3f} (lowest over "
                  f"thresholds) on {c['simulations']} simulated sweeps with a known b, this sweep's sizes, "
                  f"{c['structure']['n_pretrained']} pretrained model(s) per size and {c['structure']['n_seeds']} "
                  f"seeds, seed noise {c['structure']['seed_cv']:.3f} in log gap (measured here), pretraining "
                  f"spread {c['structure']['pretrain_sd']:.3f} in log T* ("
                  f"{'measured here' if res['measured_noise'].get('pretrain_sd') is not None else 'assumed'}) and "
                  f"lack of fit {c['structure']['lack_of_fit_sd']} in log T* (assumed), budgets placed around each "
                  f"size's true crossing (every crossing bracketed; on a fixed grid that censors them the coverage "
                  f"differs: docs/statistics.md)."]
    for name, block in (("fixed grid", res.get("censored")), ("fixed grid + stage 2", res.get("censored_extended"))):
        if block:
            lines += ["", *censored_lines(block, res["verdict"], name)]
    if res.get("stage") and any(v["stage2"] for v in res["stage"].values()):
        lines += ["", "Budgets beyond the fixed grid (stage 2; tokens: seeds measured): " + "; ".join(
            f"{s}: " + ", ".join(f"{_k(b)}: {res['stage'][s]['seeds'][str(b)]}" for b in v["stage2"])
            for s, v in res["stage"].items() if v["stage2"]) + "."]
    lines += ["", f"T* (tokens) per size [two-level bootstrap spread; x = beyond (>) or below (<) the measured "
              f"budgets, e = inside them with fewer than {BRACKET} measured budgets on one side; neither is in the "
              f"fit; the extrapolated values are in scaling.json]:", "",
              "| size | N (non-emb.) | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for s in res["sizes"]:
        cells = []
        for k in keys:
            t = s["t_star"].get(k)
            if not t:
                cells.append("-")
                continue
            if t["value"] is None or t["value"] > s["budgets"][-1]:  # an extrapolation says only where it is not
                cells.append(f"> {_k(s['budgets'][-1])} x")
                continue
            if t["value"] < s["budgets"][0]:
                cells.append(f"< {_k(s['budgets'][0])} x")
                continue
            ci = f" [{_k(t.get('ci_low'))}, {_k(t.get('ci_high'))}]" if "ci_low" in t else ""
            cells.append(f"{_k(t['value'])}{ci}" + ("" if t["bracketed"] else " e"))
        lines.append(f"| {s['name']} | {s['non_embedding_params'] / 1e6:.3f}M | " + " | ".join(cells) + " |")
    budgets = sorted({int(b) for s in res["sizes"] for b in s["gap_by_budget"]})
    lines += ["", "Relative gap LN-free vs vanilla (%, mean over seeds and pretrained models [95% t CI over seeds]) "
              "by budget (tokens):", "",
              "| size | " + " | ".join(_k(b) for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for s in res["sizes"]:
        cells = []
        for b in budgets:
            g = s["gap_by_budget"].get(str(b))
            ci = g.get("ci95") if g else None
            cells.append("" if g is None else f"{100 * g['mean']:.2f}" + (f" [{100 * ci[0]:.2f}, {100 * ci[1]:.2f}]"
                                                                         if ci else ""))
        lines.append(f"| {s['name']} | " + " | ".join(cells) + " |")
    o = res.get("size_ordering")
    if o and o["budgets"]:  # the fit-free comparison of adjacent sizes, one row per pair
        bs = list(o["budgets"])
        lines += ["", "Gap of each size vs the next smaller one, per budget (tokens), without a fit: \"smaller\" when "
                  "every pretrained model of the larger size has a smaller seed-mean gap than every pretrained model "
                  f"of the smaller size and every such pair's Welch t test over seeds gives p < {ORDER_LEVEL}, "
                  "\"larger\" for the opposite, else \"not separated\":", "",
                  "| sizes | " + " | ".join(_k(int(b)) for b in bs) + " |", "|---|" + "---|" * len(bs)]
        for i, p in enumerate(o["budgets"][bs[0]]["pairs"]):
            lines.append(f"| {p['larger']} vs {p['smaller']} | "
                         + " | ".join(ORDER_WORDS[o["budgets"][b]["pairs"][i]["order"]] for b in bs) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description="data-scaling analysis of a sweep")
    p.add_argument("sweep_dir", nargs="+", help="sweep dirs and/or runs.jsonl files, merged")
    p.add_argument("--thresholds", type=float, nargs="+", default=list(THRESHOLDS), help="relative gaps")
    p.add_argument("--absolute", type=float, default=ABSOLUTE_NATS, help="absolute gap threshold in nats")
    p.add_argument("--out", help="where scaling.json, .md and .png go (default: a new dir outputs/scaling/<time>; "
                                 "committed results only when named, e.g. --out experiments/data_scaling)")
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples of each T* interval")
    p.add_argument("--simulations", type=int, default=N_SIMULATIONS, help="simulated sweeps of the coverage check")
    p.add_argument("--family", help="name of the model family (for the result file)")
    p.add_argument("--family-json", help="the family's JSON (pretrained val CE and convergence per model)")
    p.add_argument("--schedule", help="the LN-free arm when the records hold several schedules")
    p.add_argument("--lr-json", help="the fine-tuning LR per size (an LR probe's lr.json): runs at other LRs are "
                                     "left out")
    p.add_argument("--max-steps", type=int, help="only the runs of at most this many optimizer steps (records with "
                                                 "`steps`: a fixed grid without the budgets of a later extension)")
    p.add_argument("--records", help="also add every run's record to this .jsonl (records already there are kept; "
                                     "a run already there with another result is refused)")
    p.add_argument("--coverage-json", nargs="*", help="the censored fit's coverage records "
                   "(censored_coverage*.json); each fit quotes the one simulated on its own design")
    a = p.parse_args(argv)
    with user_errors_as_messages():
        if a.records:  # the runs themselves, compact, so that the analysis can be redone from a committed file
            runs = sorted(load_sources(a.sweep_dir), key=lambda r: (r["n_nonemb"], str(r.get("pretrained")),
                                                                   r["tokens"], r["removes"], r["seed"]))
            added = append_jsonl(a.records, runs, run_key, RECORD_KEYS, FINITE_KEYS)  # a conflict: nothing written
            print(f"[lnfree] {a.records}: {added} new record(s) added")
        res = analyse(a.sweep_dir, a.out, a.thresholds, a.absolute, a.bootstrap, a.simulations, a.family,
                      a.family_json, a.schedule, a.lr_json, a.max_steps, a.coverage_json)
    for key, v in res["verdict"].items():
        c = res["censored"][key]
        print(f"{key:>10s}: {v}  | censored: {c['verdict']} b = {c['value']} [{c['ci_low']}, {c['ci_high']}]")
    if res["coverage"]:
        print("coverage of the exponent's 95% interval:", res["coverage"]["covered"], res["coverage"]["per_threshold"])


if __name__ == "__main__":
    main()
