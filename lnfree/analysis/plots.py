"""Figures for evaluations and runs (matplotlib, Agg: no screen needed)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..io import RUN_SUMMARY, find_run_dir  # noqa: E402
from ..model import NORM_KINDS  # noqa: E402

# removal events as dotted lines in colours the model curves (default cycle from tab:blue) do not start with
KIND_COLOURS = {"ln2": "tab:purple", "ln1qk": "tab:olive", "ln1v": "tab:cyan", "lnf": "black",
                "bos": "tab:gray", "eot": "tab:brown"}


def figure_row(n):
    """A figure of n side-by-side axes, the size every lnfree plot uses."""
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4), squeeze=False)
    return fig, axes[0]


def save_figure(fig, path):
    """Write and close the figure (so a long analysis does not accumulate open figures)."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ce_hist(per_token: dict, path: Path):
    """Per-token CE histograms, one panel per dataset, one line per model (log counts: the tail matters)."""
    datasets = list(dict.fromkeys(d for d, _ in per_token))
    fig, axes = figure_row(len(datasets))
    for ax, d in zip(axes, datasets):
        arrays = {m: a["ce"].reshape(-1) for (dd, m), a in per_token.items() if dd == d}
        hi = max(np.percentile(a, 99.99) for a in arrays.values())
        bins = np.linspace(0, hi, 80)
        for m, a in arrays.items():
            ax.hist(a, bins=bins, histtype="step", label=f"{m} (mean {a.mean():.3f}, median {np.median(a):.3f})")
        ax.set_yscale("log")
        ax.set(title=d, xlabel="per-token cross-entropy (nats)", ylabel="tokens")
        ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_ce_by_position(per_token: dict, path: Path):
    datasets = list(dict.fromkeys(d for d, _ in per_token))
    fig, axes = figure_row(len(datasets))
    for ax, d in zip(axes, datasets):
        for (dd, m), a in per_token.items():
            if dd == d:
                ax.plot(np.arange(1, a["ce"].shape[1] + 1), a["ce"].mean(0), label=m, lw=1)
        ax.set_xscale("log")
        ax.set(title=d, xlabel="position of the predicted token", ylabel="mean cross-entropy (nats)")
        ax.legend(fontsize=8)
    save_figure(fig, path)


def read_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every metric of a run's CSV logs (resumed parts included), as sorted (step, value) lists."""
    series: dict[str, dict[int, float]] = {}
    for f in sorted(run_dir.glob("csv/**/metrics.csv")):
        with open(f) as fh:
            for row in csv.DictReader(fh):
                step = int(float(row["step"]))
                for k, v in row.items():
                    if k not in ("step", "epoch") and v not in ("", None):
                        series.setdefault(k, {})[step] = float(v)
    return {k: sorted(v.items()) for k, v in series.items()}


def plot_training_curves(models: dict[str, str], path: Path) -> bool:
    """Train and validation CE of every model that is a training run, removal events marked."""
    runs = {m: r for m, p in models.items() if (r := find_run_dir(p)) is not None}
    if not runs:
        return False
    fig, axes = figure_row(2)
    for name, run in runs.items():
        metrics = read_metrics(run)
        for ax, key in zip(axes, ("train/ce", "val/ce")):
            if key in metrics:
                steps, vals = zip(*metrics[key])
                ax.plot(steps, vals, label=name, marker="o" if key == "val/ce" else None, ms=3, lw=1)
        events = json.loads((run / RUN_SUMMARY).read_text()).get("events", [])
        for e in events:
            for ax in axes:
                ax.axvline(e["step"], color=KIND_COLOURS.get(e["kind"], "k"), alpha=0.5, lw=0.8, ls=":")
    for ax, title in zip(axes, ("training cross-entropy", "validation cross-entropy")):
        ax.set(title=title + " (vertical lines: removal events)", xlabel="optimizer step", ylabel="nats/token")
        ax.legend(fontsize=8)
    handles = [plt.Line2D([], [], color=c, ls=":", label=f"{k} removed") for k, c in KIND_COLOURS.items()
               if k in NORM_KINDS]
    axes[0].legend(handles=axes[0].get_legend_handles_labels()[0] + handles, fontsize=8)
    save_figure(fig, path)
    return True
