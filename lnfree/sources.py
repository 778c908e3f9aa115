"""Where models and tokenizers come from: the hub, a local HF dir, the built-in family, or random init.

One resolver for training, evaluation and the analyses. Hub names go through the ordinary
`from_pretrained` (users have the internet); offline, a hub name fails at once with a message that names the
local alternatives instead of retrying for half a minute.
"""

from __future__ import annotations

import os
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from . import corpus
from .model import RemovableGPT2LMHeadModel, check_gpt2_config, make_removable

BUILTIN_PREFIX = "builtin:"


class SourceError(ValueError):
    pass


def hub_offline() -> bool:
    import huggingface_hub.constants as c

    return bool(c.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


SHIPPED_DIR = Path(__file__).parent / "pretrained"


def builtin_dir(name: str, cache_dir: str | Path, committed: bool = True) -> Path:
    """A built-in model's dir: shipped with lnfree (lnfree/pretrained/<name>) or in the cache."""
    shipped = SHIPPED_DIR / name
    if committed and shipped.exists():
        return shipped
    return Path(cache_dir).expanduser() / "models" / name


def resolve(source: str, cache_dir: str | Path) -> tuple[str, str]:
    """(kind, location): kind is builtin | random | local | hub."""
    if source == "random":
        return "random", ""
    if source.startswith(BUILTIN_PREFIX):
        return "builtin", str(builtin_dir(source[len(BUILTIN_PREFIX):], cache_dir))
    if Path(source).expanduser().is_dir():
        return "local", str(Path(source).expanduser())
    if source.startswith((".", "/", "~")):
        raise SourceError(f"model directory {source!r} does not exist")
    return "hub", source


def _hub_guard(name: str, what: str):
    if hub_offline():
        raise SourceError(
            f"{what} {name!r} is a Hugging Face hub name but the hub is offline (HF_HUB_OFFLINE=1 or no "
            "network); use a local HF dir or a built-in model (model=builtin_2x128, see conf/model/)"
        )


def check_available(model_cfg, cache_dir) -> None:
    """Fail before any compute if the model or tokenizer cannot be had (cheap: no weights loaded)."""
    kind, loc = resolve(model_cfg.source, cache_dir)
    if kind == "hub":
        _hub_guard(loc, "model")
    tok = model_cfg.tokenizer
    if tok and tok != "builtin" and not Path(tok).expanduser().is_dir():
        _hub_guard(tok, "tokenizer")
    if kind == "random" and not tok:
        raise SourceError("model.source=random needs model.tokenizer (e.g. builtin)")


def load_tokenizer(model_cfg, cache_dir):
    name = model_cfg.tokenizer
    kind, loc = resolve(model_cfg.source, cache_dir)
    if name == "builtin" or (name is None and kind == "builtin"):
        return corpus.load_tokenizer()
    name = name or loc
    tok = AutoTokenizer.from_pretrained(name, revision=model_cfg.revision if name == loc else None)
    if tok.eos_token_id is None:
        raise SourceError(f"tokenizer {name!r} has no end-of-text (eos) token")
    return tok


def gpt2_config(model_cfg, cache_dir, tokenizer=None) -> GPT2Config:
    """The model's config without loading weights (for early checks: context length, depth)."""
    kind, loc = resolve(model_cfg.source, cache_dir)
    if kind in ("random", "builtin") and not (kind == "builtin" and Path(loc).exists()):
        special = {}
        if tokenizer is not None:
            special = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.eos_token_id,
                       "eos_token_id": tokenizer.eos_token_id}
        cfg = GPT2Config(**{**special, **dict(model_cfg.shape)})
    else:
        cfg = AutoConfig.from_pretrained(loc, revision=model_cfg.revision)
    check_gpt2_config(cfg)
    return cfg


def load_model(model_cfg, cache_dir, tokenizer) -> RemovableGPT2LMHeadModel:
    kind, loc = resolve(model_cfg.source, cache_dir)
    overrides = {}
    if model_cfg.dropout is not None:
        overrides = {k: model_cfg.dropout for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    if kind == "builtin" and not Path(loc).exists():
        from .pretrain import ensure_builtin

        ensure_builtin(model_cfg, cache_dir)
    if kind == "random":
        cfg = gpt2_config(model_cfg, cache_dir, tokenizer)
        cfg._attn_implementation = model_cfg.attn_implementation
        return make_removable(cfg, **overrides)
    try:
        base = GPT2LMHeadModel.from_pretrained(loc, revision=model_cfg.revision,
                                               attn_implementation=model_cfg.attn_implementation)
    except OSError as e:
        raise SourceError(f"could not load model {model_cfg.source!r}: {e}") from e
    return make_removable(base, **overrides)
