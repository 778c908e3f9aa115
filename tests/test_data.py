import json
import re

import pytest
import torch
from torch.utils.data import DataLoader

from lnfree.data import corpus
from lnfree.data.datamodule import TextDataModule
from lnfree.data.streams import DataError, PackedBlocks, open_stream, pack


@pytest.fixture(scope="module")
def tok():
    return corpus.load_tokenizer()


def write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts))
    return path


def test_pack_concatenates_and_cuts_blocks():
    blocks = list(pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], 4))
    assert blocks == [[1, 2, 3, 4], [5, 6, 7, 8]]


def test_eot_after_every_document_and_kept(tok, tmp_path):
    docs = [f"document number {i} says hello." for i in range(6)]
    f = write_jsonl(tmp_path / "d.jsonl", docs)
    dm = TextDataModule(tok, name="t", source="files", files=[str(f)], val_files=[str(f)], block_size=8,
                        micro_batch_size=2, val_blocks=1)
    dm.setup()
    stream = dm._train_dataset(0, 1)
    flat = torch.cat(list(_take(stream, 3)))
    expected = sum(([*corpus.load_tokenizer()(d, add_special_tokens=False)["input_ids"], tok.eos_token_id]
                    for d in docs), [])
    assert flat.tolist() == expected[: len(flat)]
    assert (flat == tok.eos_token_id).sum() >= 2  # end-of-text is in the data, hence a training target


def _take(it, n):
    for x, _ in zip(it, range(n)):
        yield x


def _blocks_by_shard(tok, f, world, workers, n_batches):
    out = []
    for rank in range(world):
        ds = PackedBlocks(lambda: open_stream("files", "train", files=[str(f)]),
                          tok, "text", 16, rank=rank, world_size=world, micro_batch_size=2)
        loader = DataLoader(ds, batch_size=2, num_workers=workers)
        out.append([b for b, _ in zip(loader, range(n_batches))])
    return out


def test_two_ranks_and_two_workers_read_disjoint_documents(tok, tmp_path):
    # every document is a unique marker word repeated, so a block reveals which document it came from
    docs = [" ".join([f"doc{i:03d}"] * 12) for i in range(40)]
    f = write_jsonl(tmp_path / "d.jsonl", docs)
    per_rank = _blocks_by_shard(tok, f, world=2, workers=2, n_batches=6)
    seen = [_markers(tok, batches) for batches in per_rank]
    assert seen[0] and seen[1] and not (seen[0] & seen[1])
    # within one rank the two workers alternate batches and share no document either
    w0, w1 = _markers(tok, per_rank[0][0::2]), _markers(tok, per_rank[0][1::2])
    assert w0 and w1 and not (w0 & w1)


def _markers(tok, batches):
    """Whole document markers (a block boundary may cut one: partial markers do not match)."""
    return {m for batch in batches for b in batch for m in re.findall(r"doc\d{3}", tok.decode(b))}


def test_resume_skips_exactly_the_consumed_batches(tok, tmp_path):
    docs = [f"text {i} " * 30 for i in range(30)]
    f = write_jsonl(tmp_path / "d.jsonl", docs)


    def ds(skip):
        return PackedBlocks(lambda: open_stream("files", "train", files=[str(f)]), tok, "text", 16,
                            skip_batches=skip, micro_batch_size=2)

    for workers in (0, 2):
        full = [b for b, _ in zip(DataLoader(ds(0), batch_size=2, num_workers=workers), range(8))]
        resumed = [b for b, _ in zip(DataLoader(ds(5), batch_size=2, num_workers=workers), range(3))]
        for a, b in zip(full[5:], resumed):
            assert torch.equal(a, b)


def test_builtin_validation_is_fixed_and_disjoint_from_training(tok):
    dm = TextDataModule(tok, name="builtin", source="builtin", val_split="validation", block_size=64,
                        micro_batch_size=2, val_blocks=4)
    dm.setup()
    dm2 = TextDataModule(tok, name="builtin", source="builtin", val_split="validation", block_size=64,
                         micro_batch_size=2, val_blocks=4)
    dm2.setup()
    assert torch.equal(dm.val_data, dm2.val_data)
    train_titles = {json.loads(line)["title"] for line in _lines("train")}
    val_titles = {json.loads(line)["title"] for line in _lines("validation")}
    assert val_titles and not (train_titles & val_titles)


def _lines(split):
    import gzip

    with gzip.open(corpus.corpus_file(split), "rt") as f:
        return f.readlines()


def test_held_out_validation_documents_are_skipped_by_training(tok, tmp_path):
    docs = [" ".join([f"doc{i:03d}"] * 20) for i in range(20)]
    f = write_jsonl(tmp_path / "d.jsonl", docs)
    dm = TextDataModule(tok, name="t", source="files", files=[str(f)], block_size=16, micro_batch_size=2,
                        val_blocks=3)
    dm.setup()
    val_words = _markers(tok, [dm.val_data])
    train_words = _markers(tok, [list(_take(dm._train_dataset(0, 1), 20))])
    assert val_words and train_words and not (val_words & train_words)


def test_missing_text_field_and_short_data_rejected(tok, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", ["hello"] * 3, field="content")
    dm = TextDataModule(tok, name="x", source="files", files=[str(f)], block_size=8, val_blocks=1)
    with pytest.raises(DataError, match="no field 'text'.*content"):
        dm.setup()
    g = write_jsonl(tmp_path / "short.jsonl", ["hi there"])
    dm = TextDataModule(tok, name="short", source="files", files=[str(g)], block_size=64, val_blocks=2)
    with pytest.raises(DataError, match="too short"):
        dm.setup()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    dm = TextDataModule(tok, name="empty", source="files", files=[str(empty)], block_size=8, val_blocks=1)
    with pytest.raises(DataError, match="empty"):
        dm.setup()
    with pytest.raises(DataError, match="matched no file"):
        TextDataModule(tok, name="none", source="files", files=[str(tmp_path / "nope*.txt")]).setup()


def test_text_and_parquet_files_use_the_same_path(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [f"plain text document {i}. " * 10 for i in range(6)]
    for i, d in enumerate(docs):
        (tmp_path / f"{i}.txt").write_text(d)
    pq.write_table(pa.table({"text": docs}), tmp_path / "d.parquet")
    vals = []
    for files in ([str(tmp_path / "*.txt")], [str(tmp_path / "d.parquet")]):
        dm = TextDataModule(tok, name="x", source="files", files=files, block_size=16, micro_batch_size=2,
                            val_blocks=2)
        dm.setup()
        vals.append(dm.val_data)
    assert torch.equal(vals[0], vals[1])  # one document per .txt file == one per parquet row


def test_prepend_bos_puts_end_of_text_at_position_0_of_every_block():
    dm = TextDataModule(corpus.load_tokenizer(), name="builtin", source="builtin", val_split="validation",
                        block_size=32, micro_batch_size=4, val_blocks=3, prepend_bos=True)
    dm.setup()
    batch = dm.calibration_batch()
    eot = dm.tokenizer.eos_token_id
    assert (batch[:, 0] == eot).all() and (dm.val_data[:, 0] == eot).all() and batch.shape == (4, 32)
    assert list(pack([[1, 2, 3, 4, 5, 6, 7]], 4, bos=0)) == [[0, 1, 2, 3], [0, 4, 5, 6]]
