"""GPT-2 (GPT2LMHeadModel): LayerNorm with beta; ln_1 read by the fused c_attn (Conv1D [d, 3d]: Q | K | V)."""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from ..norm import SplitLayerNorm
from .base import Family, RemovableMixin, UnsupportedFamily
from .gpt2_folded import ACTIVATIONS, FoldedConfig, FoldedGPT2


def check_gpt2_config(config):
    """Refuse, before any compute, a GPT-2 config whose options the adapter cannot remove exactly (docs/families.md).
    Every attention-scaling option is exact (the adapter's fold moves the scale into the queries); an activation must
    be one the folded form computes (lnfree.families.gpt2_folded.ACTIVATIONS)."""
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


class SplitQKVProjection(nn.Module):
    """GPT-2's c_attn (Conv1D, weight [d, 3d]) that also accepts SplitLayerNorm's [u, f_qk, f_v] input.

    It reads beta from its block's ln_1 (a plain reference, not a submodule: state dicts keep HF's names).
    """

    def __init__(self, n_embd: int, ln: SplitLayerNorm, std: float):
        super().__init__()
        self.nx, self.nf = n_embd, 3 * n_embd
        self.weight = nn.Parameter(torch.empty(n_embd, 3 * n_embd))
        self.bias = nn.Parameter(torch.zeros(3 * n_embd))
        # as GPT-2 initialises its Conv1D (normal, std = config.initializer_range): HF's _init_weights does not
        # know this class, so a removable model built from a config gets the stock init only through `std`
        nn.init.normal_(self.weight, std=std)
        self._ln = (ln,)  # tuple: not registered as a child module

    @property
    def in_features(self) -> int:  # nn.Linear's names, which peft reads to size its LoRA layers (lora.py)
        return self.nx

    @property
    def out_features(self) -> int:
        return self.nf

    @property
    def v_cols(self) -> torch.Tensor:  # [3d]: the value columns (they read f_v), as SplitInputLinear's buffer
        return torch.arange(self.nf, device=self.weight.device) >= 2 * self.nx

    def forward(self, x):  # [batch, pos, d or d + 2] -> [batch, pos, 3d]
        lead = x.shape[:-1]
        if x.shape[-1] == self.nx:
            return torch.addmm(self.bias, x.reshape(-1, self.nx), self.weight).view(*lead, self.nf)
        u, f_qk, f_v = x.split([self.nx, 1, 1], dim=-1)
        y = torch.matmul(u, self.weight).view(*lead, 3, self.nx)  # one matmul for Q, K and V
        beta = self._ln[0].bias
        offset = (torch.matmul(beta.unsqueeze(0), self.weight).squeeze(0) + self.bias).view(3, self.nx)
        f = torch.cat([f_qk, f_qk, f_v], dim=-1).unsqueeze(-1)  # [batch, pos, 3, 1]: Q, K, V
        return torch.addcmul(offset.to(y.dtype), y, f.to(y.dtype)).view(*lead, self.nf)


class GPT2Family(Family):
    name = "gpt2"
    model_types = ("gpt2",)
    centre = True
    eps_field = "layer_norm_epsilon"
    site_names = {"pre_mlp": "ln2", "attn_qk": "ln1qk", "attn_v": "ln1v", "final": "lnf"}  # after ln_2, ln_1, ln_f
    shape_fields = ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size")
    embedding_names = ("transformer.wte.weight", "transformer.wpe.weight")  # wte is tied to the unembedding
    lora_targets = ("c_attn", "c_proj", "c_fc")
    block_class = "GPT2Block"
    blocks_path, final_norm_path = "transformer.h", "transformer.ln_f"
    attn_norm_name, mlp_norm_name = "ln_1", "ln_2"
    attn_readers, mlp_readers = ("attn.c_attn",), ("mlp.c_fc",)  # c_attn: Q | K | V
    attn_out_name, mlp_out_name = "attn.c_proj", "mlp.c_proj"
    conv1d = True

    def check(self, config):
        check_gpt2_config(config)

    def dropout_fields(self):
        return ("resid_pdrop", "embd_pdrop", "attn_pdrop")

    def value_rows(self, config, reader, n_out):
        return torch.arange(n_out) >= 2 * config.n_embd  # the last third of c_attn's outputs

    def stock_class(self, config):
        return GPT2LMHeadModel

    def removable_class(self, config):
        return RemovableGPT2LMHeadModel

    def split_reader(self, linear, ln, name, config):
        return SplitQKVProjection(config.n_embd, ln, config.initializer_range)  # one matmul for Q, K and V

    @torch.no_grad()
    def fold(self, model: RemovableGPT2LMHeadModel) -> FoldedGPT2:
        """GPT-2's folded form (FoldedGPT2, plain torch), in float64, from the folded state dict."""
        c = model.config
        d = c.n_embd
        cfg = FoldedConfig(c.vocab_size, c.n_positions, d, c.n_layer, c.n_head, c.n_inner or 4 * d,
                           c.activation_function)
        folded = FoldedGPT2(cfg).double()
        sd = self.fold_state_dict(model)

        def copy(dst, name):  # a Conv1D's folded weight [in, out] into an nn.Linear [out, in]
            dst.weight.copy_(self.linear_weight(sd, name)), dst.bias.copy_(sd[name + ".bias"])

        folded.wte.weight.copy_(sd["transformer.wte.weight"])
        folded.wpe.weight.copy_(sd["transformer.wpe.weight"])
        for i, dst in enumerate(folded.blocks):
            p = f"transformer.h.{i}."
            # FoldedAttention scales scores by 1/sqrt(d_head); GPT-2's options (scale_attn_weights=false: no scale,
            # scale_attn_by_inverse_layer_idx: 1/(i + 1) more) differ by a factor that goes into the queries,
            # exactly. reorder_and_upcast_attn changes only the precision HF computes the scores in, not what they are.
            q_scale = ((1.0 if c.scale_attn_weights else math.sqrt(d // c.n_head))
                       / (i + 1 if c.scale_attn_by_inverse_layer_idx else 1))
            copy(dst.attn.qkv, p + "attn.c_attn")
            dst.attn.qkv.weight[:d] *= q_scale
            dst.attn.qkv.bias[:d] *= q_scale
            copy(dst.attn.proj, p + "attn.c_proj")
            copy(dst.mlp.fc, p + "mlp.c_fc")
            copy(dst.mlp.proj, p + "mlp.c_proj")
        folded.lm_head.weight.copy_(sd["lm_head.weight"]), folded.lm_head.bias.copy_(sd["lm_head.bias"])
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


