"""Llama architecture (LlamaForCausalLM; Mistral and Qwen2, which differ only in config: q/k/v biases, sliding
windows): RMSNorm (scale only, no centring, no beta); input_layernorm read by separate q_proj, k_proj, v_proj.

Block (pre-norm, sequential):  x = x + attn(input_layernorm(x));  x = x + mlp(post_attention_layernorm(x)).
"""

from __future__ import annotations

import torch
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

from .base import Family, RemovableMixin, UnsupportedFamily

STOCK = {"llama": LlamaForCausalLM, "mistral": MistralForCausalLM, "qwen2": Qwen2ForCausalLM}


class LlamaFamily(Family):
    name = "llama"
    model_types = tuple(STOCK)
    centre = False
    eps_field = "rms_norm_eps"
    embedding_names = ("model.embed_tokens.weight",)  # positions are rotary: no parameters
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    block_class = "LlamaDecoderLayer"
    blocks_path, final_norm_path = "model.layers", "model.norm"
    attn_norm_name, mlp_norm_name = "input_layernorm", "post_attention_layernorm"
    attn_readers = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    mlp_readers = ("mlp.gate_proj", "mlp.up_proj")
    attn_out_name, mlp_out_name = "self_attn.o_proj", "mlp.down_proj"

    def check(self, config):
        if getattr(config, "mlp_bias", False):
            raise UnsupportedFamily("lnfree's Llama adapter covers MLPs without biases (mlp_bias=false)")

    def dropout_fields(self):
        return ("attention_dropout",)  # Llama has no residual or embedding dropout

    def value_rows(self, config, reader, n_out):
        return torch.full((n_out,), reader == "self_attn.v_proj")  # separate projections: all or none

    def stock_class(self, config):
        return STOCK[config.model_type]

    def removable_class(self, config):
        return REMOVABLE[config.model_type]


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
