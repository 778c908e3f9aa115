"""Run the data-scaling jobs that are not yet recorded, a few Hydra multiruns at a time, one thread each.

    python experiments/data_scaling/run_missing.py [--workers 2] [--dry-run]    (make scaling runs this)

The grid is conf/experiment/data_scaling.yaml's hydra.sweeper.params (sizes, budgets, seeds, arms). Finished runs
are in experiments/data_scaling/runs.jsonl and in multirun/data_scaling/resume/; for every (size, budget, arm) this
runs the seeds without a record as one `python -m lnfree.train -m experiment=data_scaling ...` multirun, several
at a time, one thread each (on 2 cores that is 1.6x faster than one 2-thread process at a time). Smallest budgets
first, so that whatever finishes completes whole rows of the gap table. Stopping and rerunning loses at most the
multiruns in flight. With --until-within GAP, a size's larger budgets are skipped once one of its budgets has a
seed-mean gap within GAP (its crossing is bracketed; larger budgets do not move T*): on 2 CPU cores this is what
makes the sweep fit in about 2 hours. Afterwards:
    python -m lnfree.analysis.scaling experiments/data_scaling/runs.jsonl multirun/data_scaling/resume \
        --records experiments/data_scaling/runs.jsonl
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lnfree.analysis.scaling import load_runs  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUT = Path("multirun/data_scaling/resume")


def grid():
    """(models, budgets in steps, seeds, schedules) from the experiment config, and tokens per step."""
    from omegaconf import OmegaConf

    exp = OmegaConf.load(ROOT / "conf/experiment/data_scaling.yaml")
    p = exp.hydra.sweeper.params
    split = lambda v: str(v).split(",")  # noqa: E731
    step_tokens = OmegaConf.load(ROOT / "conf/hardware/base.yaml").micro_batch_size * \
        OmegaConf.load(ROOT / "conf/data/base.yaml").block_size
    return (split(p.model), [int(b) for b in split(p["trainer.max_steps"])], [int(s) for s in split(p.seed)],
            split(p.schedule), step_tokens)


def missing_jobs(sources):
    models, budgets, seeds, schedules, step_tokens = grid()
    runs = [r for src in sources if Path(src).exists() for r in _load(src)]
    done = {(r["model"], r["tokens"] // step_tokens, r["removes"], r["seed"]) for r in runs}
    jobs = []  # (budget, model, schedule, seeds)
    for b in budgets:
        for m in models:
            for arm in schedules:
                todo = [s for s in seeds if (m, b, arm != "none", s) not in done]
                if todo:
                    jobs.append((b, m, arm, todo))
    return jobs


def within(sources, model: str, budget: int, gap: float, step_tokens: int) -> int | None:
    """The smallest budget below `budget` at which `model` has every seed of both arms and a seed-mean relative
    gap <= `gap`; None if there is none."""
    from lnfree.analysis.scaling import gap_table

    runs = [r for src in sources if Path(src).exists() for r in _load(src) if r["model"] == model]
    if not runs:
        return None
    t = gap_table(runs)[model]
    done = [b // step_tokens for b, g in zip(t["budgets"], t["gaps"])
            if b // step_tokens < budget and len(g) == 3 and sum(g) / len(g) <= gap]
    return min(done) if done else None


def _load(src):
    try:
        return load_runs(src)
    except FileNotFoundError:  # a sweep dir with nothing finished yet
        return []


def run(job, sources=(), until_within=None):
    b, m, arm, seeds = job
    if until_within is not None:
        w = within(sources, m, b, until_within, grid()[4])
        if w is not None:
            print(f"[{time.strftime('%H:%M:%S')}] {m} {arm} {b} steps: skipped (gap within {until_within:.1%} "
                  f"at {w} steps)", flush=True)
            return 0
    d = OUT / f"{m}-{arm}-{b}"
    cmd = [sys.executable, "-m", "lnfree.train", "-m", "experiment=data_scaling", f"model={m}",
           f"schedule={arm}", f"trainer.max_steps={b}", "seed=" + ",".join(map(str, seeds)),
           f"hydra.sweep.dir={d}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(d / "run.log", "a") as log:
        rc = subprocess.call(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    # 143 / 130: lnfree.train stopped by SIGTERM / Ctrl-C (-15 / -2: killed by it): its seeds stay missing
    state = " (interrupted, not done)" if rc in (143, 130, -15, -2) else ""
    print(f"[{time.strftime('%H:%M:%S')}] {m} {arm} {b} steps seeds {seeds}: rc={rc}{state}, {time.time() - t0:.0f} s",
          flush=True)
    return rc if rc >= 0 else 128 - rc  # killed by signal N: the shell's 128 + N, never below 0 (max() would hide it)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--records", nargs="+", default=["experiments/data_scaling/runs.jsonl", str(OUT)])
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--until-within", type=float, default=None,
                   help="skip a size's budgets beyond one where its seed-mean gap is within this (e.g. 0.01)")
    a = p.parse_args()
    jobs = missing_jobs(a.records)
    print(f"{sum(len(j[3]) for j in jobs)} runs missing in {len(jobs)} multiruns", flush=True)
    if a.dry_run:
        for j in jobs:
            w = within(a.records, j[1], j[0], a.until_within, grid()[4]) if a.until_within is not None else None
            print(*j, f"(skipped: within {a.until_within:.1%} at {w} steps)" if w is not None else "")
        return
    with ThreadPoolExecutor(a.workers) as pool:
        rcs = list(pool.map(lambda j: run(j, a.records, a.until_within), jobs))
    sys.exit(max(rcs, default=0))


if __name__ == "__main__":
    main()
