"""Tail averaging: a pretraining's kept weights as the mean of its checkpoints over the last 10% of steps.

Why (the depth family, conf/pretrain_depth.yaml): at the end of a small model's pretraining the weights jitter
from step to step under SGD, and validation CE on the same 65,536 tokens moves by 0.01-0.04 nats between
checkpoints 100 steps apart. A convergence tolerance of 0.003 nats on single checkpoints is then decided by that
jitter. The kept model is the mean of the checkpoints of the last 10% of steps (a uniform average of weights,
as in "latest weight averaging"): no lucky draw is chosen, and the two halves of one window (every other
checkpoint) differ by a few thousandths of a nat, not by hundredths.
Convergence (lnfree/analysis/family.py: window_gain) is judged on the checkpoints' own validation CE, averaged over
each window (the last 10% of steps against the 10% before), not on the averaged weights: averaging gains more where
the learning rate is higher, i.e. in the earlier window, so comparing two windows' averaged weights leans towards
"converged" (criterion 2's flaw, experiments/depth_family/README.md). Both are recorded.

Only floating-point tensors are averaged (weights, and the norm sites' float buffers, which pretraining with
schedule=none leaves at their initial values); others are taken from the window's last checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..io import model_from_checkpoint, read_checkpoint
from ..model import next_token_ce

WINDOW = 0.1  # fraction of the steps in each window
RECORD = "tail_average.json"  # in the run dir, read by lnfree/analysis/family.py


def windows(steps: int, every: int, frac: float = WINDOW, horizon: int | None = None) -> tuple[list[int], list[int]]:
    """Checkpoint steps (one every `every`) in the last window of `steps` and in the window before it; a window is
    `frac` of the cosine horizon (default `steps`), so a pretraining continued past its horizon at the final
    learning rate keeps windows of the recipe's width (e.g. 800 steps for a horizon of 8000)."""
    width = round(frac * (horizon or steps))
    saved = range(every, steps + 1, every)
    last = [s for s in saved if s > steps - width]
    previous = [s for s in saved if steps - 2 * width < s <= steps - width]
    if not last or not previous:
        raise ValueError(f"tail averaging needs checkpoints in the last two {frac:.0%} windows of {steps} steps "
                         f"(one every {every} steps gives none in at least one of them)")
    return last, previous


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step{step:06d}.ckpt"  # train.py's ModelCheckpoint filename


def average_checkpoints(paths: list[Path]):
    """The removable model whose float tensors are the mean of those of the checkpoints at `paths`."""
    total, model = None, None
    for p in paths:
        model = model_from_checkpoint(read_checkpoint(p), p)
        state = model.state_dict()
        if total is None:
            total = {k: v.double().clone() for k, v in state.items() if v.is_floating_point()}
        else:
            for k in total:
                total[k] += state[k].double()
    state = model.state_dict()  # the last checkpoint's: non-float tensors come from it
    model.load_state_dict({**state, **{k: (v / len(paths)).to(state[k].dtype) for k, v in total.items()}})
    return model.eval()


@torch.no_grad()
def validation_ce(model, val_data: torch.Tensor, batch: int) -> float:
    """Mean next-token CE over the validation blocks [n, block] in micro-batches, as training's validation
    logs it (every block has the same number of predicted tokens, so the mean of batch means weighted by size)."""
    total = 0.0
    for i in range(0, len(val_data), batch):
        ids = val_data[i:i + batch]
        out = model(ids)
        total += next_token_ce(out.logits, ids).item() * len(ids)
    return total / len(val_data)


def tail_average(run_dir: Path, steps: int, every: int, val_data: torch.Tensor, batch: int,
                 logged: dict[int, float], horizon: int | None = None):
    """(the last window's averaged model, its record): validation CE of the last window's mean, of the window
    before's mean, of the two halves of the last window (every other checkpoint: how much the mean itself still
    jitters), and the mean over each window of the validation CE logged for its checkpoints (`logged`: optimizer
    step -> CE, training's own validations). Written to <run_dir>/tail_average.json."""
    last, previous = windows(steps, every, horizon=horizon)
    missing = [s for s in last + previous if s not in logged]
    if missing:
        raise ValueError(f"{run_dir}: no logged validation at checkpoint steps {missing}")
    ce = {}
    for key, window in (("previous", previous), ("first_half", last[0::2]), ("second_half", last[1::2])):
        if window:
            ce[key] = validation_ce(average_checkpoints([checkpoint_path(run_dir, s) for s in window]), val_data,
                                    batch)
    kept = average_checkpoints([checkpoint_path(run_dir, s) for s in last])
    record = {"steps": steps, "window": [last[0], last[-1]], "n_checkpoints": len(last),
              "previous_window": [previous[0], previous[-1]], "val_ce": validation_ce(kept, val_data, batch),
              "val_ce_previous": ce["previous"], "val_ce_halves": [ce.get("first_half"), ce.get("second_half")],
              "checkpoints_val_ce": {"last": sum(logged[s] for s in last) / len(last),
                                     "previous": sum(logged[s] for s in previous) / len(previous)}}
    (Path(run_dir) / RECORD).write_text(json.dumps(record, indent=1))
    return kept, record
