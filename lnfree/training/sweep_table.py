"""After a multirun: one table of its jobs' results in the sweep dir (results.md and results.csv).

    python -m lnfree.train -m schedule=none,builtin seed=1,2     -> multirun/train/<time>/results.md

A Hydra callback (conf/hydra/default.yaml) calls `write_sweep_table` when the sweep ends; it can also be run on
any sweep dir afterwards: `python -m lnfree.training.sweep_table multirun/train/<time>`. Each job is a row with
the overrides that differ between jobs; a job without summary.json (failed, interrupted) is listed as such.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from ..paths import RUN_SUMMARY

TABLE_MD, TABLE_CSV = "results.md", "results.csv"
COLUMNS = ("job", "overrides", "status", "val_ce_before", "val_ce", "removed", "steps", "tokens_seen",
           "wall_time_s", "exports")


def _jobs(sweep_dir: Path) -> list[Path]:
    jobs = [d for d in sweep_dir.iterdir() if (d / ".hydra" / "overrides.yaml").exists()]
    return sorted(jobs, key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else 0, d.name))


def sweep_rows(sweep_dir: str | Path) -> list[dict]:
    jobs = _jobs(Path(sweep_dir))
    overrides = {d: [str(o) for o in OmegaConf.load(d / ".hydra" / "overrides.yaml")] for d in jobs}
    shared = set.intersection(*(set(o) for o in overrides.values())) if overrides else set()
    rows = []
    for d in jobs:
        row = {"job": d.name, "overrides": " ".join(o for o in overrides[d] if o not in shared) or "-"}
        f = d / RUN_SUMMARY
        if not f.exists():
            rows.append({**row, "status": "not finished"})
            continue
        s = json.loads(f.read_text())
        rows.append({**row, "status": "finished", "val_ce_before": s.get("val_ce_before"), "val_ce": s["val_ce"],
                     "removed": f"{len(s['removed_sites'])}/{len(s['sigmas'])}", "steps": s["steps"],
                     "tokens_seen": s["tokens_seen"], "wall_time_s": s["wall_time_s"],
                     "exports": ", ".join(s.get("exports") or {}) or "-"})
    return rows


def _cell(column: str, v) -> str:
    if v is None:
        return ""
    return f"{v:.4f}" if column.startswith("val_ce") else str(v)


def write_sweep_table(sweep_dir: str | Path) -> tuple[Path, Path] | None:
    """results.md and results.csv in the sweep dir; None when it holds no job."""
    sweep_dir = Path(sweep_dir)
    rows = sweep_rows(sweep_dir) if sweep_dir.is_dir() else []
    if not rows:
        return None
    md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(_cell(c, r.get(c)) for c in COLUMNS) + " |" for r in rows]
    (sweep_dir / TABLE_MD).write_text("\n".join(md) + "\n")
    with open(sweep_dir / TABLE_CSV, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows({c: r.get(c, "") for c in COLUMNS} for r in rows)
    return sweep_dir / TABLE_MD, sweep_dir / TABLE_CSV


class SweepTable(Callback):
    """Rewrites the table after every job of a multirun (failed jobs included), so that a sweep stopped half-way
    still has one, and reports it when the sweep ends."""

    def on_job_end(self, config, job_return=None, **kwargs) -> None:
        from hydra.types import RunMode

        if config.hydra.mode == RunMode.MULTIRUN:
            write_sweep_table(config.hydra.sweep.dir)

    def on_multirun_end(self, config, **kwargs) -> None:
        written = write_sweep_table(config.hydra.sweep.dir)
        if written:
            print(f"[lnfree] sweep results: {written[0]} and {written[1]}")


if __name__ == "__main__":
    print(write_sweep_table(sys.argv[1]))
