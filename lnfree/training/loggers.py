"""Loggers: CSV always (local curves for `make eval` figures), plus Weights & Biases when asked.

W&B works online, offline (sync later with `wandb sync <run dir>/wandb/offline-run-*`) and disabled. Online
mode without network makes wandb hang for minutes, so online first checks in 3 s that the W&B host answers
and otherwise falls back to offline with a warning.
"""

from __future__ import annotations

import os
import socket
import time
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn

LOGGER_KINDS = ("wandb", "csv", "none")


def wandb_reachable(timeout: float = 3.0) -> bool:
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def make_loggers(log_cfg, output_dir: str, run_name: str, config: dict, resumed: bool = False):
    """CSV goes to csv/metrics.csv; a resumed run writes csv/resumed-<time>/metrics.csv beside it (Lightning's
    CSV logger would otherwise delete the first part's file)."""
    if log_cfg.kind not in LOGGER_KINDS:
        raise ValueError(f"unknown logger.kind {log_cfg.kind!r}; use one of {LOGGER_KINDS}")
    if log_cfg.kind == "none":
        return []
    version = time.strftime("resumed-%Y%m%d-%H%M%S") if resumed else ""
    loggers = [CSVLogger(save_dir=output_dir, name="csv", version=version)]
    if log_cfg.kind == "wandb":
        mode = log_cfg.mode
        if mode == "online" and not wandb_reachable():
            rank_zero_warn("W&B host unreachable: logging offline; run `wandb sync` on the run dir later")
            mode = "offline"
        loggers.append(WandbLogger(project=log_cfg.project, entity=log_cfg.entity, name=run_name,
                                   group=log_cfg.group, tags=list(log_cfg.tags), save_dir=output_dir,
                                   mode=mode, config=config))
    return loggers


def finish_wandb():
    """End the W&B run this process started, if any (each multirun job is its own run)."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()
