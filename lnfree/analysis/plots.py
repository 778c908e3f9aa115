"""Figures for evaluations and runs (matplotlib, Agg: no screen needed)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from ..families import FAMILIES  # noqa: E402
from ..model import NORM_KINDS, SPECIAL_KINDS  # noqa: E402
from ..paths import RUN_SUMMARY  # noqa: E402
from ..references import find_run_dir  # noqa: E402
from .stats import interval_text  # noqa: E402

# removal events as dotted lines in colours the model curves (default cycle from tab:blue) do not start with
# (by generic kind; a run's summary names a norm kind as its family does: GPT-2 ln2, Llama pre_mlp)
KIND_COLOURS = {"pre_mlp": "tab:purple", "attn_qk": "tab:olive", "attn_v": "tab:cyan", "final": "black",
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


def plot_training_curves(models: dict[str, str], path: Path) -> bool:
    """Train and validation CE of every model that is a training run, removal events marked."""
    runs = {m: r for m, p in models.items() if (r := find_run_dir(p)) is not None}
    if not runs:
        return False  # no run among them (exports, built-ins, hub models): lnfree eval needs no Lightning
    from ..training.loggers import read_metrics  # the CSV logger's reader (imports Lightning: only when plotting runs)

    fig, axes = figure_row(2)
    named = {}  # generic norm kind -> the names the runs' summaries give it
    for name, run in runs.items():
        metrics = read_metrics(run)
        for ax, key in zip(axes, ("train/ce", "val/ce")):
            if key in metrics:
                steps, vals = zip(*metrics[key])
                ax.plot(steps, vals, label=name, marker="o" if key == "val/ce" else None, ms=3, lw=1)
        summary = json.loads((run / RUN_SUMMARY).read_text())
        fam = next(f for f in FAMILIES if f.name == summary["family"])
        for e in summary.get("events", []):
            kind = fam.norm_kind(e["kind"]) if e["kind"] not in SPECIAL_KINDS else e["kind"]  # GPT-2: ln2 -> pre_mlp
            named.setdefault(kind, set()).add(e["kind"])
            for ax in axes:
                ax.axvline(e["step"], color=KIND_COLOURS.get(kind, "k"), alpha=0.5, lw=0.8, ls=":")
    for ax, title in zip(axes, ("training cross-entropy", "validation cross-entropy")):
        ax.set(title=title + " (vertical lines: removal events)", xlabel="optimizer step", ylabel="nats/token")
        ax.legend(fontsize=8)
    handles = [plt.Line2D([], [], color=c, ls=":", label=f"{' / '.join(sorted(named.get(k, {k})))} removed")
               for k, c in KIND_COLOURS.items() if k in NORM_KINDS]
    axes[0].legend(handles=axes[0].get_legend_handles_labels()[0] + handles, fontsize=8)
    save_figure(fig, path)
    return True


def plot_family(sizes: list[dict], out: Path):
    """<out>/family.png: each model's pretraining curve (its CSV, relative to `out`) and validation CE vs size."""
    fig, (ax1, ax2) = figure_row(2)
    for x in sizes:
        rows = list(csv.DictReader(open(out / x["curve"])))
        pts = [(int(r["step"]), float(r["val_ce"])) for r in rows if r["val_ce"]]
        ax1.plot(*zip(*pts), marker="o", ms=2, lw=1, label=f"{x['name']} ({x['non_embedding_params'] / 1e6:.2f}M)")
    ax1.set(xlabel="pretraining step", ylabel="validation CE (nats)", title="Pretraining curves", ylim=(4.2, 5.6))
    ax1.legend(fontsize=7)
    ax2.plot([x["non_embedding_params"] for x in sizes], [x["val_ce"] for x in sizes], marker="o")
    ax2.set(xscale="log", xlabel="non-embedding parameters", ylabel="final validation CE",
            title="Validation CE vs size")
    save_figure(fig, out / "family.png")


