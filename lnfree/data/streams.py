"""Documents -> token blocks: open a text source as a stream, tokenize, pack, shard.

Every source becomes a `datasets` IterableDataset (streaming=True): hub datasets by repo id, local
.txt/.jsonl/.json/.parquet files through the packaged text/json/parquet builders, the built-in corpus as
its JSONL file. Documents are tokenized, followed by end-of-text (kept as a training target) and packed
into fixed blocks; documents span block boundaries, nothing is padded.

Sharding: document i goes to shard i mod (world_size * num_workers), shard = rank * num_workers + worker,
so ranks and dataloader workers read disjoint documents, deterministically. The stream repeats forever
(epoch e reshuffles with seed + e when shuffle_buffer > 0).
"""

from __future__ import annotations

import glob
import itertools
from pathlib import Path

import torch
from torch.utils.data import IterableDataset, get_worker_info

from . import corpus

FILE_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DataError(ValueError):
    pass


def open_stream(source: str, split: str, path=None, config_name=None, revision=None, files=()):
    """A streaming `datasets.IterableDataset` of documents."""
    import datasets

    if source == "builtin":
        return datasets.load_dataset("json", data_files=str(corpus.corpus_file(split)), split="train",
                                     streaming=True)
    if source == "files":
        paths = sorted(p for pattern in files for p in glob.glob(str(Path(pattern).expanduser())))
        if not paths:
            raise DataError(f"data.files matched no file: {list(files)}")
        if all(Path(p).stat().st_size == 0 for p in paths):
            raise DataError(f"data.files are all empty: {paths}")
        suffixes = {Path(p).suffix for p in paths}
        if len(suffixes) > 1 or not suffixes <= set(FILE_BUILDERS):
            raise DataError(f"data.files must share one suffix among {sorted(FILE_BUILDERS)}; got {sorted(suffixes)}")
        builder = FILE_BUILDERS[suffixes.pop()]
        kw = {"sample_by": "document"} if builder == "text" else {}  # a .txt file is one document
        return datasets.load_dataset(builder, data_files=paths, split="train", streaming=True, **kw)
    if source == "hf":
        if not path:
            raise DataError("data.source=hf needs data.path (a dataset repo id)")
        return datasets.load_dataset(path, config_name, revision=revision, split=split, streaming=True)
    raise DataError(f"unknown data.source {source!r}; use builtin, files or hf")


def iter_texts(stream, text_field: str, batch_size: int = 64):
    """The documents' texts, in order. `.iter(batch_size)` rather than `iter(stream)`: inside a DataLoader
    worker, plain iteration makes `datasets` split *files* among workers (a one-file dataset would leave
    all but one worker idle); we shard by document ourselves."""
    for batch in stream.iter(batch_size=batch_size):
        yield from batch[text_field]


def tokenize(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def pack(token_lists, block_size: int):
    """Concatenate token lists and cut fixed blocks; the tail that does not fill a block is dropped."""
    buf: list[int] = []
    for ids in token_lists:
        buf.extend(ids)
        while len(buf) >= block_size:
            yield buf[:block_size]
            buf = buf[block_size:]


class PackedBlocks(IterableDataset):
    """Endless stream of [block_size] token blocks from this rank/worker's shard of the documents."""

    def __init__(self, open_docs, tokenizer, text_field: str, block_size: int, rank: int = 0,
                 world_size: int = 1, skip_docs: int = 0, skip_batches: int = 0, micro_batch_size: int = 1,
                 shuffle_buffer: int = 0, seed: int = 0):
        self.open_docs, self.tokenizer, self.text_field = open_docs, tokenizer, text_field
        self.block_size, self.rank, self.world_size = block_size, rank, world_size
        self.skip_docs, self.skip_batches, self.micro_batch_size = skip_docs, skip_batches, micro_batch_size
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.eot = tokenizer.eos_token_id

    def _documents(self, shard: int, n_shards: int):
        for epoch in itertools.count():
            stream = self.open_docs()
            if self.shuffle_buffer > 0:
                stream = stream.shuffle(seed=self.seed + epoch, buffer_size=self.shuffle_buffer)
            n_mine = 0
            for i, text in enumerate(iter_texts(stream, self.text_field)):
                if i < self.skip_docs or (i - self.skip_docs) % n_shards != shard:
                    continue
                n_mine += 1
                yield tokenize(self.tokenizer, text) + [self.eot]
            if n_mine == 0:
                raise DataError(f"shard {shard}/{n_shards} received no document: too few documents for "
                                f"{self.world_size} rank(s) x dataloader workers")

    def __iter__(self):
        info = get_worker_info()
        wid, n_workers = (info.id, info.num_workers) if info else (0, 1)
        # A DataLoader takes batch k from worker k mod n_workers. After `skip_batches` batches, loader worker
        # `wid` must continue the stream of original worker (skip_batches + wid) mod n_workers, past the
        # batches that worker had already produced.
        orig = (self.skip_batches + wid) % n_workers
        shard, n_shards = self.rank * n_workers + orig, self.world_size * n_workers
        my_batches = (self.skip_batches - orig + n_workers - 1) // n_workers
        blocks = pack(self._documents(shard, n_shards), self.block_size)
        for block in itertools.islice(blocks, my_batches * self.micro_batch_size, None):
            yield torch.tensor(block, dtype=torch.long)
