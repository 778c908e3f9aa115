"""The removal-methods study's depth-and-width part: one arm on the family's largest sizes, against the depth grid.

    python -m lnfree.sweeps.efficient_depth            # train what experiments/efficient/depth_runs.jsonl lacks
    python -m lnfree.sweeps.efficient_depth --dry-run  # what is missing, and its CPU hours

The protocol is experiments/efficient/depth_protocol.yaml (the arm and its overrides, sizes, budgets, seeds). Each
run is the depth grid's LN-free run (`python -m lnfree.train -m experiment=data_scaling_depth schedule=scaled`,
the same pretrained model, budget, seed, LR and data order; lnfree.sweeps.run_missing.depth_command) plus the
arm's overrides, so the grid's own records (experiments/depth_family/runs.jsonl) are its baseline (schedule=scaled)
and its vanilla control (schedule=none), and nothing is trained twice. One record per run, the grid's record shape
(run_missing.depth_record) plus the arm's name and overrides.

The analysis (analyse(), called by lnfree.sweeps.efficient_analysis into efficient.json's `depth_family`): per
pretrained model, the relative validation gap of the arm and of the baseline at every budget, seed by seed, and the
tokens to a 1% and 2% gap (T*) of each by the built-in part's rule (log-log interpolation between the two budgets
that bracket the crossing, a bound outside them: efficient_analysis.crossing) and their ratio. With one
fine-tuning seed there is no interval from the arm's seeds; beside each ratio stands the seed noise of the
baseline's own T* (the sd of log T* over the grid's seeds of the same pretrained model), the yardstick a
single-seed ratio has to clear, and the verdict says "not established" unless the ratio lies beyond 2.8 such sds
(a 95% band for the difference of two independent seeds' log T*, 1.96 * sqrt(2)). That yardstick is an
approximation whose coverage is not tested; it says what a second and third seed would settle.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from ..analysis.censored import censoring, crossing, open_end
from ..records import append_jsonl, read_jsonl
from . import run_missing as grid

STUDY = Path("experiments/efficient")
PROTOCOL = STUDY / "depth_protocol.yaml"
RECORDS = STUDY / "depth_runs.jsonl"
OUT = Path("outputs/efficient/depth")
DISTILL_COST = 1.9  # a distillation step's CPU time over a plain one (the built-in part's measured rate)
HALF = 0.5  # the study's goal: the same gap with half the tokens
BAND = 1.96 * math.sqrt(2)  # two independent seeds' log T* differ by less than this many per-seed sds, 95%


def read_protocol(path: Path = PROTOCOL) -> dict:
    return yaml.safe_load(Path(path).read_text())


def jobs(protocol: dict, records: list[dict], lrs: dict, pairs: dict) -> list[tuple]:
    """The missing runs as run_missing's jobs (budget, model, replicate, "scaled", lr, [seed]), in the protocol's
    order: each size's first pretrained model at every budget (smallest first), then the second."""
    done = {grid.depth_key(r) for r in records}
    out = []
    for position in (0, 1):
        for m in protocol["sizes"]:
            rep, lr = pairs[m][position], lrs[m]["lr"]
            for b in protocol["budgets"]:
                for seed in protocol["seeds"]:
                    if (f"{grid.size_of(m)}_s{rep}", b, "scaled", seed, lr) not in done:
                        out.append((b, m, rep, "scaled", lr, [seed]))
    return out


def cpu_hours(job_list) -> float:
    return grid.cpu_hours(job_list) * DISTILL_COST


