"""Tables and figures of the positive controls, from the committed JSON alone (controls_cli.py writes it):
<out>/controls.md (the tables) and <out>/{patching,sinks,neurons}.png. The same tables in experiments/interp's
README are rewritten by `make tables` (tools/doc_tables.py's interp_controls calls tables() below).

    python -m lnfree.analysis.interp.controls_plot --out experiments/interp
"""

from __future__ import annotations

import json
import math
from pathlib import Path

ARM_NAMES = {"original": "original", "frozen_ln": "original, norms frozen at clean scale", "vanilla": "vanilla",
             "lnfree": "LN-free"}


def fmt(o: dict, scale: float = 1.0, digits: int = 2) -> str:
    """'mean [low, high]' of an over_seeds() dict (times `scale`)."""
    m = o["mean"] * scale
    if "ci95" not in o or any(math.isnan(v) for v in o["ci95"]):
        return f"{m:.{digits}f}"
    lo, hi = (v * scale for v in o["ci95"])
    return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _elem(o: dict, *idx) -> dict:
    """The over_seeds() dict of one element of an elementwise summary."""
    m, c = o["mean"], o["ci95"]
    for i in idx:
        m, c = m[i], c[i]
    return {"mean": m, "ci95": c}


def patching_table(d: dict) -> str:
    n = len(d["replicates"])
    rows = [f"AtP vs AP over {n} replicates (mean [95% t interval]); live nodes only (residual positions from the "
            "first differing token on, and every head); M = logit(correct) - logit(wrong) at the last position; "
            "attention moved = total-variation distance of the last query's attention, clean vs corrupted, mean over "
            "layer 0's heads.", "",
            "| task | arm | M clean | M corrupted | NMAE % | Pearson | scale (AtP ~ s AP) | NMAE % after scale | "
            "attention moved (L0) |", "|---|---|---|---|---|---|---|---|---|"]
    for task, arms in d["patching"].items():
        for arm, r in arms.items():
            if arm not in ARM_NAMES:
                continue
            tv = r.get("attention_tv_last_query")
            moved = "-" if tv is None else fmt({"mean": sum(tv["mean"][0]) / len(tv["mean"][0]),
                                                "ci95": [float("nan")] * 2})
            rows.append(f"| {task} | {ARM_NAMES[arm]} | {fmt(r['clean_logit_diff'], digits=1)} | "
                        f"{fmt(r['corrupted_logit_diff'], digits=1)} | {fmt(r['nmae_percent'], digits=1)} | "
                        f"{fmt(r['pearson'], digits=3)} | {fmt(r['scale'])} | {fmt(r['nmae_scaled_percent'], digits=1)}"
                        f" | {moved} |")
    share = "; ".join(f"{task} {fmt(arms['ln_share_of_atp_error'], 100, 0)}%" for task, arms in d["patching"].items())
    rows += ["", f"LayerNorm's share of AtP's error in the original model, 1 - NMAE(frozen) / NMAE(original): {share}"]
    return "\n".join(rows)


def sinks_table(d: dict) -> str:
    s = d["sinks"]
    n_layer = len(s["original"]["sink_heads"]["mean"])
    rows = [f"Per layer over {len(d['replicates'])} replicates (mean [95% t interval]): heads with alpha > 0.3 "
            "(attention to BOS from queries >= 1), and the residual norm at position 0 / the mean of the other "
            "positions at each block's input (last row: ln_f's input).", "",
            "| arm | layer | sink heads | position-0 norm / rest | position-0 norm | top / median activation, pos 0 |",
            "|---|---|---|---|---|---|"]
    for arm, r in s.items():
        for layer in range(n_layer + 1):
            heads = fmt(_elem(r["sink_heads"], layer), digits=1) if layer < n_layer else "-"
            name = f"block {layer} input" if layer < n_layer else "ln_f input"
            rows.append(f"| {ARM_NAMES[arm]} | {name} | {heads} | {fmt(_elem(r['pos0_ratio'], layer))} | "
                        f"{fmt(_elem(r['pos0_norm'], layer), digits=1)} | "
                        f"{fmt(_elem(r['massive_pos0'], layer), digits=1)} |")
    per = "; ".join(f"r{r}: " + ", ".join(str(int(v)) for v in vals)
                    for r, vals in zip(d["replicates"], s["original"]["sink_heads"]["values"]))
    return "\n".join(rows + ["", f"Sink heads per layer, original, per replicate: {per}."])


