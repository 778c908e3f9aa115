"""A training progress bar in optimizer steps: step/max_steps, ETA, tokens/s and how many sites are removed.

Lightning's bar counts batches per epoch; lnfree's runs are step-limited streams (max_epochs=-1), for which it
shows "Epoch 0/-2" and a per-epoch batch count that never ends. This bar counts trainer.global_step against
trainer.max_steps from the start (a resumed run starts where it left off), so tqdm's ETA means the run's end.
Validation has no bar of its own (a second bar broke the first one's line in logs); its CE shows in this one.
"""

from __future__ import annotations

import math
import time

from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm


def progress_fields(trainer, pl_module, throughput=None) -> dict:
    """What the bar and the plain lines show: train and validation CE, tokens/s, sites removed."""
    out = {}
    metrics = trainer.progress_bar_metrics
    for k in ("train/ce", "val/ce"):
        if k in metrics:
            out[k.replace("/", " ")] = f"{float(metrics[k]):.3f}"
    tps = throughput.tokens_per_s if throughput is not None else None
    if tps:
        out["tok/s"] = f"{tps:,.0f}"
    model = getattr(pl_module, "model", None)
    if model is not None and hasattr(model, "sites"):
        out["removed"] = f"{len(model.removed_sites())}/{len(model.sites())}"
    return out


class StepProgressBar(TQDMProgressBar):
    def __init__(self, throughput=None, refresh_rate: int = 1):
        super().__init__(refresh_rate=refresh_rate)
        self.throughput = throughput  # callbacks.Throughput, for tokens/s

    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)
        self._start(trainer)

    def init_validation_tqdm(self):
        return Tqdm(disable=True)

    def on_train_epoch_start(self, trainer, *_):  # one bar for the whole run, not one per epoch
        if self.train_progress_bar.total != trainer.max_steps:
            self._start(trainer)

    def _start(self, trainer):
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps)
        bar.initial = 0
        bar.n = trainer.global_step
        bar.set_description("train (steps)")
        bar.refresh()

    def postfix(self, trainer, pl_module) -> dict:
        return progress_fields(trainer, pl_module, self.throughput)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        bar = self._train_progress_bar
        if bar is None or bar.disable or trainer.global_step == bar.n:
            return  # mid gradient accumulation: the optimizer has not stepped
        bar.n = trainer.global_step
        bar.set_postfix(self.postfix(trainer, pl_module), refresh=False)
        bar.refresh()

    def on_train_epoch_end(self, trainer, pl_module):
        pass  # the bar lives until the run ends

    def on_validation_end(self, trainer, pl_module):
        super().on_validation_end(trainer, pl_module)
        bar = self._train_progress_bar  # None in a validation before training
        if bar is not None and not bar.disable and trainer.state.fn == "fit":
            bar.set_postfix(self.postfix(trainer, pl_module))



class StepLines(Callback):
    """With progress bars off (trainer.progress_bar=false: logs, batch jobs): one plain line at least every 10%
    of the run's steps (and at its last), with the bar's fields, so that a long run is never silent."""

    def __init__(self, throughput=None, every_fraction: float = 0.1):
        self.throughput, self.every_fraction = throughput, every_fraction
        self._printed, self._t0 = None, None

    def on_train_start(self, trainer, pl_module):
        self._t0, self._printed = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step, total = trainer.global_step, trainer.max_steps
        every = max(1, math.ceil(total * self.every_fraction))
        if step == self._printed or (step % every and step != total):
            return  # mid gradient accumulation, or between two lines
        self._printed = step
        fields = ", ".join(f"{k} {v}" for k, v in progress_fields(trainer, pl_module, self.throughput).items())
        elapsed = time.perf_counter() - self._t0
        print(f"[lnfree] progress: step {step}/{total} ({100 * step / total:.0f}%), {elapsed:.0f} s"
              + (f": {fields}" if fields else ""), flush=True)