def run(job, protocol: dict, cache_dir=None) -> dict | None:
    """Train one run (the grid's command plus the arm's overrides) and append its record; None if it failed."""
    cmd, d = grid.depth_command(job, OUT)
    cmd += list(protocol["overrides"]) + ([f"paths.cache_dir={cache_dir}"] if cache_dir else [])
    env = grid.one_thread_env()
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(d / "run.log", "a") as log:
        rc = subprocess.call(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    summary = d / f"s{job[5][0]}" / "summary.json"
    if rc != 0 or not summary.exists():
        print(f"[efficient-depth] {d.name}: failed (rc={rc}), see {d / 'run.log'}", flush=True)
        return None
    s = json.loads(summary.read_text())
    rec = {**grid.depth_record(s, grid.pretrained_ce(s["config"]["model"]["source"].removeprefix("builtin:"),
                                                     cache_dir)),
           "arm": protocol["arm"], "overrides": list(protocol["overrides"])}
    append_jsonl(RECORDS, [rec], key=grid.depth_key)
    print(f"[efficient-depth] {time.strftime('%H:%M:%S')} {d.name} s{job[5][0]}: {time.time() - t0:.0f} s, "
          f"val CE {rec['val_ce']:.4f}", flush=True)
    return rec


# -- the analysis -------------------------------------------------------------------------------------------------
def _gap(run: dict, control: dict) -> float:
    return (run["val_ce"] - control["val_ce"]) / control["val_ce"]


def _curve(grid_records: list[dict], pretrained: str, lr: float, seed: int, runs: dict | None = None):
    """(steps, tokens, gaps) of one seed: the given runs {steps: record} (default: the grid's LN-free runs), each
    against the grid's vanilla control of the same budget; budgets without both are left out."""
    by = {(r["steps"], r["schedule"]): r for r in grid_records
          if r["pretrained"] == pretrained and r["seed"] == seed and r["lr"] == lr}
    runs = runs if runs is not None else {b: r for (b, s), r in by.items() if s == "scaled"}
    steps = sorted(b for b in runs if (b, "none") in by)
    return (steps, [runs[b]["tokens"] for b in steps], [_gap(runs[b], by[(b, "none")]) for b in steps])


def _crossing(tokens, gaps, threshold: float) -> dict:
    value, low, high = (float(v) for v in crossing(tokens, gaps, threshold))
    inside = math.isfinite(value)
    return {"value": value if inside else None, "low": open_end(low), "high": open_end(high),
            "censored": censoring(low, high)}


def _ratio(arm: dict, base: dict) -> dict:
    """T*(arm) / T*(baseline): the value where both cross inside their budgets, else the bounds."""
    if arm["value"] is not None and base["value"] is not None:
        v = arm["value"] / base["value"]
        return {"value": v, "low": v, "high": v}
    low = None if arm["low"] is None or base["high"] is None else arm["low"] / base["high"]
    high = None if arm["high"] is None or base["low"] is None else arm["high"] / base["low"]
    return {"value": None, "low": low, "high": high}


def seed_band_verdict(ratio: dict, seed_sd: float | None) -> str:
    """A single-seed T* ratio against the seed band of the baseline's log T* (BAND sds either way)."""
    if seed_sd is None or not np.isfinite(seed_sd):
        return "not established (no seed noise measured for the baseline's T*)"
    band = math.exp(BAND * seed_sd)
    if ratio["high"] is not None and ratio["high"] * band <= HALF:
        return f"meets the goal (ratio <= {HALF} beyond the seed band x{band:.2f})"
    if ratio["high"] is not None and ratio["high"] < 1 / band:
        return f"fewer tokens than the baseline (beyond the seed band x{band:.2f})"
    if ratio["low"] is not None and ratio["low"] > band:
        return f"more tokens than the baseline (beyond the seed band x{band:.2f})"
    return f"not established (within the seed band x{band:.2f}, or censored)"


def analyse(arm_records: list[dict], grid_records: list[dict], protocol: dict, thresholds=(0.01, 0.02)) -> dict:
    models = []
    for pretrained in sorted({r["pretrained"] for r in arm_records}, key=lambda p: (p.split("_s")[0], p)):
        mine = [r for r in arm_records if r["pretrained"] == pretrained]
        lr = mine[0]["lr"]
        for seed in sorted({r["seed"] for r in mine}):
            arm_runs = {r["steps"]: r for r in mine if r["seed"] == seed}
            a_steps, a_tok, a_gap = _curve(grid_records, pretrained, lr, seed, arm_runs)
            b_steps, b_tok, b_gap = _curve(grid_records, pretrained, lr, seed)
            base_at = dict(zip(b_steps, b_gap))
            entry = {"pretrained": pretrained, "size": mine[0]["size"], "seed": seed, "lr": lr,
                     "budgets": [{"steps": b, "tokens": t, "gap_rel": g, "baseline_gap_rel": base_at.get(b)}
                                 for b, t, g in zip(a_steps, a_tok, a_gap)],
                     "baseline_budgets": b_steps, "t_star": {}}
            other_seeds = sorted({r["seed"] for r in grid_records if r["pretrained"] == pretrained})
            for thr in thresholds:
                arm_t, base_t = _crossing(a_tok, a_gap, thr), _crossing(b_tok, b_gap, thr)
                per_seed = [_crossing(*_curve(grid_records, pretrained, lr, s)[1:], thr)["value"]
                            for s in other_seeds]
                logs = [math.log(v) for v in per_seed if v is not None]
                sd = float(np.std(logs, ddof=1)) if len(logs) >= 2 else None
                ratio = _ratio(arm_t, base_t)
                entry["t_star"][f"{thr:g}"] = {"arm": arm_t, "baseline": base_t, "ratio": ratio,
                                               "baseline_seed_sd_log": sd, "baseline_seeds": len(logs),
                                               "verdict": seed_band_verdict(ratio, sd)}
            models.append(entry)
    return {"arm": protocol["arm"], "overrides": protocol["overrides"], "sizes": protocol["sizes"],
            "budgets": protocol["budgets"], "seeds": protocol["seeds"], "records": len(arm_records),
            "models": models,
            "method": "relative validation gap to the grid's vanilla control of the same pretrained model, budget "
                      "and seed; T*: log-log interpolation between the bracketing budgets (a bound outside them); "
                      "ratio arm / baseline (the grid's LN-free run, schedule=scaled) of the same seed; verdict "
                      "against the baseline's seed sd of log T* (band 1.96 * sqrt(2) sds; coverage not tested)"}


def markdown(res: dict) -> str:
    def tok(x):
        return "-" if x is None else f"{x / 1e6:.2f}M"

    def t_text(t):
        if t["value"] is not None:
            return tok(t["value"])
        return f"> {tok(t['low'])}" if t["censored"] == "above" else f"< {tok(t['high'])}"

    def r_text(r):
        if r["value"] is not None:
            return f"{r['value']:.2f}"
        low, high = ("-" if x is None else f"{x:.2f}" for x in (r["low"], r["high"]))
        return f"[{low}, {high}]"

    lines = [f"### Depth-and-width family: `{res['arm']}` against today's schedule (seed {res['seeds']})", "",
             "| model | gap at " + ", ".join(f"{b}" for b in res["budgets"]) + " steps (arm / baseline) | "
             "T* 1% arm / baseline | ratio | T* 2% arm / baseline | ratio | baseline seed sd (log T*, 1% / 2%) |",
             "|---|---|---|---|---|---|---|"]
    for m in res["models"]:
        gaps = ", ".join(f"{100 * e['gap_rel']:.2f} / "
                         + ("-" if e["baseline_gap_rel"] is None else f"{100 * e['baseline_gap_rel']:.2f}")
                         for e in m["budgets"])
        t1, t2 = m["t_star"]["0.01"], m["t_star"]["0.02"]
        sds = " / ".join("-" if t["baseline_seed_sd_log"] is None else f"{t['baseline_seed_sd_log']:.2f}"
                         for t in (t1, t2))
        lines.append(f"| {m['pretrained']} | {gaps} | {t_text(t1['arm'])} / {t_text(t1['baseline'])} | "
                     f"{r_text(t1['ratio'])} | {t_text(t2['arm'])} / {t_text(t2['baseline'])} | "
                     f"{r_text(t2['ratio'])} | {sds} |")
    lines += ["", "Gaps in % of the vanilla control's validation CE. Verdicts (per model, 1% then 2%):", ""]
    lines += [f"- {m['pretrained']}: {m['t_star']['0.01']['verdict']}; {m['t_star']['0.02']['verdict']}"
              for m in res["models"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="list what is missing and its CPU hours, run nothing")
    ap.add_argument("--cache-dir", help="where the depth family's pretrained models are (paths.cache_dir)")
    ap.add_argument("--sizes", nargs="*", help="only these of the protocol's sizes (e.g. one runner per size)")
    ap.add_argument("--replicates", type=int, nargs="*", help="only these pretrained replicates of each size")
    a = ap.parse_args(argv)
    protocol = read_protocol()
    records = read_jsonl(RECORDS) if RECORDS.exists() else []
    g = grid.depth_grid(cache_dir=a.cache_dir, settled=True)
    if any(g["pairs"][m] is None for m in protocol["sizes"]):
        raise SystemExit("the depth family's pretrained models are not in the cache: "
                         "python -m lnfree.sweeps.pretrain_depth --restore-only")
    todo = [j for j in jobs(protocol, records, grid.read_lrs(), g["pairs"])
            if (not a.sizes or j[1] in a.sizes) and (not a.replicates or j[2] in a.replicates)]
    print(f"[efficient-depth] {len(todo)} runs missing, about {cpu_hours(todo):.1f} CPU h", flush=True)
    if a.dry_run:
        for j in todo:
            print("  ", *j)
        return 0
    failed = [j for j in todo if run(j, protocol, a.cache_dir) is None]
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
