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
- check_resume: a checkpoint given as ckpt_path is opened and compared with the config before any data or weights
  are read: model shape, tokens per step, schedule, every config field that changes results (the checkpoint holds
  its run's config) and every data file (size and content hash, recorded at the start); a change is refused, naming
  the field or file, unless it is one that a resume applies for real (RESUME_APPLIED; recorded with both values
  and the step).
- acquire_run_lock: one run per output dir. Two runs started together on one dir would both pass the output-dir
  check and write into one checkpoints/; the lock file is created atomically (O_CREAT | O_EXCL) and names its
  holder (pid, host), so the second is refused, and a lock left by a killed run is reported, never taken over.
- remove_leftovers: a run killed while writing leaves .export.tmp/ or .<name>.ckpt.tmp-<pid>; the next run of
  the dir (holding the lock, so no other run is writing them) removes them.
- guarded_run: whatever way train() ends, its lock is released; a signal ends it with the exit code a process
  killed by that signal has (SIGTERM 143, SIGINT 130), after the on-exception checkpoint, never with 0.
- write_hydra_files: Hydra's record of the job (.hydra/), written once the run holds its directory, never into a
  directory that a refused run was refused from.
"""

from __future__ import annotations

import functools
import json
import os
import re
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
from ..families import NORM_KINDS, family
from ..io import CKPT_MODEL_CONFIG, EXPORT_TMP, RUN_INFO, TEMPORARY, raise_storage_error, read_checkpoint
from ..paths import RUN_SUMMARY
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
def last_removals(trainer) -> str:
    """", <n> step(s) after removing <sites> at step <s>": the newest removal event of the run's removal callback
    (the usual suspect when a loss turns non-finite; lnfree.diagnose locates the overflow on a batch), or "" when
    none. With ramps (schedule.ramp) a site starts ramping at `applied_at` and is removed at `removed_at` (None
    while it ramps): the newest of those steps names the sites removed and the ramps started there apart."""
    applied = [r for cb in trainer.callbacks for r in getattr(cb, "applied", []) if isinstance(r, dict)]
    if not applied:
        return ""
    removed_at = {r["site"]: r.get("removed_at", r["applied_at"]) for r in applied}  # instant events: no key
    last = max(max(r["applied_at"], removed_at[r["site"]] or 0) for r in applied)
    removed = [r["site"] for r in applied if removed_at[r["site"]] == last]
    ramping = [r["site"] for r in applied if r["applied_at"] == last and removed_at[r["site"]] != last]
    what = ([f"removing {', '.join(removed)}"] if removed else []) + (
        [f"starting the ramp of {', '.join(ramping)}"] if ramping else [])
    return f", {trainer.global_step - last} step(s) after {' and '.join(what)} at step {last}"


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
            why += last_removals(trainer)
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


# -- what a resume may change ----------------------------------------------------------------------------
# top-level keys that do not change what a run computes (where it writes, whether it resumes or pushes)
NOT_RESULTS = ("paths", "ckpt_path", "overwrite", "skip_if_done", "push_to_hub", "hub_private",
               "resume_allow_data_change")
# what a resume may change freely (a key, or a group and all of its keys): how the same computation runs, what is
# measured, logged, kept or exported, and names. Every other field changes results and is compared.
RESUME_FREE = (*NOT_RESULTS, "export", "task_name", "experiment", "logger", "cluster",
               "model.name", "schedule.name", "data.name", "finetune.name", "hardware.name",
               "model.pretrain_steps", "model.pretrain_keep",  # read by lnfree.pretrain (steps: via trainer.max_steps)
               "model.compile", "model.gradient_checkpointing", "hardware.accelerator", "hardware.strategy",
               "hardware.fsdp_activation_checkpointing",
               "trainer.val_every", "trainer.log_every", "trainer.ckpt_every", "trainer.keep_checkpoints",
               "trainer.keep_at_end", "trainer.validate_before", "trainer.progress_bar", "trainer.max_loss",
               "data.on_bad_row")  # a resume skips the row that stopped a `fail` run: it reads what `skip` reads
# what a resume applies for real, recorded with both values and the step: more (or fewer) steps on the same
# learning-rate horizon (optim.decay_steps, or trainer.max_steps when it is null: the steps already run followed it)
RESUME_APPLIED = ("trainer.max_steps", "optim.decay_steps")
DATA_FIELDS = ("data.files", "data.val_files")  # applied too when resume_allow_data_change=true


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _free(key: str) -> bool:
    return any(key == f or key.startswith(f + ".") for f in RESUME_FREE)


def config_changes(saved: dict, config: dict, step: int, allow_data_change: bool = False) -> tuple[list[str], dict]:
    """(the changes a resume refuses, one line each; those it applies, {field: [checkpoint's, resume's]}) between the
    resolved config a checkpoint at optimizer step `step` holds and the resume's."""
    old, new = _flat(saved), _flat(config)
    refused, applied = [], {}
    for key in sorted(old.keys() | new.keys()):
        if (key in old and key in new and old[key] == new[key]) or _free(key):
            continue
        if key in RESUME_APPLIED or (allow_data_change and key in DATA_FIELDS):
            applied[key] = [old.get(key), new.get(key)]
        else:
            refused.append(f"{key}: checkpoint {old.get(key, '(not set)')!r} vs config {new.get(key, '(not set)')!r}")
    if applied.keys() & {"trainer.max_steps", "optim.decay_steps"}:
        horizon = [c.get("optim.decay_steps") or c.get("trainer.max_steps") for c in (old, new)]
        if horizon[0] != horizon[1]:
            refused.append(f"learning-rate horizon (optim.decay_steps, or trainer.max_steps when null): checkpoint "
                           f"{horizon[0]} vs config {horizon[1]}; the steps already run followed the checkpoint's, so "
                           f"to change trainer.max_steps keep optim.decay_steps={horizon[0]}")
        if new.get("trainer.max_steps", 0) <= step:
            refused.append(f"trainer.max_steps={new.get('trainer.max_steps')}: the checkpoint is at step {step} "
                           "already")
    return refused, applied


def data_changes(saved: dict, now: dict) -> list[str]:
    """Each data file (streams.data_identity) that is new, gone or changed since the checkpoint's run started."""
    lines = []
    for name in sorted(saved.keys() | now.keys()):
        a, b = saved.get(name), now.get(name)
        if a == b:
            continue
        if a is None or b is None:
            lines.append(f"{name}: {'not read' if a is None else 'read'} by the checkpoint's run, "
                         f"{'not read' if b is None else 'read'} now")
            continue
        how = [f"{k} {str(a.get(k))[:12]} -> {str(b.get(k))[:12]}" for k in sorted(a.keys() | b.keys())
               if a.get(k) != b.get(k)]
        lines.append(f"{name} changed: {', '.join(how)}")
    return lines


def check_resume(ckpt_path: str, model_config, tokens_per_step: int, events, config: dict | None = None,
                 data_files: dict | None = None, allow_data_change: bool = False) -> list[dict]:
    """Open the checkpoint (weights_only) and compare it with the config (the resolved `config` and the identity
    of its `data_files`, when given) before any compute; returns the run's resumes so far, this one last:
    [{"step", "changed": {field: [checkpoint's, resume's]}}], a changed data file under "data files"."""
    if TEMPORARY.match(Path(ckpt_path).name):
        raise ResumeError(f"ckpt_path {ckpt_path} is a temporary name (a checkpoint being written, or left "
                          "half-written by a killed run): resume from a finished checkpoint (step*.ckpt, last.ckpt)")
    ckpt = read_checkpoint(ckpt_path)
    if CKPT_MODEL_CONFIG not in ckpt:
        raise ResumeError(f"ckpt_path {ckpt_path} is not an lnfree training checkpoint")
    saved = ckpt[CKPT_MODEL_CONFIG]
    fam = family(model_config)
    fields = ("model_type", *fam.shape_fields)
    diffs = [f"model.{k}: checkpoint {saved.get(k)} vs config {getattr(model_config, k)}"
             for k in fields if saved.get(k) != getattr(model_config, k)]
    info = ckpt.get(RUN_INFO, {})
    if info.get("tokens_per_step") not in (None, tokens_per_step):
        diffs.append(f"tokens per step: checkpoint {info['tokens_per_step']} vs config {tokens_per_step} "
                     "(micro-batch x block size x devices x accumulation)")
    # named as the run records them (callbacks.event_site): by the family's site names (GPT-2: ln2.0 ... lnf)
    planned = [[fam.site_name(e.kind, e.block) if e.kind in NORM_KINDS else e.name, e.step] for e in events]
    if info.get("events") is not None and [[n, s] for n, s in info["events"]] != planned:
        diffs.append(f"removal schedule: checkpoint {info['events']} vs config {planned}")
    step, changed = ckpt.get("global_step", 0), {}
    if config is not None and "config" in info:
        refused, changed = config_changes(info["config"], config, step, allow_data_change)
        diffs += refused
    if data_files is not None and "data_files" in info and (moved := data_changes(info["data_files"], data_files)):
        if allow_data_change:
            changed["data files"] = moved
        else:
            diffs += moved + ["(a resume reads the data its run started on; if the change is meant, pass "
                              "resume_allow_data_change=true, and the run records it)"]
    if "config" not in info and config is not None:
        print(f"[lnfree] warning: {ckpt_path} predates checkpoints that hold their run's config and data files: only "
              "the model shape, tokens per step and removal schedule were compared", file=sys.stderr, flush=True)
    if diffs:
        raise ResumeError(f"ckpt_path {ckpt_path} does not match this config; nothing was run (a resume continues "
                          "the checkpoint's run: to change what it computes, start a new run in another "
                          "directory):\n  " + "\n  ".join(diffs))
    return [*info.get("resumes", []), {"step": step, "changed": changed}]


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
    args = [sys.executable.rsplit("/", 1)[-1], "-m", *entry, *overrides,
            f"hydra.run.dir={hydra_value(str(out.resolve()))}", f"ckpt_path={hydra_value(str(Path(ckpt).resolve()))}"]
    return " ".join(shlex.quote(a) for a in args)  # then quoted for the shell


def hydra_value(v: str) -> str:
    """`v` as a Hydra override value that reads back as `v`: plain when Hydra's grammar takes it as it is, else
    single-quoted (a comma would make a sweep, a space, a quote or a non-ASCII letter would not parse), with a
    quote, and a backslash before a quote or at the end, escaped."""
    if re.fullmatch(r"[A-Za-z0-9_/.\-+@~%]+", v):
        return v
    return "'" + re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), v) + "'"
