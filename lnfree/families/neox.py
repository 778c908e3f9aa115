"""GPT-NeoX / Pythia (GPTNeoXForCausalLM): LayerNorm with beta; input_layernorm read by the fused
query_key_value (nn.Linear [3d, d], output laid out per head as [q | k | v] of head_size each); partial rotary.

Block, parallel residual (Pythia):  x = x + attn(input_layernorm(x)) + mlp(post_attention_layernorm(x));
sequential (use_parallel_residual=false) as GPT-2. Both are Hugging Face's own code: only norms are swapped.
"""

from __future__ import annotations

import torch
from transformers import GPTNeoXForCausalLM

from .base import Family, RemovableMixin


def value_columns(config) -> torch.Tensor:
    """[3d] bool: which output columns of query_key_value are values (per head: q, k, v of head_size each)."""
    hs = config.hidden_size // config.num_attention_heads
    per_head = torch.tensor([False] * 2 * hs + [True] * hs)
    return per_head.repeat(config.num_attention_heads)


class NeoXFamily(Family):
    name = "gpt_neox"
    model_types = ("gpt_neox",)
    centre = True
    eps_field = "layer_norm_eps"
    embedding_names = ("gpt_neox.embed_in.weight",)  # positions are rotary: no parameters
    lora_targets = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
    block_class = "GPTNeoXLayer"
    blocks_path, final_norm_path = "gpt_neox.layers", "gpt_neox.final_layer_norm"
    attn_norm_name, mlp_norm_name = "input_layernorm", "post_attention_layernorm"
    attn_readers, mlp_readers = ("attention.query_key_value",), ("mlp.dense_h_to_4h",)
    attn_out_name, mlp_out_name = "attention.dense", "mlp.dense_4h_to_h"

    def dropout_fields(self):
        return ("attention_dropout", "hidden_dropout")

    def value_rows(self, config, reader, n_out):
        return value_columns(config)

    def stock_class(self, config):
        return GPTNeoXForCausalLM

    def removable_class(self, config):
        return RemovableGPTNeoXForCausalLM

    def stock_config(self, config):
        return {**config, "attention_bias": True}  # the q/k rows' beta term needs a bias (attention_bias=false too)


NEOX = NeoXFamily()


class RemovableGPTNeoXForCausalLM(RemovableMixin, GPTNeoXForCausalLM):
    family = NEOX

    def __init__(self, config):
        super().__init__(config)
        self._setup_removable()
        self.post_init()
