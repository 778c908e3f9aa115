"""The model a training config asks for (`conf/model/`), resolved once through lnfree.references.

model.source is a model reference that lnfree.references resolves: builtin:<name>, a hub name, an HF dir, a removable
dir, a .ckpt, or "random" (a fresh config from model.shape, whose model_type names the family: e.g. to pretrain
the built-in family).
model.tokenizer is "builtin" (the built-in BPE), a hub name or dir, or null (the source's own: a built-in
model's is the built-in BPE, a local dir's is the one saved in it; a random-init model has none).

`open_source` resolves the reference, loads the tokenizer and reads the model's config, each once and before
any weight is read; `load_model` loads the weights of that same resolved reference. Neither reads model.source
again, so nothing downstream re-resolves it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

from ..errors import ModelIOError
from ..io import load, load_tokenizer, model_config, read_record
from ..model import RemovableMixin
from ..model_record import check_tokenizer
from ..references import BUILTIN_PREFIX, RANDOM, ModelRef, find_run_dir, resolve


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


def model_label(model_cfg, limit: int = 48) -> str:
    """What a run calls its model (W&B run and artifact names, the model card's title, the training-curve legend):
    model.name where it names model.source (every conf/model/ option), else a name from the source itself, so that
    `model.source=/data/my_gpt2` with the default model group is "my_gpt2", not the default's "builtin_w128".
    Local paths give their dir's name (a run's export or checkpoint: the run dir's name and the form); a hub id is
    itself; anything longer than `limit` is cut and ends with a stable hash of the whole source."""
    name, source = str(model_cfg.get("name")), str(model_cfg.get("source"))
    if source == RANDOM:  # the shape is the model: its option's name says which
        return name
    if source.startswith(BUILTIN_PREFIX):
        own = source[len(BUILTIN_PREFIX):]
        derived, names = f"builtin_{own}", (own, f"builtin_{own}")
    elif source.startswith((".", "/", "~")) or Path(source).expanduser().exists():
        p = Path(source).expanduser()
        run = find_run_dir(p)
        derived = f"{run.name}-{p.stem}" if run is not None and run != p else (p.stem if p.is_file() else p.name)
        names = (derived, p.name)
    else:  # a hub id: openai-community/gpt2-medium
        derived, names = source, (source, source.rsplit("/", 1)[-1])
    same = lambda a, b: a.lower().replace("-", "_") == b.lower().replace("-", "_")  # noqa: E731
    label = name if any(same(name, n) for n in names) else derived
    return shorten(label, limit, key=source)


def shorten(text: str, limit: int, key: str | None = None) -> str:
    """`text` if it fits in `limit` characters, else its start and a stable 8-hex hash of `key` (default: text)."""
    if len(text) <= limit:
        return text
    digest = hashlib.sha256((key or text).encode()).hexdigest()[:8]
    return f"{text[:limit - 9]}-{digest}"


def load_model(source: ModelSource, model_cfg) -> RemovableMixin:
    """The removable model to fine-tune, in training mode (a random-init model: initialised now)."""
    model, _ = load(source.ref, removable=True, revision=model_cfg.revision, tokenizer=source.tokenizer,
                    attn_implementation=model_cfg.attn_implementation, dropout=model_cfg.dropout)
    return model.train()
