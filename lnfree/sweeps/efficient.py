"""The removal-methods study: which way of removing the norms reaches a given gap with the fewest tokens.

    python -m lnfree.sweeps.efficient                 # train and evaluate what the records lack (resumable)
    python -m lnfree.sweeps.efficient --dry-run       # what is missing, and its CPU hours, without running it
    python -m lnfree.sweeps.efficient --seeds 1       # only seed 1's cells

Reads the study's protocol (experiments/efficient/protocol.yaml: families and budgets, arms and their overrides,
seeds, the combination rule, the evaluation sets). Per seed in protocol order, per family and budget, it trains
the vanilla control and then each arm with the same seed (so the same data order) through `python -m lnfree.train`
into outputs/efficient/<family>/<arm>/b<budget>_s<seed> (skip_if_done: a finished dir is never trained twice),
evaluates each arm and its control on the same tokens of every evaluation set, and appends one record per run to
experiments/efficient/runs.jsonl. A record holds what the analysis needs and nothing it would recompute: the run's
summary numbers, its wall time, its final training CE on the training split, and per evaluation set the control's
CE, the 64 per-block mean gaps (arm - control, nats) and the 99th percentile of the per-token CE difference. The
analysis (lnfree.sweeps.efficient_analysis) reads only these records.

The combination arm is chosen once seed `combination.after_seed` of every single-method arm has run on every gpt2
budget, by the protocol's rule on training-split CE (never the evaluation tokens), and the choice is recorded in
experiments/efficient/combination.json before the arm runs.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from omegaconf import OmegaConf

from ..analysis.eval_config import DatasetSpec
from ..analysis.eval_data import eval_chunks
from ..analysis.metrics import token_stats
from ..io import load
from ..model_record import logits
from ..paths import RUN_SUMMARY
from ..records import append_jsonl, read_jsonl, write_text_atomic

STUDY = Path("experiments/efficient")
PROTOCOL = STUDY / "protocol.yaml"
RECORDS = STUDY / "runs.jsonl"
COMBINATION = STUDY / "combination.json"
RUNS = Path("outputs/efficient")
CE_CACHE = RUNS / "ce"  # per-token CE of every evaluated run (not committed: the records hold their summaries)
SINGLE_METHODS = ("distill", "ramp", "adaptive", "compressed")
SECONDS_PER_STEP = {"plain": 0.45, "distill": 0.9}  # one thread, measured here (builtin w128, 4 x 1024 tokens)
SECONDS_PER_RUN = 25  # process start, calibration, exports and their checks, evaluation


def record_key(r: dict) -> tuple:
    return (r["family"], r["arm"], r["budget"], r["seed"])


def read_protocol(path: Path = PROTOCOL) -> dict:
    return yaml.safe_load(path.read_text())


def arms_of(protocol: dict) -> dict[str, list[str]]:
    """Every arm's overrides, the control first, the combination last once chosen."""
    arms = {protocol["control"]["name"]: list(protocol["control"]["overrides"]), **protocol["arms"]}
    if COMBINATION.exists():
        chosen = json.loads(COMBINATION.read_text())
        if chosen["overrides"]:
            arms[chosen["name"]] = chosen["overrides"]
    return arms


def run_dir(family: str, arm: str, budget: int, seed: int) -> Path:
    return RUNS / family / arm / f"b{budget}_s{seed}"


def cells(protocol: dict, seeds=None) -> list[tuple[str, str, int, int]]:
    """(family, arm, budget, seed) in run order: seed by seed, the control before the arms of its cell."""
    out = []
    for seed in seeds or protocol["seeds"]:
        for family, spec in protocol["families"].items():
            for budget in spec["budgets"]:
                out += [(family, arm, budget, seed) for arm in arms_of(protocol)]
    return out


def train(protocol: dict, family: str, arm: str, budget: int, seed: int) -> tuple[Path, float]:
    out = run_dir(family, arm, budget, seed)
    overrides = [f"model={protocol['families'][family]['model']}", f"trainer.max_steps={budget}", f"seed={seed}",
                 *protocol["common"], *arms_of(protocol)[arm], f"hydra.run.dir={out}", "skip_if_done=true"]
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "lnfree.train", *overrides], capture_output=True, text=True)
    if proc.returncode != 0 or not (out / RUN_SUMMARY).exists():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
        raise RuntimeError(f"{family}/{arm} budget {budget} seed {seed} failed (rc={proc.returncode}):\n{tail}")
    return out, time.time() - t0