def plot_scaling(res: dict, table: dict, path: Path, reference_exponent: float):
    """The data-scaling figure: the gap to the vanilla control vs fine-tuning tokens per size, and T* vs N with
    each threshold's fit and a reference line N^reference_exponent."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))  # log axes: decade labels only (minor ones overlap)
    for s in res["sizes"]:
        m = table[s["name"]]
        g = np.asarray(m["gaps"]) * 100
        ax1.errorbar(m["budgets"], g.mean(1), yerr=g.std(1, ddof=1) / np.sqrt(g.shape[1]) if g.shape[1] > 1 else None,
                     marker="o", ms=3, capsize=2, label=f"{s['name']} ({m['n'] / 1e6:.2f}M)")
    for t in res["thresholds"]:
        ax1.axhline(100 * t, color="k", ls=":", lw=0.8)
    ax1.set(xscale="log", yscale="log", xlabel="fine-tuning tokens",
            ylabel="LN-free CE gap to vanilla (%, mean +- s.e. over seeds)", title="Gap to the vanilla control")
    ax1.xaxis.set_minor_formatter(NullFormatter())
    ax1.legend(fontsize=7)
    colors = plt.get_cmap("tab10")
    shown = []  # every T* drawn (fitted, edge or lower bound): where the reference slope is anchored
    for i, (key, e) in enumerate(res["exponent"].items()):
        beyond = [(s["non_embedding_params"] * (1 + 0.03 * i), s["budgets"][-1]) for s in res["sizes"]
                  if (t := s["t_star"].get(key)) and (t["value"] is None or t["value"] > s["budgets"][-1])]
        if beyond:  # a lower bound: the gap had not reached the threshold at the largest budget
            ax2.scatter(*zip(*beyond), marker="^", s=40, facecolors="none", edgecolors=colors(i),
                        label=f"{key}: T* beyond the largest budget (a lower bound)")
            shown += beyond
        inside = [(s["non_embedding_params"], t) for s in res["sizes"] if (t := s["t_star"].get(key))
                  and t["value"] is not None and s["budgets"][0] <= t["value"] <= s["budgets"][-1]]
        edge = [(n * (1 + 0.03 * i), t["value"]) for n, t in inside if not t["bracketed"]]
        if edge:  # inside the grid but with fewer than the required measured budgets on one side: not in the fit
            ax2.scatter(*zip(*edge), marker="o", s=30, facecolors="none", edgecolors=colors(i),
                        label=f"{key}: T* at the grid's edge (not in the fit)")
            shown += edge
        pts = [(n, t) for n, t in inside if t["bracketed"]]
        if not pts:
            continue
        fitted = e["value"] is not None and e["ci_low"] is not None  # a line through 2 points would be no fit
        n = np.array([p[0] for p in pts], float)
        t = np.array([p[1]["value"] for p in pts])
        lo = np.array([p[1].get("ci_low", v) for p, v in zip(pts, t)], float)
        hi = np.array([p[1].get("ci_high", v) for p, v in zip(pts, t)], float)
        hi = np.where(np.isfinite(hi), hi, t * 3)
        ax2.errorbar(n * (1 + 0.03 * i), t, yerr=[t - lo, hi - t], fmt="o", ms=4, capsize=3, color=colors(i),
                     label=None if fitted else f"{key}: T* ({len(pts)} size(s): no interval, no fit drawn)")
        shown += list(zip(n, t))
        if fitted:
            xs = np.geomspace(n.min(), n.max(), 50)
            a = np.exp(np.mean(np.log(t) - e["value"] * np.log(n)))
            ax2.plot(xs, a * xs ** e["value"], color=colors(i),
                     label=f"{key}: b = {e['value']:.2f} {interval_text(e)}")
    if shown:  # the paper's slope for comparison; its level is arbitrary (through the mean of what is drawn)
        n, level = np.array([p[0] for p in shown], float), float(np.exp(np.mean(np.log([p[1] for p in shown]))))
        xs = np.geomspace(n.min(), n.max(), 50)
        ax2.plot(xs, level * (xs / np.exp(np.mean(np.log(n)))) ** reference_exponent, "k--", lw=1,
                 label=f"slope N^{reference_exponent} (paper's released budgets; level arbitrary)")
    ax2.set(xscale="log", yscale="log", xlabel="non-embedding parameters N", ylabel="T*: tokens to the gap threshold",
            title=f"Data needed to remove LayerNorm\n{res['family']}")
    ax2.xaxis.set_minor_formatter(NullFormatter())
    ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))  # outside: the points span the whole panel
    save_figure(fig, path)
