"""LoRA fine-tuning of a removable model of any family (finetune=lora), through peft.

The base weights stay frozen; low-rank adapters on the chosen projections (each family's lora_targets, e.g.
GPT-2's attention and MLP Conv1Ds) learn to compensate for the norms as they are removed, as in the authors'
LoRA variant (Baroni et al. 2025). Norm gains and biases can be trained too (finetune.train_norms). peft adapts
HF's Conv1D and nn.Linear out of the box; the attention-input readers (GPT-2's SplitQKVProjection, the other
families' SplitInputLinear) read the two paths of the attention-input norm (norm.py), so they get their own LoRA
layer, registered with peft's custom-module mapping.

The adapter settings are stored in the model config (`lnfree_lora`), so every checkpoint says how to rebuild
the adapted model: lnfree.io.model_from_checkpoint re-applies them, loads the weights, and merges. Exports and
evaluation always see a merged model: W <- W + (alpha / r) * B A, checked against the adapted model's logits.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from .families import FAMILIES, family
from .families.gpt2 import SplitQKVProjection
from .norm import NormParams, SplitInputLinear

LORA_CONFIG_KEY = "lnfree_lora"  # model.config field holding the adapter settings
MERGE_TOL = 1e-5  # relative logits error allowed between the adapted model and its merge (fp32 round-off)


def _peft():
    try:
        import peft
    except ImportError as e:  # the `lora` extra
        raise ImportError("finetune=lora needs peft: pip install 'lnfree[lora]'") from e
    return peft


def _lora_split_class():
    """The LoRA layer for lnfree's projections that read the attention-input norm: SplitQKVProjection (GPT-2's
    c_attn) and SplitInputLinear (Llama's q/k/v_proj, NeoX's query_key_value); a peft LoRA Linear on that base.

    For the ordinary [batch, pos, d] input it is peft's own Linear LoRA. For the split input [u, f_qk, f_v]
    the adapter sees each path's actual input, as a LoRA on the stock projection would: the value columns
    (`base.v_cols`) read x_v, the query/key columns x_qk. Merging adds the same delta to the weight, which is
    exact for both inputs because the projection is linear in each path.
    """
    from peft.tuners.lora.layer import Linear

    class LoraSplit(Linear):
        def forward(self, x, *args, **kwargs):
            base: SplitQKVProjection | SplitInputLinear = self.get_base_layer()
            if x.shape[-1] == base.in_features or self.disable_adapters or self.merged:
                return super().forward(x, *args, **kwargs)
            result = base(x)
            x_qk, x_v = base._ln[0].paths(x)
            for name in self.active_adapters:
                if name not in self.lora_A:
                    continue
                a, b = self.lora_A[name], self.lora_B[name]
                drop, s = self.lora_dropout[name], self.scaling[name]
                dt = a.weight.dtype
                delta_qk = b(a(drop(x_qk.to(dt))))  # dropout draws: the query/key path first, then the value
                delta_v = b(a(drop(x_v.to(dt))))
                result = result + torch.where(base.v_cols, delta_v, delta_qk).to(result.dtype) * s
            return result

    return LoraSplit


def lora_settings(cfg) -> dict:
    """The finetune config's adapter settings as a plain dict (what is stored in the model config)."""
    return {"r": int(cfg.rank), "alpha": float(cfg.alpha), "dropout": float(cfg.dropout),
            "target_modules": list(cfg.target_modules), "train_norms": bool(cfg.train_norms)}


def apply_lora(model, settings: dict):
    """Inject LoRA adapters into `model` in place (base frozen) and record the settings in its config."""
    peft = _peft()
    fam = family(model.config)
    others = {t for f in FAMILIES for t in f.lora_targets} - set(fam.lora_targets)
    foreign = [t for t in settings["target_modules"] if t in others]  # another family's module names
    if foreign:
        raise ValueError(f"LoRA target(s) {foreign} are not {fam.name} modules; this family's are "
                         f"{list(fam.lora_targets)} (finetune.target_modules)")
    # GPT-2's Conv1D stores [in, out] (fan_in_fan_out); the other families' nn.Linear [out, in]
    cfg = peft.LoraConfig(r=settings["r"], lora_alpha=settings["alpha"], lora_dropout=settings["dropout"],
                          target_modules=list(settings["target_modules"]), fan_in_fan_out=fam.name == "gpt2",
                          bias="none")
    split = _lora_split_class()
    cfg._register_custom_module({SplitQKVProjection: split, SplitInputLinear: split})
    with warnings.catch_warnings():  # peft warns that it does not know SplitQKVProjection; its LoRA layer is ours
        warnings.filterwarnings("ignore", message="Unsupported layer type")
        peft.inject_adapter_in_model(cfg, model)
    norms = {id(p) for m in model.modules() if isinstance(m, NormParams) for p in m.parameters(recurse=False)}
    for name, p in model.named_parameters():  # peft froze everything but the adapters
        p.requires_grad = "lora_" in name or (settings["train_norms"] and id(p) in norms)
    model.config.update({LORA_CONFIG_KEY: dict(settings)})
    return model


def has_lora(model) -> bool:
    return getattr(model.config, LORA_CONFIG_KEY, None) is not None


@torch.no_grad()
def merged_copy(model):
    """A copy of an adapted model with every adapter merged into its base layer and the LoRA layers gone:
    a plain removable GPT-2 (same modes and sigmas), which the exports and evaluation take."""
    from peft.tuners.lora import LoraLayer

    out = copy.deepcopy(model)
    for name, module in list(out.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent_name) if parent_name else out, child, module.get_base_layer())
    for p in out.parameters():
        p.requires_grad_(True)
    if hasattr(out.config, LORA_CONFIG_KEY):
        delattr(out.config, LORA_CONFIG_KEY)
    if hasattr(out, "peft_config"):
        del out.peft_config
    return out


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    return (sum(p.numel() for p in model.parameters() if p.requires_grad),
            sum(p.numel() for p in model.parameters()))