def ensure_control(protocol: dict, family: str, budget: int, seed: int, records: list[dict]) -> None:
    """Retrain an arm's control whose record exists but whose run dir does not (a fresh machine, the outputs not
    kept): the same seed and overrides give the same model, which is checked against the recorded val CE."""
    name = protocol["control"]["name"]
    if (run_dir(family, name, budget, seed) / RUN_SUMMARY).exists():
        return
    run, _ = train(protocol, family, name, budget, seed)
    recorded = [r["val_ce"] for r in records if record_key(r) == (family, name, budget, seed)]
    got = json.loads((run / RUN_SUMMARY).read_text())["val_ce"]
    if recorded and abs(got - recorded[0]) > 1e-6 * max(1.0, abs(recorded[0])):
        raise RuntimeError(f"{family}/{name} budget {budget} seed {seed} retrained to val CE {got}, its record says "
                           f"{recorded[0]}: the control is not reproducible here, so no arm is paired with it")


def final_train_ce(run: Path, last: int = 10) -> float:
    """Mean train/ce over the run's last `last` logged steps (training split)."""
    with open(run / "csv" / "metrics.csv") as f:
        ce = [float(r["train/ce"]) for r in csv.DictReader(f) if r.get("train/ce")]
    return float(np.mean(ce[-last:]))


@torch.inference_mode()
def per_token_ce(run: Path, protocol: dict) -> dict[str, np.ndarray]:
    """{set: per-token CE [blocks, context - 1]} of the run's final model, cached under outputs/efficient/ce."""
    cache = CE_CACHE / run.relative_to(RUNS).with_suffix(".npz")
    if cache.exists():
        return dict(np.load(cache))
    model, tok = load(str(run))
    ev = protocol["evaluation"]
    out = {}
    for spec in ev["sets"]:
        chunks = eval_chunks(OmegaConf.structured(DatasetSpec(**spec)), tok, ev["context"], ev["tokens"])
        out[spec["name"]] = np.concatenate([token_stats(logits(model, chunks[i:i + 8]), chunks[i:i + 8])[0]["ce"]
                                            .float().numpy() for i in range(0, len(chunks), 8)])
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(cache, **out)
    return out


def paired_summary(arm_ce: dict, control_ce: dict) -> dict:
    """Per set: the control's mean CE, per-block mean gaps (arm - control) and the per-token difference's tail."""
    out = {}
    for name, a in arm_ce.items():
        diff = a.astype(np.float64) - control_ce[name].astype(np.float64)
        out[name] = {"control_ce": round(float(control_ce[name].mean()), 6),
                     "block_gaps": [round(float(g), 6) for g in diff.mean(1)],
                     "mean_gap": round(float(diff.mean()), 6),
                     "p99_token_diff": round(float(np.quantile(diff, 0.99)), 6)}
    return out


def make_record(protocol, family, arm, budget, seed, run: Path, wall: float) -> dict:
    s = json.loads((run / RUN_SUMMARY).read_text())
    control = run_dir(family, protocol["control"]["name"], budget, seed)
    rec = {"family": family, "arm": arm, "budget": budget, "seed": seed, "overrides": arms_of(protocol)[arm],
           "model": protocol["families"][family]["model"], "tokens": s["tokens_seen"], "val_ce": s["val_ce"],
           "all_removed": s["all_removed"], "removed_sites": len(s["removed_sites"]),
           "final_train_ce": round(final_train_ce(run), 6), "wall_time_s": round(wall, 1),
           "events": [{k: e.get(k) for k in ("site", "step", "applied_at", "removed_at", "why") if k in e}
                      for e in s.get("events", [])]}
    if arm != protocol["control"]["name"]:
        rec["sets"] = paired_summary(per_token_ce(run, protocol), per_token_ce(control, protocol))
    return rec


