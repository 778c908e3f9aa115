"""Runs that cannot silently go wrong: the divergence guard, safe checkpoint files, the output-dir policy, the
resume check and the resume command.

Why each piece exists (a GPT-2 XL removal run costs hours of several GPUs):
- DivergenceGuard stops a run whose loss is non-finite or above `trainer.max_loss` within one optimizer step,
  naming the step and the last good checkpoint, instead of training on garbage to the end.
- SafeCheckpointIO writes every checkpoint to a temporary file and renames it into place (a crash or a full
  disk never leaves a truncated checkpoint), refuses to write one whose parameters are non-finite (so none
  becomes last.ckpt), and reads with weights_only=True (no pickled code).
- check_output_dir: a run never writes into a directory holding another run unless it resumes that run or
  `overwrite=true` is given.
- check_resume: a checkpoint given as ckpt_path is opened and compared with the config (model shape, tokens
  per step, schedule) before any data or weights are read.
- acquire_run_lock: one run per output dir. Two runs started together on one dir would both pass the output-dir
  check and write into one checkpoints/; the lock file is created atomically (O_CREAT | O_EXCL) and names its
  holder (pid, host), so the second is refused, and a lock left by a killed run is reported, never taken over.
- remove_leftovers: a run killed while writing leaves .export.tmp/ or .<name>.ckpt.tmp-<pid>; the next run of
  the dir (holding the lock, so no other run is writing them) removes them.
- guarded_run: whatever way train() ends, its lock is released; a signal ends it with the exit code a process
  killed by that signal has (SIGTERM 143, SIGINT 130), after the on-exception checkpoint, never with 0.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from ..data.streams import DATA_FAULTS
from ..errors import UserError
from ..families import family
from ..io import CKPT_MODEL_CONFIG, EXPORT_TMP, RUN_INFO, TEMPORARY, raise_storage_error, read_checkpoint
from ..paths import RUN_SUMMARY
from ..schedule import canonical_event_name
from .loggers import CSV_DIR

CKPT_TMP = ".{name}.tmp-{pid}"  # a checkpoint being written (renamed into place when whole)
LOCK_FILE = ".lnfree.lock"  # in the output dir while a run uses it: {"pid", "host", "started", "command"}
RUN_FILES = (RUN_SUMMARY, "checkpoints", "export", CSV_DIR, DATA_FAULTS, "wandb")  # what a run writes
SITE_STATE = (".running", ".sigma")  # site buffers that are NaN by design (no estimate yet / still real)


class DivergenceError(FloatingPointError):
    pass


class RunDirError(UserError):
    pass


class ResumeError(UserError):
    pass


# -- checkpoint files ------------------------------------------------------------------------------------
def non_finite_entries(state_dict: dict) -> list[str]:
    return [k for k, v in state_dict.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
            and not k.endswith(SITE_STATE) and not bool(torch.isfinite(v).all())]


class SafeCheckpointIO(TorchCheckpointIO):
    """Atomic (temporary file + rename), finite-only checkpoint writes; weights_only reads."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        bad = non_finite_entries(checkpoint.get("state_dict", {}))
        if bad:
            raise DivergenceError(f"refusing to write checkpoint {path}: non-finite values in {bad[:3]}"
                                  f"{' and more' if len(bad) > 3 else ''} (the run has diverged)")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(CKPT_TMP.format(name=path.name, pid=os.getpid()))
        try:
            with open(tmp, "wb") as f:  # a Python file: a full disk surfaces as its OSError (errno), not only as
                torch.save(checkpoint, f)  # torch's "unexpected pos" RuntimeError
            os.replace(tmp, path)  # atomic on one filesystem: the old file or the new one, never half of one
        except Exception as e:
            raise_storage_error(e, f"checkpoint {path}")
            raise
        finally:
            tmp.unlink(missing_ok=True)

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return read_checkpoint(path)


def last_good_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest periodic checkpoint (on-exception ones are excluded: they may hold the failure's state)."""
    found = [p for p in Path(ckpt_dir).glob("step*.ckpt")]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


# -- divergence guard ------------------------------------------------------------------------------------
class DivergenceGuard(L.Callback):
    """Stop within one optimizer step of a non-finite loss or a CE above `max_loss`.

    The test runs on device for every micro-batch (no host sync); the flag is read once per optimizer step."""

    def __init__(self, max_loss: float | None, ckpt_dir: Path):
        self.max_loss, self.ckpt_dir = max_loss, Path(ckpt_dir)
        self._bad, self._worst, self._last_step = None, None, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss, ce = outputs["loss"].detach(), outputs["ce"].detach()
        bad = ~torch.isfinite(loss)
        if self.max_loss is not None:
            bad = bad | (ce > self.max_loss)
        self._bad = bad if self._bad is None else self._bad | bad
        self._worst = ce if self._worst is None else torch.maximum(self._worst, ce.nan_to_num(float("inf")))
        if trainer.global_step == self._last_step:
            return  # inside a gradient-accumulation window
        self._last_step = trainer.global_step
        if bool(self._bad):  # one host sync per optimizer step
            good, worst = last_good_checkpoint(self.ckpt_dir), float(self._worst)
            why = (f"cross-entropy {worst:.4g} > trainer.max_loss={self.max_loss}" if worst < float("inf")
                   else "a non-finite loss")
            then = f"resume from {good}" if good else "start again (no checkpoint was written before it)"
            raise DivergenceError(f"training diverged at step {trainer.global_step}: {why}; stopped. Last good "
                                  f"checkpoint: {good or 'none'}. Lower optim.lr (or raise trainer.max_loss) and "
                                  f"{then}")
        self._bad = self._worst = None


# -- output dir and resume -------------------------------------------------------------------------------
def check_output_dir(out: Path, ckpt_path: str | None, overwrite: bool) -> None:
    """Refuse a directory that holds another run, unless resuming from a checkpoint inside it, or overwrite."""
    used = [name for name in RUN_FILES if (out / name).exists()]
    if not used:
        return
    resuming_here = ckpt_path is not None and out.resolve() in Path(ckpt_path).resolve().parents
    if resuming_here:
        return
    if not overwrite:
        raise RunDirError(f"{out} already holds a run ({', '.join(used)}); resume it with "
                          f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}, choose another hydra.run.dir, or pass "
                          "overwrite=true to replace it")
    for name in used:  # overwrite: the old run goes, so that the directory never mixes two runs
        p = out / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    rank_zero_info(f"[lnfree] overwrite=true: removed the previous run's {', '.join(used)} from {out}")


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


