"""GPT-2 (GPT2LMHeadModel): LayerNorm with beta; ln_1 read by the fused c_attn (Conv1D [d, 3d]: Q | K | V)."""

from __future__ import annotations

import math

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from ..folded import ACTIVATIONS, FoldedConfig, FoldedGPT2
from ..norm import RemovableLayerNorm, SplitLayerNorm, SplitQKVProjection
from .base import GPT2_ALIASES, Family, RemovableMixin, UnsupportedFamily, sigma


def check_gpt2_config(config):
    """Refuse, before any compute, a GPT-2 config whose options the adapter cannot remove exactly (docs/families.md).
    Every attention-scaling option is exact (fold_gpt2 moves the scale into the queries); an activation must be one
    the folded form computes (lnfree.folded.ACTIVATIONS)."""
    if getattr(config, "model_type", None) != "gpt2":
        raise ValueError(
            f"not a GPT-2-architecture config; got model_type={getattr(config, 'model_type', None)!r} "
            f"({type(config).__name__})"
        )
    if getattr(config, "add_cross_attention", False):
        raise UnsupportedFamily("GPT-2 with cross-attention is not supported")
    act = getattr(config, "activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise UnsupportedFamily(f"GPT-2 with activation_function={act!r} is not supported (its folded export could "
                                f"not compute it); supported: {', '.join(sorted(ACTIVATIONS))}")


class GPT2Family(Family):
    name = "gpt2"
    model_types = ("gpt2",)
    centre = True
    eps_field = "layer_norm_epsilon"
    site_names = {generic: alias for alias, generic in GPT2_ALIASES.items()}  # ln2, ln1qk, ln1v, lnf
    shape_fields = ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size")
    embedding_names = ("transformer.wte.weight", "transformer.wpe.weight")  # wte is tied to the unembedding
    lora_targets = ("c_attn", "c_proj", "c_fc")
    block_class = "GPT2Block"

    def check(self, config):
        check_gpt2_config(config)

    def dropout_fields(self):
        return ("resid_pdrop", "embd_pdrop", "attn_pdrop")

    def stock_class(self, config):
        return GPT2LMHeadModel

    def removable_class(self, config):
        return RemovableGPT2LMHeadModel

    def blocks(self, model):
        return list(model.transformer.h)

    def attn_norm(self, block):
        return block.ln_1

    def mlp_norm(self, block):
        return block.ln_2

    def final_norm(self, model):
        return model.transformer.ln_f

    def install(self, model, ctx):
        d, eps = model.config.n_embd, model.config.layer_norm_epsilon
        for block in model.transformer.h:
            block.ln_1 = SplitLayerNorm(d, eps, ctx)
            block.attn.c_attn = SplitQKVProjection(d, block.ln_1, model.config.initializer_range)
            block.ln_2 = RemovableLayerNorm(d, eps, ctx)
        model.transformer.ln_f = RemovableLayerNorm(d, eps, ctx)

    def embed(self, model, ids):
        t = model.transformer
        return t.wte(ids) + t.wpe(torch.arange(ids.shape[1], device=ids.device))

    def attn_out(self, block):
        return block.attn.c_proj, block.attn.c_proj.weight  # Conv1D: already [d_in, d_out]

    def mlp(self, block):
        return block.mlp

    def mlp_out(self, block):
        return block.mlp.c_proj, block.mlp.c_proj.weight  # Conv1D: already [d_mlp, d_out]

    def embedding_params(self, model):
        t = model.transformer  # wte is tied to the unembedding
        return t.wte.weight.numel() + t.wpe.weight.numel()

    def stock_state_dict(self, model, sd, scale):
        d = model.config.n_embd
        for i, block in enumerate(model.transformer.h):
            p = f"transformer.h.{i}."
            s_qk, s_v = sigma(block.ln_1.qk), sigma(block.ln_1.v)
            sd[p + "ln_1.weight"] *= scale / s_v
            # the one ln_1 now divides by s_v; rescale Q,K columns by r = s_v / s_qk and correct the bias
            # so that (x_v-form) @ (r W_qk) + b' == (x_qk-form) @ W_qk + b   exactly
            r = s_v / s_qk
            w_qk = sd[p + "attn.c_attn.weight"][:, : 2 * d]
            sd[p + "attn.c_attn.bias"][: 2 * d] += (1 - r) * (sd[p + "ln_1.bias"] @ w_qk)
            sd[p + "attn.c_attn.weight"][:, : 2 * d] = r * w_qk
            sd[p + "ln_2.weight"] *= scale / sigma(block.ln_2.site)
        sd["transformer.ln_f.weight"] *= scale / sigma(model.transformer.ln_f.site)

    def fold(self, model):
        return fold_gpt2(model)


# -- folded form -----------------------------------------------------------------------------------------
def _fold(weight, bias, gamma, beta, sigma):
    """Fold (x - mean) / sigma * gamma + beta into a reader x @ W + b (Conv1D layout W: [d, out]).

    W' = P diag(gamma / sigma) W   with P = I - 11^T/d the centring projector;  b' = b + beta W.
    Returns the nn.Linear layout: weight [out, d], bias [out].
    """
    wg = (gamma / sigma)[:, None] * weight
    w = wg - wg.mean(0, keepdim=True)  # P @ wg
    b = beta @ weight + (0 if bias is None else bias)
    return w.T, b


@torch.no_grad()
def fold_gpt2(model: "RemovableGPT2LMHeadModel") -> FoldedGPT2:
    """GPT-2's folded form (FoldedGPT2, plain torch), in float64."""
    c = model.config
    d = c.n_embd
    cfg = FoldedConfig(c.vocab_size, c.n_positions, d, c.n_layer, c.n_head, c.n_inner or 4 * d,
                       c.activation_function)
    folded = FoldedGPT2(cfg).double()
    t = model.transformer
    folded.wte.weight.copy_(t.wte.weight)
    folded.wpe.weight.copy_(t.wpe.weight)
    for i, (src, dst) in enumerate(zip(t.h, folded.blocks)):
        ln1, attn, mlp = src.ln_1, src.attn, src.mlp
        g, b = ln1.weight.double(), ln1.bias.double()
        w, bias = attn.c_attn.weight.double(), attn.c_attn.bias.double()
        wq, bq = _fold(w[:, : 2 * d], bias[: 2 * d], g, b, sigma(ln1.qk))
        # FoldedAttention scales scores by 1/sqrt(d_head); GPT-2's options (scale_attn_weights=false: no scale,
        # scale_attn_by_inverse_layer_idx: 1/(i + 1) more) differ by a factor that goes into the queries, exactly.
        # reorder_and_upcast_attn changes only the precision HF computes the scores in, not what they are.
        q_scale = ((1.0 if c.scale_attn_weights else math.sqrt(d // c.n_head))
                   / (i + 1 if c.scale_attn_by_inverse_layer_idx else 1))
        wq[:d], bq[:d] = wq[:d] * q_scale, bq[:d] * q_scale
        wv, bv = _fold(w[:, 2 * d :], bias[2 * d :], g, b, sigma(ln1.v))
        dst.attn.qkv.weight.copy_(torch.cat([wq, wv])), dst.attn.qkv.bias.copy_(torch.cat([bq, bv]))
        dst.attn.proj.weight.copy_(attn.c_proj.weight.T), dst.attn.proj.bias.copy_(attn.c_proj.bias)
        wf, bf = _fold(mlp.c_fc.weight.double(), mlp.c_fc.bias.double(), src.ln_2.weight.double(),
                       src.ln_2.bias.double(), sigma(src.ln_2.site))
        dst.mlp.fc.weight.copy_(wf), dst.mlp.fc.bias.copy_(bf)
        dst.mlp.proj.weight.copy_(mlp.c_proj.weight.T), dst.mlp.proj.bias.copy_(mlp.c_proj.bias)
    w_u = model.lm_head.weight.double().T  # [d, vocab]; tied to wte in GPT-2, untied here
    wu, bu = _fold(w_u, None, t.ln_f.weight.double(), t.ln_f.bias.double(), sigma(t.ln_f.site))
    folded.lm_head.weight.copy_(wu), folded.lm_head.bias.copy_(bu)
    return folded


GPT2 = GPT2Family()


class RemovableGPT2LMHeadModel(RemovableMixin, GPT2LMHeadModel):
    """GPT-2 with removable norms. Extra config fields (saved with the model):
    lnfree_special_bos / lnfree_special_eot: give position 0 / end-of-text tokens their own frozen sigma
    until a `bos` / `eot` event (default False, as in the published runs).
    """

    family = GPT2

    def __init__(self, config: GPT2Config):
        check_gpt2_config(config)
        super().__init__(config)
        self._setup_removable()
        self.post_init()


