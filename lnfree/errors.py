"""The one kind of error that is the user's, not lnfree's.

A UserError says what in the user's request cannot work (a config value, a model reference, data, a limit, a
run directory) and what to do instead. The entry points print its message alone; any other exception is a bug
and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from pathlib import Path

HYDRA_FILES = (".hydra",)  # Hydra's record of the job: the first thing a run writes into the dir it holds
_STARTED = time.time()  # imported before Hydra makes the job's dir


class UserError(ValueError):
    pass


class ExportError(UserError):
    """An export that cannot be written (sites still real, a dtype that cannot hold it, a failed check)."""


class NotRemovableError(UserError):
    """A model whose norms are already gone (an LN-free export) given to make_removable."""


class ModelIOError(UserError):
    """A model reference lnfree cannot load (lnfree.references), or a model that fails its checks as it is loaded
    (lnfree.io, lnfree.model_record)."""


JOB_FAILURES = "failed_jobs"  # in a sweep's dir: <job>.json, why each failed job failed (sweep_table.py lists it)


def record_job_failure(hydra_cfg, message: str) -> None:
    """Write a failed job's overrides and message into its sweep's dir (never into the job's own dir, which may
    be a directory that another run holds)."""
    import json

    from omegaconf import OmegaConf

    d = Path(hydra_cfg.sweep.dir) / JOB_FAILURES
    d.mkdir(parents=True, exist_ok=True)
    job = Path(hydra_cfg.runtime.output_dir).name
    (d / f"{job}.json").write_text(json.dumps({"job": job, "error": message,
                                               "overrides": OmegaConf.to_container(hydra_cfg.overrides.task)}))


@contextlib.contextmanager
def user_errors_as_messages():
    """Around a Hydra entry point: a UserError ends the command with its message and exit status 2, no traceback,
    and without the job dir Hydra made for it; any other error keeps its traceback. In a multirun, a UserError
    ends that job alone: its message goes to the sweep's dir (JOB_FAILURES), the sweep goes on to its next job, and
    the sweep table's callback exits 2 when the sweep ends (lnfree/training/sweep_table.py, _sweep_table)."""
    try:
        yield
    except UserError as e:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN and _sweep_table(HydraConfig.get()):
            hc = HydraConfig.get()
            print(f"[lnfree] job {hc.job.num} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            record_job_failure(hc, f"{type(e).__name__}: {e}")
            return
        if HydraConfig.initialized():
            remove_unused_dir(Path(HydraConfig.get().runtime.output_dir))
        print(f"[lnfree] {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def _sweep_table(hc) -> bool:
    """Whether the sweep runs lnfree's table callback (conf/hydra/default.yaml), which lists a failed job and makes
    the sweep's exit status 2; without it a UserError stops the sweep, so that it never exits 0."""
    return any(str(c.get("_target_", "")).endswith("sweep_table.SweepTable") for c in (hc.callbacks or {}).values())


def remove_unused_dir(out: Path) -> None:
    """Remove the job dir Hydra created for a run that never started: new since this process started and
    holding nothing but Hydra's own files."""
    if not out.is_dir() or out.stat().st_mtime < _STARTED - 1:
        return
    if any(p.name not in HYDRA_FILES for p in out.iterdir()):
        return
    shutil.rmtree(out, ignore_errors=True)
