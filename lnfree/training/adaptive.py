"""When an adaptive schedule fires its next event group (schedule.adaptive; docs/removal_methods.md).

A fixed schedule waits the same number of steps after every removal, whether the loss needed them or not. An
adaptive one keeps the schedule's order and grouping (events planned at the same step fire together; the first
group at its planned step) and fires each later group at the first step t where either
    t - t_prev >= window  and  smoothed(t) <= (1 + tolerance) * reference        ("recovered"), or
    t - t_prev >= max_gap                                                       ("max_gap"),
with t_prev the step the previous group fired, smoothed(t) the mean training CE of the last `window` optimizer
steps and reference = smoothed(t_prev), the level just before the previous group took effect. Requiring
t - t_prev >= window makes the window hold only losses measured after that removal (a moving average that still
holds pre-removal losses would call a jump "recovered" at once).

The decision is a pure function of the logged per-step CE (train/ce, averaged over gradient-accumulation
micro-batches and over ranks by the caller, so every rank decides the same) and of this object's state, which is
checkpointed with the removal callback: a resumed run fires at the same steps as an uninterrupted one.
"""

from __future__ import annotations


class AdaptiveTrigger:
    def __init__(self, tolerance: float, window: int, max_gap: int):
        self.tolerance, self.window, self.max_gap = tolerance, window, max_gap
        self.recent: list[float] = []  # training CE of the last `window` optimizer steps, oldest first
        self.reference: float | None = None  # smoothed CE just before the previous group fired
        self.last_fired: int | None = None  # step of the previous group

    def observe(self, ce: float) -> None:
        """One optimizer step's training CE (already averaged over micro-batches and ranks)."""
        self.recent = (self.recent + [float(ce)])[-self.window:]

    @property
    def smoothed(self) -> float | None:
        return sum(self.recent) / len(self.recent) if self.recent else None

    def due(self, step: int) -> str | None:
        """Why the next group fires at `step` ("recovered" or "max_gap"), or None. Before any group has fired the
        caller follows the planned step of the first group."""
        if self.last_fired is None:
            return None
        gap = step - self.last_fired
        if gap >= self.max_gap:
            return "max_gap"
        if gap >= self.window and self.reference is not None and self.smoothed <= (1 + self.tolerance) * self.reference:
            return "recovered"
        return None

    def fired(self, step: int) -> None:
        """A group fired at `step`: its pre-removal level becomes the reference (None before any loss was seen:
        then only max_gap can fire the next group)."""
        self.reference, self.last_fired = self.smoothed, step

    def state_dict(self) -> dict:
        return {"recent": list(self.recent), "reference": self.reference, "last_fired": self.last_fired}

    def load_state_dict(self, state: dict) -> None:
        self.recent = list(state["recent"])
        self.reference, self.last_fired = state["reference"], state["last_fired"]
