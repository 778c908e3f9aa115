"""The frozen-LN arm: a model whose every LayerNorm divides by the scale it had on a reference (clean) run.

Each norm computes (x - mean(x)) / s * gamma + beta with s = sqrt(var(x) + eps) of the token it normalises.
Inside `norms_frozen_at(model, ids)`, s is the value it had, token by token, on the forward of `ids` (the clean
prompts), whatever the input now is: every norm becomes affine in its input, and nothing else changes (attention
softmax, GELU). On the clean prompts the model computes exactly what it did before; on the corrupted and patched
runs of activation and attribution patching, the error of AtP that is left is the softmax's and the MLP's.
So the AtP error of the original model minus that of this arm is LayerNorm's share of it, on the same weights.

The scales are per (prompt, position): every forward inside must be of a batch shaped like `ids`
(patching runs the clean and corrupted batches, both [n, t]).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def layer_norms(model) -> list[nn.LayerNorm]:
    """Every nn.LayerNorm of the model, in module order (GPT-2: ln_1, ln_2 of each block, then ln_f)."""
    return [m for m in model.modules() if isinstance(m, nn.LayerNorm)]


@torch.no_grad()
def clean_scales(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per norm, the scale sqrt(var(x) + eps) [n, t, 1] of every token on the forward of `ids`."""
    norms, scales = layer_norms(model), []
    hooks = [m.register_forward_pre_hook(
        lambda m, a: scales.append(torch.sqrt(a[0].var(-1, unbiased=False, keepdim=True) + m.eps))) for m in norms]
    try:
        model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return scales


@contextlib.contextmanager
def norms_frozen_at(model, ids: torch.Tensor):
    """Within: every LayerNorm of `model` divides by its per-token scale on `ids` (see the module docstring)."""
    norms = layer_norms(model)
    if not norms:
        raise ValueError("the model has no nn.LayerNorm to freeze (an LN-free or removable model: use it as it is)")
    scales = clean_scales(model, ids)

    def frozen(m, args, out, s):
        x = args[0]
        if x.shape[:-1] != s.shape[:-1]:
            raise ValueError(f"frozen norms were recorded on a batch {tuple(s.shape[:-1])}, got {tuple(x.shape[:-1])}")
        return (x - x.mean(-1, keepdim=True)) / s * m.weight + m.bias

    hooks = [m.register_forward_hook(lambda m, a, o, s=s: frozen(m, a, o, s)) for m, s in zip(norms, scales)]
    try:
        yield model
    finally:
        for h in hooks:
            h.remove()
