"""Confidence (entropy) neurons (docs/interpretability.md): last-layer MLP neurons whose output weight lies in the
unembedding's (effective) null space act on the logits through the final norm's scale, a temperature.

Candidates (weights only): the last MLP's neurons ranked by output-weight norm ||w_i|| and by the fraction of
||w_i||^2 in the span of the effective unembedding's smallest singular directions (W_U with ln_f's gain folded
in). Effect: mean-ablate the neuron (its activation set to its mean over the data) and measure, per token, the
change in entropy and in CE of the next-token distribution:
    total effect (TE):  the forward is rerun, so ln_f recomputes its scale
    direct effect (DE): the final residual moves by (mean - act) w_i but ln_f's scale stays the clean one
LN-mediated fraction = 1 - mean|DE| / mean|TE|. The neuron is in the last block, so its only path to the logits
is direct: with ln_f frozen (LN-free) TE == DE exactly.

    python -m lnfree.analysis.interp.neurons [name=path ...]      -> experiments/interp/builtin/neurons.{json,png}
"""

from __future__ import annotations

import contextlib

import torch

from ...families import family
from .dla import final_scale


def _last_mlp_out(model):
    """The last MLP's output projection (its input: one activation per neuron) and its weight [d_mlp, d]
    (row i: neuron i's output weight), whatever the family."""
    fam = family(model.config)
    return fam.mlp_out(fam.blocks(model)[-1])


def weight_signature(model, null_dims: float = 0.1, tokens: torch.Tensor | None = None):
    """Every last-MLP neuron's output-weight norm [d_mlp] and the fraction of its squared norm in the span of the
    smallest `null_dims` of the effective unembedding's singular directions [d_mlp]. `tokens`: the ids the model
    ever has to predict (a synthetic task's), whose unembedding rows alone make the effective one; default all."""
    w_out = _last_mlp_out(model)[1].detach().double()  # [d_mlp, d]: row i = neuron i's output weight
    ln_f = family(model.config).final_norm(model)
    w_u = model.get_output_embeddings().weight.detach().double() * ln_f.weight.detach().double()  # [vocab, d], gain in
    if tokens is not None:
        w_u = w_u[tokens]
    w_u = w_u - w_u.mean(0, keepdim=True)  # softmax ignores a shift common to all tokens: centre over the vocab
    # rows of vh: all d right singular directions, largest first. Full matrices only when the rows are fewer than d
    # (a synthetic task's few tokens: the null space is then the missing directions); with a real vocabulary the
    # reduced SVD has the same vh, and the full one would build a [vocab, vocab] U (19 GB in fp64 at 49k tokens)
    _, _, vh = torch.linalg.svd(w_u, full_matrices=w_u.shape[0] < w_u.shape[1])
    n_null = max(1, int(round(null_dims * vh.shape[0])))
    null = vh[-n_null:]  # [n_null, d]
    norms = w_out.norm(dim=1)
    return norms, ((w_out @ null.T) ** 2).sum(1) / norms.clamp_min(1e-30) ** 2


def candidates(model, k: int = 8, null_dims: float = 0.1, tokens: torch.Tensor | None = None,
               by: str = "norm") -> list[dict]:
    """The k neurons with the largest output-weight norm (by="norm") or null-space fraction (by="null"), each
    with both."""
    norms, frac = weight_signature(model, null_dims, tokens)
    top = torch.argsort(norms if by == "norm" else frac, descending=True)[:k]
    return [{"neuron": int(i), "w_out_norm": float(norms[i]), "null_space_fraction": float(frac[i])} for i in top]


@contextlib.contextmanager
def _hook(module, fn, pre: bool = False):
    h = module.register_forward_pre_hook(fn) if pre else module.register_forward_hook(fn)
    try:
        yield
    finally:
        h.remove()


def _entropy_ce(logits, ids):
    logp = torch.log_softmax(logits[:, :-1].double(), -1)
    ent = -(logp.exp() * logp).sum(-1)
    ce = -logp.gather(-1, ids[:, 1:, None])[..., 0]
    return ent, ce


