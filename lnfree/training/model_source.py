"""The model a training config asks for (`conf/model/`), resolved once through lnfree.io.

model.source is a model reference that lnfree.io resolves: builtin:<name>, a hub name, an HF dir, a removable
dir, a .ckpt, or "random" (a fresh config from model.shape, whose model_type names the family: e.g. to pretrain
the built-in family).
model.tokenizer is "builtin" (the built-in BPE), a hub name or dir, or null (the source's own: a built-in
model's is the built-in BPE, a local dir's is the one saved in it; a random-init model has none).

`open_source` resolves the reference, loads the tokenizer and reads the model's config, each once and before
any weight is read; `load_model` loads the weights of that same resolved reference. Neither reads model.source
again, so nothing downstream re-resolves it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import PretrainedConfig

from ..io import (
    RANDOM,
    ModelIOError,
    ModelRef,
    check_tokenizer,
    load,
    load_tokenizer,
    model_config,
    read_record,
    resolve,
)
from ..model import RemovableModel


@dataclass(frozen=True)
class ModelSource:
    """A training run's model, checked and not yet loaded."""

    ref: ModelRef  # model.source, resolved
    tokenizer: Any  # the run's tokenizer, checked against the model
    config: PretrainedConfig  # the model's config: depth, context length, vocabulary


def open_source(model_cfg, cache_dir) -> ModelSource:
    """Fail before any compute if the model or its tokenizer cannot be had or do not belong together (cheap:
    no weights loaded)."""
    try:
        ref = resolve(model_cfg.source, cache_dir, shape=model_cfg.shape)
    except ModelIOError as e:
        raise ModelIOError(f"model.source={model_cfg.source!r} (model={model_cfg.name}): {e}") from None
    tokenizer = _tokenizer(model_cfg, ref)
    config = model_config(ref, revision=model_cfg.revision, tokenizer=tokenizer)
    check_tokenizer(config, tokenizer, read_record(ref), where=f"model={model_cfg.name} ({model_cfg.source})",
                    untrained=ref.kind == RANDOM)
    return ModelSource(ref, tokenizer, config)


def _tokenizer(model_cfg, ref: ModelRef):
    name = model_cfg.tokenizer
    if name:
        try:
            tok = load_tokenizer(name)
        except ModelIOError as e:
            raise ModelIOError(f"model.tokenizer={name!r}: {e}; use a local dir, model.tokenizer=builtin, or "
                               "model.tokenizer=null for the model's own") from None
    else:
        tok = load_tokenizer(ref)
        if tok is None:
            raise ModelIOError(f"model {model_cfg.source!r} carries no tokenizer: set model.tokenizer (e.g. builtin)")
    if tok.eos_token_id is None:
        raise ModelIOError(f"tokenizer of model={model_cfg.name!r} has no end-of-text (eos) token")
    return tok


def load_model(source: ModelSource, model_cfg) -> RemovableModel:
    """The removable model to fine-tune, in training mode (a random-init model: initialised now)."""
    model, _ = load(source.ref, removable=True, revision=model_cfg.revision, tokenizer=source.tokenizer,
                    attn_implementation=model_cfg.attn_implementation, dropout=model_cfg.dropout)
    return model.train()
