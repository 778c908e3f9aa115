"""Evaluation data: a dataset spec -> fixed [n_chunks, context] token chunks, optionally token-filtered.

Protocol (docs/method.md, evaluation): documents tokenized, end-of-text appended and kept as a target, packed into
`context`-token chunks, no BOS prepended. The filter drops chunks containing any token that never occurs in
a reference set's first `docs` documents (the paper's "Pile-filtered").
"""

from __future__ import annotations

import itertools
import math

import torch

from ..data.streams import iter_texts, open_stream, pack, tokenize
from .eval_config import EvalError

# nanoGPT's OpenWebText split: 0.05% held out with seed 2357 (needs the whole dataset once, ~40 GB)
OWT_TEST_SIZE, OWT_SEED = 0.0005, 2357


def documents(spec):
    """Texts of a dataset spec (streamed, except nanoGPT's OpenWebText split, which needs the whole set)."""
    if spec.source == "owt_nanogpt":
        import datasets

        full = datasets.load_dataset(spec.path or "Skylion007/openwebtext", split="train")
        held_out = full.train_test_split(test_size=OWT_TEST_SIZE, seed=OWT_SEED, shuffle=True)["test"]
        return (row[spec.text_field] for row in held_out)
    stream = open_stream(spec.source, spec.split, spec.path, spec.config_name, getattr(spec, "revision", None),
                         spec.files)
    return iter_texts(stream, spec.text_field)


def seen_tokens(texts, tokenizer, vocab_size: int, max_docs: int) -> torch.Tensor:
    """Boolean mask [vocab] of the token ids that occur in the first `max_docs` texts."""
    seen = torch.zeros(vocab_size, dtype=torch.bool)
    for text in itertools.islice(texts, max_docs):
        seen[torch.tensor(tokenize(tokenizer, text), dtype=torch.long)] = True
    return seen


def keep_seen(blocks, seen: torch.Tensor):
    """The blocks (each [context] token ids) whose every token is in `seen` (the paper's token-filtered Pile)."""
    return (b for b in blocks if bool(seen[b].all()))


def eval_chunks(spec, tokenizer, context: int, tokens: int) -> torch.Tensor:
    """[n_chunks, context] token ids, n_chunks = ceil(tokens / context) (fewer if the data runs out)."""
    n = math.ceil(tokens / context)
    eot = tokenizer.eos_token_id
    docs = (tokenize(tokenizer, t) + [eot] for t in documents(spec))
    blocks = (torch.tensor(b, dtype=torch.long) for b in pack(docs, context))
    if spec.filter is not None:
        seen = seen_tokens(documents(spec.filter), tokenizer, len(tokenizer), spec.filter.docs)
        blocks = keep_seen(blocks, seen)
    chunks = list(itertools.islice(blocks, n))
    if not chunks:
        raise EvalError(f"dataset {spec.name!r} yielded no {context}-token chunk")
    return torch.stack(chunks)
