"""After a multirun: one table of its jobs' results in the sweep dir (results.md and results.csv).

    python -m lnfree.train -m schedule=none,builtin seed=1,2     -> multirun/train/<time>/results.md

A Hydra callback (conf/hydra/default.yaml) calls `write_sweep_table` when the sweep ends; it can also be run on
any sweep dir afterwards: `python -m lnfree.training.sweep_table multirun/train/<time>`. Each job is a row with
the overrides that differ between jobs; a job that failed is listed as failed with its message (a UserError ends
its job alone, lnfree.errors.user_errors_as_messages; any other exception is recorded here when the job ends), a
job without summary.json as not finished, one whose summary.json does not read as "bad summary" with the file
and line. The sweep's exit status is 2 when any job failed.
"""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from ..errors import JOB_FAILURES, record_job_failure
from ..paths import RUN_SUMMARY
from ..records import RecordError, read_json, write_text_atomic

TABLE_MD, TABLE_CSV = "results.md", "results.csv"
COLUMNS = ("job", "overrides", "status", "val_ce_before", "val_ce", "removed", "steps", "tokens_seen",
           "wall_time_s", "exports", "error")


def _failures(sweep_dir: Path) -> dict[str, dict]:
    """{job dir name: {"job", "error", "overrides"}} of the jobs that failed (lnfree.errors.record_job_failure)."""
    return {f.stem: read_json(f, ("error", "overrides")) for f in sorted((sweep_dir / JOB_FAILURES).glob("*.json"))}


def _jobs(sweep_dir: Path, failures: dict) -> list[Path]:
    jobs = [d for d in sweep_dir.iterdir() if (d / ".hydra" / "overrides.yaml").exists() or d.name in failures]
    return sorted(jobs, key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else 0, d.name))


def _overrides(d: Path, failures: dict) -> list[str]:
    f = d / ".hydra" / "overrides.yaml"
    return [str(o) for o in (OmegaConf.load(f) if f.exists() else failures[d.name]["overrides"])]


def sweep_rows(sweep_dir: str | Path) -> list[dict]:
    failures = _failures(Path(sweep_dir))
    jobs = _jobs(Path(sweep_dir), failures)
    overrides = {d: _overrides(d, failures) for d in jobs}
    shared = set.intersection(*(set(o) for o in overrides.values())) if overrides else set()
    rows = []
    for d in jobs:
        row = {"job": d.name, "overrides": " ".join(o for o in overrides[d] if o not in shared) or "-"}
        f = d / RUN_SUMMARY
        if d.name in failures:  # its latest attempt failed (SweepTable.on_job_start clears an earlier record), even
            # where its dir holds a summary: a finished run of another config, which skip_if_done refuses
            rows.append({**row, "status": "failed", "error": _one_line(failures[d.name]["error"])})
            continue
        if not f.exists():
            rows.append({**row, "status": "not finished"})
            continue
        try:
            s = read_json(f, ("val_ce", "removed_sites", "sigmas", "steps", "tokens_seen", "wall_time_s"))
        except RecordError as e:  # half-written: listed, never a crash that loses the other jobs' rows
            rows.append({**row, "status": "bad summary", "error": _one_line(str(e))})
            continue
        rows.append({**row, "status": "finished", "val_ce_before": s.get("val_ce_before"), "val_ce": s["val_ce"],
                     "removed": f"{len(s['removed_sites'])}/{len(s['sigmas'])}", "steps": s["steps"],
                     "tokens_seen": s["tokens_seen"], "wall_time_s": s["wall_time_s"],
                     "exports": ", ".join(s.get("exports") or {}) or "-"})
    return rows


def _ended_since(sweep_dir: Path, job: str, t: float) -> bool:
    """Whether the job's failure record or summary was written at or after time t."""
    return any(f.exists() and f.stat().st_mtime >= t
               for f in (sweep_dir / JOB_FAILURES / f"{job}.json", sweep_dir / job / RUN_SUMMARY))


def _one_line(text: str) -> str:
    return " ".join(text.split()).replace("|", "/")  # one Markdown cell


def failed_jobs(sweep_dir: str | Path) -> list[dict]:
    return [r for r in sweep_rows(sweep_dir) if r["status"] in ("failed", "bad summary")]


def _cell(column: str, v) -> str:
    if v is None:
        return ""
    return f"{v:.4f}" if column.startswith("val_ce") and isinstance(v, (int, float)) else str(v)


def write_sweep_table(sweep_dir: str | Path) -> tuple[Path, Path] | None:
    """results.md and results.csv in the sweep dir; None when it holds no job."""
    sweep_dir = Path(sweep_dir)
    rows = sweep_rows(sweep_dir) if sweep_dir.is_dir() else []
    if not rows:
        return None
    md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(_cell(c, r.get(c)) for c in COLUMNS) + " |" for r in rows]
    write_text_atomic(sweep_dir / TABLE_MD, "\n".join(md) + "\n")
    with open(sweep_dir / TABLE_CSV, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows({c: r.get(c, "") for c in COLUMNS} for r in rows)
    return sweep_dir / TABLE_MD, sweep_dir / TABLE_CSV


class SweepTable(Callback):
    """Rewrites the table after every job of a multirun (failed jobs included), so that a sweep stopped half-way
    still has one, and reports it when the sweep ends: exit status 2 when any job failed."""

    def on_job_start(self, config, **kwargs) -> None:
        """A job run again (a sweep into the dirs of an earlier one, as the Makefile's) starts without the failure
        record of its earlier attempt: the table shows how its latest attempt ended."""
        from hydra.types import RunMode

        if config.hydra.mode == RunMode.MULTIRUN:
            job = Path(config.hydra.runtime.output_dir).name
            (Path(config.hydra.sweep.dir) / JOB_FAILURES / f"{job}.json").unlink(missing_ok=True)

    def on_job_end(self, config, job_return=None, **kwargs) -> None:
        from hydra.core.utils import JobStatus
        from hydra.types import RunMode

        if config.hydra.mode != RunMode.MULTIRUN:
            return
        if job_return is not None and job_return.status == JobStatus.FAILED:  # not a UserError: a bug
            e = job_return._return_value  # (its .return_value raises it)
            record_job_failure(config.hydra, f"{type(e).__name__}: {e}")
        write_sweep_table(config.hydra.sweep.dir)

    def on_multirun_start(self, config, **kwargs) -> None:
        self._started = time.time() - 1  # (a filesystem's mtime may be whole seconds)

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        written = write_sweep_table(sweep_dir)
        if written:
            print(f"[lnfree] sweep results: {written[0]} and {written[1]}")
        # this sweep's failures: the dir may hold the jobs of other sweeps (the Makefile's arms share $(RUNS)),
        # whose failures are theirs to report
        started = getattr(self, "_started", 0.0)
        failed = [r for r in failed_jobs(sweep_dir) if _ended_since(sweep_dir, r["job"], started)] \
            if sweep_dir.is_dir() else []
        if failed:
            print(f"[lnfree] {len(failed)} job(s) of the sweep failed: "
                  + "; ".join(f"job {r['job']} ({r['overrides']}): {r['error']}" for r in failed), file=sys.stderr)
            raise SystemExit(2)


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description="write results.md and results.csv of a finished (or stopped) sweep")
    p.add_argument("sweep_dir", help="the multirun's dir, e.g. multirun/train/<time>")
    print(write_sweep_table(p.parse_args(argv).sweep_dir))


if __name__ == "__main__":
    main()
