"""The LN-removal callback: folds the std statistics in once per optimizer step and applies due events.

An event is applied as soon as the optimizer step count reaches its step (`event.step <= global_step`)
and it has not been applied yet, so resuming, gradient accumulation or a skipped step can never miss or
double an event. Whether an event is applied is read from the model's own state (a removed site), which is
restored from the checkpoint together with the weights; the callback's log of applied events (with the
frozen sigmas) is checkpointed too.

Two optional methods (docs/removal_methods.md) change how events act, never which they are:
- soft removal (ramp_steps > 0): an event starts a ramp (sigma frozen, the site divides by
  (1 - alpha) * std + alpha * sigma) and the site is removed ramp_steps later; alpha is a function of the step count
  and of the event's step in the checkpointed log, set again at every step (so also right after a resume);
- adaptive (training.adaptive): after the first group, a group of events fires when the training CE has recovered
  (or after a maximum gap), not at its planned step; its state is checkpointed with this callback.
Each record keeps the planned `step` and the step it was `applied_at`; with ramps also the step the site was
`removed_at`, with an adaptive schedule `why` its group fired ("planned", "recovered" or "max_gap").
"""

from __future__ import annotations

import time

import lightning as L
import torch
import torch.distributed as dist

from ..model import NORM_KINDS
from ..schedule import Event, event_groups, ramp_alpha
from .adaptive import AdaptiveTrigger
from .console import announce


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: torch.Tensor):
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


class RankDisagreement(RuntimeError):
    pass


