"""Run the data-scaling jobs that are not yet recorded, a few Hydra multiruns at a time, one thread each.

    python -m lnfree.sweeps.run_missing [--workers 2] [--dry-run]    (lnfree sweep run-missing; make scaling)
    python -m lnfree.sweeps.run_missing --experiment data_scaling_depth    (make scaling-depth)

The depth-and-width family's grid (`--experiment data_scaling_depth`, below the width family's code) has no
early stopping: every job of conf/experiment/data_scaling_depth.yaml runs (--until-within is refused).

The grid is conf/experiment/data_scaling.yaml's hydra.sweeper.params (sizes, budgets, seeds, arms). Finished runs
are in experiments/data_scaling/runs.jsonl and in multirun/data_scaling/resume/; for every (size, budget, arm) this
runs the seeds without a record as one `python -m lnfree.train -m experiment=data_scaling ...` multirun, several
at a time, one thread each (on 2 cores that is 1.6x faster than one 2-thread process at a time). Smallest budgets
first, so that whatever finishes completes whole rows of the gap table. Stopping and rerunning loses at most the
multiruns in flight. With --until-within GAP, a size's larger budgets are skipped once one of its budgets has a
seed-mean gap within GAP (its crossing is bracketed; larger budgets do not move T*): on 2 CPU cores this is what
makes the sweep fit in about 2 hours. The config and record paths are the source checkout's (conf/, experiments/);
the multirun dirs are relative to the working directory. Afterwards:
    python -m lnfree.analysis.scaling experiments/data_scaling/runs.jsonl multirun/data_scaling/resume \
        --records experiments/data_scaling/runs.jsonl
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..paths import SOURCE_ROOT as ROOT  # the rest of lnfree is imported where used (Hydra, the analyses)

OUT = Path("multirun/data_scaling/resume")


def one_thread_env() -> dict:
    """A sweep job's environment: one thread (several jobs share the cores), offline, no W&B."""
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled")


