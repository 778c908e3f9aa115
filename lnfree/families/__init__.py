"""Model-family adapters, keyed by `config.model_type` (docs/families.md: adding a family is one file here).

    family(config)          the adapter of a config (or config dict); refuses any other family, naming the
                            supported ones, before any weight is read
"""

from __future__ import annotations

from .base import NORM_KINDS, Dims, Family, RemovableMixin, UnsupportedFamily
from .gpt2 import GPT2
from .llama import LLAMA
from .neox import NEOX

FAMILIES: tuple[Family, ...] = (GPT2, LLAMA, NEOX)
REGISTRY: dict[str, Family] = {t: f for f in FAMILIES for t in f.model_types}


def supported_text() -> str:
    return ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES)


def family(config) -> Family:
    """The adapter for a config object or a config.json dict; UnsupportedFamily for anything else."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    if model_type not in REGISTRY:
        raise UnsupportedFamily(f"lnfree cannot remove the norms of model_type={model_type!r}: the supported "
                                f"families are {supported_text()}")
    f = REGISTRY[model_type]
    if not isinstance(config, dict):
        f.check(config)
    return f


__all__ = ["FAMILIES", "REGISTRY", "NORM_KINDS", "Dims", "Family", "RemovableMixin", "UnsupportedFamily", "family",
           "supported_text"]
