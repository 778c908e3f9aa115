"""Where things live: the one definition of each path the package and its entry points use."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
CONF_DIR = PACKAGE_DIR.parent / "conf"  # the Hydra configs (train.yaml, eval.yaml, pretrain.yaml and the groups)
SHIPPED_DIR = PACKAGE_DIR / "pretrained"  # built-in models that ship with lnfree
DEFAULT_CACHE_DIR = "~/.cache/lnfree"  # built-in models pretrained on this machine: <cache>/models/<name>
RUN_SUMMARY = "summary.json"  # what marks a training run's output dir
