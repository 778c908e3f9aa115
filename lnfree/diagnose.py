"""Where a forward turns non-finite, reported as a result rather than a crash.

A model with massive activations (a few residual dimensions hundreds of times larger than the rest, as in models
trained long on broad text) can overflow once its norms are frozen: the division by a live std that kept each
block's input bounded is gone, and a residual that grows block by block ends in inf and then NaN logits. Two
questions matter then, and these functions answer them on one batch of token ids:

    locate_nonfinite(model, ids)         # this forward: the first block whose output is non-finite, the positions
                                         # and tokens whose logits are, and each block's largest |residual|
    first_nonfinite_removal(model, ids)  # freezing the real sites one at a time in removal order: the first whose
                                         # removal makes the logits non-finite (the model is left so; pass a copy)

`python -m lnfree.training.remove_now` uses them when removing every norm at once gives non-finite logits, the
divergence guard names the sites removed last, and the exports say "non-finite logits" instead of a NaN error.
"""

from __future__ import annotations

import torch

from .families import family

MAX_LISTED = 8  # positions listed in a report; the count is always exact


@torch.no_grad()
def locate_nonfinite(model, input_ids: torch.Tensor) -> dict | None:
    """None when the logits of `input_ids` [batch, seq] are all finite; else where they are not: `block` (the first
    block whose output holds a non-finite value, None when every block's output is finite), `positions`
    ([row, position] of the first MAX_LISTED non-finite logit rows), `tokens` (their input token ids),
    `n_nonfinite` (how many), and `max_abs_residual` (the largest finite |value| after each block, in order; None
    for a block whose output holds no finite value)."""
    blocks = family(model.config).blocks(model)
    outputs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: outputs.append(out[0] if isinstance(out, tuple) else out))
             for b in blocks]
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=input_ids, use_cache=False).logits
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    bad = ~torch.isfinite(logits).all(dim=-1)  # [batch, seq]
    if not bool(bad.any()):
        return None
    first_block = next((i for i, o in enumerate(outputs) if not bool(torch.isfinite(o).all())), None)
    where = bad.nonzero().tolist()
    return {"block": first_block, "n_nonfinite": len(where), "positions": where[:MAX_LISTED],
            "tokens": [int(input_ids[r, t]) for r, t in where[:MAX_LISTED]],
            "max_abs_residual": [_finite_max_abs(o) for o in outputs]}


def _finite_max_abs(x: torch.Tensor) -> float | None:
    """The largest finite |value| of x; None when nothing in it is finite."""
    finite = x[torch.isfinite(x)]
    return float(finite.float().abs().max()) if finite.numel() else None


@torch.no_grad()
def first_nonfinite_removal(model, input_ids: torch.Tensor, order: list[str] | None = None) -> dict:
    """Freeze the model's real sites one at a time (removal order, or `order`: site names), a forward after each;
    stops at the first removal after which the logits are non-finite. Returns {"site": that site or None,
    "removed": how many sites were frozen, "report": locate_nonfinite's report or None}. Sites need their std
    estimates (calibrate first); the model is left with the frozen sites frozen."""
    from .model import parse_site_name

    report = locate_nonfinite(model, input_ids)
    if report is not None:  # non-finite before any removal: no site to blame
        return {"site": None, "removed": 0, "report": report}
    names = order if order is not None else model.real_sites()
    for i, name in enumerate(names, 1):
        model.remove(*parse_site_name(name))
        report = locate_nonfinite(model, input_ids)
        if report is not None:
            return {"site": name, "removed": i, "report": report}
    return {"site": None, "removed": len(names), "report": None}


def describe(report: dict) -> str:
    """One line for a locate_nonfinite report."""
    where = f"first at the output of block {report['block']}" if report["block"] is not None else \
        "every block's output finite (the final norm or the unembedding overflows)"
    peak = max((v for v in report["max_abs_residual"] if v is not None), default=float("nan"))
    return (f"non-finite logits at {report['n_nonfinite']} positions ({where}; positions [row, pos] "
            f"{report['positions']}, tokens {report['tokens']}; largest finite |residual| {peak:.3g})")
