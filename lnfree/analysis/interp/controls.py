"""Positive controls over seeds: what the interpretability claims are settled on (compute only; the command is
controls_cli.py, the tables and figures controls_plot.py).

A replicate r is the synthetic control pretrained with seed r (`builtin:synth_w64_1k_s<r>`, conf/model/
synth_w64_1k.yaml; `make interp-control` makes them) and its two fine-tunes with seed r + 1, vanilla
(schedule=none) and LN-free (the default schedule), under <runs>/r<r>/{vanilla,lnfree}. Its arms:
    original   the pretrained model, with LayerNorm
    frozen_ln  the same weights with every norm's scale frozen at its clean-run value (frozen.py; patching only)
    vanilla    fine-tuned with LayerNorm
    lnfree     fine-tuned with every norm removed
Per replicate: AtP vs AP on two tasks (patching.py: the back-copy, whose corruption leaves the copy heads'
attention where it was, and the trigger switch, whose corruption moves it), attention sinks and position-0 norms
per layer (residual.py), and the last MLP's entropy neurons (neurons.py). Over replicates: the mean and a
Student-t 95% interval of every per-replicate number (stats.over_seeds).
"""

from __future__ import annotations

import numpy as np
import torch

from ..stats import over_seeds
from .neurons import ablation_effects, candidates, summary, weight_signature
from .patching import AGREEMENT, SYNTHETIC_TASKS, attention_shift, compare
from .residual import SINK_THRESHOLD, attention_sinks, residual_norms

ARMS = ("original", "frozen_ln", "vanilla", "lnfree")
MODEL_ARMS = ("original", "vanilla", "lnfree")  # the arms that are models of their own


def replicate_models(r: int, runs: str) -> dict[str, str]:
    """arm -> load path of replicate r."""
    return {"original": f"builtin:synth_w64_1k_s{r}", "vanilla": f"{runs}/r{r}/vanilla",
            "lnfree": f"{runs}/r{r}/lnfree"}


# -- one replicate ----------------------------------------------------------------------------------------
def patching(models: dict, task, prompts: int, length: int, bos: int, n_boot: int, seed: int) -> dict:
    """{task: {arm: compare() result (+ attention_shift for the model arms)}} on the same prompts for every arm."""
    out = {}
    for name, make in SYNTHETIC_TASKS.items():
        pairs = make(task, prompts, length, seed=seed, bos=bos)
        res = {}
        for arm in ARMS:
            model = models["original" if arm == "frozen_ln" else arm]
            res[arm] = compare(model, *pairs, n_boot=n_boot, seed=seed, freeze=arm == "frozen_ln")
            if arm != "frozen_ln":
                res[arm]["attention_shift"] = attention_shift(model, pairs[0], pairs[1])
        out[name] = res
    return out


def sinks(model, val: torch.Tensor) -> dict:
    """Per layer: sink heads (alpha > SINK_THRESHOLD), their alphas, and the residual norm at position 0 / the rest
    and the top/median activation ratio at every block input and ln_f's input."""
    n, s = residual_norms(model, val), attention_sinks(model, val)
    alpha = np.asarray(s["alpha"])
    return {"alpha": s["alpha"], "sink_heads": (alpha > SINK_THRESHOLD).sum(1).tolist(),
            "pos0_norm": n["pos0"], "rest_norm": n["rest"],
            "pos0_ratio": [a / b for a, b in zip(n["pos0"], n["rest"])], "massive_pos0": n["massive_pos0"],
            "massive_rest": n["massive_rest"]}


def neurons(models: dict, val: torch.Tensor, tokens: torch.Tensor, k: int) -> dict:
    """Entropy neurons of the last MLP. Candidates: the original model's k neurons of largest output norm and its
    k of largest null-space fraction (effective unembedding: the task's tokens). The top entropy neuron is the
    candidate whose mean ablation moves the original's entropy most (median |delta H| per token, total effect);
    for it, per arm: total and direct effect, LN-mediated fraction, null-space fraction."""
    orig = models["original"]
    cands = {c["neuron"]: c for by in ("norm", "null") for c in candidates(orig, k, tokens=tokens, by=by)}
    rows = [{**c, **summary(ablation_effects(orig, val, i))} for i, c in sorted(cands.items())]
    top = max(rows, key=lambda r: r["median_abs_te_entropy"])
    i, per_arm = top["neuron"], {}
    for arm, model in models.items():  # the fine-tunes start from the original: neuron i is the same unit
        norms, frac = weight_signature(model, tokens=tokens)
        per_arm[arm] = {"neuron": i, "w_out_norm": float(norms[i]), "null_space_fraction": float(frac[i]),
                        **summary(ablation_effects(model, val, i))}
    return {"candidates": rows, "top_neuron": top["neuron"], "top": per_arm,
            "random_direction_null_fraction": 0.1}


