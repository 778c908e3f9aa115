"""Data needed to remove LayerNorm vs model size (METHOD.md section 8), from a sweep's run summaries.

    make scaling      # = the sweep's missing runs (experiments/data_scaling/run_missing.py), then this module
    python -m lnfree.analysis.scaling SWEEP_DIR [--gap 0.01] [--out experiments/data_scaling]  # any Hydra multirun dir
    python -m lnfree.analysis.scaling experiments/data_scaling/runs.jsonl      # again, from the committed records
    python -m lnfree.analysis.scaling experiments/data_scaling/runs.jsonl multirun/data_scaling/resume \
        --records experiments/data_scaling/runs.jsonl   # committed records + the runs that finished a sweep

Every (size, budget, seed) has an LN-free run and its vanilla control with the same seed (same data order).
Gap = (CE_LN-free - CE_vanilla) / CE_vanilla. Per size, T* = the budget at which a power-law fit of the
seed-mean gap against the budget crosses the allowed gap; the removal phase is the schedule's share of it
(schedule.fit_fraction). Then T* ~ N^b over sizes (N = non-embedding parameters). T* and b get 95% CIs from one
bootstrap over seeds (analysis/stats.py). Also reported: the gap at every budget against size.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from .stats import over_seeds, scaling_fit


def load_sources(sources) -> list[dict]:
    """The runs of several sweep dirs / runs.jsonl files, one record per (size, arm, seed, budget). The same run
    found twice (a records file and the sweep dir it came from) must agree; two different results fail."""
    seen: dict[tuple, dict] = {}
    for src in sources:
        for r in load_runs(src):
            key = (r["model"], r["removes"], r["seed"], r["tokens"])
            if key in seen and abs(seen[key]["val_ce"] - r["val_ce"]) > 1e-6:
                raise ValueError(f"two different results for {key}: {seen[key]['val_ce']} and {r['val_ce']}")
            seen[key] = r
    return list(seen.values())


def load_runs(sweep_dir: str | Path) -> list[dict]:
    """One record per run, from a sweep dir's summary.json files or from a runs.jsonl written by `--records`."""
    if Path(sweep_dir).is_file():
        return [json.loads(line) for line in Path(sweep_dir).read_text().splitlines() if line.strip()]
    runs = []
    for f in sorted(Path(sweep_dir).glob("**/summary.json")):
        s = json.loads(f.read_text())
        c = s["config"]
        runs.append({"model": c["model"]["name"], "removes": c["schedule"]["remove"], "seed": c["seed"],
                     "tokens": s["tokens_seen"], "val_ce": s["val_ce"], "n_nonemb": s["n_params_non_embedding"],
                     "all_removed": s["all_removed"], "fit_fraction": c["schedule"].get("fit_fraction")})
    if not runs:
        raise FileNotFoundError(f"no summary.json under {sweep_dir}")
    bad = [r for r in runs if r["removes"] and not r["all_removed"]]
    if bad:
        raise ValueError(f"{len(bad)} LN-free run(s) did not remove every site, e.g. {bad[0]}")
    return runs


def gap_table(runs: list[dict]) -> dict:
    """{model: {"n", "budgets", "seeds", "gaps": [[gap per seed] per budget], "vanilla", "lnfree"}}, keeping
    the seeds that have both arms at every budget (pairs only)."""
    out = {}
    for model in sorted({r["model"] for r in runs}, key=lambda m: next(r["n_nonemb"] for r in runs if r["model"] == m)):
        mine = [r for r in runs if r["model"] == model]
        arm = {(r["removes"], r["tokens"], r["seed"]): r["val_ce"] for r in mine}
        all_budgets = {r["tokens"] for r in mine}
        # seeds with at least one pair (an LN-free run and its control); a seed without any is dropped
        seeds = sorted(s for s in {r["seed"] for r in mine}
                       if any((True, b, s) in arm and (False, b, s) in arm for b in all_budgets))
        # budgets where every seed has both arms (an unfinished sweep leaves the largest budgets incomplete)
        budgets = sorted(b for b in all_budgets if all((a, b, s) in arm for a in (True, False) for s in seeds))
        out_of = sorted(all_budgets - set(budgets))
        van = [[arm[(False, b, s)] for s in seeds] for b in budgets]
        lnf = [[arm[(True, b, s)] for s in seeds] for b in budgets]
        gaps = [[(x - y) / y for x, y in zip(rl, rv)] for rl, rv in zip(lnf, van)]
        fractions = {r["fit_fraction"] for r in mine if r["removes"]}
        out[model] = {"n": mine[0]["n_nonemb"], "budgets": budgets, "seeds": seeds, "gaps": gaps, "vanilla": van,
                      "lnfree": lnf, "removal_fraction": fractions.pop() if len(fractions) == 1 else None,
                      "incomplete_budgets": out_of}
    return out


