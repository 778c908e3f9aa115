"""Evaluation outputs: Markdown tables, results.json / results.csv, and the figures."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf


def markdown_table(results: dict, key: str = "mean") -> str:
    datasets = list(results)
    models = list(results[datasets[0]])
    lines = ["| model | " + " | ".join(datasets) + " |", "|---|" + "---|" * len(datasets)]
    for m in models:
        cells = []
        for d in datasets:
            best = min(results[d][x][key] for x in models)
            v = results[d][m][key]
            cells.append(f"{v:.4f} (best)" if v == best else f"{v:.4f} (+{v - best:.4f})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def detail_table(results: dict) -> str:
    cols = ["mean", "ci95_low", "ci95_high", "median", "p2.5", "p97.5", "p0.05", "p99.95", "accuracy",
            "entropy", "ece", "jsd_to_reference"]
    lines = ["| dataset | model | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for d, per_model in results.items():
        for m, s in per_model.items():
            lines.append(f"| {d} | {m} | " + " | ".join(f"{s[c]:.4f}" if c in s else "-" for c in cols) + " |")
    return "\n".join(lines)


def paired_table(paired: dict) -> str:
    """One row per (dataset, pair): per-seed gaps with their paired-bootstrap CIs, and the mean over seeds."""
    lines = ["| dataset | pair (a - b) | per seed: gap [95% CI] | over seeds: gap [95% CI, t] | relative |",
             "|---|---|---|---|---|"]
    for d, pairs in paired.items():
        for name, p in pairs.items():
            seeds = "; ".join(f"{r['gap']:+.4f} [{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}]" for r in p["per_seed"])
            g, rel = p["gap_over_seeds"], p["relative_gap_over_seeds"]
            ci = f" [{g['ci95'][0]:+.4f}, {g['ci95'][1]:+.4f}]" if "ci95" in g else ""
            rci = f" [{100 * rel['ci95'][0]:+.2f}, {100 * rel['ci95'][1]:+.2f}]" if "ci95" in rel else ""
            lines.append(f"| {d} | {name} | {seeds} | {g['mean']:+.4f}{ci} (n={g['n']}) | "
                         f"{100 * rel['mean']:+.2f}%{rci} |")
    return "\n".join(lines)


PAIRED_HEADER = ("## Paired gaps (same tokens; CI per seed: bootstrap over chunks; over seeds: t interval of seeds "
                 "plus the text they share, docs/statistics.md)")


# A re-evaluation reproduces a record when its config is the same and every statistic is within this (absolute;
# the tables print 4 decimals, float noise between runs and thread counts is about 1e-6): the record is then left
# as it is, so that committed results do not change by noise.
REPRO_TOL = 1e-5


def _agrees(new, old, tol: float = REPRO_TOL) -> bool:
    """Same structure, same strings, every number within `tol` (NaN agrees with NaN)."""
    if isinstance(new, dict):
        return isinstance(old, dict) and new.keys() == old.keys() and all(_agrees(new[k], old[k], tol) for k in new)
    if isinstance(new, list):
        return isinstance(old, list) and len(new) == len(old) and all(_agrees(a, b, tol) for a, b in zip(new, old))
    if isinstance(new, (int, float)) and isinstance(old, (int, float)) and not isinstance(new, bool):
        return (new != new and old != old) or abs(new - old) <= tol
    return new == old


def reproduces_record(record: dict, out: Path) -> bool:
    """Whether out/results.json holds this same evaluation (lnfree.analysis.tables.REPRO_TOL)."""
    f = out / "results.json"
    if not f.exists():
        return False
    try:
        old = json.loads(f.read_text())
    except json.JSONDecodeError:
        return False
    return _agrees(json.loads(json.dumps(record)), old)


def write_outputs(results, per_token, cfg, out: Path, paired: dict | None = None):
    record = {"results": results, "paired": paired or {}, "config": OmegaConf.to_container(cfg, resolve=True)}
    if reproduces_record(record, out):
        if (out / "table.md").exists():
            print((out / "table.md").read_text())
        print(f"[lnfree] this evaluation reproduces the record in {out.resolve()} (same config, every statistic "
              f"within {REPRO_TOL:g}): left untouched")
        return
    table = ("## Mean cross-entropy (nats/token), gap to the best model in brackets\n\n" + markdown_table(results)
             + "\n\n## Median\n\n" + markdown_table(results, "median"))
    if paired:
        table += "\n\n" + PAIRED_HEADER + "\n\n" + paired_table(paired)
    table += "\n\n## All statistics\n\n" + detail_table(results) + "\n"
    (out / "table.md").write_text(table)
    (out / "results.json").write_text(json.dumps(record, indent=1))
    # per-token CE of every model on every dataset (same token order for all), for paired tests later
    np.savez_compressed(out / "per_token_ce.npz",
                        **{f"{d}/{m}": v["ce"].astype(np.float32) for (d, m), v in per_token.items()})
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        keys = sorted({k for per_model in results.values() for s in per_model.values() for k in s})
        w.writerow(["dataset", "model", *keys])
        for d, per_model in results.items():
            for m, s in per_model.items():
                w.writerow([d, m, *[s.get(k, "") for k in keys]])
    from .plots import plot_ce_by_position, plot_ce_hist, plot_training_curves

    plot_ce_hist(per_token, out / "ce_hist.png")
    plot_ce_by_position(per_token, out / "ce_by_position.png")
    runs = {m.name: m.path for m in cfg.models}
    plot_training_curves(runs, out / "training_curves.png")
    print(table)
    print(f"[lnfree] evaluation written to {out.resolve()}")