def replicate(models: dict, task, val: torch.Tensor, bos: int, prompts: int = 128, length: int = 32,
              n_boot: int = 1000, seed: int = 0, k: int = 16) -> dict:
    """Every measurement of one replicate (models: arm -> model for MODEL_ARMS)."""
    tokens = torch.arange(task.low, task.low + task.vocab)
    return {"patching": patching(models, task, prompts, length, bos, n_boot, seed),
            "sinks": {arm: sinks(m, val) for arm, m in models.items()},
            "neurons": neurons(models, val, tokens, k)}


# -- over replicates ------------------------------------------------------------------------------------
def _over(values) -> dict:
    """over_seeds of a list of numbers, or elementwise of a list of equally shaped nested lists."""
    a = np.asarray(values, dtype=np.float64)
    if a.ndim == 1:
        return over_seeds(a.tolist())
    flat = [over_seeds(a[(slice(None), *i)].tolist()) for i in np.ndindex(a.shape[1:])]
    return {"mean": np.asarray([f["mean"] for f in flat]).reshape(a.shape[1:]).tolist(),
            "ci95": np.asarray([f.get("ci95", [np.nan, np.nan]) for f in flat]).reshape(*a.shape[1:], 2).tolist(),
            "values": a.tolist(), "n": len(a)}


PATCHING_KEYS = ("clean_logit_diff", "corrupted_logit_diff", "clean_positive_fraction", *AGREEMENT)
SINK_KEYS = ("sink_heads", "pos0_ratio", "pos0_norm", "rest_norm", "massive_pos0")
NEURON_KEYS = ("median_abs_te_entropy", "median_abs_de_entropy", "ln_mediated_fraction", "null_space_fraction",
               "mean_te_ce")


def aggregate(reps: dict[int, dict]) -> dict:
    """{patching, sinks, neurons}: per replicate and over replicates (mean, 95% t interval, values)."""
    rs = sorted(reps)
    pat = {}
    for t in SYNTHETIC_TASKS:
        pat[t] = {}
        for arm in ARMS:
            pat[t][arm] = {key: _over([reps[r]["patching"][t][arm][key] for r in rs]) for key in PATCHING_KEYS}
            if arm != "frozen_ln":
                pat[t][arm]["attention_tv_last_query"] = _over(
                    [reps[r]["patching"][t][arm]["attention_shift"]["tv"] for r in rs])
        # LayerNorm's share of AtP's error in the original model: (NMAE original - NMAE frozen) / NMAE original
        share = [1 - reps[r]["patching"][t]["frozen_ln"]["nmae_percent"] / reps[r]["patching"][t]["original"][
            "nmae_percent"] for r in rs]
        pat[t]["ln_share_of_atp_error"] = _over(share)
    sinks_ = {arm: {key: _over([reps[r]["sinks"][arm][key] for r in rs]) for key in SINK_KEYS} for arm in MODEL_ARMS}
    neu = {arm: {key: _over([reps[r]["neurons"]["top"][arm][key] for r in rs]) for key in NEURON_KEYS}
           for arm in MODEL_ARMS}
    after = [reps[r]["neurons"]["top"]["lnfree"]["median_abs_te_entropy"]
             / reps[r]["neurons"]["top"]["original"]["median_abs_te_entropy"] for r in rs]
    neu["lnfree_over_original_entropy_effect"] = _over(after)
    neu["top_neuron"] = [reps[r]["neurons"]["top_neuron"] for r in rs]
    return {"replicates": rs, "patching": pat, "sinks": sinks_, "neurons": neu}
