"""Residual-stream norms per layer (position 0 vs the rest) and attention sinks (docs/interpretability.md).

Residual norm: L2 norm of the residual stream at the input of every block and of ln_f, averaged over
sequences, for position 0 and for positions >= 1 (GPT-2's "massive activation" lives at position 0).
Massive activation: top |activation| / median |activation| of the residual stream (Sun et al. 2024), per layer,
at position 0 and at the other positions (the median over every position and feature of the layer).
Attention sink: alpha_{l,h} = mean over queries i >= 1 of A[i, 0] (query 0 can only attend to itself, so it
is left out); the sink rate is the fraction of heads with alpha > 0.3 (per-head definition, Gu et al. 2025).
"""

from __future__ import annotations

import torch

from ...families import family
from .hooks import run_with_hooks

SINK_THRESHOLD = 0.3


def massive_ratio(x: torch.Tensor) -> tuple[float, float]:
    """x [batch, pos, d] -> (top |x| at position 0, top |x| at positions >= 1), each / median |x| over all."""
    a = x.abs().float()
    median = a.flatten().median().clamp_min(1e-30)
    return float(a[:, 0].max() / median), float(a[:, 1:].max() / median)


@torch.no_grad()
def residual_norms(model, ids: torch.Tensor) -> dict[str, list[float]]:
    """{"pos0", "rest"}: mean L2 norm at each block input and at ln_f's input [L+1]; {"massive_pos0",
    "massive_rest"}: top/median activation ratio there [L+1]."""
    fam = family(model.config)
    seen = []
    modules = [*fam.blocks(model), fam.final_norm(model)]
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach())) for m in modules]
    run_with_hooks(model, ids, hooks)
    norms = [x.norm(dim=-1) for x in seen]
    ratios = [massive_ratio(x) for x in seen]
    return {"pos0": [float(n[:, 0].mean()) for n in norms], "rest": [float(n[:, 1:].mean()) for n in norms],
            "massive_pos0": [r[0] for r in ratios], "massive_rest": [r[1] for r in ratios]}


def sink_alpha(attentions) -> torch.Tensor:
    """L x [batch, head, query, key] attention probabilities -> alpha [L, H]: mean over batch and queries >= 1 of
    the attention to key 0."""
    return torch.stack([a[:, :, 1:, 0].float().mean(dim=(0, 2)) for a in attentions])


@torch.no_grad()
def attention_sinks(model, ids: torch.Tensor, threshold: float = SINK_THRESHOLD) -> dict:
    """alpha [L, H] (attention to token 0 from queries >= 1) and the sink rate (needs eager attention)."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")  # attention weights are only materialised by eager attention
    try:
        model.eval()
        attn = model(ids, output_attentions=True).attentions  # L x [batch, head, query, key]
    finally:
        model.set_attn_implementation(previous)
    alpha = sink_alpha(attn)
    return {"alpha": alpha.tolist(), "sink_rate": float((alpha > threshold).float().mean()), "threshold": threshold}


def main(argv=None):
    """python -m lnfree.analysis.interp.residual [name=path ...]: both measures on validation blocks of the built-in
    corpus (--synthetic: of data=synthetic); writes <out>/sinks.{json,png} (make interp: --out
    experiments/interp/builtin)."""
    import json

    from ...records import output_dir
    from ..plots import save_figure
    from .cli import each_model, parser, val_data

    p = parser("residual norms and attention sinks per model", "experiments/interp/builtin")
    p.add_argument("--blocks", type=int, default=64)
    p.add_argument("--prepend-bos", action="store_true", help="blocks start with end-of-text at position 0")
    p.add_argument("--synthetic", action="store_true", help="validation blocks of data=synthetic (BOS first)")
    a = p.parse_args(argv)
    res, tok = {}, None
    for name, path, model, t in each_model(a.models):
        tok = tok or t
        if a.synthetic:
            data = val_data(tok, "synthetic", micro_batch_size=1, val_blocks=a.blocks)
        else:
            data = val_data(tok, "builtin", block_size=256, micro_batch_size=1, val_blocks=a.blocks,
                            prepend_bos=a.prepend_bos)
        res[name] = {"path": path, "norms": residual_norms(model, data), "sinks": attention_sinks(model, data)}
        n = res[name]["norms"]
        print(f"{name:10s} residual norm pos0 {[round(v) for v in n['pos0']]} rest {[round(v) for v in n['rest']]}"
              f"  top/median pos0 {[round(v) for v in n['massive_pos0']]} rest {[round(v) for v in n['massive_rest']]}"
              f"  sink rate {res[name]['sinks']['sink_rate']:.2f}")
    out = output_dir(a.out, "interp/residual")
    meta = {"prepend_bos": a.prepend_bos, "synthetic": a.synthetic}
    (out / "sinks.json").write_text(json.dumps({**res, **meta}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, r in res.items():
        line = ax1.plot(r["norms"]["pos0"], marker="o", label=f"{name}, position 0")[0]
        ax1.plot(r["norms"]["rest"], marker="x", ls="--", color=line.get_color(), label=f"{name}, positions >= 1")
        alpha = torch.tensor(r["sinks"]["alpha"]).flatten()
        ax2.scatter([name] * len(alpha), alpha, alpha=0.7)
    ax1.set_xticks(range(len(r["norms"]["pos0"])))
    ax1.set(xlabel="residual stream at the input of block (last: ln_f)", ylabel="mean L2 norm", yscale="log",
            title="Residual-stream norm")
    ax1.legend(fontsize=7)
    ax2.axhline(SINK_THRESHOLD, color="k", ls=":", lw=1)
    ax2.set(ylabel="mean attention to token 0 (queries >= 1)", title="Attention sinks: one dot per head")
    save_figure(fig, out / "sinks.png")
    print(f"[lnfree] written to {out}")


if __name__ == "__main__":
    main()
