"""A truly norm-free model: no normalisation module anywhere, saved and loaded here as folded_config.json +
folded.safetensors. Each family's adapter builds its own (lnfree.families, Family.fold): GPT-2's is plain torch
(FoldedGPT2, families/gpt2_folded.py); the other families' is their Hugging Face class with every norm an
nn.Identity and an untied unembedding (Family.folded_model).

Every frozen norm site has been folded into the linear layer that reads it (see export.fold), so a block is
    x = x + attn(x) ;  x = x + mlp(x)                  and   logits = x @ W_U' + b_U'
with an untied unembedding that carries a bias. This is the form interpretability tools want
(TransformerLens `normalization_type=None`). Loading needs nothing but torch and safetensors.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from .families.gpt2_folded import FoldedConfig, FoldedGPT2

CONFIG_FILE = "folded_config.json"
# A config.json for stock transformers, which cannot build this model: its error message then names the loader
# ("model type `lnfree_folded (...)` ... not recognized") instead of a generic "Unrecognized model".
HF_HINT = {"model_type": "lnfree_folded (a norm-free model: load it with lnfree.load(path), not transformers)"}
WEIGHTS_FILE = "folded.safetensors"


def hf_folded_model(saved: dict) -> nn.Module:
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
    """GPT-2's plain-torch folded model (its FoldedConfig), or another family's folded HF model: its config, the
    names of its identity norms and whether its unembedding has a bias, which is all load_folded needs to rebuild
    it (no lnfree family code)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model.config, FoldedConfig):
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
        model = hf_folded_model(saved)
    else:  # a config without one is GPT-2's plain-torch form
        model = FoldedGPT2(FoldedConfig(**saved))
    model.load_state_dict(load_file(str(Path(path) / WEIGHTS_FILE)))  # copied into the CPU model's parameters
    return model.to(device).eval()