def analyse(sweep_dir, threshold: float, out_dir: str | Path, n_boot: int = 2000) -> dict:
    """sweep_dir: a sweep dir or runs.jsonl, or a list of them (merged by load_sources)."""
    sources = list(sweep_dir) if isinstance(sweep_dir, (list, tuple)) else [sweep_dir]
    table = gap_table(load_sources(sources))
    usable = {k: v for k, v in table.items() if v["seeds"]}
    fit = scaling_fit(usable, threshold, n_boot=n_boot)
    for s in fit["sizes"]:
        m = table[s["name"]]
        t = s["t_star"]["value"]
        s["t_star"]["extrapolated"] = bool(t is not None and t > max(m["budgets"]))
        frac = m["removal_fraction"]
        s["removal_phase_tokens"] = ({k: (v * frac if v not in (None, float("inf")) else v)
                                      for k, v in s["t_star"].items() if k != "extrapolated"} if frac else None)
        s["gap_by_budget"] = {str(b): over_seeds(g) for b, g in zip(m["budgets"], m["gaps"])}
        s["vanilla_ce_by_budget"] = {str(b): float(np.mean(v)) for b, v in zip(m["budgets"], m["vanilla"])}
        s["incomplete_budgets"] = m["incomplete_budgets"]
        # the direct reading (METHOD.md section 8): the smallest measured budget within the gap, by the seed mean
        # and, stricter, by the upper end of its 95% CI over seeds
        gaps = dict(zip(m["budgets"], s["gap_by_budget"].values()))
        within = [b for b, g in gaps.items() if g["mean"] <= threshold]
        strict = [b for b, g in gaps.items() if g.get("ci95", [None, np.inf])[1] <= threshold]
        s["first_budget_within"] = {"mean": min(within, default=None), "ci_upper": min(strict, default=None)}
    # the exponent only from sizes whose crossing lies within their measured budgets: an extrapolated T* is not
    # a measurement (its bootstrap CI reflects seed noise, not the extrapolation)
    inside = [s["name"] for s in fit["sizes"] if s["t_star"]["value"] is not None and not s["t_star"]["extrapolated"]]
    if len(inside) >= 2:
        fit["exponent"] = scaling_fit({k: usable[k] for k in inside}, threshold, n_boot=n_boot)["exponent"]
    else:
        fit["exponent"] = {"value": None, "ci_low": None, "ci_high": None, "bootstrap_valid": 0, "bootstrap": n_boot}
    fit["exponent"]["sizes"] = inside  # fit["sizes"] is ordered by N
    seeds = sorted({s for v in usable.values() for s in v["seeds"]})
    res = {"sources": [str(x) for x in sources], "seeds": seeds, "threshold": threshold, "sizes": fit["sizes"],
           "exponent": fit["exponent"]}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps(res, indent=1))
    (out / "scaling.md").write_text(markdown(res))
    _plot(res, table, out / "scaling.png")
    return res


def _k(x) -> str:
    return "-" if x is None else ("inf" if x == float("inf") else f"{x / 1e3:.0f}k")


