"""A Hydra callback: the dir a run (or a sweep) writes into can be made and written, checked before Hydra makes it.

Hydra creates the job's dir before any of lnfree's code runs, so a dir that cannot be made (a parent that is a
file, a read-only or special filesystem, no permission) would end in Hydra's traceback. `on_run_start` and
`on_multirun_start` run before that: such a dir is refused here with one line and exit status 2, as every other
user error is (lnfree.errors.user_errors_as_messages).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

SPECIAL = (Path("/proc"), Path("/sys"))  # kernel filesystems: no run dir can be made in them


def unwritable(d: str | Path) -> str | None:
    """Why `d` cannot be made or written into, or None. Nothing is created: the nearest existing ancestor must be a
    directory this process may write into (os.access also reports a read-only filesystem)."""
    p = Path(d).expanduser().absolute()
    existing = next(q for q in (p, *p.parents) if q.exists())
    if not existing.is_dir():
        return f"{existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"no permission to write into {existing} (or a read-only filesystem)"
    real = existing.resolve()
    if existing != p and any(q in SPECIAL for q in (real, *real.parents)):  # root may "write" there; mkdir fails
        return f"{existing} is on a kernel filesystem ({next(q for q in SPECIAL if q in (real, *real.parents))})"
    return None


def _refuse_unwritable(*dirs) -> None:
    for d in dirs:
        why = unwritable(d) if d else None
        if why:
            print(f"[lnfree] RunDirError: cannot write the run dir {d}: {why}; choose another (hydra.run.dir=..., "
                  "or hydra.sweep.dir=... for a multirun)", file=sys.stderr, flush=True)
            raise SystemExit(2)


def _plain(config, key: str):
    """config's `key` when it is given as a path, not an interpolation (paths.output_dir names the job's dir)."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(config, parent, throw_on_missing=False) if parent else config
    if node is None or leaf not in node or OmegaConf.is_interpolation(node, leaf):
        return None
    value = node[leaf]
    return None if value is None else str(value)


class WritableRunDir(Callback):
    def on_run_start(self, config, **kwargs) -> None:
        _refuse_unwritable(config.hydra.run.dir, _plain(config, "paths.output_dir"))

    def on_multirun_start(self, config, **kwargs) -> None:
        _refuse_unwritable(config.hydra.sweep.dir)
