"""Recompute the paired gaps of evaluation outputs from their committed per-token CE, without the models:

    python -m lnfree.analysis.paired_tables experiments/builtin_eval experiments/ablations experiments/lora

For every output dir (written by `python -m lnfree.eval`): the pairs and bootstrap settings of its results.json
config, the per-token CE of per_token_ce.npz; rewrites results.json's "paired" block and table.md's paired-gap
section with the current statistics (stats.paired_over_seeds). Used when the interval method changes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .stats import paired_over_seeds
from .tables import PAIRED_HEADER, paired_table


def recompute(out: Path) -> dict:
    res = json.loads((out / "results.json").read_text())
    cfg = res["config"]
    ce = np.load(out / "per_token_ce.npz")
    paired = {}
    for d in res["results"]:
        for p in cfg["pairs"]:
            if not all(f"{d}/{m}" in ce for m in [*p["a"], *p["b"]]):
                continue
            paired.setdefault(d, {})[p["name"]] = {
                "a": list(p["a"]), "b": list(p["b"]),
                **paired_over_seeds([ce[f"{d}/{m}"] for m in p["a"]], [ce[f"{d}/{m}"] for m in p["b"]],
                                    cfg["bootstrap"], cfg["seed"])}
    res["paired"] = paired
    (out / "results.json").write_text(json.dumps(res, indent=1))
    table = (out / "table.md").read_text()
    start = table.index("## Paired gaps")
    end = table.index("\n\n## ", start)
    (out / "table.md").write_text(table[:start] + PAIRED_HEADER + "\n\n" + paired_table(paired) + table[end:])
    return paired


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description="recompute the paired gaps of eval output dirs from their per-token CE")
    p.add_argument("dirs", nargs="+", help="output dirs of python -m lnfree.eval (results.json, per_token_ce.npz)")
    for d in p.parse_args(argv).dirs:
        recompute(Path(d))
        print(f"[lnfree] paired gaps recomputed in {d}")


if __name__ == "__main__":
    main()
