"""lnfree: remove every LayerNorm from GPT-2-class models by fine-tuning, then study the LN-free models.

The core (this package's top-level modules) needs torch, transformers and safetensors only:

    from lnfree import make_removable, export_hf, export_folded, load
    model = make_removable(load("gpt2")[0])          # a GPT-2 whose norm sites can be frozen one by one
    export_hf(model, "out/hf"); export_folded(model, "out/folded")   # once every site is removed

Training (Lightning + Hydra) lives in lnfree.training, data in lnfree.data, evaluation and the analyses in
lnfree.analysis; the entry points are `python -m lnfree.train`, `python -m lnfree.eval`, `python -m lnfree.pretrain`.
"""

from .export import export_folded, export_hf
from .io import ModelIOError, load, resolve
from .model import RemovableGPT2LMHeadModel, load_removable, make_removable, save_removable

__all__ = ["make_removable", "export_hf", "export_folded", "load", "resolve", "ModelIOError",
           "RemovableGPT2LMHeadModel", "save_removable", "load_removable"]
