"""The censored exponent's coverage on the depth study's own design (issue 39), written to censored_coverage.json.

    python experiments/data_scaling/censored_coverage.py [--sweeps 200]   # about 30 min on 2 cores

The design is read from the committed records (experiments/depth_family/runs.jsonl at each size's probed LR, the
fixed grid of data_scaling_depth): its budgets, its sizes' non-embedding parameters, 2 pretrained models per size,
3 seeds, and the noise measured in it (seed noise, the gap's slope against the budget, the pretraining spread;
scaling.measured_noise). The truths span b in TRUE_B and a lack of fit in TRUE_LACK_OF_FIT; the level is set so
that a size of the geometric-mean N crosses 1% at ANCHOR_TOKENS (about where the records put it: just beyond the
grid's 2.1M tokens), so that the grid's edges censor as they do in the records. Per truth and threshold: the
coverage of b's interval at each fixed lack of fit and of the envelope the verdict uses, and how often each claim is
made (lnfree.analysis.censored.coverage); beside it the coverage of the measured-crossings estimator (scaling.
exponent_coverage) on the same sweeps' design. scaling.py quotes the lowest envelope coverage per threshold."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, replace
from multiprocessing import Pool
from pathlib import Path

import yaml

from lnfree.analysis.censored import coverage
from lnfree.analysis.scaling import (
    at_chosen_lr,
    exponent_coverage,
    gap_table,
    load_runs,
    measured_noise,
    seed_mean_curves,
)
from lnfree.analysis.simulate import SweepStructure
from lnfree.paths import SOURCE_ROOT as ROOT
from lnfree.sweeps.run_missing import depth_budgets  # the fixed grid's budgets, from its config

TRUE_B = (-0.5, 0.0, 0.37, 1.0)
TRUE_LACK_OF_FIT = (0.0, 0.25, 0.5)
ANCHOR_TOKENS = 2.5e6  # T* at 1% of a size of the geometric-mean N
THRESHOLDS = (0.005, 0.01, 0.02)
OUT = ROOT / "experiments/data_scaling/censored_coverage.json"
OUT_STAGE2 = ROOT / "experiments/data_scaling/censored_coverage_stage2.json"


def design(stage2_seeds: int | None = None) -> tuple[SweepStructure, dict]:
    """The fixed grid's design and measured noise, from the committed records; with stage2_seeds, plus each size's
    stage-2 budgets (experiments/depth_family/protocol.yaml's stage2) measured with that many seeds."""
    depth = ROOT / "experiments/depth_family"
    runs = at_chosen_lr(load_runs(depth / "runs.jsonl"), json.loads((depth / "lr.json").read_text())["sizes"])
    table = gap_table([r for r in runs if r["steps"] <= max(depth_budgets())], "scaled")
    noise = measured_noise(table)
    budgets = sorted(set.intersection(*(set(m["budgets"]) for m in table.values())))
    sizes = sorted(table, key=lambda m: table[m]["n"])
    st = replace(SweepStructure(), budgets=tuple(int(b) for b in budgets),
                 sizes_n=tuple(float(table[m]["n"]) for m in sizes),
                 n_pretrained=min(len(m["pretrained"]) for m in table.values()),
                 n_seeds=min(len(m["seeds"]) for m in table.values()),
                 **{k: noise[k] for k in ("seed_cv", "slope", "pretrain_sd") if noise[k] is not None})
    if stage2_seeds == 0:  # stage 2 as measured so far: each size's budgets beyond the grid, the fewest seeds there
        curves = seed_mean_curves(runs, "scaled")
        grid_max = max(budgets)
        extra = [[b for b in curves[m]["budgets"] if b > grid_max] for m in sizes]
        seeds = [len(x) for m in sizes for b, x in zip(curves[m]["budgets"], curves[m]["seeds"]) if b > grid_max]
        return replace(st, stage2_budgets=tuple(tuple(int(b) for b in e) for e in extra),
                       stage2_seeds=min(seeds) if seeds else 1), noise
    if stage2_seeds is not None:
        stage2 = yaml.safe_load((depth / "protocol.yaml").read_text())["stage2"]["budgets"]
        step_tokens = {r["tokens"] // r["steps"] for r in runs}
        assert len(step_tokens) == 1, f"one token count per step expected, got {step_tokens}"
        (tokens,) = step_tokens
        st = replace(st, stage2_budgets=tuple(tuple(int(b) * tokens for b in stage2.get(f"builtin_{m}", []))
                                              for m in sizes), stage2_seeds=stage2_seeds)
    return st, noise


def truth(st: SweepStructure, b: float, lack_of_fit: float) -> SweepStructure:
    log_mean = sum(math.log(n) for n in st.sizes_n) / len(st.sizes_n)
    return replace(st, b=b, lack_of_fit_sd=lack_of_fit,
                   t0=ANCHOR_TOKENS * math.exp(b * (math.log(st.sizes_n[0]) - log_mean)))


def cell(args) -> dict:
    """One truth: the censored fit's coverage and the measured-crossings estimator's, on the same design."""
    st, b, lof, sweeps, seed = args
    s = truth(st, b, lof)
    cen = coverage(s, THRESHOLDS, sweeps, seed=seed)
    today = exponent_coverage(s, THRESHOLDS, None, sweeps, seed=seed)
    print(b, lof, {k: (v["coverage"], v["coverage_profile_envelope"], v["claims"]["sublinear"])
                   for k, v in cen.items()}, today["per_threshold"], today["fits"], flush=True)
    return {"b": b, "lack_of_fit_sd": lof, "censored": cen,
            "measured_crossings": {"coverage": today["per_threshold"], "fits": today["fits"]}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweeps", type=int, default=200)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--stage2-seeds", type=int, help="the design with the protocol's stage 2 measured with this many "
                   "seeds (1: seed 1 of every stage-2 cell); 0: stage 2 as the records have measured it so far (its "
                   f"budgets and seeds); written to {OUT_STAGE2.name} unless --out says otherwise")
    p.add_argument("--out")
    a = p.parse_args(argv)
    st, noise = design(a.stage2_seeds)
    a.out = a.out or str(OUT if a.stage2_seeds is None else OUT_STAGE2)
    truths = [(b, lof) for b in TRUE_B for lof in TRUE_LACK_OF_FIT]
    jobs = [(st, b, lof, a.sweeps, i) for i, (b, lof) in enumerate(truths)]
    with Pool(a.workers) as pool:  # each cell has its own seed: the record does not depend on the workers
        cells = pool.map(cell, jobs, chunksize=1)
    lowest = {f"{t:g}": min(c["censored"][f"{t:g}"]["coverage"] for c in cells) for t in THRESHOLDS}
    lowest_profile = {f"{t:g}": min(c["censored"][f"{t:g}"]["coverage_profile_envelope"] for c in cells)
                      for t in THRESHOLDS}
    false_sublinear = {f"{t:g}": max(c["censored"][f"{t:g}"]["claims"]["sublinear"] for c in cells if c["b"] >= 1)
                       for t in THRESHOLDS}
    record = {"sweeps": a.sweeps, "thresholds": list(THRESHOLDS), "true_b": list(TRUE_B),
              "true_lack_of_fit_sd": list(TRUE_LACK_OF_FIT), "anchor_tokens_1pct_geometric_mean_size": ANCHOR_TOKENS,
              "design": asdict(st), "measured_noise": noise, "cells": cells,
              "lowest_envelope_coverage": lowest, "lowest_profile_envelope_coverage": lowest_profile,
              "false_sublinear_at_b1": false_sublinear}
    Path(a.out).write_text(json.dumps(record, indent=1))
    print("lowest envelope coverage", lowest, "false 'b < 1' at b = 1", false_sublinear)


if __name__ == "__main__":
    main()
