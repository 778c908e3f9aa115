"""The removal schedule: a pure function from (schedule config, n_layer) to an ordered list of events.

The norm kinds are the site kinds of every family (lnfree.families.NORM_KINDS: pre_mlp, attn_qk, attn_v, final),
whatever a family calls its sites (GPT-2: ln2.i, ...; Family.site_names). Block i of kind k is removed at optimizer
step start_k + i * gap_k (gap 0: all blocks at start_k); final is one event. A start left null follows the
contiguous rule (docs/method.md#the-removal-schedule):
    start_attn_qk = start_pre_mlp + L * gap_pre_mlp,  start_attn_v = start_attn_qk + L * gap_attn_qk,
    start_final = start_attn_v + L * gap_attn_v
so one schedule fits every depth; a kind left out is {start: null, gap: 0}. Optional kinds bos/eot end the
special sigmas over stages 0..L (the L blocks, then the final norm), at start + stage * gap.

`fit_fraction` (optional) rescales the whole event list, keeping its order and proportions, so that the last
event falls at fit_fraction * max_steps: one schedule then fits every budget (data-scaling sweeps).

Three optional methods change how the events act, not which they are (docs/removal_methods.md; all off in
conf/schedule/base.yaml): `ramp` (soft removal over k steps, ramp_alpha), `adaptive` (an event group fires when the
training loss has recovered: lnfree.training.adaptive) and `distill` (a loss term: lnfree.training.module). This
file checks them (method_problems, validate) so that a run that cannot finish its removals is refused before compute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import UserError
from .families import FAMILIES
from .model import NORM_KINDS, SPECIAL_KINDS


class ScheduleError(UserError):
    pass


@dataclass(frozen=True)
class Event:
    step: int
    kind: str  # one of EVENT_KINDS: pre_mlp | attn_qk | attn_v | final | eot | bos
    block: int | None  # None for final

    def __post_init__(self):
        if self.kind not in EVENT_KINDS:
            hint = site_prefix_hint(self.kind)
            raise ScheduleError(f"unknown event kind {self.kind!r}; the kinds are {EVENT_KINDS}"
                                + (f" ({hint})" if hint else ""))

    @property
    def name(self) -> str:
        """The event name (pre_mlp.3, final, bos.0); a model names its site by model.site_name."""
        if self.kind == "final":
            return "final"
        return f"{self.kind}.{self.block}"


def _get(cfg, key, default=None):
    return cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)


EVENT_KINDS = NORM_KINDS + SPECIAL_KINDS  # every kind a schedule may set, in application order within a step
KIND_KEYS = ("start", "gap")  # what each kind's entry sets (training.config.KindSchedule)


def site_prefix_hint(key: str) -> str | None:
    """For the error that refuses an unknown schedule key or event kind: what it means when it is a family's name for
    the sites of a norm kind (GPT-2's ln2 for pre_mlp), which schedules and events do not take; else None."""
    for f in FAMILIES:
        for kind, prefix in f.site_names.items():
            if key == prefix != kind:
                return f"{key} is {f.name}'s name for its {kind} sites; the kind is named {kind}"
    return None


def _entry(schedule, name):
    """The entry under `name`, or None when it sets nothing: absent, null, or both start and gap null (the config
    schema's default for every norm kind: lnfree.training.config.NormKindSchedule)."""
    entry = _get(schedule, name)
    if entry is None:
        return None
    keys = entry.keys() if isinstance(entry, dict) else list(entry)
    return entry if any(_get(entry, k) is not None for k in keys) else None


def kind_entries(schedule) -> dict[str, object]:
    """Each norm kind's entry, None where the schedule sets nothing."""
    return {kind: _entry(schedule, kind) for kind in NORM_KINDS}


def _start_gap(entry) -> tuple[int | None, int]:
    """A norm kind's (start, gap): a null gap is 0."""
    start, gap = _get(entry or {}, "start"), _get(entry or {}, "gap")
    return start, 0 if gap is None else gap


def kind_problems(schedule) -> list[str]:
    """What is wrong in the kinds' entries (unknown keys, a negative gap, a negative start, a special kind's null
    gap), one line each; both build_events and the config's limit check (training.config.check_limits) refuse them."""
    bad = []
    for kind in EVENT_KINDS:
        entry = _entry(schedule, kind)
        if entry is None:
            continue
        unknown = sorted(set(entry.keys() if isinstance(entry, dict) else list(entry)) - set(KIND_KEYS))
        if unknown:
            bad.append(f"{kind} has unknown key(s) {unknown} (known: {list(KIND_KEYS)})")
        start, gap = _start_gap(entry) if kind not in SPECIAL_KINDS else (_get(entry, "start"), _get(entry, "gap", 0))
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
    for kind, k in kind_entries(schedule).items():
        start, gap = _start_gap(k)
        starts[kind] = prev_end if start is None else start
        prev_end = starts[kind] + (1 if kind == "final" else n_layer) * gap
    return starts


def normal_form(schedule: dict) -> dict:
    """A schedule (a plain dict) with each norm kind's entry filled with the defaults, and the first kind's null
    start written as 0 (what the contiguous rule makes it): schedules that plan the same events compare equal
    however much of each entry they spell out (a run dir's saved config, a schedule option)."""
    out = {k: v for k, v in schedule.items() if k not in NORM_KINDS}
    # a method that is off computes nothing: a saved schedule from before the methods existed compares equal
    off = {"ramp": not ramp_steps(schedule), "adaptive": adaptive_settings(schedule) is None,
           "distill": not distill_weight(schedule) and _get(_get(schedule, "distill") or {}, "ce_weight", 1) == 1}
    out = {k: v for k, v in out.items() if not off.get(k, False)}
    for i, (kind, entry) in enumerate(kind_entries(schedule).items()):
        start, gap = _start_gap(entry)
        out[kind] = {"start": 0 if i == 0 and start is None else start, "gap": gap}
    return out


RAMP_SHAPES = ("linear", "cosine")
METHODS = ("ramp", "adaptive", "distill")  # schedule keys of the optional removal methods (training.config)


def ramp_alpha(shape: str, steps_done: int, steps: int) -> float:
    """Weight of the frozen sigma `steps_done` optimizer steps into a ramp of `steps` (0 at its start, 1 at its end:
    the site is then removed). linear: the fraction done; cosine: (1 - cos(pi * fraction)) / 2, flat at both ends."""
    p = min(max(steps_done / steps, 0.0), 1.0)
    if shape == "linear":
        return p
    if shape == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * p))
    raise ScheduleError(f"schedule.ramp.shape={shape!r}; use one of {RAMP_SHAPES}")


