"""`make paper`'s last step: every table and figure that the committed records make, with no model and no run dir.

    python -m tools.paper      (from the repository root)

In order: the paired gaps and table.md of every evaluation (paired_tables.recompute, from per_token_ce.npz); their
per-token CE figures (ce_hist.png, ce_by_position.png, from the same npz); every family's family.png (from
family.json and curves/); then every marked table of the README, docs/ and experiments/ (doc_tables.write). The
data-scaling analyses (scaling.json, scaling.md, scaling.png from runs.jsonl) are Makefile targets of their own
that `make paper` runs before this step. Figures that need the models or the run dirs (training curves, the
interpretability figures) are made only by their experiments' commands.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lnfree.analysis.family import redraw
from lnfree.analysis.paired_tables import recompute
from lnfree.analysis.plots import plot_ce_by_position, plot_ce_hist

from .doc_tables import ROOT, write

EVALUATIONS = ("experiments/builtin_eval", "experiments/ablations", "experiments/lora", "experiments/shift",
               "experiments/shift/steps_300", "experiments/families/llama", "experiments/families/neox")
FAMILIES = ("experiments/builtin_family", "experiments/builtin_family/dropout_0.2", "experiments/depth_family",
            "experiments/depth_family/recipe_4000_steps")


def regenerate(root: Path = ROOT):
    for rel in EVALUATIONS:
        out = root / rel
        if not (out / "per_token_ce.npz").exists():
            continue
        recompute(out)
        ce = np.load(out / "per_token_ce.npz")
        per_token = {tuple(k.split("/", 1)): {"ce": ce[k]} for k in ce.files}
        plot_ce_hist(per_token, out / "ce_hist.png")
        plot_ce_by_position(per_token, out / "ce_by_position.png")
        print(f"[lnfree] {rel}: paired gaps, table.md and per-token figures regenerated")
    for rel in FAMILIES:
        if (root / rel / "family.json").exists():
            redraw(root / rel)
            print(f"[lnfree] {rel}: family.png regenerated")
    changed = write(root)
    print("\n".join(f"[lnfree] rewrote {c}" for c in changed) or "[lnfree] every marked table matches its JSON")


def main(argv=None):
    regenerate()


if __name__ == "__main__":
    main()