def check_resume(ckpt_path: str, model_config, tokens_per_step: int, events) -> dict:
    """Open the checkpoint (weights_only) and compare it with the config before any compute."""
    if TEMPORARY.match(Path(ckpt_path).name):
        raise ResumeError(f"ckpt_path {ckpt_path} is a temporary name (a checkpoint being written, or left "
                          "half-written by a killed run): resume from a finished checkpoint (step*.ckpt, last.ckpt)")
    ckpt = read_checkpoint(ckpt_path)
    if CKPT_MODEL_CONFIG not in ckpt:
        raise ResumeError(f"ckpt_path {ckpt_path} is not an lnfree training checkpoint")
    saved = ckpt[CKPT_MODEL_CONFIG]
    fields = ("model_type", *family(model_config).shape_fields)
    diffs = [f"model.{k}: checkpoint {saved.get(k)} vs config {getattr(model_config, k)}"
             for k in fields if saved.get(k) != getattr(model_config, k)]
    info = ckpt.get(RUN_INFO, {})
    if info.get("tokens_per_step") not in (None, tokens_per_step):
        diffs.append(f"tokens per step: checkpoint {info['tokens_per_step']} vs config {tokens_per_step} "
                     "(micro-batch x block size x devices x accumulation)")
    planned = [[e.name, e.step] for e in events]  # generic names; a checkpoint's may be GPT-2's (ln2.0, lnf)
    if info.get("events") is not None and [[canonical_event_name(n), s] for n, s in info["events"]] != planned:
        diffs.append(f"removal schedule: checkpoint {info['events']} vs config {planned}")
    if diffs:
        raise ResumeError(f"ckpt_path {ckpt_path} does not match this config; nothing was run:\n  "
                          + "\n  ".join(diffs))
    return ckpt


class CheckpointOnException(L.Callback):
    """Nothing lost on a crash or Ctrl-C, and nothing destroyed: save `on_exception_step<N>.ckpt` (named by
    step, so never the checkpoint being resumed from), but only if an optimizer step ran since the start or the
    restore and the state is finite; then print the exact resume command. Lightning exits on Ctrl-C right after
    the on_exception hooks, so the command is printed here. A failed save never hides the original error."""

    def __init__(self, ckpt_dir: Path, out: Path, resume_from: str | None):
        self.ckpt_dir, self.out, self.resume_from = Path(ckpt_dir), Path(out), resume_from
        self.start_step = None

    def on_train_start(self, trainer, pl_module):
        self.start_step = trainer.global_step  # after a restore: the restored step

    def on_exception(self, trainer, pl_module, exception):
        step = trainer.global_step
        resume = Path(self.resume_from) if self.resume_from else last_good_checkpoint(self.ckpt_dir)
        if isinstance(exception, FloatingPointError):
            why = "the state is not finite"
            resume = last_good_checkpoint(self.ckpt_dir) or resume
        elif self.start_step is None or step == self.start_step:
            why = "no optimizer step ran since the start or the restore"
        else:
            path = self.ckpt_dir / f"on_exception_step{step:06d}.ckpt"
            try:
                # weights_only=False: the full training state, to resume from. Lightning's flag of that name
                # (save weights only), not torch.load's; said explicitly, Lightning no longer logs its default
                trainer.save_checkpoint(path, weights_only=False)
                why, resume = None, path
            except Exception as e:  # noqa: BLE001  (report, then let the original exception propagate)
                why = f"saving it failed ({type(e).__name__}: {e})"
        saved = "" if why is None else f"; no on-exception checkpoint written ({why})"
        msg = f"[lnfree] {type(exception).__name__} at step {step}{saved}."
        if trainer.is_global_zero:
            if resume is not None:
                msg += f"\n[lnfree] resume with:\n  {resume_command(self.out, resume)}"
            print(msg, file=sys.stderr, flush=True)


def resume_command(out: Path, ckpt: Path | str) -> str:
    """The exact command that resumes this run from `ckpt` (the original overrides, plus where and from what)."""
    entry, overrides = ["lnfree.train"], []
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            hc = HydraConfig.get()
            overrides = [o for o in hc.overrides.task
                         if o.split("=", 1)[0].lstrip("+~") not in ("ckpt_path", "hydra.run.dir", "overwrite")]
            # the command that ran: lnfree.train or lnfree.pretrain (Hydra's job name is the script's), and its
            # config when not the script's own (python -m lnfree.pretrain --config-name pretrain_depth)
            if hc.job.name in ("train", "pretrain"):
                entry = [f"lnfree.{hc.job.name}"]
                if hc.job.config_name and hc.job.config_name != hc.job.name:
                    entry += ["--config-name", hc.job.config_name]
    except ImportError:
        pass
    args = [sys.executable.rsplit("/", 1)[-1], "-m", *entry, *overrides, f"hydra.run.dir={out.resolve()}",
            f"ckpt_path={Path(ckpt).resolve()}"]
    return " ".join(shlex.quote(a) for a in args)