def ramp_steps(schedule) -> int:
    """k of the soft removal; 0 (instant) when off, or for a saved schedule from before ramps existed."""
    return int(_get(_get(schedule, "ramp") or {}, "steps", 0) or 0)


def adaptive_settings(schedule) -> dict | None:
    """{tolerance, window, max_gap} of an adaptive schedule, None when it is off (or a saved schedule predates it)."""
    a = _get(schedule, "adaptive")
    if a is None or not _get(a, "enabled", False) or not _get(schedule, "remove", True):
        return None
    return {k: _get(a, k) for k in ("tolerance", "window", "max_gap")}


def distill_weight(schedule) -> float:
    return float(_get(_get(schedule, "distill") or {}, "weight", 0.0) or 0.0)


def method_problems(schedule) -> list[str]:
    """What is wrong in the methods' settings that no single-field limit sees, one line each (check_limits)."""
    bad = []
    ramp = _get(schedule, "ramp")
    if ramp is not None and _get(ramp, "shape", "linear") not in RAMP_SHAPES:
        bad.append(f"ramp.shape={_get(ramp, 'shape')!r} (must be one of {RAMP_SHAPES})")
    a = _get(schedule, "adaptive")
    if a is not None and _get(a, "enabled", False):
        window, max_gap = _get(a, "window"), _get(a, "max_gap")
        if window is not None and max_gap is not None and window > max_gap:
            bad.append(f"adaptive.window={window} exceeds adaptive.max_gap={max_gap} (the window is the least gap)")
    d = _get(schedule, "distill")
    if d is not None and not _get(d, "weight", 0) and not _get(d, "ce_weight", 1):
        bad.append("distill.ce_weight=0 with distill.weight=0 leaves no loss to train on")
    return bad


