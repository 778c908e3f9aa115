"""A truly norm-free model: no normalisation module anywhere. GPT-2's is plain torch (FoldedGPT2, below); the other
families' is their Hugging Face class with every norm an nn.Identity and an untied unembedding (the family
adapter's folded_model, lnfree.families), saved the same way: folded_config.json + folded.safetensors.

Every frozen norm site has been folded into the linear layer that reads it (see export.fold), so a block is
    x = x + attn(x) ;  x = x + mlp(x)                  and   logits = x @ W_U' + b_U'
with an untied unembedding that carries a bias. This is the form interpretability tools want
(TransformerLens `normalization_type=None`). Loading needs nothing but torch and safetensors.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG_FILE = "folded_config.json"
# A config.json for stock transformers, which cannot build this model: its error message then names the loader
# ("model type `lnfree_folded (...)` ... not recognized") instead of a generic "Unrecognized model".
HF_HINT = {"model_type": "lnfree_folded (a norm-free model: load it with lnfree.load(path), not transformers)"}
WEIGHTS_FILE = "folded.safetensors"
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


def _hf_folded(saved: dict) -> nn.Module:
    """The HF class of a saved folded model, every norm named in `identity` an nn.Identity."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = dict(saved["hf_config"])
    config = AutoConfig.for_model(hf.pop("model_type"), **hf)
    model = AutoModelForCausalLM.from_config(config)
    for name in saved["identity"]:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, nn.Identity())
    if saved["lm_head_bias"]:
        model.set_output_embeddings(nn.Linear(config.hidden_size, config.vocab_size, bias=True))
    return model


def save_folded(model, out_dir: str | Path):
    """A FoldedGPT2, or another family's folded HF model: its config, the names of its identity norms and whether
    its unembedding has a bias, which is all load_folded needs to rebuild it (no lnfree family code)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model, FoldedGPT2):
        cfg = asdict(model.config)
    else:
        cfg = {"hf_config": model.config.to_dict(),
               "identity": [name for name, m in model.named_modules() if isinstance(m, nn.Identity)],
               "lm_head_bias": model.get_output_embeddings().bias is not None}
    (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=1))
    (out / "config.json").write_text(json.dumps(HF_HINT, indent=1))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / WEIGHTS_FILE))


def load_folded(path: str | Path, device="cpu"):
    saved = json.loads((Path(path) / CONFIG_FILE).read_text())
    if "hf_config" in saved:  # another family: its HF class with identity norms
        model = _hf_folded(saved)
    else:
        model = FoldedGPT2(FoldedConfig(**saved))
    model.load_state_dict(load_file(str(Path(path) / WEIGHTS_FILE)))  # copied into the CPU model's parameters
    return model.to(device).eval()