def markdown(res: dict) -> str:
    """The result as tables: T* per size, then the seed-mean gap (95% t CI over seeds) at every budget."""
    e = res["exponent"]
    lines = [f"Allowed gap {100 * res['threshold']:.0f}%, seeds {res['seeds']}. T* ~ N^b over the sizes whose crossing "
             f"was measured ({', '.join(e.get('sizes', [])) or 'none'}): "
             + (f"b = {e['value']:.2f} (95% CI {e['ci_low']:.2f} to {e['ci_high']:.2f}, bootstrap over seeds)"
                if e.get("value") is not None else "no fit"), "",
             "| size | N (non-emb.) | T* tokens [95% CI] | removal phase | smallest budget within (mean / CI-strict) |",
             "|---|---|---|---|---|"]
    for s in res["sizes"]:
        t, f, rp = s["t_star"], s["first_budget_within"], s.get("removal_phase_tokens") or {}
        flag = " (extrapolated)" if t.get("extrapolated") else ""
        lines.append(f"| {s['name']} | {s['non_embedding_params'] / 1e6:.3f}M | {_k(t['value'])} [{_k(t['ci_low'])}, "
                     f"{_k(t['ci_high'])}]{flag} | {_k(rp.get('value'))} | {_k(f['mean'])} / {_k(f['ci_upper'])} |")
    budgets = sorted({int(b) for s in res["sizes"] for b in s["gap_by_budget"]})
    lines += ["", "Gap LN-free vs vanilla (%, seed mean [95% CI]) by budget (tokens):", "",
              "| size | " + " | ".join(_k(b) for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for s in res["sizes"]:
        cells = []
        for b in budgets:
            g = s["gap_by_budget"].get(str(b))
            ci = g.get("ci95") if g else None
            cells.append("" if g is None else f"{100 * g['mean']:.2f}" + (f" [{100 * ci[0]:.2f}, {100 * ci[1]:.2f}]"
                                                                         if ci else ""))
        lines.append(f"| {s['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(res, table, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax3, ax2) = plt.subplots(1, 3, figsize=(16, 4))
    for s in res["sizes"]:
        m = table[s["name"]]
        g = np.asarray(m["gaps"]) * 100
        ax1.errorbar(m["budgets"], g.mean(1), yerr=g.std(1, ddof=1) / np.sqrt(g.shape[1]) if g.shape[1] > 1 else None,
                     marker="o", ms=3, capsize=2, label=f"{s['name']} ({m['n'] / 1e6:.2f}M)")
    ax1.axhline(100 * res["threshold"], color="k", ls=":", lw=1, label=f"{100 * res['threshold']:.0f}% gap")
    ax1.set(xscale="log", xlabel="fine-tuning tokens", ylabel="LN-free CE gap to vanilla (%, mean +- s.e. over seeds)",
            title="Gap to the vanilla control vs budget")
    ax1.legend(fontsize=7)
    # the gap against size at every budget that every size of the fit has (the fixed-budget view)
    fitted = [s for s in res["sizes"] if s["name"] in (res["exponent"].get("sizes") or [])] or res["sizes"]
    common = sorted(set.intersection(*(set(table[s["name"]]["budgets"]) for s in fitted))) if fitted else []
    cmap = plt.get_cmap("viridis")
    for i, b in enumerate(common):
        ns = [table[s["name"]]["n"] for s in fitted]
        g = [100 * np.mean(table[s["name"]]["gaps"][table[s["name"]]["budgets"].index(b)]) for s in fitted]
        ax3.plot(ns, g, marker="o", ms=3, color=cmap(i / max(len(common) - 1, 1)), label=f"{b / 1e3:.0f}k tokens")
    ax3.axhline(100 * res["threshold"], color="k", ls=":", lw=1)
    ax3.set(xscale="log", yscale="log", xlabel="non-embedding parameters N", ylabel="gap to vanilla (%, seed mean)",
            title="Gap vs size at fixed budgets")
    if common:
        ax3.legend(fontsize=6, ncol=2)
    pts = [(s["non_embedding_params"], s["t_star"]) for s in res["sizes"]
           if s["t_star"]["value"] and not s["t_star"].get("extrapolated")]  # measured crossings only
    if pts:
        n = np.array([p[0] for p in pts], float)
        t = np.array([p[1]["value"] for p in pts])
        lo = np.array([p[1]["ci_low"] for p in pts], float)
        hi = np.array([p[1]["ci_high"] for p in pts], float)
        hi_plot = np.where(np.isfinite(hi), hi, t * 10)
        ax2.errorbar(n, t, yerr=[t - lo, hi_plot - t], fmt="o", capsize=3, zorder=3,
                     label="T* (95% CI, bootstrap over seeds)")
        e = res["exponent"]
        if e["value"] is not None:
            xs = np.geomspace(n.min(), n.max(), 50)
            a = np.exp(np.mean(np.log(t) - e["value"] * np.log(n)))
            ax2.plot(xs, a * xs ** e["value"],
                     label=f"T* ~ N^{e['value']:.2f} (95% CI {e['ci_low']:.2f} to {e['ci_high']:.2f})")
        ax2.legend(fontsize=7)
    ax2.set(xscale="log", yscale="log", xlabel="non-embedding parameters N",
            ylabel=f"tokens to a {100 * res['threshold']:.0f}% gap", title="Data needed to remove LayerNorm")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description="data-scaling analysis of a sweep")
    p.add_argument("sweep_dir", nargs="+", help="sweep dirs and/or runs.jsonl files, merged")
    p.add_argument("--gap", type=float, default=0.01, help="allowed relative CE gap to vanilla")
    p.add_argument("--out", default="experiments/data_scaling")
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--records", help="also write every run's record to this .jsonl")
    a = p.parse_args(argv)
    res = analyse(a.sweep_dir, a.gap, a.out, a.bootstrap)
    if a.records:  # the runs themselves, compact, so that the analysis can be redone from a committed file
        runs = sorted(load_sources(a.sweep_dir), key=lambda r: (r["n_nonemb"], r["tokens"], r["removes"], r["seed"]))
        Path(a.records).write_text("".join(json.dumps(r) + "\n" for r in runs))
    for s in res["sizes"]:
        t = s["t_star"]
        f = s["first_budget_within"]
        print(f"{s['name']:16s} N={s['non_embedding_params']:>9d}  T*={t['value']}  "
              f"95% CI [{t['ci_low']}, {t['ci_high']}]  first budget within: {f['mean']} (CI-strict {f['ci_upper']})")
    print("exponent:", res["exponent"])


if __name__ == "__main__":
    main()
