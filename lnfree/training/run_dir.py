"""A run's output directory: which run may write into it, one run at a time, what a killed run left in it, and
how a run that holds it ends.

Why each piece exists:
- check_output_dir: a run never writes into a directory holding another run unless it resumes that run or
  `overwrite=true` is given.
- acquire_run_lock: one run per output dir. Two runs started together on one dir would both pass the output-dir
  check and write into one checkpoints/; the lock file is created atomically (O_CREAT | O_EXCL) and names its
  holder (pid, host), so the second is refused, and a lock left by a killed run is reported, never taken over.
- remove_leftovers: a run killed while writing leaves .export.tmp/ or .<name>.ckpt.tmp-<pid>; the next run of
  the dir (holding the lock, so no other run is writing them) removes them.
- write_hydra_files: Hydra's record of the job (.hydra/), written once the run holds its directory, never into a
  directory that a refused run was refused from.
- guarded_run: whatever way train() ends, its lock is released; a signal ends it with the exit code a process
  killed by that signal has (SIGTERM 143, SIGINT 130), after the on-exception checkpoint, never with 0.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info

from ..data.streams import DATA_FAULTS
from ..errors import UserError
from ..paths import RUN_SUMMARY
from ..references import EXPORT_TMP
from .checkpoints import CKPT_TMP
from .loggers import CSV_DIR

LOCK_FILE = ".lnfree.lock"  # in the output dir while a run uses it: {"pid", "host", "started", "command"}
RUN_FILES = (RUN_SUMMARY, "checkpoints", "export", CSV_DIR, DATA_FAULTS, "wandb")  # what a run writes


class RunDirError(UserError):
    pass


# -- which run may use the dir ---------------------------------------------------------------------------
def check_output_dir(out: Path, ckpt_path: str | None, overwrite: bool) -> None:
    """Refuse a directory that holds another run, unless resuming from a checkpoint inside it, or overwrite."""
    used = [name for name in RUN_FILES if (out / name).exists()]
    if not used:
        return
    resuming_here = ckpt_path is not None and out.resolve() in Path(ckpt_path).resolve().parents
    if resuming_here:
        return
    if not overwrite:
        raise RunDirError(f"{out} already holds a run ({', '.join(used)}); " + "; ".join(_ways_forward(out)))
    for name in used:  # overwrite: the old run goes, so that the directory never mixes two runs
        p = out / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    rank_zero_info(f"[lnfree] overwrite=true: removed the previous run's {', '.join(used)} from {out}")


def _ways_forward(out: Path) -> list[str]:
    """What works in a dir that holds a run: return it if it finished (skip_if_done), else resume from a checkpoint
    that is there; another dir, or overwrite."""
    ways = []
    ckpts = sorted((out / "checkpoints").glob("*.ckpt"), key=lambda p: (p.name != "last.ckpt", -p.stat().st_mtime))
    if (out / RUN_SUMMARY).exists():
        ways.append("it finished: skip_if_done=true returns it (same config) without running again")
    elif ckpts:
        ways.append(f"resume it with hydra.run.dir={out} ckpt_path={ckpts[0]}")
    return ways + ["choose another hydra.run.dir", "or pass overwrite=true to replace it"]


# -- one run per directory -------------------------------------------------------------------------------
_held: list[tuple[Path, bool]] = []  # the locks this process holds, in order, and whether it made their dir


def _first_process() -> bool:
    """Whether this is the process that owns the run (global rank 0): under DDP every rank runs train() on the
    same dir, and only one of them may take its lock."""
    return all(int(os.environ.get(k, "0")) == 0 for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK",
                                                          "SLURM_PROCID"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def lock_holder(lock: Path) -> str:
    """Why `lock` keeps a run out: who holds it and whether that process still runs, and how to remove it."""
    out, remove = lock.parent, f"if no run uses {lock.parent}, remove the lock (rm {lock}) and start again"
    try:
        held = json.loads(lock.read_text())
        pid, host = int(held["pid"]), str(held["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return (f"{out} has a lock ({lock}) that names no holder: a run is starting right now, or one was killed "
                f"while starting; {remove}")
    who = f"pid {pid} on host {host} (since {held.get('started', '?')}: {held.get('command', '?')})"
    if host != socket.gethostname():
        return (f"{out} is in use by another run: {who}; that is another machine, so whether it still runs cannot "
                f"be checked from here; wait for it, choose another hydra.run.dir, or, {remove}")
    if _alive(pid):
        return f"{out} is in use by another run: {who}; wait for it to end or choose another hydra.run.dir"
    return (f"{out} has a stale lock: {who} is no longer running (it was killed before it could release the "
            f"lock), so nothing was taken over; {remove}")


def acquire_run_lock(out: Path) -> Path | None:
    """Create `out`/.lnfree.lock atomically, naming this process; a RunDirError naming the holder if it exists.
    The first process of a run only (None elsewhere); released by guarded_run when train() ends."""
    if not _first_process():
        return None
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = out / LOCK_FILE
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:  # (never made here: the lock was in it)
        raise RunDirError(lock_holder(lock)) from None
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "command": " ".join(sys.argv)}, f)
    _held.append((lock, made))
    return lock


def release_run_locks(keep: int = 0) -> None:
    """Remove the locks this process took after its first `keep` ones (only if they still name this process),
    and a dir the lock made that nothing else was written into (a run refused later leaves no empty dir)."""
    while len(_held) > keep:
        lock, made = _held.pop()
        try:
            if json.loads(lock.read_text()).get("pid") == os.getpid():
                lock.unlink()
            if made:
                lock.parent.rmdir()  # only if empty
        except (OSError, ValueError):
            pass


def remove_leftovers(out: Path) -> list[Path]:
    """Remove what a killed run of `out` left half-written (call with the dir's lock held): the export being
    built and checkpoints being written. Returns what was removed."""
    gone = [p for p in [out / EXPORT_TMP, *(out / "checkpoints").glob(CKPT_TMP.format(name="*", pid="*"))]
            if p.exists()]
    for p in gone:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    if gone:
        rank_zero_info(f"[lnfree] removed what an earlier run left half-written in {out}: "
                       f"{', '.join(str(p.relative_to(out)) for p in gone)}")
        ckpts = out / "checkpoints"
        if ckpts.is_dir() and not any(ckpts.iterdir()):
            ckpts.rmdir()  # held nothing else: no run there
    return gone


# -- Hydra's record of the job ---------------------------------------------------------------------------
HYDRA_DIR = ".hydra"  # Hydra's record of the job: config.yaml, hydra.yaml, overrides.yaml


def write_hydra_files(out: Path, cfg) -> None:
    """<out>/.hydra/{config,hydra,overrides}.yaml, as Hydra writes them, once the run holds `out`. Hydra itself
    would write them before the job starts, into whatever directory it is given, even one that another run holds
    or has finished in (the run is then refused, but those files are already overwritten): conf/hydra sets
    hydra.output_subdir=null and the run writes them here instead. Nothing outside a Hydra job."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    if not HydraConfig.initialized():
        return
    d = out / HYDRA_DIR
    d.mkdir(parents=True, exist_ok=True)
    for name, node in (("config.yaml", cfg), ("hydra.yaml", HydraConfig.instance().cfg),
                       ("overrides.yaml", HydraConfig.get().overrides.task)):
        (d / name).write_text(OmegaConf.to_yaml(node))


# -- exit codes ------------------------------------------------------------------------------------------
class RunInterrupted(SystemExit):
    """A run stopped by SIGTERM (exit 143: what SLURM and most schedulers send before killing a job) or SIGINT
    (Ctrl-C, exit 130): 128 + the signal's number, as for a process the signal killed, so that a sweep driver,
    `make` or a shell never reads a pre-empted run as finished."""


def interrupted_by(e: BaseException) -> int | None:
    """The signal that ended a run, from the exception it became: Lightning turns SIGTERM into SIGTERMException
    (a SystemExit with code None, i.e. exit 0) and Ctrl-C into sys.exit(1) while handling KeyboardInterrupt."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    if isinstance(e, SIGTERMException):
        return signal.SIGTERM
    if isinstance(e, KeyboardInterrupt) or (isinstance(e, SystemExit) and isinstance(e.__context__, KeyboardInterrupt)):
        return signal.SIGINT
    return None


def _sigterm_outside_fit(signum, frame):
    """SIGTERM while Lightning's own handler is not installed (data setup, export): stop the same way, so the run
    dir's lock is released and temporary files removed, instead of dying on the spot. Inside trainer.fit Lightning
    installs its handler (which calls this one after its own): then Lightning stops the loop at a safe point."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    if signal.getsignal(signal.SIGTERM) is _sigterm_outside_fit:
        raise SIGTERMException()


def guarded_run(fn):
    """Wrap train(): release the run-dir lock it took, however it ends; turn a signal into RunInterrupted."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        held = len(_held)
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _sigterm_outside_fit) if main else None
        try:
            return fn(*args, **kwargs)
        except BaseException as e:
            sig = None if isinstance(e, RunInterrupted) else interrupted_by(e)
            if sig is None:
                raise
            print(f"[lnfree] stopped by {signal.Signals(sig).name}: exit code {128 + sig} (interrupted, not "
                  "finished)", file=sys.stderr, flush=True)
            raise RunInterrupted(128 + sig) from e
        finally:
            if main:
                signal.signal(signal.SIGTERM, previous)
            release_run_locks(held)

    return run
