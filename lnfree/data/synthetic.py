"""Synthetic token data for positive controls of the interpretability analyses (data=synthetic).

Small models pretrained on the built-in Shakespeare neither form attention sinks nor learn induction on random
tokens, so the analyses that need those (docs/interpretability.md) would measure nothing. This task is known to
produce both in 1-3 layer transformers:

- Bigram-Backcopy (Guo et al. 2024, arXiv 2410.13835): tokens follow a fixed random bigram chain, except after a
  *trigger* token, where the next token copies the one before the trigger. Heads that serve the copy are useless
  on non-trigger tokens and learn to park their attention on the beginning-of-sequence token: attention sinks.
  Here triggers come at random (probability trigger_prob after any token), not from the chain: with triggers in
  a peaked chain the token before a trigger is guessable from the trigger itself, and a model learns that guess
  instead of the copy (measured: 91% "copy" accuracy on the task's blocks, 16% on prompts where the guess fails).
- Induction: with probability `repeat_prob` a span of uniformly random tokens appears twice in the block, so that
  the second copy is predictable only by looking back at the first (what `analysis.interp.patching` tests).

Every block is [BOS, x_1, ..., x_{T-1}] with BOS = the tokenizer's end-of-text and x in [low, low + vocab). The
bigram chain and triggers are fixed by `task_seed` (the task); block g of the stream is drawn from
(seed, g) alone, so ranks and dataloader workers draw disjoint blocks and a resumed run redraws exactly the blocks
it had not seen. Validation blocks come from a separate stream (seed -1) that training never draws.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .datamodule import TextDataModule
from .streams import DataError

VAL_STREAM = -1  # the validation blocks' stream id (training uses the run's seed, >= 0)


class BigramBackcopy:
    """The task: a bigram transition matrix over the `vocab` - `n_triggers` ordinary tokens (each row a sparse random
    distribution); after any ordinary token, a trigger (uniform among the first `n_triggers` tokens) comes with
    probability `trigger_prob`, whatever the token was, so that the token before a trigger cannot be guessed
    from the trigger and the model has to copy it. `repeat_prob`, `repeat_len`: the induction spans."""

    def __init__(self, vocab: int = 64, n_triggers: int = 3, low: int = 1, task_seed: int = 0,
                 concentration: float = 0.1, trigger_prob: float = 0.1, repeat_prob: float = 0.0,
                 repeat_len: tuple = (8, 24)):
        if vocab < n_triggers + 2 or low < 0 or n_triggers < 1:
            raise DataError(f"synthetic task: vocab={vocab} must exceed n_triggers={n_triggers} + 1 (>= 1), low >= 0")
        if not 0 <= repeat_prob <= 1 or not 0 < trigger_prob < 1 or not 1 <= repeat_len[0] <= repeat_len[1]:
            raise DataError(f"synthetic task: repeat_prob={repeat_prob} not in [0, 1], trigger_prob={trigger_prob} "
                            f"not in (0, 1), or bad repeat_len={repeat_len}")
        self.vocab, self.n_triggers, self.low = vocab, n_triggers, low
        self.trigger_prob, self.repeat_prob, self.repeat_len = trigger_prob, repeat_prob, tuple(repeat_len)
        rng = np.random.default_rng(task_seed)
        n = vocab - n_triggers
        # [n, n] next-token probabilities among ordinary tokens; a small Dirichlet concentration makes each row
        # peaked, so the bigram part is learnable and the copy after a trigger is the hard part
        self.transition = rng.dirichlet(np.full(n, concentration), size=n)
        self.cumulative = np.cumsum(self.transition, axis=1)

    def sequence(self, rng: np.random.Generator, length: int) -> np.ndarray:
        """[length] task tokens (0-based, before `low` is added; triggers are 0 .. n_triggers - 1)."""
        k = self.n_triggers
        x = np.empty(length, dtype=np.int64)
        x[0] = rng.integers(k, self.vocab)
        u, v = rng.random(length), rng.random(length)
        for t in range(1, length):
            if x[t - 1] < k:  # after a trigger: copy the token before it (x[0] is never a trigger)
                x[t] = x[t - 2]
            elif v[t] < self.trigger_prob:
                x[t] = rng.integers(0, k)
            else:
                row = self.cumulative[x[t - 1] - k]
                x[t] = k + min(int(np.searchsorted(row, u[t])), len(row) - 1)
        if length >= 8 and rng.random() < self.repeat_prob:
            n = int(rng.integers(self.repeat_len[0], min(self.repeat_len[1], length // 2 - 1) + 1))
            span = rng.integers(k, self.vocab, n)  # random, trigger-free tokens
            first = int(rng.integers(0, length - 2 * n + 1))
            second = int(rng.integers(first + n, length - n + 1))
            x[first:first + n] = span
            x[second:second + n] = span
        return x

    def block(self, seed: int, index: int, block_size: int, bos: int) -> list[int]:
        rng = np.random.default_rng([seed + 1, index])  # seed -1 (validation) -> 0, training seeds -> >= 1
        return [bos] + (self.sequence(rng, block_size - 1) + self.low).tolist()


class SyntheticBlocks(IterableDataset):
    """Endless blocks; block g = task.block(seed, g). Batch k (micro_batch_size blocks) of rank r is global batch
    k * world_size + r; DataLoader worker w of n makes batches k = skip_batches + w, + n, ... (the loader takes
    batch k from worker k mod n)."""

    def __init__(self, task: BigramBackcopy, block_size: int, bos: int, seed: int, rank: int = 0,
                 world_size: int = 1, skip_batches: int = 0, micro_batch_size: int = 1):
        self.task, self.block_size, self.bos, self.seed = task, block_size, bos, seed
        self.rank, self.world_size = rank, world_size
        self.skip_batches, self.micro_batch_size = skip_batches, micro_batch_size

    def __iter__(self):
        info = get_worker_info()
        wid, n_workers = (info.id, info.num_workers) if info else (0, 1)
        k = self.skip_batches + wid
        while True:
            first = (k * self.world_size + self.rank) * self.micro_batch_size
            for g in range(first, first + self.micro_batch_size):
                yield torch.tensor(self.task.block(self.seed, g, self.block_size, self.bos), dtype=torch.long)
            k += n_workers


class SyntheticDataModule(TextDataModule):
    """TextDataModule's interface (validation tensor, resume by micro-batches, calibration batch) over the
    synthetic task instead of text. The text fields of data/base.yaml are accepted and unused."""

    def __init__(self, tokenizer, *, synthetic: dict, seed: int, **kw):
        kw["prepend_bos"] = False  # every synthetic block starts with BOS (set below)
        super().__init__(tokenizer, synthetic=None, seed=seed, **kw)
        if seed < 0:
            raise DataError(f"data=synthetic needs seed >= 0 (stream {VAL_STREAM} is validation), got {seed}")
        self.task = BigramBackcopy(**(synthetic or {}))
        self.bos = tokenizer.eos_token_id
        top = self.task.low + self.task.vocab
        if top > len(tokenizer) or self.task.low <= self.bos < top:
            raise DataError(f"synthetic tokens [{self.task.low}, {top}) must fit the tokenizer's {len(tokenizer)} "
                            f"ids and leave out BOS (id {self.bos}): change data.synthetic.low / vocab")

    def setup(self, stage=None):
        if self.val_data is None:
            self.val_data = torch.tensor([self.task.block(VAL_STREAM, i, self.block_size, self.bos)
                                          for i in range(self.val_blocks)], dtype=torch.long)

    def _train_dataset(self, rank: int, world_size: int, skip_batches: int = 0):
        return SyntheticBlocks(self.task, self.block_size, self.bos, self.seed, rank, world_size, skip_batches,
                               self.micro_batch_size)