@torch.no_grad()
def ablation_effects(model, ids: torch.Tensor, neuron: int, mean_act: float | None = None) -> dict:
    """Per-token TE and DE of mean-ablating `neuron` of the last MLP on entropy and CE ([batch, pos-1] each)."""
    model.eval()
    fam = family(model.config)
    (proj, w_out), ln_f = _last_mlp_out(model), fam.final_norm(model)
    seen = {}  # the neurons' activations are the output projection's input
    with _hook(proj, lambda m, a: seen.__setitem__("act", a[0]), pre=True), \
         _hook(ln_f, lambda m, i, o: seen.__setitem__("resid", i[0])):
        clean = model(input_ids=ids).logits
    act = seen["act"][..., neuron]  # [batch, pos]
    mean = float(act.mean()) if mean_act is None else mean_act

    def ablate(m, args):
        x = args[0].clone()
        x[..., neuron] = mean
        return (x, *args[1:])

    with _hook(proj, ablate, pre=True):
        total = model(input_ids=ids).logits
    # direct: move the final residual, keep the clean scale of ln_f (an RMSNorm, Llama: no centring, no beta)
    x = seen["resid"]
    w_i = w_out[neuron]  # [d]
    x_new = x + (mean - act)[..., None] * w_i
    s = final_scale(ln_f, x, fam.centre)
    normed = ((x_new - x_new.mean(-1, keepdim=True)) if fam.centre else x_new) / s * ln_f.weight
    if fam.centre:
        normed = normed + ln_f.bias
    direct = model.get_output_embeddings()(normed)
    e0, c0 = _entropy_ce(clean, ids)
    e_t, c_t = _entropy_ce(total, ids)
    e_d, c_d = _entropy_ce(direct, ids)
    return {"mean_act": mean, "te_entropy": e_t - e0, "de_entropy": e_d - e0, "te_ce": c_t - c0, "de_ce": c_d - c0}


def summary(effects: dict) -> dict:
    te, de = effects["te_entropy"].abs(), effects["de_entropy"].abs()
    return {"median_abs_te_entropy": float(te.median()), "median_abs_de_entropy": float(de.median()),
            "mean_te_entropy": float(effects["te_entropy"].mean()), "mean_te_ce": float(effects["te_ce"].mean()),
            "mean_de_ce": float(effects["de_ce"].mean()),
            "ln_mediated_fraction": float(1 - de.mean() / te.mean().clamp_min(1e-30))}


def main(argv=None):
    from ...records import output_dir
    from .cli import each_model, parser, val_data, write_result

    p = parser("confidence (entropy) neurons of the last MLP", "experiments/interp/builtin")
    p.add_argument("--blocks", type=int, default=32, help="validation blocks of 256 tokens")
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--by", choices=("norm", "null"), default="norm",
                   help="rank the last MLP's neurons by output-weight norm or by null-space fraction")
    a = p.parse_args(argv)
    out, res = output_dir(a.out, "interp/neurons"), {}
    for name, path, model, tok in each_model(a.models):
        data = val_data(tok, "builtin", block_size=256, micro_batch_size=8, val_blocks=a.blocks)
        rows = []
        for c in candidates(model, a.top, by=a.by):
            rows.append({**c, **summary(ablation_effects(model, data, c["neuron"]))})
        res[name] = {"path": path, "ranked_by": a.by, "neurons": rows}
        best = max(rows, key=lambda r: r["median_abs_te_entropy"])
        print(f"{name:10s} strongest entropy effect: neuron {best['neuron']} (||w|| {best['w_out_norm']:.2f}, null "
              f"fraction {best['null_space_fraction']:.3f}): median |dH| TE {best['median_abs_te_entropy']:.4f}, "
              f"DE {best['median_abs_de_entropy']:.4f}, LN-mediated {100 * best['ln_mediated_fraction']:.1f}%")
    write_result(out, "neurons", res, plot)


def plot(res: dict, path):
    """Per model: total vs direct effect on entropy for each candidate (bars), and the LN-mediated fraction
    against the null-space fraction (the paper's confidence neurons sit top right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(res) + 1, figsize=(4.2 * (len(res) + 1), 3.6), squeeze=False)
    for ax, (name, r) in zip(axes[0], res.items()):
        rows = r["neurons"]
        x = np.arange(len(rows))
        ax.bar(x - 0.2, [n["median_abs_te_entropy"] for n in rows], 0.4, label="total effect")
        ax.bar(x + 0.2, [n["median_abs_de_entropy"] for n in rows], 0.4, label="direct effect (scale frozen)")
        ax.set_xticks(x, [str(n["neuron"]) for n in rows], fontsize=7)
        ax.set(title=name, xlabel="neuron (last MLP, by output norm)", ylabel="median |delta entropy| per token")
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    for name, r in res.items():
        ax.scatter([n["null_space_fraction"] for n in r["neurons"]],
                   [100 * n["ln_mediated_fraction"] for n in r["neurons"]], label=name, alpha=0.7)
    ax.axvline(0.1, color="k", ls=":", lw=1)
    ax.set(xlabel="fraction of ||w_out||^2 in W_U's null space (random: 0.10)", ylabel="LN-mediated effect (%)",
           title="Confidence-neuron signature")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
