"""Removable-norm models: a Hugging Face causal LM whose every norm path can be frozen to a constant scale.

Sites, in removal order (docs/method.md, 'Norm sites'): for each block i the MLP-input norm, the attention-input
norm's query/key path, its value path, then the final norm: the norm kinds pre_mlp, attn_qk, attn_v, final.
GPT-2 names the sites `ln2.i`, `ln1qk.i`, `ln1v.i`, `lnf`; the other families (lnfree.families: Llama architecture,
GPT-NeoX) `pre_mlp.i`, `attn_qk.i`, `attn_v.i`, `final`. Every family's removable class is a RemovableMixin.
Each removable class subclasses the family's Hugging Face class and only swaps modules (the norms and the
attention-input readers), so generation, KV cache, attention masks, SDPA/eager attention, gradient checkpointing
and output_hidden_states are Hugging Face's own. This file holds no training code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from transformers import AutoConfig, PretrainedConfig

from .errors import NotRemovableError
from .families import NORM_KINDS, UnsupportedFamily, family
from .families.base import RemovableMixin
from .families.gpt2 import RemovableGPT2LMHeadModel, check_gpt2_config
from .norm import NormSite

# NORM_KINDS (lnfree.families): the removal kinds in schedule order; `final` is a single event, the others one per block
SPECIAL_KINDS = ("eot", "bos")  # optional: end the special sigma of end-of-text tokens / position 0
LNFREE_FILE = "lnfree.json"
LNFREE_EPS = 1e6  # a norm eps at or above this marks the HF-compatible LN-free trick (1e12): an LN-free export

__all__ = ["NORM_KINDS", "SPECIAL_KINDS", "LNFREE_FILE", "NormSite", "RemovableMixin", "RemovableGPT2LMHeadModel",
           "UnsupportedFamily", "check_gpt2_config", "make_removable", "save_removable", "load_removable",
           "next_token_ce", "parse_site_name", "non_embedding_params"]


def next_token_ce(logits: torch.Tensor, ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """CE of predicting ids[:, 1:] from logits[:, :-1]; end-of-text tokens are ordinary targets. The training
    loss, and the CE every evaluation reports."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(),
                                             reduction=reduction)


def parse_site_name(name: str) -> tuple[str, int | None]:
    """'ln1qk.3' -> ('ln1qk', 3); 'lnf' -> ('lnf', None): what model.remove, model.site and model.site_name take, so
    that model.site_name(*parse_site_name(name)) == name for each of the model's sites."""
    kind, _, block = name.partition(".")
    return kind, (int(block) if block else None)


def non_embedding_params(model) -> int:
    """Parameters outside the token and position embeddings and the unembedding (tied in GPT-2)."""
    return sum(p.numel() for p in model.parameters()) - family(model.config).embedding_params(model)


# -- construction, save, load --------------------------------------------------------------------------
def _with_overrides(config: PretrainedConfig, overrides: dict) -> PretrainedConfig:
    cfg = config.__class__.from_dict({**config.to_dict(), **overrides})
    cfg._attn_implementation = config._attn_implementation
    return cfg


def not_removable_again(what: str, form: str) -> str:
    """Why an LN-free export cannot be made removable (lnfree.load(removable=True) and make_removable alike)."""
    return (f"{what} is an LN-free export ({form}); to fine-tune further, start from the run's checkpoint (.ckpt) "
            "instead")


def is_lnfree_stock(config) -> bool:
    """Whether a stock model's config carries the HF-compatible LN-free trick (every norm's eps = 1e12)."""
    fam = family(config)
    return getattr(config, fam.eps_field, 0.0) >= LNFREE_EPS


def make_removable(source, **config_overrides) -> RemovableMixin:
    """A removable model (all sites real) from a stock HF model of a supported family (GPT2LMHeadModel,
    LlamaForCausalLM, GPTNeoXForCausalLM, ...) or a config (random init); another family is refused from its
    config. A path or hub name is a model reference: `lnfree.load(reference, removable=True)` checks it, then
    comes here."""
    if isinstance(source, (str, Path)):
        raise TypeError(f"make_removable takes a model or a config, not the reference {str(source)!r}: load it with "
                        "lnfree.load(reference, removable=True), which checks it first")
    if isinstance(source, PretrainedConfig):
        fam = family(source)
        cfg = _with_overrides(source, config_overrides)
        cfg._attn_implementation = source._attn_implementation or "sdpa"
        return fam.removable_class(cfg)(cfg)
    config = getattr(source, "config", None)
    fam = family(config) if config is not None else None
    if fam is None or not isinstance(source, fam.stock_class(config)):
        raise TypeError(f"cannot make a removable model from {type(source).__name__}")
    if is_lnfree_stock(config):  # its norms are already gone: wrapping them again would remove nothing
        raise NotRemovableError(not_removable_again(f"this {type(source).__name__}", "hf_lnfree"))
    cfg = _with_overrides(source.config, config_overrides)
    model = fam.removable_class(cfg)(cfg).to(dtype=source.dtype)
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    site_buffers = {"removed", "running", "sigma", "special"}
    bad = [k for k in missing if k.rsplit(".", 1)[-1] not in site_buffers]
    if bad or unexpected:
        raise RuntimeError(f"weights do not match a {fam.name} layout: missing {bad}, unexpected {unexpected}")
    return model.to(source.device).train(source.training)  # the source's mode, as a converted HF model keeps it


def save_removable(model: RemovableMixin, out_dir: str | Path, tokenizer=None):
    """Weights plus every mode and sigma (safetensors), the HF config, and a human-readable site table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    save_model(model, str(out / "removable.safetensors"))
    (out / LNFREE_FILE).write_text(json.dumps({"sigmas": model.sigmas()}, indent=1))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


def load_removable(path: str | Path, device="cpu") -> RemovableMixin:
    config = AutoConfig.from_pretrained(path)
    model = family(config).removable_class(config)(config)
    # load_model goes through load_state_dict (copying into the CPU model), which refreshes every site's mode mirror
    load_model(model, str(Path(path) / "removable.safetensors"))
    return model.to(device)