def event_groups(events: list[Event]) -> list[list[Event]]:
    """Events planned at the same step, in order: what an adaptive schedule fires together."""
    groups: list[list[Event]] = []
    for e in events:
        if groups and groups[-1][0].step == e.step:
            groups[-1].append(e)
        else:
            groups.append([e])
    return groups


def build_events(schedule, n_layer: int, max_steps: int | None = None) -> list[Event]:
    """Every event in application order (by step, then kind in EVENT_KINDS order, then block)."""
    known = {*EVENT_KINDS, "name", "remove", "aux_weight", "momentum", "fit_fraction", *METHODS}
    keys = schedule.keys() if isinstance(schedule, dict) else list(schedule)
    unknown = [k for k in keys if k not in known]
    if unknown:
        hints = [h for k in unknown if (h := site_prefix_hint(k)) is not None]
        raise ScheduleError(f"unknown schedule key(s) {unknown}; the kinds are {EVENT_KINDS}"
                            + "".join(f"; {h}" for h in hints))
    if not _get(schedule, "remove", True):
        return []
    events, entries = [], kind_entries(schedule)
    for kind, start in kind_starts(schedule, n_layer).items():
        gap = _start_gap(entries[kind])[1]
        blocks = [None] if kind == "final" else range(n_layer)
        events += [Event(start + j * gap, kind, b) for j, b in enumerate(blocks)]
    for kind in SPECIAL_KINDS:
        k = _get(schedule, kind)
        if k is None:
            continue
        start, gap = _get(k, "start"), _get(k, "gap", 0)  # kind_problems (in kind_starts) checked their signs
        if start is None:
            raise ScheduleError(f"{kind} needs an explicit start >= 0 and gap >= 0, got {start}/{gap}")
        events += [Event(start + j * gap, kind, j) for j in range(n_layer + 1)]
    order = {k: i for i, k in enumerate(EVENT_KINDS)}
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
    _check_methods_fit(schedule, events, max_steps)
    for kind in SPECIAL_KINDS:  # ending a special sigma before its site is removed would be a no-op
        norm_steps = {e.name: e.step for e in events if e.kind in NORM_KINDS}
        for e in (e for e in events if e.kind == kind):
            sites = ["final"] if e.block == n_layer else [f"{k}.{e.block}" for k in NORM_KINDS[:3]]
            if any(norm_steps[s] > e.step for s in sites):
                raise ScheduleError(f"{kind} event at stage {e.block} (step {e.step}) precedes the removal of {sites}")
    return events


def latest_end(schedule, events: list[Event]) -> int:
    """The latest step at which the last site can become removed: the last event's step, or for an adaptive
    schedule the first group's step plus max_gap per later group (every group waiting its longest), plus the ramp."""
    norm = [e for e in events if e.kind in NORM_KINDS]
    if not norm:
        return 0
    adaptive = adaptive_settings(schedule)
    if adaptive is None:
        last = norm[-1].step
    else:
        groups = event_groups(events)
        last_norm_group = max(i for i, g in enumerate(groups) if any(e.kind in NORM_KINDS for e in g))
        last = groups[0][0].step + last_norm_group * adaptive["max_gap"]
    return last + ramp_steps(schedule)


def _check_methods_fit(schedule, events: list[Event], max_steps: int) -> None:
    """Every site must end removed before max_steps, however long the ramps and the adaptive waits; and the
    special-sigma events (bos/eot) are planned relative to removals, which an adaptive schedule moves."""
    if ramp_steps(schedule) == 0 and adaptive_settings(schedule) is None:
        return
    if adaptive_settings(schedule) is not None and any(e.kind in SPECIAL_KINDS for e in events):
        raise ScheduleError("schedule.adaptive with bos/eot events is not supported: their steps are planned "
                            "relative to the removals, which an adaptive schedule moves")
    end = latest_end(schedule, events)
    if end >= max_steps:
        raise ScheduleError(
            f"with schedule.ramp.steps={ramp_steps(schedule)} and schedule.adaptive "
            f"{'on' if adaptive_settings(schedule) else 'off'}, the last site may only be removed at step {end}, not "
            f"before max_steps={max_steps}: raise trainer.max_steps, or shorten the ramp / adaptive.max_gap")
