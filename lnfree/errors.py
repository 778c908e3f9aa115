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

HYDRA_FILES = (".hydra",)  # what Hydra writes into a job's dir before lnfree's code runs
_STARTED = time.time()  # imported before Hydra makes the job's dir


class UserError(ValueError):
    pass


class ExportError(UserError):
    """An export that cannot be written (sites still real, a dtype that cannot hold it, a failed check)."""


@contextlib.contextmanager
def user_errors_as_messages():
    """Around a Hydra entry point: a UserError ends the command with its message and exit status 2, no traceback,
    and without the job dir Hydra made for it; any other error keeps its traceback."""
    try:
        yield
    except UserError as e:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            _remove_unused_dir(Path(HydraConfig.get().runtime.output_dir))
        print(f"[lnfree] {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def _remove_unused_dir(out: Path) -> None:
    """Remove the job dir Hydra created for a run that never started: new since this process started and
    holding nothing but Hydra's own files."""
    if not out.is_dir() or out.stat().st_mtime < _STARTED - 1:
        return
    if any(p.name not in HYDRA_FILES for p in out.iterdir()):
        return
    shutil.rmtree(out, ignore_errors=True)
