"""The removal schedule: a pure function from (schedule config, n_layer) to an ordered list of events.

Block i of kind k is removed at optimizer step start_k + i * gap_k (gap 0: all blocks at start_k); lnf is
one event. A start left null follows the contiguous rule (docs/method.md#the-removal-schedule):
    start_ln1qk = start_ln2 + L * gap_ln2,  start_ln1v = start_ln1qk + L * gap_ln1qk,
    start_lnf = start_ln1v + L * gap_ln1v
so one schedule fits every depth. Optional kinds bos/eot end the special sigmas over stages 0..L
(the L blocks, then the final norm), at start + stage * gap.

`fit_fraction` (optional) rescales the whole event list, keeping its order and proportions, so that the last
event falls at fit_fraction * max_steps: one schedule then fits every budget (data-scaling sweeps).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError
from .model import NORM_KINDS, SPECIAL_KINDS


class ScheduleError(UserError):
    pass


@dataclass(frozen=True)
class Event:
    step: int
    kind: str  # ln2 | ln1qk | ln1v | lnf | bos | eot
    block: int | None  # None for lnf

    @property
    def name(self) -> str:
        if self.kind == "lnf":
            return "lnf"
        return f"{self.kind}.{self.block}"


def _get(cfg, key, default=None):
    return cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)


KINDS = NORM_KINDS + SPECIAL_KINDS  # every removal kind a schedule may set, in application order within a step
KIND_KEYS = ("start", "gap")  # what each kind's entry sets (training.config.KindSchedule)


def kind_problems(schedule) -> list[str]:
    """What is wrong in the kinds' entries (unknown keys, a negative or null gap, a negative start), one line each;
    both build_events and the config's limit check (training.config.check_limits) refuse them."""
    bad = []
    for kind in KINDS:
        entry = _get(schedule, kind)
        if entry is None:
            continue
        unknown = sorted(set(entry.keys() if isinstance(entry, dict) else list(entry)) - set(KIND_KEYS))
        if unknown:
            bad.append(f"{kind} has unknown key(s) {unknown} (known: {list(KIND_KEYS)})")
        start, gap = _get(entry, "start"), _get(entry, "gap", 0)
        if gap is None or gap < 0:
            bad.append(f"{kind}.gap must be >= 0, got {gap}")
        if start is not None and start < 0:
            bad.append(f"{kind}.start must be >= 0, got {start}")
    return bad


def kind_starts(schedule, n_layer: int) -> dict[str, int]:
    """Start step of each norm kind, filling null starts with the contiguous rule."""
    bad = kind_problems(schedule)
    if bad:
        raise ScheduleError("; ".join(bad))
    starts, prev_end = {}, 0
    for kind in NORM_KINDS:
        k = _get(schedule, kind)
        if k is None:
            raise ScheduleError(f"schedule has no entry for {kind!r}")
        start, gap = _get(k, "start"), _get(k, "gap", 0)
        starts[kind] = prev_end if start is None else start
        prev_end = starts[kind] + (1 if kind == "lnf" else n_layer) * gap
    return starts


def build_events(schedule, n_layer: int, max_steps: int | None = None) -> list[Event]:
    """Every event in application order (by step, then kind in KINDS order, then block)."""
    known = set(KINDS) | {"name", "remove", "aux_weight", "momentum", "fit_fraction"}
    keys = schedule.keys() if isinstance(schedule, dict) else list(schedule)
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise ScheduleError(f"unknown schedule kind(s) {unknown}; kinds are {KINDS}")
    if not _get(schedule, "remove", True):
        return []
    events = []
    for kind, start in kind_starts(schedule, n_layer).items():
        gap = _get(_get(schedule, kind), "gap", 0)
        blocks = [None] if kind == "lnf" else range(n_layer)
        events += [Event(start + j * gap, kind, b) for j, b in enumerate(blocks)]
    for kind in SPECIAL_KINDS:
        k = _get(schedule, kind)
        if k is None:
            continue
        start, gap = _get(k, "start"), _get(k, "gap", 0)  # kind_problems (in kind_starts) checked their signs
        if start is None:
            raise ScheduleError(f"{kind} needs an explicit start >= 0 and gap >= 0, got {start}/{gap}")
        events += [Event(start + j * gap, kind, j) for j in range(n_layer + 1)]
    order = {k: i for i, k in enumerate(KINDS)}
    events = sorted(events, key=lambda e: (e.step, order[e.kind], -1 if e.block is None else e.block))
    return _fit(events, _get(schedule, "fit_fraction"), max_steps)


def _fit(events: list[Event], fraction: float | None, max_steps: int | None) -> list[Event]:
    if fraction is None or not events:
        return events
    if not 0 < fraction < 1 or max_steps is None:
        raise ScheduleError(f"fit_fraction must be in (0, 1) and needs max_steps; got {fraction}, {max_steps}")
    last = max(e.step for e in events)
    target = int(fraction * max_steps)
    scale = target / last if last else 0.0
    return [Event(round(e.step * scale), e.kind, e.block) for e in events]  # order kept: scaling is monotone


def special_kinds(schedule) -> dict[str, bool]:
    """Which special sigmas the schedule turns on (derived, so the model and schedule cannot disagree)."""
    on = _get(schedule, "remove", True)
    return {k: bool(on and _get(schedule, k) is not None) for k in SPECIAL_KINDS}


def validate(schedule, n_layer: int, max_steps: int) -> list[Event]:
    """Events, or a ScheduleError if the schedule does not fit the run."""
    events = build_events(schedule, n_layer, max_steps)
    late = [e for e in events if e.step >= max_steps]
    if late:
        raise ScheduleError(
            f"{len(late)} removal event(s) at or after max_steps={max_steps} (first: {late[0].name} at step "
            f"{late[0].step}, last at {late[-1].step}); raise trainer.max_steps or shorten the schedule"
        )
    for kind in SPECIAL_KINDS:  # ending a special sigma before its site is removed would be a no-op
        norm_steps = {e.name: e.step for e in events if e.kind in NORM_KINDS}
        for e in (e for e in events if e.kind == kind):
            sites = ["lnf"] if e.block == n_layer else [f"{k}.{e.block}" for k in NORM_KINDS[:3]]
            if any(norm_steps[s] > e.step for s in sites):
                raise ScheduleError(f"{kind} event at stage {e.block} (step {e.step}) precedes the removal of {sites}")
    return events
