"""Sweeps (`python -m lnfree.train -m ...`): a bad job fails alone and the later jobs still run, and the sweep's
table (results.md / results.csv) lists every job, failed jobs and unreadable summaries included; a sweep with a
failed job exits 2."""

import csv
import json
import subprocess
import sys

import pytest
from conftest import ROOT
from omegaconf import OmegaConf

from lnfree.errors import JOB_FAILURES
from lnfree.training.sweep_table import SweepTable, write_sweep_table

TINY_SWEEP = ["model=tiny", "model.dropout=0.0", "schedule=none", "data=builtin", "data.block_size=64",
              "data.val_blocks=2", "hardware=cpu", "hardware.precision=32-true", "hardware.micro_batch_size=2",
              "trainer.max_steps=2", "trainer.val_every=2", "trainer.ckpt_every=2", "trainer.progress_bar=false",
              "logger=csv", "optim.warmup_steps=1", "export=false"]


@pytest.mark.slow
def test_a_bad_value_in_the_middle_of_a_sweep_fails_that_job_alone(tmp_path):
    """The issue's sweep: optim.lr=6e-4,-1,3e-4. The bad job is listed as failed with its message, the later
    valid job still runs, and the sweep exits 2."""
    out = subprocess.run([sys.executable, "-m", "lnfree.train", "-m", *TINY_SWEEP, "optim.lr=6e-4,-1,3e-4",
                          f"hydra.sweep.dir={tmp_path / 'sweep'}", f"paths.cache_dir={tmp_path / 'cache'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2, out.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "sweep" / "results.csv")))
    assert [r["status"] for r in rows] == ["finished", "failed", "finished"]
    assert "optim.lr=-1" in rows[1]["overrides"] and "optim.lr" in rows[1]["error"] and "> 0" in rows[1]["error"]
    assert "failed" in (tmp_path / "sweep" / "results.md").read_text()
    assert "Traceback" not in out.stderr and "1 job(s) of the sweep failed" in out.stderr


def _job(sweep, name, overrides):
    (sweep / name / ".hydra").mkdir(parents=True)
    (sweep / name / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))


def test_the_sweep_table_lists_failed_jobs_and_unreadable_summaries_and_the_sweep_exits_2(tiny_run, tmp_path):
    import shutil

    _, run = tiny_run
    sweep = tmp_path / "sweep"
    _job(sweep, "0", ["seed=1"])
    shutil.copy(run / "summary.json", sweep / "0" / "summary.json")
    (sweep / "1").mkdir(parents=True)  # refused before it held its dir: no .hydra/, only the failure record
    (sweep / JOB_FAILURES).mkdir()
    (sweep / JOB_FAILURES / "1.json").write_text(json.dumps(
        {"job": "1", "error": "LimitError: optim.lr=-1.0 (must be > 0)", "overrides": ["seed=2"]}))
    _job(sweep, "2", ["seed=3"])
    (sweep / "2" / "summary.json").write_text((run / "summary.json").read_text()[:300])  # half-written
    md, path = write_sweep_table(sweep)
    rows = list(csv.DictReader(open(path)))
    assert [(r["job"], r["status"]) for r in rows] == [("0", "finished"), ("1", "failed"), ("2", "bad summary")]
    assert rows[1]["overrides"] == "seed=2" and rows[1]["error"].startswith("LimitError: optim.lr=-1.0")
    assert "2/summary.json:" in rows[2]["error"] and "not valid JSON" in rows[2]["error"]
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    with pytest.raises(SystemExit) as e:
        SweepTable().on_multirun_end(config)
    assert e.value.code == 2


def test_a_sweep_into_the_dirs_of_earlier_sweeps_reports_its_own_jobs_latest_attempts(tiny_run, tmp_path):
    """The Makefile's sweeps (skip_if_done into $(RUNS), one per arm): a job refused on a dir that holds a finished
    run of another config failed, though the dir has a summary; a job run again starts without its earlier
    failure record; the sweep exits 2 for its own failed jobs only, not for those another sweep left there."""
    import os
    import shutil
    import time

    from hydra.types import RunMode

    _, run = tiny_run
    sweep = tmp_path / "runs"
    for job, seed in (("vanilla_s1", 1), ("vanilla_s2", 2), ("lnfree_s1", 1)):
        _job(sweep, job, [f"seed={seed}"])
        shutil.copy(run / "summary.json", sweep / job / "summary.json")  # finished in an earlier sweep
        os.utime(sweep / job / "summary.json", (time.time() - 120,) * 2)
    (sweep / JOB_FAILURES).mkdir()
    for job in ("vanilla_s1", "vanilla_s2", "lnfree_s1"):  # refused (another config) in an earlier sweep
        (sweep / JOB_FAILURES / f"{job}.json").write_text(json.dumps(
            {"job": job, "error": "RunDirError: holds a finished run with a different config", "overrides": []}))
        os.utime(sweep / JOB_FAILURES / f"{job}.json", (time.time() - 60,) * 2)

    def config(job):
        return OmegaConf.create({"hydra": {"mode": RunMode.MULTIRUN, "sweep": {"dir": str(sweep)},
                                           "runtime": {"output_dir": str(sweep / job)}}})

    table = SweepTable()
    table.on_multirun_start(config("vanilla_s1"))  # this sweep: the vanilla arm, its jobs run again
    table.on_job_start(config("vanilla_s1"))  # returned as finished (skip_if_done)
    table.on_job_start(config("vanilla_s2"))  # refused again
    (sweep / JOB_FAILURES / "vanilla_s2.json").write_text(json.dumps(
        {"job": "vanilla_s2", "error": "RunDirError: holds a finished run with a different config", "overrides": []}))
    rows = {r["job"]: r["status"] for r in csv.DictReader(open(write_sweep_table(sweep)[1]))}
    assert rows == {"vanilla_s1": "finished", "vanilla_s2": "failed", "lnfree_s1": "failed"}
    with pytest.raises(SystemExit) as e:
        table.on_multirun_end(config("vanilla_s1"))
    assert e.value.code == 2
    (sweep / JOB_FAILURES / "vanilla_s2.json").unlink()  # once this sweep's own job is fixed: lnfree_s1 is the
    table.on_multirun_end(config("vanilla_s1"))  # lnfree arm's to report, when it runs again


def test_a_multirun_leaves_a_table_of_its_jobs(tmp_path, tiny_run):
    """results.md / results.csv: a row per job with the overrides that differ, unfinished jobs listed as such;
    the Hydra config runs the table's callback after every job."""
    import csv
    import shutil

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from lnfree.training.sweep_table import SweepTable, write_sweep_table

    summary, run = tiny_run
    sweep = tmp_path / "sweep"
    for job, seed in ((0, 1), (1, 2), (2, 3)):
        (sweep / str(job) / ".hydra").mkdir(parents=True)
        (sweep / str(job) / ".hydra" / "overrides.yaml").write_text(f"- model=tiny\n- seed={seed}\n")
    for job in (0, 1):
        shutil.copy(run / "summary.json", sweep / str(job) / "summary.json")
    md, csv_path = write_sweep_table(sweep)
    rows = list(csv.DictReader(open(csv_path)))
    assert [r["overrides"] for r in rows] == ["seed=1", "seed=2", "seed=3"]
    assert [r["status"] for r in rows] == ["finished", "finished", "not finished"]
    assert float(rows[0]["val_ce"]) == pytest.approx(summary["val_ce"])
    assert rows[0]["removed"] == "7/7" and rows[0]["exports"] == "hf, folded"
    row = f"| 0 | seed=1 | finished | {summary['val_ce_before']:.4f} | {summary['val_ce']:.4f} | 7/7 |"
    assert row in md.read_text()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", return_hydra_config=True)
    assert any(isinstance(instantiate(c), SweepTable) for c in cfg.hydra.callbacks.values())
