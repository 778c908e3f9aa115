"""Documents -> token blocks: open a text source as a stream, tokenize, pack, shard.

Every source becomes a `datasets` IterableDataset (streaming=True): hub datasets by repo id, local
.txt/.jsonl/.json/.parquet files through the packaged text/json/parquet builders, the built-in corpus as
its JSONL file. Documents are tokenized, followed by end-of-text (kept as a training target) and packed
into fixed blocks; documents span block boundaries, nothing is padded.

Sharding: shard = rank * num_workers + worker, of n_shards = world_size * num_workers. When the source has at
least n_shards parts (local files, or a hub dataset's data files), each shard opens only its own parts (part j
goes to shard j mod n_shards; a hub dataset through `IterableDataset.shard`), so at 64 GPUs x 4 workers a process
reads 1/256 of the data instead of all of it. With fewer parts (the built-in corpus is one file) every shard
reads the whole stream and keeps document i when i mod n_shards == shard, and says so in the log. Either way
the shards' documents are disjoint and deterministic. The stream repeats forever (epoch e reshuffles with
seed + e when shuffle_buffer > 0: a buffer shuffle of the documents).

Faults: a row without text or an unreadable file is named (file and row) and skipped or fatal per
`data.on_bad_row`, and recorded in the run's data_faults.jsonl (FaultLog). Local .jsonl files are read row by row
by lnfree (JsonLines), so that one row that cannot be decoded is one bad row, named by its own number, and `skip`
drops it alone; a file that `datasets` reads (.txt, .json, .parquet, the hub) and that fails part-way stops the run
under either policy, since skipping would drop the rest of the file unseen (a .txt file is one row: skipping it
drops that row alone). Before training starts (`preflight`) every local file is opened and its first rows decoded,
and every byte of a .jsonl file is checked to be UTF-8; a glob that matches a directory is refused.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import itertools
import json
import os
import random
import sys
from pathlib import Path

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import UserError
from . import corpus

FILE_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DataError(UserError):
    pass


BAD_ROW_POLICIES = ("skip", "fail")
DATA_FAULTS = "data_faults.jsonl"  # in the run dir: every bad row / unreadable file met, and what was done


def open_stream(source: str, split: str, path=None, config_name=None, revision=None, files=()):
    """The documents as [(where, streaming `datasets.IterableDataset`)], in order: one part per local file (so
    that a fault can name its file), one for a hub dataset or the built-in corpus."""
    import datasets

    if source == "builtin":
        f = corpus.corpus_file(split)
        return [(f"built-in corpus {f.name}", datasets.load_dataset("json", data_files=str(f), split="train",
                                                                    streaming=True))]
    if source == "files":
        paths = matched_files(files)
        if not paths:
            raise DataError(f"data.files matched no file: {list(files)}")
        dirs = [p for p in paths if Path(p).is_dir()]
        if dirs:
            raise DataError(f"data.files {list(files)} match directories {dirs[:3]}: give the files in them (e.g. "
                            f"{Path(dirs[0]) / '*.jsonl'})")
        special = [p for p in paths if not Path(p).is_file()]  # a FIFO, socket or device: reading it may never end
        if special:
            raise DataError(f"data.files: {special[:3]} not regular files (a FIFO, socket or device); give files")
        unreadable = [p for p in paths if not os.access(p, os.R_OK)]
        if unreadable:
            raise DataError(f"data.files: no permission to read {unreadable[:3]}")
        if all(Path(p).stat().st_size == 0 for p in paths):
            raise DataError(f"data.files are all empty: {paths}")
        suffixes = {Path(p).suffix for p in paths}
        if len(suffixes) > 1 or not suffixes <= set(FILE_BUILDERS):
            raise DataError(f"data.files must share one suffix among {sorted(FILE_BUILDERS)}; got {sorted(suffixes)}")
        suffix = suffixes.pop()
        if suffix == ".jsonl":
            return [(p, JsonLines(p)) for p in paths]
        builder = FILE_BUILDERS[suffix]
        kw = {"sample_by": "document"} if builder == "text" else {}  # a .txt file is one document
        return [(p, datasets.load_dataset(builder, data_files=[p], split="train", streaming=True, **kw))
                for p in paths]
    if source == "hf":
        if not path:
            raise DataError("data.source=hf needs data.path (a dataset repo id)")
        ds = datasets.load_dataset(path, config_name, revision=revision, split=split, streaming=True)
        return [(f"{path} [{split}]", ds)]
    raise DataError(f"unknown data.source {source!r}; use builtin, files or hf")


def matched_files(patterns) -> list[str]:
    """The files of data.files / data.val_files: every glob's matches, sorted."""
    return sorted(p for pattern in patterns for p in glob.glob(str(Path(pattern).expanduser())))


