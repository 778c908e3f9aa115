"""GPT-NeoX / Pythia (GPTNeoXForCausalLM): LayerNorm with beta; input_layernorm read by the fused
query_key_value (nn.Linear [3d, d], output laid out per head as [q | k | v] of head_size each); partial rotary.

Block, parallel residual (Pythia):  x = x + attn(input_layernorm(x)) + mlp(post_attention_layernorm(x));
sequential (use_parallel_residual=false) as GPT-2. Both are Hugging Face's own code: only norms are swapped.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GPTNeoXForCausalLM

from ..norm import RemovableLayerNorm, SplitInputLinear, SplitLayerNorm
from .base import Family, RemovableMixin, sigma


def value_columns(config) -> torch.Tensor:
    """[3d] bool: which output columns of query_key_value are values (per head: q, k, v of head_size each)."""
    hs = config.hidden_size // config.num_attention_heads
    per_head = torch.tensor([False] * 2 * hs + [True] * hs)
    return per_head.repeat(config.num_attention_heads)


def _fold_centred(w, b, gamma, beta, sig):
    """(x - mean) / sig * gamma + beta read by W [out, d], b [out]; sig a scalar or [out] (one per output row).
    W' = W diag(gamma) / sig  P   (P = I - 11^T/d, the centring projector);  b' = b + W beta."""
    wg = w * gamma[None, :] / (sig[:, None] if sig.ndim else sig)
    return wg - wg.mean(1, keepdim=True), (w @ beta) + (0 if b is None else b)


class NeoXFamily(Family):
    name = "gpt_neox"
    model_types = ("gpt_neox",)
    centre = True
    eps_field = "layer_norm_eps"
    embedding_names = ("gpt_neox.embed_in.weight",)  # positions are rotary: no parameters
    lora_targets = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
    block_class = "GPTNeoXLayer"

    def dropout_fields(self):
        return ("attention_dropout", "hidden_dropout")

    def stock_class(self, config):
        return GPTNeoXForCausalLM

    def removable_class(self, config):
        return RemovableGPTNeoXForCausalLM

    def blocks(self, model):
        return list(model.gpt_neox.layers)

    def attn_norm(self, block):
        return block.input_layernorm

    def mlp_norm(self, block):
        return block.post_attention_layernorm

    def final_norm(self, model):
        return model.gpt_neox.final_layer_norm

    def install(self, model, ctx):
        d, eps = model.config.hidden_size, model.config.layer_norm_eps
        v_cols = value_columns(model.config)
        for block in model.gpt_neox.layers:
            ln = SplitLayerNorm(d, eps, ctx)
            block.input_layernorm = ln
            block.attention.query_key_value = SplitInputLinear(block.attention.query_key_value, ln, v_cols)
            block.post_attention_layernorm = RemovableLayerNorm(d, eps, ctx)
        model.gpt_neox.final_layer_norm = RemovableLayerNorm(d, eps, ctx)

    def embed(self, model, ids):
        return model.gpt_neox.embed_in(ids)  # positions are rotary: nothing added to the residual

    def attn_out(self, block):
        return block.attention.dense, block.attention.dense.weight.T

    def mlp(self, block):
        return block.mlp

    def mlp_out(self, block):
        return block.mlp.dense_4h_to_h, block.mlp.dense_4h_to_h.weight.T

    def embedding_params(self, model):
        n = model.gpt_neox.embed_in.weight.numel()
        return n if model.config.tie_word_embeddings else n + model.lm_head.weight.numel()

    # -- exports ----------------------------------------------------------------------------------------
    def stock_config(self, config):
        return {**config, "attention_bias": True}  # the q/k rows' beta term needs a bias (attention_bias=false too)

    def stock_state_dict(self, model, sd, scale):
        v_cols = value_columns(model.config)
        for i, block in enumerate(model.gpt_neox.layers):
            p, ln = f"gpt_neox.layers.{i}.", block.input_layernorm
            s_qk, s_v = sigma(ln.qk), sigma(ln.v)
            d = model.config.hidden_size  # a model without attention biases: its export's are zero, then the beta term
            sd.setdefault(p + "attention.query_key_value.bias", torch.zeros(3 * d, dtype=torch.float64))
            sd.setdefault(p + "attention.dense.bias", torch.zeros(d, dtype=torch.float64))
            sd[p + "input_layernorm.weight"] *= scale / s_v
            # the one norm now divides by s_v: query/key rows take r = s_v / s_qk, and their bias the beta term
            # (x_v-form) W_qk^T r + b' == (x_qk-form) W_qk^T + b   exactly
            r, qk = s_v / s_qk, ~v_cols
            w = sd[p + "attention.query_key_value.weight"]
            b = sd[p + "attention.query_key_value.bias"]
            b[qk] += (1 - r) * (w[qk] @ sd[p + "input_layernorm.bias"])
            w[qk] *= r
            sd[p + "post_attention_layernorm.weight"] *= scale / sigma(block.post_attention_layernorm.site)
        sd["gpt_neox.final_layer_norm.weight"] *= scale / sigma(model.gpt_neox.final_layer_norm.site)

    def folded_model(self, config):
        """GPTNeoXForCausalLM with every norm an identity and an untied unembedding with a bias (lnfree.folded).
        Attention biases always: the input norm's beta lands in query_key_value's bias even where the model has
        none (attention_bias=false; its dense bias is then zero, fold)."""
        cfg = config.__class__.from_dict({**config.to_dict(), "tie_word_embeddings": False, "attention_bias": True})
        cfg._attn_implementation = config._attn_implementation or "sdpa"
        model = GPTNeoXForCausalLM(cfg)
        for block in model.gpt_neox.layers:
            block.input_layernorm, block.post_attention_layernorm = nn.Identity(), nn.Identity()
        model.gpt_neox.final_layer_norm = nn.Identity()
        model.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=True)  # the final norm's beta lands here
        return model

    @torch.no_grad()
    def fold(self, model):
        folded = self.folded_model(model.config).double()
        sd = {k: v.double() for k, v in model.state_dict().items() if k in folded.state_dict()}
        v_cols = value_columns(model.config)
        for i, block in enumerate(model.gpt_neox.layers):
            p, ln = f"gpt_neox.layers.{i}.", block.input_layernorm
            sd.setdefault(p + "attention.dense.bias", torch.zeros(model.config.hidden_size, dtype=torch.float64))
            sig = torch.where(v_cols, sigma(ln.v), sigma(ln.qk))  # [3d]: one sigma per output row
            q = p + "attention.query_key_value."
            sd[q + "weight"], sd[q + "bias"] = _fold_centred(sd[q + "weight"], sd.get(q + "bias"),
                                                             ln.weight.double(), ln.bias.double(), sig)
            ln2, m = block.post_attention_layernorm, p + "mlp.dense_h_to_4h."
            sd[m + "weight"], sd[m + "bias"] = _fold_centred(sd[m + "weight"], sd.get(m + "bias"), ln2.weight.double(),
                                                             ln2.bias.double(), sigma(ln2.site))
        fn = model.gpt_neox.final_layer_norm
        sd["lm_head.weight"], sd["lm_head.bias"] = _fold_centred(
            model.lm_head.weight.double(), None, fn.weight.double(), fn.bias.double(), sigma(fn.site))
        folded.load_state_dict(sd)
        return folded


NEOX = NeoXFamily()


class RemovableGPTNeoXForCausalLM(RemovableMixin, GPTNeoXForCausalLM):
    family = NEOX

    def __init__(self, config):
        super().__init__(config)
        self._setup_removable()
        self.post_init()
