"""Count host synchronisations: every `.item()`, `bool(t)`, `float(t)` or `if t:` on a tensor dispatches to
`aten::_local_scalar_dense`, which on a GPU waits for the device. A dispatch mode sees every such call, on
any device, so the check runs on CPU too (used by the tests and `make bench`)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_syncs(fn) -> int:
    with SyncCounter() as c:
        fn()
    return c.count
