"""A built-in family's record: per model its shape, size, pretraining tokens, validation CE and curve,
and whether it meets the convergence criterion.

    python -m lnfree.analysis.family outputs/pretrain --out experiments/builtin_family       (the width family)
    python -m lnfree.analysis.family ~/.cache/lnfree/pretrain_runs --out experiments/depth_family \
        --keep tail_average --tol 0.003                                          (the depth family, make family-depth)

Reads the pretraining runs (`<runs>/<name>/summary.json` and their CSV logs) and writes family.json, one
curve per model (curves/<name>.csv: step, train CE, validation CE) and family.png.
Criterion with the last weights kept (`--keep last`, the width family): validation CE not rising over the last 20%
of steps (no validation above the one before it by more than `tol`) and changing by at most `tol` over the last
10% of steps. With the validation-minimum checkpoint kept (`--keep val_min`, the depth family; fixed before its
pretraining): the best validation CE improved by at most `tol` nats during the last 10% of steps (a model still
improving is not converged; one that passed its minimum earlier is, and keeps that minimum). With the mean of the
last 10% of steps' checkpoints kept (`--keep tail_average`, the depth family's second criterion,
lnfree/training/tail_average.py): that mean's validation CE is at most `tol` nats below the mean of the 10% before
(the window gain); the val_min criterion's late gain is recorded beside it. The depth family's record groups the
independently pretrained replicates of each size (`model.replicate`) and adds family.md.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from ..paths import DEFAULT_CACHE_DIR, RUN_SUMMARY
from ..records import output_dir
from ..training.loggers import read_metrics
from ..training.tail_average import RECORD as TAIL_RECORD

DEPTH_TOL = 0.003  # the depth family's convergence tolerance in nats (conf/pretrain_depth.yaml's criteria)
CRITERIA = {
    "val_min": "kept weights: the validation-minimum checkpoint; converged: the best validation CE improved by at "
               "most {tol} nats during the last 10% of steps",
    "tail_average": "kept weights: the mean of the checkpoints of the last 10% of steps; converged: the "
                    "checkpoints' validation CE, averaged over the last 10% of steps, is at most {tol} nats below its "
                    "average over the 10% before",
}


def converged(curve: list[tuple[int, float]], max_steps: int, tol: float) -> dict:
    late = [(s, v) for s, v in curve if s >= 0.8 * max_steps]
    last = [v for s, v in curve if s >= 0.9 * max_steps]
    rising = any(b - a > tol for (_, a), (_, b) in zip(late, late[1:]))
    change = (max(last) - min(last)) if len(last) > 1 else None
    return {"not_rising_last_20pct": not rising, "change_last_10pct": change,
            "met": (not rising) and change is not None and change <= tol}


def val_min(run_dir: Path, steps: int) -> tuple[int, float]:
    """(optimizer step, validation CE) of a run's lowest validation. Lightning logs a validation inside training
    at the index of the batch it follows (step - 1) and the one after training at the last step; both are the
    weights after `step` optimizer steps, as is the checkpoint step<step>.ckpt. Ties go to the earlier step."""
    at = val_by_step(read_metrics(Path(run_dir)).get("val/ce", []), steps)
    if not at:
        raise ValueError(f"{run_dir} has no validation after training started")
    best = min(at, key=lambda s: (at[s], s))
    return best, at[best]


def val_by_step(logged: list[tuple[int, float]], steps: int) -> dict[int, float]:
    """Logged validations keyed by the optimizer step of the weights they measured (step 0, the random init
    measured before training, left out)."""
    return {min(s + 1, steps): v for s, v in logged if s > 0}


def late_gain(curve: dict[int, float], max_steps: int, tol: float) -> dict:
    """The val_min criterion: how much the best validation CE improved during the last 10% of steps."""
    early = [v for s, v in curve.items() if s < 0.9 * max_steps]
    late = [v for s, v in curve.items() if s >= 0.9 * max_steps]
    gain = (min(early) - min(late)) if early and late else None
    best = min(curve, key=lambda s: (curve[s], s))
    return {"late_gain": gain, "kept_step": best, "kept_val_ce": curve[best], "val_ce_last": curve[max(curve)],
            "overfit": curve[max(curve)] - curve[best] > tol, "met": gain is not None and gain <= tol}


def window_gain(record: dict, tol: float) -> dict:
    """The tail_average criterion (criterion 3) from a run's tail_average.json: how much the checkpoints'
    validation CE, averaged over the last 10% of steps, improved on its average over the 10% before. Beside it:
    the same comparison on the two windows' averaged weights (criterion 2, biased towards converged: averaging
    gains more in the earlier, higher-LR window) and how much the last window's two halves differ."""
    singles = record["checkpoints_val_ce"]
    gain = singles["previous"] - singles["last"]
    halves = [h for h in record["val_ce_halves"] if h is not None]
    return {"window_gain": gain, "averaged_weights_gain": record["val_ce_previous"] - record["val_ce"],
            "window": record["window"], "val_ce": record["val_ce"], "val_ce_previous": record["val_ce_previous"],
            "checkpoints_val_ce": singles, "halves_diff": abs(halves[0] - halves[1]) if len(halves) == 2 else None,
            "overfit": gain < -tol, "met": gain <= tol}


