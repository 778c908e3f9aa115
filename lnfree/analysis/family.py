"""The built-in size family's record: per model its shape, size, pretraining tokens, validation CE and curve,
and whether it meets the convergence criterion.

    python -m lnfree.analysis.family outputs/pretrain [--out experiments/builtin_family]

Reads the pretraining runs (`<runs>/<name>/summary.json` and their CSV logs) and writes family.json, one
curve per model (curves/<name>.csv: step, train CE, validation CE) and family.png.
Criterion (stated in the output): validation CE not rising over the last 20% of steps (no validation above
the one before it by more than `tol`) and changing by at most `tol` over the last 10% of steps.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from ..paths import RUN_SUMMARY
from .plots import read_metrics


def converged(curve: list[tuple[int, float]], max_steps: int, tol: float) -> dict:
    late = [(s, v) for s, v in curve if s >= 0.8 * max_steps]
    last = [v for s, v in curve if s >= 0.9 * max_steps]
    rising = any(b - a > tol for (_, a), (_, b) in zip(late, late[1:]))
    change = (max(last) - min(last)) if len(last) > 1 else None
    return {"not_rising_last_20pct": not rising, "change_last_10pct": change,
            "met": (not rising) and change is not None and change <= tol}


def collect(runs_dir: str | Path, out_dir: str | Path, tol: float = 0.002) -> dict:
    runs_dir, out = Path(runs_dir), Path(out_dir)
    (out / "curves").mkdir(parents=True, exist_ok=True)
    sizes = []
    for summary_file in sorted(runs_dir.glob(f"*/{RUN_SUMMARY}")):
        s = json.loads(summary_file.read_text())
        c = s["config"]
        name = c["model"]["name"]
        metrics = read_metrics(summary_file.parent)
        val, tr = dict(metrics.get("val/ce", [])), dict(metrics.get("train/ce", []))
        with open(out / "curves" / f"{name}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "train_ce", "val_ce"])
            for step in sorted(set(val) | set(tr)):
                w.writerow([step, tr.get(step, ""), val.get(step, "")])
        shape = c["model"]["shape"]
        sizes.append({"name": name, "n_layer": shape["n_layer"], "n_embd": shape["n_embd"],
                      "n_head": shape["n_head"], "non_embedding_params": s["n_params_non_embedding"],
                      "params": s["n_params"], "pretrain_tokens": s["tokens_seen"], "steps": s["steps"],
                      "val_ce": s["val_ce"], "curve": f"curves/{name}.csv",
                      "convergence": converged(sorted(val.items()), s["steps"], tol),
                      "recipe": {"dropout": c["model"]["dropout"], "lr": c["optim"]["lr"],
                                 "min_lr": c["optim"]["min_lr"],
                                 "tokens_per_step": s["tokens_per_step"], "shuffle_buffer": c["data"]["shuffle_buffer"],
                                 "seed": c["seed"], "precision": c["hardware"]["precision"]},
                      "wall_time_s": s["wall_time_s"], "hardware": c["hardware"]["name"]})
    sizes.sort(key=lambda x: x["non_embedding_params"])
    ces = [x["val_ce"] for x in sizes]
    res = {"criterion": f"validation CE not rising by more than {tol} between validations over the last 20% of "
                        f"steps, and changing by at most {tol} nats over the last 10%",
           "strictly_decreasing_with_size": all(b < a for a, b in zip(ces, ces[1:])), "sizes": sizes}
    (out / "family.json").write_text(json.dumps(res, indent=1))
    _plot(sizes, out)
    return res


def _plot(sizes, out: Path):
    from .plots import _grid, _save

    fig, (ax1, ax2) = _grid(2)
    for x in sizes:
        rows = list(csv.DictReader(open(out / x["curve"])))
        pts = [(int(r["step"]), float(r["val_ce"])) for r in rows if r["val_ce"]]
        ax1.plot(*zip(*pts), marker="o", ms=2, lw=1, label=f"{x['name']} ({x['non_embedding_params'] / 1e6:.2f}M)")
    ax1.set(xlabel="pretraining step", ylabel="validation CE (nats)", title="Pretraining curves", ylim=(4.2, 5.6))
    ax1.legend(fontsize=7)
    ax2.plot([x["non_embedding_params"] for x in sizes], [x["val_ce"] for x in sizes], marker="o")
    ax2.set(xscale="log", xlabel="non-embedding parameters", ylabel="final validation CE",
            title="Validation CE vs size")
    _save(fig, out / "family.png")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs_dir")
    p.add_argument("--out", default="experiments/builtin_family")
    p.add_argument("--tol", type=float, default=0.002)
    a = p.parse_args(argv)
    res = collect(a.runs_dir, a.out, a.tol)
    for x in res["sizes"]:
        print(f"{x['name']:14s} N={x['non_embedding_params']:>9d} val CE {x['val_ce']:.4f} converged: "
              f"{x['convergence']['met']}")
    print("strictly decreasing with size:", res["strictly_decreasing_with_size"])


if __name__ == "__main__":
    main()
