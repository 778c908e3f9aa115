"""The model and tokenizer a training config asks for (`conf/model/`), through lnfree.io.

model.source is a model reference that lnfree.io resolves (builtin:<name>, hub name, HF dir, removable dir,
.ckpt) or "random" (a fresh config from model.shape, whose model_type names the family: e.g. to pretrain the
built-in family). model.tokenizer is "builtin" (the built-in BPE), a hub name or dir, or null (the source's own: a
built-in model's is the built-in BPE, a local dir's is the one saved in it).
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from ..data import corpus
from ..families import family
from ..io import ModelIOError, hub_unreachable, load, model_config, resolve
from ..io import load_tokenizer as ref_tokenizer
from ..model import RemovableModel, make_removable


def _is_random(model_cfg) -> bool:
    return model_cfg.source == "random"


def check_available(model_cfg, cache_dir) -> None:
    """Fail before any compute if the model or tokenizer cannot be had (cheap: no weights loaded)."""
    if _is_random(model_cfg):
        if not model_cfg.tokenizer:
            raise ModelIOError("model.source=random needs model.tokenizer (e.g. builtin)")
    else:
        try:
            resolve(model_cfg.source, cache_dir)
        except ModelIOError as e:
            raise ModelIOError(f"model.source={model_cfg.source!r} (model={model_cfg.name}): {e}") from None
    tok = model_cfg.tokenizer
    if tok and tok != "builtin" and not Path(tok).expanduser().is_dir() and (why := hub_unreachable()):
        raise ModelIOError(f"model.tokenizer={tok!r} is not a local dir and {why}; use a local dir, "
                           "model.tokenizer=builtin, or model.tokenizer=null for the model's own")


def load_tokenizer(model_cfg, cache_dir):
    name = model_cfg.tokenizer
    if name == "builtin":
        return corpus.load_tokenizer()
    if name:
        tok = AutoTokenizer.from_pretrained(name)
    else:
        tok = ref_tokenizer(resolve(model_cfg.source, cache_dir))
        if tok is None:
            raise ModelIOError(f"model {model_cfg.source!r} carries no tokenizer: set model.tokenizer")
    if tok.eos_token_id is None:
        raise ModelIOError(f"tokenizer of model={model_cfg.name!r} has no end-of-text (eos) token")
    return tok


def source_config(model_cfg, cache_dir, tokenizer=None) -> PretrainedConfig:
    """The model's config without loading weights (for early checks: context length, depth). For source=random,
    model.shape holds the config fields, with `model_type` (default gpt2) naming the family (lnfree.families)."""
    if _is_random(model_cfg):
        special = {}
        if tokenizer is not None:
            special = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.eos_token_id,
                       "eos_token_id": tokenizer.eos_token_id}
        fields = {**special, **dict(model_cfg.shape)}
        cfg = AutoConfig.for_model(fields.pop("model_type", "gpt2"), **fields)
        family(cfg)  # refuses an unsupported family, naming the supported ones
        return cfg
    return model_config(model_cfg.source, cache_dir, revision=model_cfg.revision)


def load_model(model_cfg, cache_dir, tokenizer) -> RemovableModel:
    if _is_random(model_cfg):
        cfg = source_config(model_cfg, cache_dir, tokenizer)
        cfg._attn_implementation = model_cfg.attn_implementation
        p = model_cfg.dropout
        overrides = {} if p is None else {k: p for k in family(cfg).dropout_fields()}
        return make_removable(cfg, **overrides)
    model, _ = load(model_cfg.source, cache_dir, removable=True, revision=model_cfg.revision,
                    attn_implementation=model_cfg.attn_implementation, dropout=model_cfg.dropout)
    return model.train()
