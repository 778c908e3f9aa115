"""GPT-2's folded form: a plain-torch, norm-free GPT-2 (FoldedGPT2), built by the GPT-2 adapter's fold
(families/gpt2.py) and saved / loaded by lnfree.folded as folded_config.json (FoldedConfig) + folded.safetensors.

Every frozen norm site has been folded into the linear layer that reads it, so a block is
    x = x + attn(x) ;  x = x + mlp(x)                  and   logits = x @ W_U' + b_U'
with learned positions (wpe) and an untied unembedding that carries a bias. Plain torch only: loading it needs
nothing but torch and safetensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import Dims

# the MLP activations of GPT-2 configs (their names in transformers' ACT2FN) that the folded form computes, each the
# same function as transformers'; a GPT-2 config with any other is refused before training (families/gpt2.py)
ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "linear": lambda x: x,
}


@dataclass
class FoldedConfig:
    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    n_inner: int
    activation_function: str = "gelu_new"

    def dims(self) -> Dims:
        """The shape under lnfree's names (lnfree.model_record.shape_of); no norms, so no eps."""
        return Dims(self.n_layer, self.n_embd, self.n_head, self.n_positions, 0.0)


class FoldedAttention(nn.Module):
    def __init__(self, cfg: FoldedConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)  # reads the raw residual stream
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x, mask):  # x: [batch, pos, d]; mask: None or [batch, 1, pos, pos] bool
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.proj(z.transpose(1, 2).reshape(b, t, d))  # z: [batch, head, pos, d_head]


class FoldedMLP(nn.Module):
    def __init__(self, cfg: FoldedConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, cfg.n_inner)
        self.proj = nn.Linear(cfg.n_inner, cfg.n_embd)
        self.act = ACTIVATIONS[cfg.activation_function]

    def forward(self, x):
        return self.proj(self.act(self.fc(x)))


class FoldedBlock(nn.Module):
    def __init__(self, cfg: FoldedConfig):
        super().__init__()
        self.attn = FoldedAttention(cfg)
        self.mlp = FoldedMLP(cfg)

    def forward(self, x, mask):
        x = x + self.attn(x, mask)
        return x + self.mlp(x)


class FoldedGPT2(nn.Module):
    def __init__(self, cfg: FoldedConfig):
        super().__init__()
        if cfg.activation_function not in ACTIVATIONS:
            raise ValueError(f"activation {cfg.activation_function!r} not supported; {sorted(ACTIVATIONS)}")
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.blocks = nn.ModuleList(FoldedBlock(cfg) for _ in range(cfg.n_layer))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=True)  # untied: ln_f is folded in

    def forward(self, input_ids, attention_mask=None, position_ids=None):  # [batch, pos] -> [batch, pos, vocab]
        t, dev = input_ids.shape[1], input_ids.device
        # positions as in Hugging Face GPT-2: 0..t-1 unless given (pass them for left padding)
        pos = torch.arange(t, device=dev) if position_ids is None else position_ids
        mask = None
        if attention_mask is not None:  # padding: keys that are padding are never attended to
            causal = torch.ones(t, t, dtype=torch.bool, device=dev).tril()
            mask = (causal & attention_mask.bool()[:, None, :])[:, None]
            mask = mask | torch.eye(t, dtype=torch.bool, device=dev)  # a padding query attends to itself
        x = self.wte(input_ids) + self.wpe(pos)
        for block in self.blocks:
            x = block(x, mask)
        return self.lm_head(x)

