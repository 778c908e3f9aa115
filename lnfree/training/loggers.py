"""Loggers: CSV always (local curves for `make eval` figures), plus Weights & Biases when asked.

W&B works online, offline (sync later with `wandb sync <run dir>/wandb/offline-run-*`) and disabled. Online
mode without network makes wandb hang for minutes, so online first checks in 3 s that the W&B host answers
and otherwise falls back to offline with a warning. Every metric has a namespace (train/, val/, lnfree/,
perf/, trainer/): Lightning's own un-namespaced `epoch` is logged as trainer/epoch. At the end of a run the
summary and the exports are logged to W&B as artifacts (`log_run_artifacts`).
"""

from __future__ import annotations

import csv
import os
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn

LOGGER_KINDS = ("wandb", "csv", "none")
CSV_DIR = "csv"  # <run>/csv/metrics.csv, and csv/resumed-<time>/metrics.csv for each resumed part


def wandb_reachable(timeout: float = 3.0) -> bool:
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def namespaced(metrics: dict) -> dict:
    """Metric names without a namespace (Lightning's `epoch`) go under trainer/."""
    return {(k if "/" in k else f"trainer/{k}"): v for k, v in metrics.items()}


class NamespacedCSVLogger(CSVLogger):
    def log_metrics(self, metrics, step=None):
        super().log_metrics(namespaced(metrics), step)


class NamespacedWandbLogger(WandbLogger):
    def log_metrics(self, metrics, step=None):
        super().log_metrics(namespaced(metrics), step)


WANDB_NAME_MAX = 128  # W&B refuses an artifact name longer than this; run names are kept to it too


def run_name(model: str, schedule: str, seed: int, finetune: str = "full", extra: str = "") -> str:
    """A W&B run name that says what the run is: model-schedule[-finetune]-s<seed>[-other overrides] (`model`:
    lnfree.training.model_source.model_label), at most WANDB_NAME_MAX characters (a long one ends with a stable
    hash of the whole)."""
    from .model_source import shorten

    name = f"{model}-{schedule}" + ("" if finetune == "full" else f"-{finetune}") + f"-s{seed}"
    return shorten(f"{name}-{extra}" if extra else name, WANDB_NAME_MAX)


def artifact_name(run: str, suffix: str) -> str:
    """A W&B artifact name for one of a run's artifacts: only the characters W&B allows, within its length limit."""
    from .model_source import shorten

    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run)
    return shorten(safe, WANDB_NAME_MAX - len(suffix), key=run) + suffix


def log_run_artifacts(loggers, output_dir, name: str) -> list[str]:
    """summary.json and export/ (hf, folded) as W&B artifacts of the run, when a W&B logger is on; returns the
    artifact names logged."""
    from pathlib import Path

    out = Path(output_dir)
    wb = [lg for lg in loggers if isinstance(lg, WandbLogger)]
    if not wb:
        return []
    import wandb

    run = wb[0].experiment
    if run is None or getattr(run, "disabled", False) or wandb.run is None:
        return []
    logged = []
    summary = wandb.Artifact(artifact_name(name, "-summary"), type="run-summary")
    summary.add_file(str(out / "summary.json"))
    run.log_artifact(summary)
    logged.append(summary.name)
    if (out / "export").is_dir():
        model = wandb.Artifact(artifact_name(name, "-export"), type="model", metadata={"forms": sorted(
            p.name for p in (out / "export").iterdir() if p.is_dir())})
        for form in (out / "export").iterdir():
            if form.is_dir():
                model.add_dir(str(form), name=form.name)
        run.log_artifact(model)
        logged.append(model.name)
    return logged


def make_loggers(log_cfg, output_dir: str, run_name: str, config: dict, resumed: bool = False):
    """CSV goes to csv/metrics.csv; a resumed run writes csv/resumed-<time>/metrics.csv beside it (Lightning's
    CSV logger would otherwise delete the first part's file)."""
    if log_cfg.kind not in LOGGER_KINDS:
        raise ValueError(f"unknown logger.kind {log_cfg.kind!r}; use one of {LOGGER_KINDS}")
    if log_cfg.kind == "none":
        return []
    version = time.strftime("resumed-%Y%m%d-%H%M%S") if resumed else ""
    loggers = [NamespacedCSVLogger(save_dir=output_dir, name=CSV_DIR, version=version)]
    if log_cfg.kind == "wandb":
        mode = log_cfg.mode
        if mode == "online" and not wandb_reachable():
            rank_zero_warn("W&B host unreachable: logging offline; run `wandb sync` on the run dir later")
            mode = "offline"
        loggers.append(NamespacedWandbLogger(project=log_cfg.project, entity=log_cfg.entity, name=run_name,
                                   group=log_cfg.group, tags=list(log_cfg.tags), save_dir=output_dir,
                                   mode=mode, config=config))
    return loggers


def read_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every metric of a run's CSV logs (resumed parts included), as sorted (step, value) lists."""
    series: dict[str, dict[int, float]] = {}
    for f in sorted(Path(run_dir).glob(f"{CSV_DIR}/**/metrics.csv")):
        with open(f) as fh:
            for row in csv.DictReader(fh):
                step = int(float(row["step"]))
                for k, v in row.items():
                    if k not in ("step", "epoch") and v not in ("", None):
                        series.setdefault(k, {})[step] = float(v)
    return {k: sorted(v.items()) for k, v in series.items()}


def finish_wandb():
    """End the W&B run this process started, if any (each multirun job is its own run)."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()
