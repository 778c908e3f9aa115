"""A run's checkpoints, and a run that stops before its state is no longer worth keeping: every checkpoint is
whole and finite, a diverged run stops within one optimizer step naming the last good checkpoint, and a crash
leaves an on-exception checkpoint and the exact command that resumes from it.

Why each piece exists (a GPT-2 XL removal run costs hours of several GPUs):
- SafeCheckpointIO writes every checkpoint to a temporary file and renames it into place (a crash or a full
  disk never leaves a truncated checkpoint), refuses to write one whose parameters are non-finite (so none
  becomes last.ckpt), and reads with weights_only=True (no pickled code).
- DivergenceGuard stops a run whose loss is non-finite or above `trainer.max_loss` within one optimizer step,
  naming the step and the last good checkpoint, instead of training on garbage to the end.
- CheckpointOnException: nothing lost on a crash or Ctrl-C, and nothing destroyed (see the class).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ..io import raise_storage_error, read_checkpoint
from .resume import resume_command

CKPT_TMP = ".{name}.tmp-{pid}"  # a checkpoint being written (renamed into place when whole)
SITE_STATE = (".running", ".sigma")  # site buffers that are NaN by design (no estimate yet / still real)


class DivergenceError(FloatingPointError):
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


# -- on a crash ------------------------------------------------------------------------------------------
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