def grid():
    """(models, budgets in steps, seeds, schedules) from the experiment config, and tokens per step."""
    from omegaconf import OmegaConf

    exp = OmegaConf.load(ROOT / "conf/experiment/data_scaling.yaml")
    p = exp.hydra.sweeper.params
    split = lambda v: str(v).split(",")  # noqa: E731
    # data.block_size is null: each model's context (lnfree.training.config.default_block_size), 256 for the family
    from lnfree.families import family
    from lnfree.training.config import default_block_size

    shape = OmegaConf.to_container(OmegaConf.load(ROOT / f"conf/model/{split(p.model)[0]}.yaml").shape)
    n_ctx = shape[family({"model_type": "gpt2", **shape}).ctx_field]  # a shape without model_type is GPT-2's
    step_tokens = OmegaConf.load(ROOT / "conf/hardware/base.yaml").micro_batch_size * default_block_size(n_ctx)
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
        from lnfree.analysis.scaling import load_runs

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
    env = one_thread_env()
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(d / "run.log", "a") as log:
        rc = subprocess.call(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    # 143 / 130: lnfree.train stopped by SIGTERM / Ctrl-C (-15 / -2: killed by it): its seeds stay missing
    state = " (interrupted, not done)" if rc in (143, 130, -15, -2) else ""
    print(f"[{time.strftime('%H:%M:%S')}] {m} {arm} {b} steps seeds {seeds}: rc={rc}{state}, {time.time() - t0:.0f} s",
          flush=True)
    return rc if rc >= 0 else 128 - rc  # killed by signal N: the shell's 128 + N, never below 0 (max() would hide it)


# -- the depth-and-width family (experiment=data_scaling_depth) ---------------------------------------------
# Every fine-tuning run is one record (one line of DEPTH_RECORDS), written by harvest() from its summary.json as
# soon as its multirun ends (and again at every start, so a run finished but not recorded is never redone). A
# job is missing when its (pretrained model, budget, schedule, seed, lr) has no record. Each size's LR comes from
# the LR probe's choice (experiments/depth_family/lr.json, lnfree.sweeps.lr_probe); the probe's own runs are jobs
# of the same kind, so its runs at the chosen LR count as the grid's.
DEPTH = "data_scaling_depth"
DEPTH_DIR = ROOT / "experiments/depth_family"
DEPTH_RECORDS = DEPTH_DIR / "runs.jsonl"
DEPTH_OUT = Path("multirun/data_scaling_depth")
LR_FILE = DEPTH_DIR / "lr.json"


def depth_budgets(experiment: str = DEPTH) -> list[int]:
    """The fixed grid's budgets (optimizer steps) of conf/experiment/<experiment>.yaml."""
    from omegaconf import OmegaConf

    p = OmegaConf.load(ROOT / "conf/experiment" / f"{experiment}.yaml").hydra.sweeper.params
    return [int(b) for b in str(p["trainer.max_steps"]).split(",")]


def depth_grid(experiment: str = DEPTH, cache_dir=None, settled: bool = False) -> dict:
    """The grid of conf/experiment/<experiment>.yaml with the protocol's fixed choices (protocol.yaml), and each
    model's pair of pretrained replicates: with `settled`, the pair the replicate rule has settled in the cache
    (lnfree.analysis.family.pair; None while a size has fewer than two converged members); otherwise the
    sweep's replicates (the design, for cost estimates)."""
    from omegaconf import OmegaConf

    from lnfree.analysis.family import pair
    from lnfree.paths import DEFAULT_CACHE_DIR

    p = OmegaConf.load(ROOT / "conf/experiment" / f"{experiment}.yaml").hydra.sweeper.params
    proto = OmegaConf.to_container(OmegaConf.load(DEPTH_DIR / "protocol.yaml"))
    split = lambda v: str(v).split(",")  # noqa: E731
    models, replicates = split(p.model), [int(r) for r in split(p["model.replicate"])]
    pairs = {m: (pair(size_of(m), cache_dir or DEFAULT_CACHE_DIR) if settled else replicates) for m in models}
    return {"models": models, "replicates": replicates, "pairs": pairs,
            "budgets": depth_budgets(experiment), "seeds": [int(s) for s in split(p.seed)],
            "schedules": split(p.schedule), "step_tokens": grid()[4], **proto}


def size_of(model: str) -> str:
    """builtin_l4w128 -> l4w128; the pretrained model is then l4w128_s<replicate>."""
    return model.removeprefix("builtin_")


@functools.cache
def _composed(schedule: str, model: str):
    """(schedule config, n_layer) as a run of the depth grid composes them."""
    from hydra import compose, initialize_config_dir

    from lnfree.training import config as _config  # noqa: F401  (registers the schemas)

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={DEPTH}", f"schedule={schedule}", f"model={model}"])
    return cfg.schedule, cfg.model.shape.n_layer


def fits(schedule: str, model: str, budget: int) -> bool:
    """Whether the schedule's removal events all fall before the budget's last step for this model's depth."""
    from lnfree.schedule import ScheduleError, validate

    sched, n_layer = _composed(schedule, model)
    try:
        validate(sched, n_layer, budget)
    except ScheduleError:
        return False
    return True


def depth_key(r: dict) -> tuple:
    return r["pretrained"], r["steps"], r["schedule"], r["seed"], r["lr"]


def depth_jobs(records, lrs: dict, g: dict | None = None, extend: bool = False) -> list[tuple]:
    """Missing jobs of the grid as (budget, model, replicate, schedule, lr, [seeds]), smallest budgets first, on
    each size's pair of pretrained replicates; the variant schedule on its positions in the pair only and where it
    fits; no early stopping. extend: then stage 2 (protocol.yaml's `stage2`: per-size budgets, its arms), one job
    per seed, seed 1 of every cell before seed 2 of any."""
    g = g or depth_grid()
    done = {depth_key(r) for r in records}
    jobs = []
    for b in g["budgets"]:
        for m in g["models"]:
            reps = g["pairs"][m]
            if reps is None or m not in lrs:  # the size's pair or LR not settled yet: no job for it yet
                continue
            lr = lrs[m]["lr"]
            variant = [reps[i - 1] for i in g["variant_replicates"]]  # positions in the pair
            for rep in reps:
                for arm in g["schedules"]:
                    if arm == g["variant_schedule"] and (rep not in variant or not fits(arm, m, b)):
                        continue
                    todo = [s for s in g["seeds"] if (f"{size_of(m)}_s{rep}", b, arm, s, lr) not in done]
                    if todo:
                        jobs.append((b, m, rep, arm, lr, todo))
    return jobs + (stage2_jobs(done, lrs, g) if extend else [])


def stage2_jobs(done: set, lrs: dict, g: dict) -> list[tuple]:
    """Stage 2's missing jobs in the protocol's order: for each seed in turn, every cell (budget, size, replicate,
    arm), smallest budgets first."""
    s2 = g["stage2"]
    budgets = sorted({b for m in g["models"] for b in s2["budgets"].get(m, [])})
    jobs = []
    for seed in s2["seed_order"]:
        for b in budgets:
            for m in g["models"]:
                if b not in s2["budgets"].get(m, []) or g["pairs"][m] is None or m not in lrs:
                    continue
                lr = lrs[m]["lr"]
                for rep in g["pairs"][m]:
                    for arm in s2["schedules"]:
                        if (f"{size_of(m)}_s{rep}", b, arm, seed, lr) not in done:
                            jobs.append((b, m, rep, arm, lr, [seed]))
    return jobs


# The cost model of a fine-tuning run, beside the measured one-thread CPU seconds per step (step_cost.json, written
# by `python -m lnfree.sweeps.cost --measure`; lnfree.sweeps.cost plans the whole study with the same numbers).
STEP_COST = DEPTH_DIR / "step_cost.json"
VAL_STEPS = 5  # a validation on 256 blocks: 16 forward-only batches, about 5 training steps' cost
RUN_OVERHEAD_S = 3  # per run in a multirun: data, model, summary (measured ~2-4 CPU s)
PROCESS_OVERHEAD_S = 12  # per multirun process: python, torch, lightning, hydra imports (measured ~10-14 CPU s)


def cpu_hours(jobs) -> float:
    """The CPU hours of these jobs at the measured one-thread step costs (STEP_COST and the overheads above)."""
    cost = json.loads(STEP_COST.read_text())
    s = sum(cost[size_of(m)]["cpu_s_per_step"] * (b + VAL_STEPS) * len(seeds) + RUN_OVERHEAD_S * len(seeds)
            + PROCESS_OVERHEAD_S for b, m, _, _, _, seeds in jobs)
    return s / 3600


def depth_record(summary: dict, pretrained_ce: float | None = None) -> dict:
    """One fine-tuning run as a record: the width family's keys plus the pretrained model, shape, schedule, LR."""
    c = summary["config"]
    return {"model": c["model"]["name"], "pretrained": c["model"]["source"].removeprefix("builtin:"),
            "size": size_of(c["model"]["name"]).rsplit("_s", 1)[0], "replicate": c["model"]["replicate"],
            "n_layer": c["model"]["shape"]["n_layer"], "n_embd": c["model"]["shape"]["n_embd"],
            "schedule": c["schedule"]["name"], "removes": c["schedule"]["remove"], "seed": c["seed"],
            "steps": summary["steps"], "tokens": summary["tokens_seen"], "lr": c["optim"]["lr"],
            "val_ce": summary["val_ce"], "pretrained_val_ce": pretrained_ce, "hardware": c["hardware"]["name"],
            "n_nonemb": summary["n_params_non_embedding"], "all_removed": summary["all_removed"],
            "fit_fraction": c["schedule"].get("fit_fraction"), "wall_time_s": summary.get("wall_time_s")}


def pretrained_ce(name: str, cache_dir=None) -> float | None:
    """The pretrained model's validation CE (same 65k validation tokens) from its pretrain_info.json."""
    from lnfree.references import builtin_dir

    f = (builtin_dir(name, cache_dir) if cache_dir else builtin_dir(name)) / "pretrain_info.json"
    return json.loads(f.read_text())["val_ce"] if f.exists() else None


_LOCK = threading.Lock()


def harvest(sweep_root: Path, records: Path, cache_dir=None) -> int:
    """Append a record for every finished run under sweep_root that records lacks; returns how many."""
    with _LOCK:
        have = {depth_key(r) for r in read_records(records)}
        new = []
        for f in sorted(Path(sweep_root).glob("**/summary.json")):
            s = json.loads(f.read_text())
            if s["config"].get("experiment") != DEPTH:
                continue
            r = depth_record(s, pretrained_ce(s["config"]["model"]["source"].removeprefix("builtin:"), cache_dir))
            if depth_key(r) not in have:
                have.add(depth_key(r))
                new.append(r)
        if new:
            records.parent.mkdir(parents=True, exist_ok=True)
            with open(records, "a") as fh:
                fh.write("".join(json.dumps(r) + "\n" for r in new))
        return len(new)


def read_records(path: Path) -> list[dict]:
    path = Path(path)
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def depth_command(job, out: Path, extra: tuple = ()) -> tuple[list[str], Path]:
    """The job's Hydra multirun (one process, its seeds in turn; a subdir per seed, so a rerun with fewer seeds
    finds each finished seed where it left it) and its sweep dir. extra: overrides that do not change results
    (hardware=gpu, paths.cache_dir=...)."""
    b, m, rep, arm, lr, seeds = job
    g = depth_grid()
    d = out / f"{size_of(m)}_s{rep}-{arm}-{b}-lr{lr:g}"
    return [sys.executable, "-m", "lnfree.train", "-m", f"experiment={DEPTH}", f"model={m}", f"model.replicate={rep}",
            f"schedule={arm}", f"trainer.max_steps={b}", f"optim.lr={lr:g}", f"optim.min_lr={lr * g['min_lr_ratio']:g}",
            "seed=" + ",".join(map(str, seeds)), f"hydra.sweep.dir={d}", "hydra.sweep.subdir=s${seed}", *extra], d


def run_depth(job, out: Path = DEPTH_OUT, records: Path = DEPTH_RECORDS, cache_dir=None, extra=()) -> int:
    extra = (*extra, f"paths.cache_dir={cache_dir}") if cache_dir else tuple(extra)
    cmd, d = depth_command(job, out, extra)
    env = one_thread_env()
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(d / "run.log", "a") as log:
        rc = subprocess.call(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    n = harvest(d, records, cache_dir)
    print(f"[{time.strftime('%H:%M:%S')}] {d.name} seeds {job[5]}: rc={rc}, {time.time() - t0:.0f} s, {n} recorded",
          flush=True)
    return rc


def run_jobs(jobs, workers: int, out: Path = DEPTH_OUT, records: Path = DEPTH_RECORDS, cache_dir=None,
             extra=()) -> int:
    with ThreadPoolExecutor(workers) as pool:
        rcs = list(pool.map(lambda j: run_depth(j, out, records, cache_dir, extra), jobs))
    return max(rcs, default=0)


def read_lrs(path: Path = LR_FILE) -> dict:
    if not Path(path).exists():
        raise SystemExit(f"{path} does not exist: run the LR probe first (python -m lnfree.sweeps.lr_probe)")
    return json.loads(Path(path).read_text())["sizes"]


def main_depth(a) -> None:
    if a.print_max_budget:
        return print(max(depth_budgets()))
    if a.until_within is not None:
        raise SystemExit("--until-within is not part of the depth family's protocol: its grid runs whole")
    records = Path(a.records[0]) if a.records else DEPTH_RECORDS
    harvest(DEPTH_OUT, records, a.cache_dir)
    g = depth_grid(cache_dir=a.cache_dir, settled=True)
    for m in g["models"]:
        if g["pairs"][m] is None:
            print(f"{m}: fewer than two converged pretrained replicates yet: not in the grid yet", flush=True)
    jobs = depth_jobs(read_records(records), read_lrs(), g, a.extend)
    print(f"{sum(len(j[5]) for j in jobs)} runs missing in {len(jobs)} multiruns, about {cpu_hours(jobs):.1f} CPU h "
          "(one-thread step costs of step_cost.json)", flush=True)
    if a.dry_run:
        for j in jobs:
            print(*j)
        return
    sys.exit(run_jobs(jobs, a.workers, DEPTH_OUT, records, a.cache_dir, a.extra))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiment", default="data_scaling", choices=("data_scaling", DEPTH))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--records", nargs="+", default=None,
                   help=f"default: experiments/data_scaling/runs.jsonl and {OUT} (width); {DEPTH_RECORDS} (depth)")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--cache-dir", default=None, help="depth: where the pretrained models are (paths.cache_dir)")
    p.add_argument("--extra", nargs="*", default=[],
                   help="depth: overrides added to every run that do not change results (e.g. hardware=gpu)")
    p.add_argument("--print-max-budget", action="store_true",
                   help="depth: print the fixed grid's largest budget (steps) and exit (make scaling-depth-analysis)")
    p.add_argument("--extend", action="store_true",
                   help="depth: then stage 2 (experiments/depth_family/protocol.yaml's stage2)")
    p.add_argument("--until-within", type=float, default=None,
                   help="width family only: skip a size's budgets beyond one where its seed-mean gap is within this")
    a = p.parse_args(argv)
    if a.experiment == DEPTH:
        return main_depth(a)
    a.records = a.records or ["experiments/data_scaling/runs.jsonl", str(OUT)]
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