def choose_combination(protocol: dict, records: list[dict]) -> dict | None:
    """The protocol's rule, once its inputs exist (None before): the single methods whose final training CE beats
    the baseline's of the same seed and budget at a majority of the gpt2 budgets, merged."""
    rule = protocol["combination"]
    seed, budgets = rule["after_seed"], protocol["families"]["gpt2"]["budgets"]
    by = {(r["arm"], r["budget"]): r["final_train_ce"] for r in records if r["family"] == "gpt2" and r["seed"] == seed}
    needed = [(a, b) for a in (protocol["baseline"], *SINGLE_METHODS) for b in budgets]
    if any(k not in by for k in needed):
        return None
    wins = {m: sum(by[(m, b)] < by[(protocol["baseline"], b)] for b in budgets) for m in SINGLE_METHODS}
    chosen = [m for m in SINGLE_METHODS if wins[m] > len(budgets) / 2]
    overrides = ["schedule=builtin_compressed" if "compressed" in chosen else "schedule=builtin"]
    for m in chosen:
        overrides += [o for o in protocol["arms"][m] if not o.startswith("schedule=")]
    return {"name": rule["name"], "methods": chosen, "wins_of_budgets": wins, "budgets": budgets, "seed": seed,
            "overrides": overrides if chosen else [], "rule": rule["rule"]}


def cpu_hours(protocol: dict, missing) -> float:
    steps = {"plain": 0, "distill": 0}
    for _family, arm, budget, _seed in missing:
        steps["distill" if any("distill.weight" in o for o in arms_of(protocol)[arm]) else "plain"] += budget
    return (sum(SECONDS_PER_STEP[k] * n for k, n in steps.items()) + SECONDS_PER_RUN * len(missing)) / 3600


def missing_cells(protocol, seeds=None) -> list:
    done = {record_key(r) for r in read_jsonl(RECORDS)} if RECORDS.exists() else set()
    return [c for c in cells(protocol, seeds) if c not in done]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="*", help="only these seeds (default: the protocol's, in order)")
    ap.add_argument("--dry-run", action="store_true", help="list what is missing and its CPU hours, run nothing")
    args = ap.parse_args(argv)
    protocol = read_protocol()
    missing = missing_cells(protocol, args.seeds)
    print(f"[efficient] {len(missing)} runs missing, about {cpu_hours(protocol, missing):.1f} CPU h "
          f"(one thread; {SECONDS_PER_STEP} s per step)")
    if args.dry_run:
        for c in missing:
            print("  ", *c)
        return 0
    for spec in protocol["evaluation"]["sets"]:  # the shift sets are built offline, once (lnfree.data.shift)
        if any(not Path(f).exists() for f in spec.get("files", [])):
            from ..data.shift import build

            build(Path(spec["files"][0]).parent)
    failed = []
    while missing:
        family, arm, budget, seed = missing[0]
        try:
            if arm != protocol["control"]["name"]:
                ensure_control(protocol, family, budget, seed, read_jsonl(RECORDS) if RECORDS.exists() else [])
            run, wall = train(protocol, family, arm, budget, seed)
            rec = make_record(protocol, family, arm, budget, seed, run, wall)
            append_jsonl(RECORDS, [rec], key=record_key)
            print(f"[efficient] {time.strftime('%H:%M:%S')} {family} {arm} b{budget} s{seed}: {wall:.0f} s, "
                  f"val CE {rec['val_ce']:.4f}", flush=True)
        except RuntimeError as e:  # one failed run is listed and the study goes on
            failed.append(missing[0])
            print(f"[efficient] {e}", flush=True)
        if not COMBINATION.exists():
            chosen = choose_combination(protocol, read_jsonl(RECORDS) if RECORDS.exists() else [])
            if chosen is not None:
                write_text_atomic(COMBINATION, json.dumps(chosen, indent=1) + "\n")
                print(f"[efficient] combination chosen by the protocol's rule: {chosen['methods'] or 'none'}")
        missing = [c for c in missing_cells(protocol, args.seeds) if c not in failed]
    if failed:
        print(f"[efficient] {len(failed)} runs failed: {failed}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
