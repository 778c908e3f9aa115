"""Shared hook plumbing for the analyses: run a forward pass with temporary hooks, always removing them."""

from __future__ import annotations

import torch


@torch.no_grad()
def run_with_hooks(model, ids: torch.Tensor, hooks: list):
    """Eval-mode forward of `ids`; the given hook handles are removed afterwards, even on error."""
    try:
        model.eval()
        return model(ids)
    finally:
        for h in hooks:
            h.remove()