# -- the depth family's replicates (experiments/depth_family/README.md: "What follows for a size") ------------
MOST_REPLICATES = 4
MOST_STEPS = 16_000  # recipe 3: a member is continued at the final learning rate up to this many steps in all


def replicates_needed(converged: dict[int, bool | None], base: int = 2, most: int = MOST_REPLICATES) -> list[int]:
    """The replicates a size pretrains, from the verdicts so far (replicate -> converged; None or absent: not
    finished): 1..base, then one more at a time while all so far are finished and fewer than two converged, up to
    `most`; none added when replicates 1 and 2 are both not converged."""
    need = list(range(1, base + 1))
    if all(converged.get(r) is False for r in (1, 2)):
        return need
    while len(need) < most and all(converged.get(r) is not None for r in need) and \
            sum(bool(converged[r]) for r in need) < 2:
        need.append(len(need) + 1)
    return need


def verdict(name: str, cache_dir=DEFAULT_CACHE_DIR, tol: float = DEPTH_TOL) -> bool | None:
    """Whether a member is settled as converged (True) or not (False) by the tail-average criterion (its
    pretrain_info.json). None: not in the cache, kept under another rule, or not converged yet with steps left to
    continue under recipe 3 (fewer than MOST_STEPS)."""
    from ..references import builtin_dir

    f = builtin_dir(name, cache_dir) / "pretrain_info.json"
    if not f.exists():
        return None
    info = json.loads(f.read_text())
    if not info.get("tail_average"):
        return None
    met = window_gain(info["tail_average"], tol)["met"]
    return None if not met and info["steps"] < MOST_STEPS else met


def pair(stem: str, cache_dir=DEFAULT_CACHE_DIR) -> list[int] | None:
    """A size's two pretrained models for the fine-tuning grid: its two converged replicates of lowest seed among
    those the rule pretrains (e.g. [1, 3] for l1w32 if 3 converges); None until two have converged."""
    converged = {r: verdict(f"{stem}_s{r}", cache_dir) for r in range(1, MOST_REPLICATES + 1)}
    ok = [r for r in replicates_needed(converged) if converged.get(r)]
    return ok[:2] if len(ok) >= 2 else None