# -- which files a run read: compared when it resumes -----------------------------------------------------
IDENTITY_CHUNK = 1 << 20  # a big file is known by the SHA-256 of its first and last MiB (and its size and time)
WHOLE_HASH_MAX = 4 << 20  # files up to this size (all of the built-in corpus) are hashed whole


def file_identity(path) -> dict:
    """What tells a data file from an edited one: its size and SHA-256, of the whole file when it is at most 4 MiB
    (then the content decides alone), else of its first and last MiB plus its modification time (an edit in the
    middle that keeps the size still changes the time)."""
    st = os.stat(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if st.st_size <= WHOLE_HASH_MAX:
            h.update(f.read())
            return {"size": st.st_size, "sha256": h.hexdigest()}
        h.update(f.read(IDENTITY_CHUNK))
        f.seek(st.st_size - IDENTITY_CHUNK)
        h.update(f.read(IDENTITY_CHUNK))
    return {"size": st.st_size, "sha256_first_last_mib": h.hexdigest(), "mtime_ns": st.st_mtime_ns}


def data_identity(source: str, split: str, val_split, files, val_files) -> dict:
    """{name: file_identity} of every local file the data config reads (training and validation): data.files and
    data.val_files by their paths as matched, the built-in corpus by its name (the same on every checkout). A hub
    dataset is named by data.path and data.revision, which a resume compares as config fields; only readable regular
    files are opened here (open_stream refuses what it cannot read)."""
    if source == "builtin":
        found = {f"built-in corpus {corpus.corpus_file(s).name}": corpus.corpus_file(s)
                 for s in dict.fromkeys([split, val_split or split])}
    elif source == "files":
        found = {p: p for p in matched_files([*files, *val_files])}
    else:
        return {}
    return {name: file_identity(p) for name, p in found.items() if os.path.isfile(p) and os.access(p, os.R_OK)}


# -- .jsonl files, row by row ------------------------------------------------------------------------------
class BadRow:
    """A row of a .jsonl file that cannot be decoded: JsonLines.iter yields it alone, between batches."""

    def __init__(self, problem: str):
        self.problem = problem


class JsonLines:
    """A local .jsonl file read row by row by lnfree rather than by `datasets`' json builder, which parses a file in
    blocks of megabytes: there one undecodable row fails its whole block (every row of it lost, the fault blamed on
    the block's first row). Here a line that is not UTF-8, not JSON or not an object is one bad row, and the next
    line is read as usual. Rows are the non-blank lines, counted from 0, as `datasets` counts them; a fault names
    the line too. `iter` yields batches as `datasets` does (a dict of columns, None where a row lacks a key)."""

    num_shards = 1  # one part (n_parts): shards never split a file

    def __init__(self, path: str):
        self.path = path

    def rows(self):
        """Every row: its dict, or a BadRow."""
        with open(self.path, "rb") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line.decode("utf-8"))
                except UnicodeDecodeError as e:
                    yield BadRow(f"line {line_no} is not UTF-8 (byte {line[e.start]:#04x} at column {e.start + 1})")
                    continue
                except ValueError as e:
                    yield BadRow(f"line {line_no} is not JSON ({e})")
                    continue
                yield row if isinstance(row, dict) else BadRow(f"line {line_no} is not a JSON object")

    def __iter__(self):  # the rows that decode (the first one tells which fields the file has)
        return (r for r in self.rows() if not isinstance(r, BadRow))

    def iter(self, batch_size: int):
        batch: list[dict] = []
        for row in self.rows():
            if isinstance(row, BadRow) or len(batch) == batch_size:
                if batch:
                    yield _columns(batch)
                batch = []
            if isinstance(row, BadRow):
                yield row
            else:
                batch.append(row)
        if batch:
            yield _columns(batch)

    def utf8(self) -> bool:
        """Whether every byte of the file is UTF-8 (a C-speed scan: cheap enough for the pre-flight)."""
        decoder = codecs.getincrementaldecoder("utf-8")()
        try:
            with open(self.path, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    decoder.decode(block)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return False
        return True


def _columns(rows: list[dict]) -> dict:
    keys = dict.fromkeys(k for r in rows for k in r)
    return {k: [r.get(k) for r in rows] for k in keys}


class FaultLog:
    """What to do with a row that has no text, or a file that cannot be read: `fail` stops with the file and
    row named, `skip` goes on; either way the fault is appended to the run's data_faults.jsonl. A bad row that
    an earlier, failed run of the same dir reported is skipped (that row alone), so a resume never re-hits it; a
    file that cannot be read from some row on stops every run, so that no row is ever skipped unseen."""

    def __init__(self, policy: str = "fail", path: str | None = None):
        if policy not in BAD_ROW_POLICIES:
            raise DataError(f"data.on_bad_row={policy!r}; use one of {BAD_ROW_POLICIES}")
        self.policy, self.path = policy, path
        self.known = {(f["where"], f["row"]) for f in read_faults(path)}

    def __call__(self, where: str, row: int, what: str, whole_rest: bool = False):
        """`whole_rest`: the fault ends the file (it cannot be read from `row` on): it stops the run under either
        policy, and again at a resume, because skipping it would drop every row after it unseen."""
        reported = (where, row) in self.known
        if not reported or whole_rest:
            self.known.add((where, row))
            action = "skip" if self.policy == "skip" and not whole_rest else "fail"
            if self.path and not reported:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a") as f:
                    f.write(json.dumps({"where": where, "row": row, "what": what, "action": action}) + "\n")
            if whole_rest:
                raise DataError(f"{where}, row {row}: {what}. Stopped: the rest of the file cannot be read, and "
                                "skipping it would drop its rows unseen (data.on_bad_row=skip drops single rows "
                                "only); repair the file or take it out of data.files")
            if action == "fail":
                raise DataError(f"{where}, row {row}: {what}. Stopped (data.on_bad_row=fail); the fault is recorded"
                                f"{' in ' + self.path if self.path else ''} and a resume of this run skips that row "
                                "alone; data.on_bad_row=skip skips every such row")
        print(f"[lnfree] skipping {where}, row {row}: {what}", file=sys.stderr, flush=True)


def read_faults(path: str | None) -> list[dict]:
    if not path or not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def iter_texts(parts, text_field: str, faults: FaultLog | None = None, batch_size: int = 64):
    """The documents' texts, in order, each a str; faults handled by `faults` (default: fail, naming file and
    row). `.iter(batch_size)` rather than `iter(stream)`: inside a DataLoader worker, plain iteration makes
    `datasets` split *files* among workers (a one-file dataset would leave all but one worker idle); we shard
    by document ourselves."""
    faults = faults or FaultLog()
    for where, stream in parts:
        row = 0
        try:
            for batch in stream.iter(batch_size=batch_size):
                if isinstance(batch, BadRow):  # a .jsonl row that cannot be decoded: that row alone
                    faults(where, row, batch.problem)
                    row += 1
                    continue
                n = len(next(iter(batch.values()), ()))
                for text in batch.get(text_field, [None] * n):  # (a batch where no row has the field)
                    if isinstance(text, str):
                        yield text
                    else:
                        faults(where, row, f"field {text_field!r} is {text!r}, not text")
                    row += 1
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001  (undecodable bytes, malformed JSON/parquet: name the file)
            _unreadable(faults, where, row, f"cannot be read from here on ({type(e).__name__}: "
                                            f"{str(e).splitlines()[0][:200]})")


def _unreadable(faults: FaultLog, where: str, row: int, what: str) -> None:
    """A file that `datasets` cannot read from `row` on: a .txt file is one row (the whole file), so that row alone is
    the bad one; in any other file the rows after it would be lost unseen, so it stops the run under either policy."""
    faults(where, row, what, whole_rest=Path(where).suffix != ".txt")


def preflight(parts, text_field: str, faults: FaultLog | None = None) -> None:
    """Open every part (each local file) and decode its first rows now, and check every byte of a .jsonl file to be
    UTF-8, so that what can be found cheaply is found before any compute, not when the stream reaches it hours
    later. A fault goes to `faults` (data.on_bad_row: fail stops here, naming file and row; skip records it now and
    the stream skips that row); in a .jsonl file that is all UTF-8, a row that is not JSON is found as the stream
    reaches it."""
    faults = faults or FaultLog()
    for where, stream in parts:
        if isinstance(stream, JsonLines) and not stream.utf8():  # rare: now read it row by row, naming each bad one
            for row, r in enumerate(stream.rows()):
                if isinstance(r, BadRow):
                    faults(where, row, r.problem)
        try:
            first = next(iter(stream.iter(batch_size=1)), None)
        except Exception as e:  # noqa: BLE001  (undecodable bytes, malformed JSON/parquet)
            _unreadable(faults, where, 0, f"cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
            continue
        if isinstance(first, BadRow):
            faults(where, 0, first.problem)
        elif first is not None and text_field not in first:
            faults(where, 0, f"has no field {text_field!r} (its fields: {sorted(first)})")


def shuffled(items, buffer_size: int, seed: int):
    """Deterministic buffer shuffle of a stream (the same order on every rank for the same seed)."""
    rng, buf = random.Random(seed), []
    for item in items:
        buf.append(item)
        if len(buf) >= buffer_size:
            yield buf.pop(rng.randrange(len(buf)))
    rng.shuffle(buf)
    yield from buf


def tokenize(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def pack(token_lists, block_size: int, bos: int | None = None):
    """Concatenate token lists and cut fixed blocks; the tail that does not fill a block is dropped. With `bos`,
    every block starts with that token (a fixed beginning-of-sequence token at position 0)."""
    buf: list[int] = []
    n = block_size - (bos is not None)
    for ids in token_lists:
        buf.extend(ids)
        while len(buf) >= n:
            yield ([bos] if bos is not None else []) + buf[:n]
            buf = buf[n:]


def n_parts(parts) -> int:
    """How many independently readable pieces a stream has: its local files, or a hub dataset's data files."""
    if len(parts) > 1:
        return len(parts)
    return int(getattr(parts[0][1], "num_shards", getattr(parts[0][1], "n_shards", 1)) or 1)


def shard_parts(parts, shard: int, n_shards: int):
    """This shard's own parts (see the module docstring), as [(index in the full list, where, stream)]."""
    if len(parts) > 1:
        return [(j, where, ds) for j, (where, ds) in enumerate(parts) if j % n_shards == shard]
    where, ds = parts[0]
    mine = ds.shard(num_shards=n_shards, index=shard, contiguous=False)  # data files shard, shard + n_shards, ...
    return [(0, f"{where} (data files {shard}::{n_shards})", mine)]


def held_out_per_part(parts, skip_docs: int, text_field: str, faults=None) -> list[int]:
    """How many of the first `skip_docs` documents (the validation hold-out) each part holds, reading parts in
    order only until the hold-out is counted."""
    out, left = [0] * len(parts), skip_docs
    for j, part in enumerate(parts):
        if left <= 0:
            break
        n = sum(1 for _ in itertools.islice(iter_texts([part], text_field, faults), left))
        out[j], left = n, left - n
    return out


_told: set = set()  # (source, n_parts, n_shards) already explained in the log


class PackedBlocks(IterableDataset):
    """Endless stream of [block_size] token blocks from this rank/worker's shard of the documents."""

    def __init__(self, open_docs, tokenizer, text_field: str, block_size: int, rank: int = 0,
                 world_size: int = 1, skip_docs: int = 0, skip_batches: int = 0, micro_batch_size: int = 1,
                 shuffle_buffer: int = 0, seed: int = 0, faults: FaultLog | None = None, bos: int | None = None):
        self.open_docs, self.tokenizer, self.text_field = open_docs, tokenizer, text_field
        self.faults, self.bos = faults, bos
        self.block_size, self.rank, self.world_size = block_size, rank, world_size
        self.skip_docs, self.skip_batches, self.micro_batch_size = skip_docs, skip_batches, micro_batch_size
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.eot = tokenizer.eos_token_id
        self._held: list[int] | None = None  # hold-out documents per part, when shards read their own parts

    def _texts(self, shard: int, n_shards: int):
        """(this shard's texts for one pass, whether they still need the i mod n_shards filter)."""
        parts = self.open_docs()
        n = n_parts(parts)
        # a hub dataset with a hold-out from its own split interleaves: which of its files hold the first documents
        # is not known without reading them in order
        by_part = n_shards > 1 and n >= n_shards and (len(parts) > 1 or self.skip_docs == 0)
        if n_shards > 1 and (parts[0][0], n, n_shards) not in _told:
            _told.add((parts[0][0], n, n_shards))
            how = (f"each of {n_shards} shards (ranks x workers) opens only its own of {n} parts" if by_part else
                   f"{n} part(s) for {n_shards} shards (ranks x workers): every shard reads every document and keeps "
                   f"1 in {n_shards} (document interleaving)")
            print(f"[lnfree] data {parts[0][0]}: {how}", file=sys.stderr, flush=True)
        if not by_part:
            # the validation hold-out (the first skip_docs documents) is dropped before shuffling, so it never
            # leaks into training
            return itertools.islice(iter_texts(parts, self.text_field, self.faults), self.skip_docs, None), True
        if self._held is None:  # counted once, not every epoch
            self._held = (held_out_per_part(parts, self.skip_docs, self.text_field, self.faults) if self.skip_docs
                          else [0] * n)
        return itertools.chain.from_iterable(
            itertools.islice(iter_texts([(where, ds)], self.text_field, self.faults), self._held[j], None)
            for j, where, ds in shard_parts(parts, shard, n_shards)), False

    def _documents(self, shard: int, n_shards: int):
        for epoch in itertools.count():
            texts, interleave = self._texts(shard, n_shards)
            if self.shuffle_buffer > 0:
                texts = shuffled(texts, self.shuffle_buffer, seed=self.seed + epoch)
            n_mine = 0
            for i, text in enumerate(texts):
                if interleave and i % n_shards != shard:
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
        blocks = pack(self._documents(shard, n_shards), self.block_size, self.bos)
        for block in itertools.islice(blocks, my_batches * self.micro_batch_size, None):
            yield torch.tensor(block, dtype=torch.long)
