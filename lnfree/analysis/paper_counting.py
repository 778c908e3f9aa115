"""The paper's own counting of the data needed, beside ours (issue 39; docs/results.md).

    python -m lnfree.analysis.paper_counting      # prints the table and the two exponents

The paper (Baroni et al. 2025) published one fine-tuning schedule per GPT-2 size; conf/experiment/gpt2_*_paper.yaml
carry them (steps, tokens per step, removal events). Two ways to count its data, both fitted as tokens ~ N^k over
the four sizes by least squares on logs (no interval: four published numbers, one run each, no seeds):
- total tokens of the run (what the authors spent: the budget question),
- tokens until the last removal event (when the model is LN-free; fine-tuning continues after it).
Neither is our T*: T* is the budget at which an LN-free model gets within a threshold of its vanilla control (the
data-needed question), measured per size on a grid; the paper states no threshold and no exponent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..schedule import EVENT_KINDS, build_events

ROOT = Path(__file__).resolve().parents[2]
PAPER_RUNS = ("gpt2_small_paper", "gpt2_medium_paper", "gpt2_large_paper", "gpt2_xl_paper")
# GPT-2's published shapes (n_layer, n_embd; vocabulary 50257, context 1024), which conf/model/gpt2*.yaml load from
# the hub rather than state
GPT2_SHAPES = {"gpt2": (12, 768), "gpt2_medium": (24, 1024), "gpt2_large": (36, 1280), "gpt2_xl": (48, 1600)}
VOCAB, CONTEXT = 50257, 1024


def gpt2_params(n_layer: int, d: int) -> tuple[int, int]:
    """(non-embedding, total) parameters of a GPT-2 block stack: per block attention 4 d^2 + 4 d, MLP 8 d^2 + 5 d,
    two LayerNorms 4 d; the final LayerNorm 2 d; embeddings (tied unembedding) (vocab + context) d."""
    non_embedding = n_layer * (12 * d * d + 13 * d) + 2 * d
    return non_embedding, non_embedding + (VOCAB + CONTEXT) * d


def schedules(root: Path = ROOT) -> list[dict]:
    """One row per published run, composed from the project's Hydra configs."""
    from hydra import compose, initialize_config_dir

    import lnfree.training.config  # noqa: F401  (registers the config schema)

    rows = []
    with initialize_config_dir(config_dir=str(root / "conf"), version_base="1.3"):
        for exp in PAPER_RUNS:
            c = compose("train", overrides=[f"experiment={exp}"])
            n_layer, d = GPT2_SHAPES[c.model.name]
            sched = {k: dict(c.schedule[k]) for k in EVENT_KINDS if c.schedule.get(k) is not None}
            last = max(e.step for e in build_events({"name": c.schedule.name, **sched}, n_layer, c.trainer.max_steps))
            non_emb, total = gpt2_params(n_layer, d)
            rows.append({"run": exp, "model": c.model.name, "params": total, "non_embedding_params": non_emb,
                         "steps": int(c.trainer.max_steps), "tokens_per_step": int(c.optim.tokens_per_step),
                         "total_tokens": int(c.trainer.max_steps * c.optim.tokens_per_step),
                         "last_removal_step": int(last),
                         "tokens_until_last_removal": int(last * c.optim.tokens_per_step)})
    return rows


def exponents(rows: list[dict], params: str = "params") -> dict:
    """Least-squares k of tokens ~ N^k over the published runs, for both counts."""
    x = np.log([r[params] for r in rows])
    return {count: float(np.polyfit(x, np.log([r[count] for r in rows]), 1)[0])
            for count in ("total_tokens", "tokens_until_last_removal")}


def main(argv=None):
    rows = schedules()
    for r in rows:
        print(r)
    print("k (total params):", exponents(rows), " k (non-embedding params):", exponents(rows, "non_embedding_params"))


if __name__ == "__main__":
    main()