def collect(runs_dir: str | Path, out_dir: str | Path, tol: float = 0.002, keep: str = "last") -> dict:
    if keep in CRITERIA:
        return collect_replicates(runs_dir, out_dir, tol, keep)
    runs_dir, out = Path(runs_dir), Path(out_dir)
    (out / "curves").mkdir(parents=True, exist_ok=True)
    sizes = []
    for summary_file in sorted(runs_dir.glob(f"*/{RUN_SUMMARY}")):
        s = json.loads(summary_file.read_text())
        c = s["config"]
        name = c["model"]["name"]
        metrics = read_metrics(summary_file.parent)
        val, tr = dict(metrics.get("val/ce", [])), dict(metrics.get("train/ce", []))
        with open(out / "curves" / f"{name}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "train_ce", "val_ce"])
            for step in sorted(set(val) | set(tr)):
                w.writerow([step, tr.get(step, ""), val.get(step, "")])
        shape = c["model"]["shape"]
        sizes.append({"name": name, "n_layer": shape["n_layer"], "n_embd": shape["n_embd"],
                      "n_head": shape["n_head"], "non_embedding_params": s["n_params_non_embedding"],
                      "params": s["n_params"], "pretrain_tokens": s["tokens_seen"], "steps": s["steps"],
                      "val_ce": s["val_ce"], "curve": f"curves/{name}.csv",
                      "convergence": converged(sorted(val.items()), s["steps"], tol),
                      "recipe": {"dropout": c["model"]["dropout"], "lr": c["optim"]["lr"],
                                 "min_lr": c["optim"]["min_lr"],
                                 "tokens_per_step": s["tokens_per_step"], "shuffle_buffer": c["data"]["shuffle_buffer"],
                                 "seed": c["seed"], "precision": c["hardware"]["precision"]},
                      "wall_time_s": s["wall_time_s"], "hardware": c["hardware"]["name"]})
    sizes.sort(key=lambda x: x["non_embedding_params"])
    ces = [x["val_ce"] for x in sizes]
    res = {"criterion": f"validation CE not rising by more than {tol} between validations over the last 20% of "
                        f"steps, and changing by at most {tol} nats over the last 10%",
           "strictly_decreasing_with_size": all(b < a for a, b in zip(ces, ces[1:])), "sizes": sizes}
    (out / "family.json").write_text(json.dumps(res, indent=1))
    from .plots import plot_family  # matplotlib only when a figure is drawn

    plot_family(sizes, out)
    return res


def collect_replicates(runs_dir: str | Path, out_dir: str | Path, tol: float = DEPTH_TOL,
                       keep: str = "val_min") -> dict:
    """The depth family's record: per size its shape and parameters, per pretrained replicate its seed, kept CE,
    last CE, curve and the criterion of `keep` (val_min: late_gain; tail_average: window_gain from the run's
    tail_average.json, with late_gain beside it). Only finished runs count; members of the committed record in
    out_dir without a run dir here keep their entries (_keep_committed)."""
    runs_dir, out = Path(runs_dir), Path(out_dir)
    (out / "curves").mkdir(parents=True, exist_ok=True)
    sizes: dict[str, dict] = {}
    for summary_file in sorted(runs_dir.glob(f"*/{RUN_SUMMARY}")):
        s = json.loads(summary_file.read_text())
        c = s["config"]
        name, shape = c["model"]["name"], c["model"]["shape"]
        metrics = read_metrics(summary_file.parent)
        val = val_by_step(metrics.get("val/ce", []), s["steps"])
        tr = {min(k + 1, s["steps"]): v for k, v in metrics.get("train/ce", [])}
        with open(out / "curves" / f"{name}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "train_ce", "val_ce"])
            for step in sorted(set(val) | set(tr)):
                w.writerow([step, tr.get(step, ""), val.get(step, "")])
        size = f"l{shape['n_layer']}w{shape['n_embd']}"
        entry = sizes.setdefault(size, {
            "name": size, "n_layer": shape["n_layer"], "n_embd": shape["n_embd"], "n_head": shape["n_head"],
            "non_embedding_params": s["n_params_non_embedding"], "params": s["n_params"], "pretrained": []})
        conv = late_gain(val, s["steps"], tol)
        kept_ce, kept, met = conv["kept_val_ce"], f"step {conv['kept_step']}", conv["met"]
        if keep == "tail_average":
            tail = summary_file.parent / TAIL_RECORD
            if not tail.exists():
                raise FileNotFoundError(f"{tail} missing: export the run again with model.pretrain_keep=tail_average "
                                        "(lnfree.pretrain on the finished run dir exports it without training)")
            conv = {"val_min": conv, "tail_average": window_gain(json.loads(tail.read_text()), tol)}
            kept_ce, met = conv["tail_average"]["val_ce"], conv["tail_average"]["met"]
            kept = "steps {}-{} (mean)".format(*conv["tail_average"]["window"])
        entry["pretrained"].append({
            "name": name, "seed": c["seed"], "replicate": c["model"]["replicate"], "val_ce": kept_ce,
            "kept": kept, "val_ce_last": val[max(val)], "converged": met,
            "convergence": conv, "steps": s["steps"], "pretrain_tokens": s["tokens_seen"],
            "curve": f"curves/{name}.csv", "wall_time_s": s["wall_time_s"], "hardware": c["hardware"]["name"],
            "recipe": {"dropout": c["model"]["dropout"], "lr": c["optim"]["lr"], "min_lr": c["optim"]["min_lr"],
                       "weight_decay": c["optim"]["weight_decay"], "tokens_per_step": s["tokens_per_step"],
                       "val_every": c["trainer"]["val_every"], "precision": c["hardware"]["precision"]}})
    _keep_committed(sizes, out / "family.json", tol, keep)
    ordered = sorted(sizes.values(), key=lambda x: x["non_embedding_params"])
    for x in ordered:
        x["pretrained"].sort(key=lambda r: r["seed"])
        x["all_converged"] = all(r["converged"] for r in x["pretrained"])
    res = {"criterion": CRITERIA[keep].format(tol=tol), "keep": keep, "tol": tol, "sizes": ordered}
    (out / "family.json").write_text(json.dumps(res, indent=1))
    (out / "family.md").write_text(markdown_replicates(res))
    from .plots import plot_family

    plot_family([{"name": r["name"], "curve": r["curve"], "non_embedding_params": x["non_embedding_params"],
            "val_ce": r["val_ce"]} for x in ordered for r in x["pretrained"]], out)
    return res


def _keep_committed(sizes: dict, record: Path, tol: float, keep: str):
    """Members of the committed record with no finished run dir here keep their committed entry (and curve): the
    run dirs live in one machine's cache, the record in the repo, so a machine that restored some members from the
    repo must not drop them from the record. A record made under another criterion is refused, not mixed in."""
    if not record.exists():
        return
    old = json.loads(record.read_text())
    if (old.get("keep"), old.get("tol")) != (keep, tol):
        raise ValueError(f"{record} was made with keep={old.get('keep')}, tol={old.get('tol')}, not keep={keep}, "
                         f"tol={tol}: pass those, or write the new record elsewhere (--out)")
    here = {r["name"] for x in sizes.values() for r in x["pretrained"]}
    for x in old["sizes"]:
        kept = [r for r in x["pretrained"] if r["name"] not in here]
        if kept:
            entry = sizes.setdefault(x["name"], {**{k: v for k, v in x.items() if k != "all_converged"},
                                                 "pretrained": []})
            entry["pretrained"] += kept
            print(f"[lnfree] {', '.join(r['name'] for r in kept)}: no run dir here, committed record kept", flush=True)


def markdown_replicates(res: dict) -> str:
    return f"Criterion: {res['criterion']}.\n\n" + replicates_table(res) + "\n"


def _gain(g) -> str:
    return "n/a" if g is None else f"{g:+.4f}"


def replicates_table(res: dict) -> str:
    """One row per pretrained replicate of the depth family: kept and last validation CE, the criterion's gain(s),
    converged. With tail averaging: the window gain that decides, the val_min criterion's late gain beside it,
    and how far the last window's two halves differ (the jitter left in a window's mean)."""
    tail = res.get("keep") == "tail_average"
    head = ["size", "layers x width", "non-embedding", "replicate (seed)", "kept", "val CE (kept)",
            "val CE (last checkpoint)"]
    head += (["window gain (checkpoints)", "window gain (averaged weights)", "halves differ by",
              "late gain (val-min)"] if tail else ["late gain"])
    rows = ["| " + " | ".join(head + ["converged"]) + " |", "|" + "---|" * (len(head) + 1)]
    for x in res["sizes"]:
        for r in x["pretrained"]:
            c = r["convergence"]
            t = c.get("tail_average", {})
            gains = ([_gain(t["window_gain"]), _gain(t["averaged_weights_gain"]),
                      _gain(t["halves_diff"]).lstrip("+"), _gain(c["val_min"]["late_gain"])]
                     if tail else [_gain(c["late_gain"])])
            cells = [x["name"], f"{x['n_layer']} x {x['n_embd']}", f"{x['non_embedding_params']:,}",
                     f"{r['replicate']} ({r['seed']})", r["kept"], f"{r['val_ce']:.4f}", f"{r['val_ce_last']:.4f}",
                     *gains, "yes" if r["converged"] else "**no**"]
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def redraw(out_dir: str | Path):
    """family.png again from a committed family.json and its curves/ (no run dir needed): make paper's figures."""
    from .plots import plot_family

    out = Path(out_dir)
    sizes = json.loads((out / "family.json").read_text())["sizes"]
    if sizes and "curve" not in sizes[0]:  # the depth family: one curve per pretrained replicate
        sizes = [{"name": r["name"], "curve": r["curve"], "non_embedding_params": x["non_embedding_params"],
                  "val_ce": r["val_ce"]} for x in sizes for r in x["pretrained"]]
    plot_family(sizes, out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs_dir")
    p.add_argument("--out", help="output dir (default: a new dir under outputs/; the committed width family: "
                                 "--out experiments/builtin_family)")
    p.add_argument("--tol", type=float, help=f"convergence tolerance in nats (default 0.002 with --keep last, "
                   f"{DEPTH_TOL} with a depth-family criterion)")
    p.add_argument("--keep", choices=("last", *CRITERIA), default="last",
                   help="which pretraining weights the family keeps (its criterion follows)")
    a = p.parse_args(argv)
    tol = a.tol if a.tol is not None else (DEPTH_TOL if a.keep in CRITERIA else 0.002)
    res = collect(a.runs_dir, output_dir(a.out, "family"), tol, a.keep)
    if a.keep in CRITERIA:
        print(res["criterion"])
        for x in res["sizes"]:
            for r in x["pretrained"]:
                print(f"{r['name']:18s} N={x['non_embedding_params']:>9d} val CE {r['val_ce']:.4f} ({r['kept']}) "
                      f"converged: {r['converged']}")
        return
    for x in res["sizes"]:
        print(f"{x['name']:14s} N={x['non_embedding_params']:>9d} val CE {x['val_ce']:.4f} converged: "
              f"{x['convergence']['met']}")
    print("strictly decreasing with size:", res["strictly_decreasing_with_size"])


if __name__ == "__main__":
    main()