def neurons_table(d: dict) -> str:
    n = d["neurons"]
    k = d.get("settings", {}).get("neuron_candidates", "k")
    rows = [f"The top entropy neuron of the last MLP (largest median |delta entropy| under mean ablation in the "
            f"original, among its {k} largest-norm and {k} largest null-space-fraction neurons; neuron "
            f"{', '.join(map(str, n['top_neuron']))} in replicates {', '.join(map(str, d['replicates']))}), the same "
            "unit in each arm; a random direction's null-space fraction is 0.10.", "",
            "| arm | median abs delta H, total | direct (scale kept) | LN-mediated fraction | null-space fraction |",
            "|---|---|---|---|---|"]
    for arm in ("original", "vanilla", "lnfree"):
        r = n[arm]
        rows.append(f"| {ARM_NAMES[arm]} | {fmt(r['median_abs_te_entropy'], digits=3)} | "
                    f"{fmt(r['median_abs_de_entropy'], digits=3)} | {fmt(r['ln_mediated_fraction'], 100, 0)}% | "
                    f"{fmt(r['null_space_fraction'])} |")
    rows += ["", "Its entropy effect after removal, LN-free / original: "
             f"{fmt(n['lnfree_over_original_entropy_effect'])}."]
    return "\n".join(rows)


def tables(out: Path) -> str:
    parts = []
    for key, make in (("patching", patching_table), ("sinks", sinks_table), ("neurons", neurons_table)):
        f = out / f"{key}.json"
        if f.exists():
            parts.append(f"### {key} (`{key}.json`)\n\n" + make(json.loads(f.read_text())))
    return "\n\n".join(parts)


def plot(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    d = json.loads((out / "patching.json").read_text())["patching"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    arms = list(ARM_NAMES)
    for ax, key, label in ((axes[0], "nmae_percent", "NMAE of AtP vs AP (%)"), (axes[1], "pearson", "Pearson")):
        for j, (task, res) in enumerate(d.items()):
            m = np.array([res[a][key]["mean"] for a in arms])
            ci = np.array([res[a][key]["ci95"] for a in arms])
            x = np.arange(len(arms)) + 0.2 * (2 * j - 1)
            ax.bar(x, m, 0.4, label=task)
            ax.errorbar(x, m, yerr=[m - ci[:, 0], ci[:, 1] - m], fmt="none", color="k", lw=1)
        ax.set_xticks(range(len(arms)), [ARM_NAMES[a].replace(", ", ",\n") for a in arms], fontsize=7)
        ax.set(ylabel=label)
        ax.legend(fontsize=7)
    fig.suptitle("Attribution vs activation patching, positive controls (mean and 95% interval over replicates)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "patching.png", dpi=120)
    plt.close(fig)

    s = json.loads((out / "sinks.json").read_text())["sinks"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for arm, r in s.items():
        for ax, key in zip(axes, ("pos0_ratio", "sink_heads")):
            m, ci = np.array(r[key]["mean"]), np.array(r[key]["ci95"])
            ax.errorbar(np.arange(len(m)), m, yerr=[m - ci[:, 0], ci[:, 1] - m], marker="o", capsize=3,
                        label=ARM_NAMES[arm])
    axes[0].set(xlabel="block input (last: ln_f input)", ylabel="position-0 norm / other positions",
                title="Position-0 residual norm")
    axes[1].set(xlabel="layer", ylabel="heads with alpha > 0.3", title="Attention sinks")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "sinks.png", dpi=120)
    plt.close(fig)


def write_all(out: str | Path = "experiments/interp") -> None:
    out = Path(out)
    text = tables(out)
    (out / "controls.md").write_text(text + "\n")
    plot(out)


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description="tables and figures of the positive controls from their JSON")
    p.add_argument("--out", required=True, help="the dir holding the controls' JSON (committed: experiments/interp)")
    write_all(p.parse_args(argv).out)


if __name__ == "__main__":
    main()
