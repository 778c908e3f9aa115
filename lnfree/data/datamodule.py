"""The DataModule: a streaming training set and a fixed validation tensor (datamodule of `conf/data/`).

Validation: a fixed tensor of `val_blocks` blocks, from `val_split` / `val_files` when given, otherwise
from the first documents of the training split, which training then skips.

Resume: the DataModule's state is the number of micro-batches consumed; a resumed stream skips exactly
those blocks, so an interrupted and resumed run sees the same data as an uninterrupted one.
"""

from __future__ import annotations

import itertools

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from .streams import (
    DataError,
    FaultLog,
    PackedBlocks,
    iter_texts,
    open_stream,
    pack,
    preflight,
    read_faults,
    tokenize,
)


class TextDataModule(L.LightningDataModule):
    # no defaults: every value comes from conf/data (Hydra; outside training: training.config.data_module)
    def __init__(self, tokenizer, *, name: str, source: str, path, config_name, revision, split: str, val_split,
                 text_field: str, files, val_files, block_size: int, micro_batch_size: int, val_blocks: int,
                 num_workers: int, shuffle_buffer: int, seed: int, on_bad_row: str, prepend_bos: bool,
                 synthetic: dict | None, faults_file: str | None = None):
        super().__init__()
        if synthetic is not None:
            raise DataError(f"data.synthetic is set but data={name!r} reads text: synthetic tasks need data=synthetic")
        self.tokenizer, self.name, self.source = tokenizer, name, source
        self.path, self.config_name, self.revision = path, config_name, revision
        self.split, self.val_split, self.text_field = split, val_split, text_field
        self.files, self.val_files = list(files), list(val_files)
        self.block_size, self.micro_batch_size, self.val_blocks = block_size, micro_batch_size, val_blocks
        self.num_workers, self.shuffle_buffer, self.seed = num_workers, shuffle_buffer, seed
        self.faults_file = faults_file
        # prepend_bos: every block starts with end-of-text as a fixed beginning-of-sequence token
        self.bos = tokenizer.eos_token_id if (prepend_bos and tokenizer is not None) else None
        self.faults = FaultLog(on_bad_row, faults_file)
        self.val_data: torch.Tensor | None = None
        self.skip_docs = 0
        self.resume_batches = 0
        if tokenizer is not None and tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no end-of-text (eos) token")
        if block_size < 2 or val_blocks < 1 or micro_batch_size < 1:
            raise DataError("data.block_size must be >= 2, val_blocks and micro_batch_size >= 1")

    # -- streams -----------------------------------------------------------------------------------
    def _open(self, split: str, files):
        return open_stream(self.source, split, self.path, self.config_name, self.revision, files)

    def train_docs(self):
        return self._open(self.split, self.files)

    def _check_fields(self, parts, what: str):
        try:
            first = next(iter(parts[0][1]), None)
        except StopIteration:  # some builders raise it for an empty file
            first = None
        except Exception as e:  # noqa: BLE001  (an unreadable first file: name it)
            raise DataError(f"{what} of data={self.name!r}: cannot read {parts[0][0]} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200]})") from e
        if first is None:
            raise DataError(f"{what} of data={self.name!r} is empty")
        if self.text_field not in first:
            raise DataError(f"{what} of data={self.name!r} has no field {self.text_field!r}; its fields are "
                            f"{sorted(first)}: set data.text_field")

    def setup(self, stage=None):
        if self.val_data is not None:
            return
        self._check_fields(self.train_docs(), "training split")
        preflight(self.train_docs(), self.text_field, self.faults)  # every file readable, before any compute
        if self.val_split is not None or self.val_files:
            val_stream = self._open(self.val_split or self.split, self.val_files or self.files)
            self._check_fields(val_stream, "validation split")
            preflight(val_stream, self.text_field, self.faults)
            docs = (tokenize(self.tokenizer, t) + [self.tokenizer.eos_token_id]
                    for t in iter_texts(val_stream, self.text_field, self.faults))
            blocks = list(itertools.islice(pack(docs, self.block_size, self.bos), self.val_blocks))
        else:  # hold out the first documents of the training split
            blocks, self.skip_docs = [], 0
            docs = (tokenize(self.tokenizer, t) + [self.tokenizer.eos_token_id]
                    for t in iter_texts(self.train_docs(), self.text_field, self.faults))
            counted = _Counting(docs)
            for block in pack(counted, self.block_size, self.bos):
                blocks.append(block)
                if len(blocks) == self.val_blocks:
                    break
            self.skip_docs = counted.n
        if len(blocks) < self.val_blocks:
            raise DataError(f"data={self.name!r} too short: {len(blocks)} validation block(s) of "
                            f"{self.block_size} tokens, need data.val_blocks={self.val_blocks}")
        self.val_data = torch.tensor(blocks, dtype=torch.long)
        # fail now, not in a worker, if nothing is left to train on
        if next(iter(self._train_dataset(rank=0, world_size=1)), None) is None:
            raise DataError(f"data={self.name!r} has no training block left after the validation hold-out")

    def _train_dataset(self, rank: int, world_size: int, skip_batches: int = 0):
        return PackedBlocks(self.train_docs, self.tokenizer, self.text_field, self.block_size, rank, world_size,
                            skip_docs=self.skip_docs, skip_batches=skip_batches,
                            micro_batch_size=self.micro_batch_size, shuffle_buffer=self.shuffle_buffer,
                            seed=self.seed, faults=self.faults, bos=self.bos)

    def train_dataloader(self):
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        ds = self._train_dataset(rank, world, skip_batches=self.resume_batches)
        return DataLoader(ds, batch_size=self.micro_batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def val_dataloader(self):
        return DataLoader(_Blocks(self.val_data), batch_size=self.micro_batch_size, shuffle=False)

    def calibration_batch(self) -> torch.Tensor:
        """The first training micro-batch (rank 0's view), for initialising the std estimates."""
        it = iter(self._train_dataset(rank=0, world_size=1))
        return torch.stack([b for b, _ in zip(it, range(self.micro_batch_size))])

    def faults_seen(self) -> dict:
        """Bad rows and unreadable files met by this run (from its data_faults.jsonl), for summary.json."""
        faults = read_faults(self.faults_file)
        return {"skipped": sum(f["action"] == "skip" for f in faults),
                "failed": sum(f["action"] == "fail" for f in faults), "first": faults[:20]}

    # -- resume ------------------------------------------------------------------------------------
    def state_dict(self):
        if self.trainer is None:
            return {}
        return {"micro_batches": self.trainer.global_step * self.trainer.accumulate_grad_batches}

    def load_state_dict(self, state):
        self.resume_batches = state.get("micro_batches", 0)


class _Blocks(TensorDataset):
    def __getitem__(self, i):
        return self.tensors[0][i]


class _Counting:
    """Iterator wrapper that counts how many items were drawn."""

    def __init__(self, it):
        self.it, self.n = iter(it), 0

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self.it)
        self.n += 1
        return item
