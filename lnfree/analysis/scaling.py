"""Data needed to remove LayerNorm vs model size (METHOD.md section 8), from a sweep's run summaries.

    python -m lnfree.train -m experiment=data_scaling          # LN-free + vanilla per (size, budget)
    python -m lnfree.analysis.scaling multirun/data_scaling/<time> [--gap 0.01] [--out experiments/data_scaling]

For each model size: the relative gap (CE_LN-free - CE_vanilla) / CE_vanilla at every budget, and the smallest
budget T* at which the gap is within `--gap`, interpolated linearly in log(budget) between the two budgets
that bracket the threshold. Then a least-squares fit log T* = a + b log N (N = non-embedding parameters) with
the slope's standard error and a 95% interval (t distribution). b < 1 is sublinear.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

# two-sided 95% quantiles of Student's t by degrees of freedom (few points per fit)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306}


def load_runs(sweep_dir: str | Path) -> list[dict]:
    runs = []
    for f in sorted(Path(sweep_dir).glob("**/summary.json")):
        s = json.loads(f.read_text())
        c = s["config"]
        runs.append({"model": c["model"]["name"], "schedule": c["schedule"]["name"], "removes": c["schedule"]["remove"],
                     "tokens": s["tokens_seen"], "val_ce": s["val_ce"], "n_params": s["n_params"],
                     "n_nonemb": s["n_params_non_embedding"], "all_removed": s["all_removed"]})
    if not runs:
        raise FileNotFoundError(f"no summary.json under {sweep_dir}")
    return runs


def gaps(runs: list[dict]) -> dict[str, dict]:
    """{model: {"n_nonemb", "tokens": [...], "gap": [...], "vanilla": [...], "lnfree": [...]}} by budget."""
    out = {}
    for model in sorted({r["model"] for r in runs}):
        mine = [r for r in runs if r["model"] == model]
        van = {r["tokens"]: r["val_ce"] for r in mine if not r["removes"]}
        lnf = {r["tokens"]: r["val_ce"] for r in mine if r["removes"] and r["all_removed"]}
        budgets = sorted(set(van) & set(lnf))
        out[model] = {"n_nonemb": mine[0]["n_nonemb"], "tokens": budgets,
                      "vanilla": [van[t] for t in budgets], "lnfree": [lnf[t] for t in budgets],
                      "gap": [(lnf[t] - van[t]) / van[t] for t in budgets]}
    return out


def threshold_budget(tokens: list[int], gap: list[float], threshold: float) -> float | None:
    """Smallest budget with gap <= threshold (staying there at every larger budget), interpolated in log."""
    ok = [g <= threshold for g in gap]
    if not ok or not ok[-1]:
        return None
    i = len(ok) - 1
    while i > 0 and ok[i - 1]:
        i -= 1
    if i == 0:
        return float(tokens[0])  # already within the gap at the smallest budget: an upper bound
    x0, x1 = math.log(tokens[i - 1]), math.log(tokens[i])
    g0, g1 = gap[i - 1], gap[i]
    return math.exp(x0 + (g0 - threshold) / (g0 - g1) * (x1 - x0))


def power_law(n: list[float], t: list[float]) -> dict:
    """OLS of log t on log n: exponent b, its standard error and 95% interval."""
    x, y = np.log(n), np.log(t)
    b, a = np.polyfit(x, y, 1)
    out = {"exponent": float(b), "prefactor": float(math.exp(a)), "points": len(n)}
    if len(n) > 2:
        resid = y - (a + b * x)
        se = math.sqrt((resid**2).sum() / (len(n) - 2) / ((x - x.mean()) ** 2).sum())
        q = T975.get(len(n) - 2, 1.96)
        out.update({"stderr": se, "ci95": [float(b - q * se), float(b + q * se)]})
    return out


def analyse(sweep_dir, threshold: float, out_dir: str | Path) -> dict:
    per_model = gaps(load_runs(sweep_dir))
    for m in per_model.values():
        m["threshold_tokens"] = threshold_budget(m["tokens"], m["gap"], threshold)
    found = [(m["n_nonemb"], m["threshold_tokens"]) for m in per_model.values() if m["threshold_tokens"]]
    fit = power_law(*zip(*found)) if len(found) >= 2 else None
    res = {"sweep_dir": str(sweep_dir), "threshold": threshold, "models": per_model, "fit": fit}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps(res, indent=1))
    _plot(res, out / "scaling.png")
    return res


def _plot(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, m in res["models"].items():
        ax1.plot(m["tokens"], [100 * g for g in m["gap"]], marker="o", label=f"{name} ({m['n_nonemb'] / 1e6:.2f}M)")
    ax1.axhline(100 * res["threshold"], color="k", ls=":", lw=1, label=f"{100 * res['threshold']:.0f}% gap")
    ax1.set(xscale="log", xlabel="fine-tuning tokens", ylabel="LN-free CE gap to vanilla (%)",
            title="Gap to the vanilla control vs budget")
    ax1.legend(fontsize=8)
    pts = [(m["n_nonemb"], m["threshold_tokens"]) for m in res["models"].values() if m["threshold_tokens"]]
    if pts:
        n, t = zip(*pts)
        ax2.scatter(n, t, zorder=3)
        fit = res["fit"]
        if fit:
            xs = np.geomspace(min(n), max(n), 50)
            label = f"T* ~ N^{fit['exponent']:.2f}"
            if "ci95" in fit:
                label += f" (95% CI {fit['ci95'][0]:.2f} to {fit['ci95'][1]:.2f})"
            ax2.plot(xs, fit["prefactor"] * xs ** fit["exponent"], label=label)
            ax2.legend(fontsize=8)
    ax2.set(xscale="log", yscale="log", xlabel="non-embedding parameters N",
            ylabel=f"tokens to reach a {100 * res['threshold']:.0f}% gap", title="Data needed to remove LayerNorm")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description="data-scaling analysis of a sweep")
    p.add_argument("sweep_dir")
    p.add_argument("--gap", type=float, default=0.01, help="allowed relative CE gap to vanilla")
    p.add_argument("--out", default="experiments/data_scaling")
    a = p.parse_args(argv)
    res = analyse(a.sweep_dir, a.gap, a.out)
    for name, m in res["models"].items():
        gaps_txt = ", ".join(f"{t}:{100 * g:+.2f}%" for t, g in zip(m["tokens"], m["gap"]))
        print(f"{name}: N={m['n_nonemb']:.0f}  gaps {gaps_txt}  T*={m['threshold_tokens']}")
    print("fit:", res["fit"])


if __name__ == "__main__":
    main()
