"""The fine-tuning LR of each size of the depth family, chosen by a rule that looks at the vanilla control only.

    python -m lnfree.sweeps.lr_probe [--workers 2] [--dry-run]     (lnfree sweep lr-probe; make scaling-depth)

For every size, every LR of protocol.yaml's lr_grid: the vanilla control (schedule=none) of the probe replicate
and seed at every budget of conf/experiment/data_scaling_depth.yaml (jobs without a record only; records in
experiments/depth_family/runs.jsonl, so the runs at the chosen LR are also the grid's). Rule, fixed before the
sweep: the highest LR whose vanilla control stays within lr_tolerance (0.1%) of its pretrained model's
validation CE, in either direction, at every budget; if no LR does, the lowest LR, flagged. Writes
experiments/depth_family/lr.json, which `lnfree.sweeps.run_missing --experiment data_scaling_depth` reads, with
every size whose pair of pretrained replicates is settled and whose probe is complete: the grid starts on those
while larger sizes still pretrain (they join when their pair is settled). Exits non-zero when a settled size's
probe is incomplete.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import run_missing as rm


def probe_jobs(records, g: dict | None = None) -> list[tuple]:
    """Missing probe runs as run_missing jobs: (budget, model, replicate, "none", lr, [seed])."""
    g = g or rm.depth_grid()
    done = {rm.depth_key(r) for r in records}
    seed = g["probe_seed"]
    return [(b, m, rep, "none", lr, [seed]) for b in g["budgets"] for m in g["models"]
            if (rep := probe_replicate(g, m)) is not None for lr in g["lr_grid"]
            if (f"{rm.size_of(m)}_s{rep}", b, "none", seed, lr) not in done]


def probe_replicate(g: dict, m: str) -> int | None:
    """The probe's pretrained replicate of a size: protocol.yaml's probe_replicate is a position in the size's pair
    (1: its converged replicate of lowest seed); None while the pair is not settled."""
    reps = g["pairs"][m]
    return None if reps is None else reps[g["probe_replicate"] - 1]


def choose_lr(records, g: dict) -> dict:
    """{model: {"lr", "rule_met", "max_abs_drift": {lr: ...}, "budgets": n}} by the rule, from the records; a size
    whose probe is incomplete (some LR x budget without a record) is left out."""
    out = {}
    for m in g["models"]:
        if probe_replicate(g, m) is None:
            continue
        pre = f"{rm.size_of(m)}_s{probe_replicate(g, m)}"
        runs = {(r["lr"], r["steps"]): r for r in records
                if r["pretrained"] == pre and r["schedule"] == "none" and r["seed"] == g["probe_seed"]}
        if any((lr, b) not in runs for lr in g["lr_grid"] for b in g["budgets"]):
            continue
        drift = {lr: max(abs(runs[(lr, b)]["val_ce"] - runs[(lr, b)]["pretrained_val_ce"])
                         / runs[(lr, b)]["pretrained_val_ce"] for b in g["budgets"]) for lr in g["lr_grid"]}
        ok = [lr for lr in g["lr_grid"] if drift[lr] <= g["lr_tolerance"]]
        out[m] = {"lr": max(ok) if ok else min(g["lr_grid"]), "rule_met": bool(ok),
                  "max_abs_drift": {f"{lr:g}": d for lr, d in drift.items()}, "budgets": len(g["budgets"])}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--records", default=str(rm.DEPTH_RECORDS))
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--cache-dir", default=None, help="where the pretrained models are (paths.cache_dir)")
    p.add_argument("--extra", nargs="*", default=[], help="overrides that do not change results (hardware=gpu)")
    a = p.parse_args(argv)
    records = Path(a.records)
    g = rm.depth_grid(cache_dir=a.cache_dir, settled=True)
    rm.harvest(rm.DEPTH_OUT, records, a.cache_dir)
    jobs = probe_jobs(rm.read_records(records), g)
    print(f"{len(jobs)} probe runs missing", flush=True)
    if a.dry_run:
        for j in jobs:
            print(*j)
        return
    rc = rm.run_jobs(jobs, a.workers, rm.DEPTH_OUT, records, a.cache_dir, a.extra)
    chosen = choose_lr(rm.read_records(records), g)
    # sizes whose pair is not settled yet are not in the grid yet (run_missing skips them too): their LR comes
    # when they join; a settled size without a choice means probe runs failed
    incomplete = [m for m in g["models"] if m not in chosen and probe_replicate(g, m) is not None]
    waiting = [m for m in g["models"] if probe_replicate(g, m) is None]
    if waiting:
        print(f"{waiting}: fewer than two converged pretrained replicates yet: no probe yet", flush=True)
    res = {"rule": f"highest LR of {g['lr_grid']} whose vanilla control (replicate {g['probe_replicate']}, seed "
                   f"{g['probe_seed']}) stays within {g['lr_tolerance']:.1%} of its pretrained model's validation CE "
                   "at every budget; else the lowest, rule_met false", "sizes": chosen}
    rm.LR_FILE.write_text(json.dumps(res, indent=1))
    for m, c in chosen.items():
        print(f"{m}: lr {c['lr']:g} (rule met: {c['rule_met']}; max drift {c['max_abs_drift']})")
    if rc or incomplete:
        sys.exit(f"probe incomplete (rc={rc}) for {incomplete}; rerun to finish it")


if __name__ == "__main__":
    main()
