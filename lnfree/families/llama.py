"""Llama architecture (LlamaForCausalLM; Mistral and Qwen2, which differ only in config: q/k/v biases, sliding
windows): RMSNorm (scale only, no centring, no beta); input_layernorm read by separate q_proj, k_proj, v_proj.

Block (pre-norm, sequential):  x = x + attn(input_layernorm(x));  x = x + mlp(post_attention_layernorm(x)).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

from ..norm import RemovableLayerNorm, SplitInputLinear, SplitLayerNorm
from .base import Family, RemovableMixin, UnsupportedFamily, sigma

STOCK = {"llama": LlamaForCausalLM, "mistral": MistralForCausalLM, "qwen2": Qwen2ForCausalLM}


class LlamaFamily(Family):
    name = "llama"
    model_types = tuple(STOCK)
    centre = False
    eps_field = "rms_norm_eps"
    embedding_names = ("model.embed_tokens.weight",)  # positions are rotary: no parameters
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    block_class = "LlamaDecoderLayer"

    def check(self, config):
        if getattr(config, "mlp_bias", False):
            raise UnsupportedFamily("lnfree's Llama adapter covers MLPs without biases (mlp_bias=false)")

    def dropout_fields(self):
        return ("attention_dropout",)  # Llama has no residual or embedding dropout

    def stock_class(self, config):
        return STOCK[config.model_type]

    def removable_class(self, config):
        return REMOVABLE[config.model_type]

    def blocks(self, model):
        return list(model.model.layers)

    def attn_norm(self, block):
        return block.input_layernorm

    def mlp_norm(self, block):
        return block.post_attention_layernorm

    def final_norm(self, model):
        return model.model.norm

    def install(self, model, ctx):
        d, eps = model.config.hidden_size, model.config.rms_norm_eps
        for block in model.model.layers:
            ln = SplitLayerNorm(d, eps, ctx, centre=False)
            block.input_layernorm = ln
            a = block.self_attn
            for name, is_v in (("q_proj", False), ("k_proj", False), ("v_proj", True)):
                lin = getattr(a, name)
                setattr(a, name, SplitInputLinear(lin, ln, torch.full((lin.out_features,), is_v)))
            block.post_attention_layernorm = RemovableLayerNorm(d, eps, ctx, centre=False)
        model.model.norm = RemovableLayerNorm(d, eps, ctx, centre=False)

    def embed(self, model, ids):
        return model.model.embed_tokens(ids)  # positions are rotary: nothing added to the residual

    def attn_out(self, block):
        return block.self_attn.o_proj, block.self_attn.o_proj.weight.T

    def mlp(self, block):
        return block.mlp

    def mlp_out(self, block):
        return block.mlp.down_proj, block.mlp.down_proj.weight.T

    def embedding_params(self, model):
        n = model.model.embed_tokens.weight.numel()
        return n if model.config.tie_word_embeddings else n + model.lm_head.weight.numel()

    # -- exports ----------------------------------------------------------------------------------------
    def stock_state_dict(self, model, sd, scale):
        for i, block in enumerate(model.model.layers):
            p = f"model.layers.{i}."
            s_qk, s_v = sigma(block.input_layernorm.qk), sigma(block.input_layernorm.v)
            sd[p + "input_layernorm.weight"] *= scale / s_v
            # the one norm now divides by s_v; the query/key readers take r = s_v / s_qk (no beta: biases unchanged)
            for name in ("q_proj", "k_proj"):
                sd[p + f"self_attn.{name}.weight"] *= s_v / s_qk
            sd[p + "post_attention_layernorm.weight"] *= scale / sigma(block.post_attention_layernorm.site)
        sd["model.norm.weight"] *= scale / sigma(model.model.norm.site)

    def folded_model(self, config):
        """The family's HF class with every norm an identity and an untied unembedding (lnfree.folded)."""
        cfg = config.__class__.from_dict({**config.to_dict(), "tie_word_embeddings": False})
        cfg._attn_implementation = config._attn_implementation or "sdpa"
        model = STOCK[config.model_type](cfg)
        for block in model.model.layers:
            block.input_layernorm, block.post_attention_layernorm = nn.Identity(), nn.Identity()
        model.model.norm = nn.Identity()
        return model

    @torch.no_grad()
    def fold(self, model):
        """x / sigma * gamma read by W: W' = W diag(gamma / sigma) (no centring, no beta: biases unchanged)."""
        folded = self.folded_model(model.config).double()
        sd = {k: v.double() for k, v in model.state_dict().items() if k in folded.state_dict()}
        sd["lm_head.weight"] = model.lm_head.weight.double().clone()  # untied copy
        for i, block in enumerate(model.model.layers):
            p, ln = f"model.layers.{i}.", block.input_layernorm
            g = ln.weight.double()
            for name, site in (("q_proj", ln.qk), ("k_proj", ln.qk), ("v_proj", ln.v)):
                sd[p + f"self_attn.{name}.weight"] = sd[p + f"self_attn.{name}.weight"] * (g / sigma(site))
            ln2 = block.post_attention_layernorm
            g2 = ln2.weight.double() / sigma(ln2.site)
            for name in ("gate_proj", "up_proj"):
                sd[p + f"mlp.{name}.weight"] = sd[p + f"mlp.{name}.weight"] * g2
        fn = model.model.norm
        sd["lm_head.weight"] = sd["lm_head.weight"] * (fn.weight.double() / sigma(fn.site))
        folded.load_state_dict(sd)
        return folded


LLAMA = LlamaFamily()


def _removable(stock):
    class Removable(RemovableMixin, stock):
        family = LLAMA

        def __init__(self, config):
            LLAMA.check(config)
            super().__init__(config)
            self._setup_removable()
            self.post_init()

    Removable.__name__ = Removable.__qualname__ = f"Removable{stock.__name__}"
    return Removable


RemovableLlamaForCausalLM = _removable(LlamaForCausalLM)
RemovableMistralForCausalLM = _removable(MistralForCausalLM)
RemovableQwen2ForCausalLM = _removable(Qwen2ForCausalLM)
REMOVABLE = {"llama": RemovableLlamaForCausalLM, "mistral": RemovableMistralForCausalLM,
             "qwen2": RemovableQwen2ForCausalLM}