def check_ranks_agree(model, step: int) -> bool:
    """At an event step, every rank must hold the same removed sites with the same frozen sigmas (they come from
    all-reduced statistics). Gathers one fixed-size vector per rank (sigma of every site, NaN while real) and
    raises if any rank differs. Called only at event steps, which every rank reaches at the same step (events
    follow the optimizer step count); a rank that did not would show up here as a collective timeout."""
    if not is_distributed():
        return False
    sites = model.sites()
    mine = torch.tensor([float(s.sigma[0]) if s.is_removed else float("nan") for s in sites.values()],
                        dtype=torch.float64, device=next(model.parameters()).device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    for rank, theirs in enumerate(every):
        if not torch.allclose(theirs, mine, rtol=0.0, atol=0.0, equal_nan=True):  # exactly equal, NaN == NaN
            raise RankDisagreement(f"step {step}: rank {rank} has sigmas {theirs.tolist()}, rank "
                                   f"{dist.get_rank()} has {mine.tolist()} (sites {list(sites)})")
    return True


def event_site(model, e: Event) -> tuple[str, str]:
    """(site name, kind) of an event as the model's family names them (GPT-2: ln2.3, ln2; Llama: pre_mlp.3,
    pre_mlp), so that GPT-2's summaries and checkpoints read as before; a special event's own (bos.0, bos)."""
    if e.kind not in NORM_KINDS:
        return e.name, e.kind
    return model.site_name(e.kind, e.block), model.family.site_names[e.kind]


class LNRemovalCallback(L.Callback):
    def __init__(self, events: list[Event], momentum: float, ramp_steps: int = 0, ramp_shape: str = "linear",
                 adaptive: dict | None = None):  # conf/schedule: momentum, ramp.*, adaptive.* (None: off)
        self.events = list(events)
        self.momentum = momentum
        self.ramp_steps, self.ramp_shape = ramp_steps, ramp_shape
        self.groups = event_groups(self.events)
        self.trigger = AdaptiveTrigger(**adaptive) if adaptive else None
        # {"step", "applied_at", "site", "kind", "block", "sigma"}, + "removed_at" with ramps, "why" when adaptive
        self.applied: list[dict] = []
        self.rank_checks = 0  # event steps at which every rank was checked to hold the same sigmas
        self._last_step = None
        self._ce = [0.0, 0]  # adaptive: this optimizer step's summed micro-batch CE (a device tensor) and count

    @staticmethod
    def _model(pl_module):
        return pl_module.model

    def _is_applied(self, model, e: Event) -> bool:  # e.kind: a norm kind (any family's) or special
        if e.kind in NORM_KINDS:
            site = model.site(e.kind, e.block)
            return site.is_removed or site.is_ramping
        return any(a["site"] == e.name for a in self.applied)

    def _due(self, model, step: int) -> tuple[list[Event], str | None]:
        """(the events to apply at `step`, why: None for planned steps, else the adaptive trigger's reason)."""
        if self.trigger is None:
            return [e for e in self.events if e.step <= step and not self._is_applied(model, e)], None
        pending = [g for g in self.groups if not all(self._is_applied(model, e) for e in g)]
        if not pending:
            return [], None
        if self.trigger.last_fired is None:  # the first group: its planned step
            return ([e for e in pending[0] if not self._is_applied(model, e)] if pending[0][0].step <= step
                    else []), "planned"
        why = self.trigger.due(step)
        return ([e for e in pending[0] if not self._is_applied(model, e)] if why else []), why

    def _advance_ramps(self, model, step: int) -> list[dict]:
        """Set every ramping site's alpha for the coming step; remove those whose ramp has ended. Returns the
        records of the sites removed now."""
        sites, done = model.sites(), []
        for rec in self.applied:
            site = sites.get(rec["site"])
            if site is None or not site.is_ramping:
                continue
            if step - rec["applied_at"] >= self.ramp_steps:
                site.finish_ramp()
                rec["removed_at"] = step
                done.append(rec)
            else:
                site.set_alpha(ramp_alpha(self.ramp_shape, step - rec["applied_at"], self.ramp_steps))
        return done

    def apply_due(self, trainer, pl_module) -> list[dict]:
        model, step, new = self._model(pl_module), trainer.global_step, []
        finished = self._advance_ramps(model, step)
        due, why = self._due(model, step)
        for e in due:
            if e.kind in NORM_KINDS:
                ramp = self.ramp_steps > 0
                sigma = model.start_ramp(e.kind, e.block) if ramp else model.remove(e.kind, e.block)
            else:
                model.end_special(e.kind, e.block)
                sigma, ramp = None, False
            name, kind = event_site(model, e)
            rec = {"step": e.step, "applied_at": step, "site": name, "kind": kind, "block": e.block, "sigma": sigma}
            if self.ramp_steps > 0:  # a ramped site is removed ramp_steps later (_advance_ramps)
                rec["removed_at"] = None if ramp else step
            if self.trigger is not None:
                rec["why"] = why
            self.applied.append(rec)
            new.append(rec)
        if due and self.trigger is not None:
            self.trigger.fired(step)
        if new or finished:
            self.rank_checks += check_ranks_agree(model, step)
            n_removed = len(model.removed_sites())
            metrics = {f"lnfree/sigma/{r['site']}": r["sigma"] for r in new if r["sigma"] is not None}
            metrics["lnfree/n_removed"] = n_removed
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
            started = [r["site"] for r in new if r.get("removed_at", step) is None]
            gone = [r["site"] for r in new if r.get("removed_at", step) is not None] + [r["site"] for r in finished]
            words = ([f"removed {', '.join(gone)}"] if gone else []) + (
                [f"started the {self.ramp_steps}-step ramp of {', '.join(started)}"] if started else [])
            because = f" (adaptive: {why})" if new and self.trigger is not None else ""
            announce(f"[lnfree] step {step}: {'; '.join(words)}{because} "
                     f"({n_removed}/{len(model.sites())} sites removed)")
        return new

    def _observe_ce(self, outputs) -> None:
        """Adaptive: add this micro-batch's training CE to the step's sum (on device: no host sync here)."""
        if self.trigger is None or not isinstance(outputs, dict) or "ce" not in outputs:
            return
        self._ce[0] = self._ce[0] + outputs["ce"].detach().float()
        self._ce[1] += 1

    def _commit_ce(self, model) -> None:
        """Adaptive, at an optimizer step: the step's CE, averaged over its micro-batches and over ranks (one
        all-reduce and one host sync per step, only while groups remain), goes to the trigger."""
        total, count = self._ce
        self._ce = [0.0, 0]
        if self.trigger is None or not count or all(self._is_applied(model, e) for e in self.events):
            return
        t = torch.stack([total.double(), torch.tensor(float(count), dtype=torch.float64, device=total.device)])
        all_reduce_sum(t)
        self.trigger.observe(float(t[0] / t[1]))

    def on_train_start(self, trainer, pl_module):
        model = self._model(pl_module)
        dm = trainer.datamodule
        # initial std estimates from a calibration batch, unless restored from a checkpoint
        if dm is not None and any(torch.isnan(s.running[0]) for s in model.sites().values()):
            batch = dm.calibration_batch().to(pl_module.device)
            model.calibrate(batch)
            for s in model.sites().values():  # same start on every rank
                all_reduce_sum(s.running)
                if trainer.world_size > 1:
                    s.running /= trainer.world_size
        self._last_step = trainer.global_step
        self.apply_due(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._observe_ce(outputs)
        if trainer.global_step == self._last_step:
            return  # inside a gradient-accumulation window: the optimizer has not stepped
        self._last_step = trainer.global_step
        self._model(pl_module).commit_norm_stats(self.momentum, all_reduce=all_reduce_sum)
        self._commit_ce(self._model(pl_module))
        self.apply_due(trainer, pl_module)

    def state_dict(self):
        state = {"applied": self.applied}
        if self.trigger is not None:
            state["adaptive"] = self.trigger.state_dict()
        return state

    def load_state_dict(self, state):
        self.applied = list(state.get("applied", []))
        if self.trigger is not None and "adaptive" in state:
            self.trigger.load_state_dict(state["adaptive"])


class Throughput(L.Callback):
    """Training tokens/s over optimizer steps, skipping the first `skip` (start-up, allocator warm-up) and
    excluding validation time; logged as perf/tokens_per_s and kept for summary.json."""

    def __init__(self, tokens_per_step: int, skip: int = 3):
        self.tokens_per_step, self.skip = tokens_per_step, skip
        self.seconds, self.steps, self._t, self._last = 0.0, 0, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._t is None:
            self._t, self._last = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self._last:
            return
        now = time.perf_counter()  # no device sync: over many steps the queue is in steady state
        if trainer.global_step > self.skip:
            self.seconds += now - self._t
            self.steps += trainer.global_step - self._last
        self._t, self._last = now, trainer.global_step
        if self.steps:
            pl_module.log("perf/tokens_per_s", self.tokens_per_s)

    def on_validation_start(self, trainer, pl_module):
        self._t = None  # validation time is not training time

    @property
    def tokens_per_s(self) -> float | None:
        return self.steps * self.tokens_per_step / self.seconds if self.seconds else None
