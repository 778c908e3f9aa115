"""lnfree: remove every norm from GPT-2, Llama-architecture and GPT-NeoX models by fine-tuning, then study the
norm-free models (the families: lnfree.families, docs/families.md).

The core (this package's top-level modules) needs torch, transformers and safetensors only:

    from lnfree import make_removable, export_hf, export_folded, load
    model = make_removable(load("gpt2")[0])          # a GPT-2 whose norm sites can be frozen one by one
    export_hf(model, "out/hf"); export_folded(model, "out/folded")   # once every site is removed

Training (Lightning + Hydra) lives in lnfree.training, data in lnfree.data, evaluation and the analyses in
lnfree.analysis; the entry points are `python -m lnfree.train`, `python -m lnfree.eval`, `python -m lnfree.pretrain`,
and the `lnfree` command runs each of them and the analyses (`lnfree --help`; lnfree/cli.py).
"""

from .errors import ModelIOError
from .export import export_folded, export_hf
from .io import load
from .model import RemovableGPT2LMHeadModel, RemovableMixin, load_removable, make_removable, save_removable
from .references import resolve

__all__ = ["make_removable", "export_hf", "export_folded", "load", "resolve", "ModelIOError",
           "RemovableGPT2LMHeadModel", "RemovableMixin", "save_removable", "load_removable"]
