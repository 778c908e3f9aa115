"""Direct logit attribution (DLA) vs direct effect (DE) of every component on one logit direction.

For a direction u (the unembedding of a token, or a difference of two), the final residual x_L at the last
position decomposes into components c: embeddings, each head's output z_{l,h} W_O^{l,h}, each layer's
attention output bias and each MLP's output. With f(y) = ln_f(y) . u:
    DLA_c = ((c - mean(c)) * gamma / s) . u       s = ln_f's scale on the clean pass (sum over c + beta.u = logit)
    DE_c  = f(x_L) - f(x_L - c)                    ln_f recomputed, so its scale moves with c
With LayerNorm, DE != DLA; with ln_f frozen to a constant sigma, f is affine and DLA == DE up to round-off.
NMAE = mean |DLA - DE| / mean |DE| * 100.
Works on a stock GPT2LMHeadModel (real LN or the HF-compatible LN-free export) and on the removable model.
"""

from __future__ import annotations

import torch

from ...norm import RemovableLayerNorm
from .hooks import run_with_hooks


def _final_scale(ln_f, x: torch.Tensor) -> torch.Tensor:
    """The scale ln_f divides x [..., d] by: the frozen sigma of a removed site, else sqrt(var + eps)."""
    if isinstance(ln_f, RemovableLayerNorm) and ln_f.site.is_removed:
        return ln_f.site.sigma[0].to(x.dtype).expand(x.shape[:-1]).unsqueeze(-1)
    return torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + ln_f.eps)


@torch.no_grad()
def components(model, ids: torch.Tensor, pos: int = -1) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Components of the final residual at `pos` ({name: [batch, d]}) and the residual itself [batch, d]."""
    t = model.transformer
    n_head, d = model.config.n_head, model.config.n_embd
    seen = {}
    hooks = [t.ln_f.register_forward_pre_hook(lambda m, a: seen.__setitem__("resid", a[0]))]
    for i, block in enumerate(t.h):
        hooks.append(block.attn.c_proj.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(f"z{i}", a[0])))
        hooks.append(block.mlp.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(f"mlp{i}", o)))
    run_with_hooks(model, ids, hooks)
    positions = torch.arange(ids.shape[1], device=ids.device)
    comps = {"embed": (t.wte(ids) + t.wpe(positions))[:, pos]}
    for i, block in enumerate(t.h):
        z = seen[f"z{i}"][:, pos]  # [batch, d] = heads side by side
        w_o = block.attn.c_proj.weight  # Conv1D [d_in, d_out]
        dh = d // n_head
        for h in range(n_head):
            comps[f"L{i}H{h}"] = z[:, h * dh:(h + 1) * dh] @ w_o[h * dh:(h + 1) * dh]
        comps[f"L{i}.attn_bias"] = block.attn.c_proj.bias.expand_as(comps["embed"])
        comps[f"L{i}.mlp"] = seen[f"mlp{i}"][:, pos]
    return comps, seen["resid"][:, pos]


@torch.no_grad()
def dla_vs_de(model, ids: torch.Tensor, direction: torch.Tensor, pos: int = -1) -> dict:
    """Per component DLA and DE [batch] for `direction` [d], their NMAE (%) and the decomposition check."""
    comps, resid = components(model, ids, pos)
    ln_f = model.transformer.ln_f
    g, b = ln_f.weight, ln_f.bias

    u = direction.expand_as(resid)  # [d] (one direction) or [batch, d] (e.g. each prompt's answer)

    def f(y):  # [batch, d] -> [batch]
        return (ln_f(y.unsqueeze(1)).squeeze(1) * u).sum(-1)

    s = _final_scale(ln_f, resid.unsqueeze(1)).squeeze(1)  # [batch, 1]
    dla = {k: (((c - c.mean(-1, keepdim=True)) * g / s) * u).sum(-1) for k, c in comps.items()}
    de = {k: f(resid) - f(resid - c) for k, c in comps.items()}
    a, e = torch.stack(list(dla.values())), torch.stack(list(de.values()))  # [component, batch]
    return {
        "dla": dla, "de": de,
        "nmae_percent": float((a - e).abs().mean() / e.abs().mean() * 100),
        "nmae_per_component": {k: float((dla[k] - de[k]).abs().mean() / de[k].abs().mean().clamp_min(1e-12) * 100)
                               for k in comps},
        # sum of DLA + beta.u reproduces the logit exactly, LN or not
        "decomposition_error": float((a.sum(0) + (b * u).sum(-1) - f(resid)).abs().max()),
    }


def main(argv=None):
    """python -m lnfree.analysis.interp.dla [name=path ...]: DLA vs DE for the correct next token at the last position
    of validation prompts of the built-in corpus; writes experiments/builtin_interp/dla.{json,png}."""
    import argparse
    import json
    from pathlib import Path

    import numpy as np

    from ...data.datamodule import TextDataModule
    from ...io import load as load_any

    p = argparse.ArgumentParser(description="DLA vs direct effect per model")
    p.add_argument("models", nargs="*", default=["original=builtin:2x128", "vanilla=outputs/builtin/vanilla",
                                                 "lnfree=outputs/builtin/lnfree"])
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--out", default="experiments/builtin_interp")
    a = p.parse_args(argv)
    out, res = Path(a.out), {}
    out.mkdir(parents=True, exist_ok=True)
    tok = None
    for spec in a.models:
        name, path = spec.split("=", 1)
        model, t = load_any(path)
        tok = tok or t
        dm = TextDataModule(tok, name="builtin", source="builtin", val_split="validation", block_size=a.length + 1,
                            micro_batch_size=1, val_blocks=a.prompts)
        dm.setup()
        ids, target = dm.val_data[:, :-1], dm.val_data[:, -1]
        r = dla_vs_de(model, ids, model.lm_head.weight[target])
        per = r["nmae_per_component"]
        rng = np.random.default_rng(0)
        a_all = torch.stack(list(r["dla"].values())).numpy()
        e_all = torch.stack(list(r["de"].values())).numpy()
        boots = []
        for _ in range(1000):  # bootstrap over prompts
            i = rng.integers(0, a_all.shape[1], a_all.shape[1])
            boots.append(np.abs(a_all[:, i] - e_all[:, i]).mean() / np.abs(e_all[:, i]).mean() * 100)
        res[name] = {"path": path, "nmae_percent": r["nmae_percent"],
                     "ci95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))],
                     "nmae_per_component": per, "decomposition_error": r["decomposition_error"]}
        print(f"{name:10s} NMAE(DLA, DE) = {r['nmae_percent']:.4f}% "
              f"(95% CI {res[name]['ci95'][0]:.4f}-{res[name]['ci95'][1]:.4f})")
    (out / "dla.json").write_text(json.dumps(res, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.5))
    keys = list(next(iter(res.values()))["nmae_per_component"])
    w = 0.8 / len(res)
    for j, (name, r) in enumerate(res.items()):
        ax.bar(np.arange(len(keys)) + j * w, [r["nmae_per_component"][k] for k in keys], w,
               label=f"{name} (all: {r['nmae_percent']:.2g}%)")
    ax.set_xticks(np.arange(len(keys)) + 0.4 - w / 2, keys, rotation=60, fontsize=7)
    ax.set(ylabel="NMAE(DLA, DE) %", title="Direct logit attribution vs direct effect, per component")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "dla.png", dpi=120)
    print(f"[lnfree] written to {out}")


if __name__ == "__main__":
    main()
