import json
import re

import pytest
import torch
from torch.utils.data import DataLoader

from lnfree.data import corpus
from lnfree.data.streams import DataError, PackedBlocks, open_stream, pack
from lnfree.training.config import data_module


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
    dm = data_module(tok, "base", name="t", source="files", files=[str(f)], val_files=[str(f)], block_size=8,
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


@pytest.mark.slow
def test_builtin_validation_is_fixed_and_disjoint_from_training(tok):
    dm = data_module(tok, "builtin", block_size=64, micro_batch_size=2, val_blocks=4)
    dm.setup()
    dm2 = data_module(tok, "builtin", block_size=64, micro_batch_size=2, val_blocks=4)
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
    dm = data_module(tok, "base", name="t", source="files", files=[str(f)], block_size=16, micro_batch_size=2,
                     val_blocks=3)
    dm.setup()
    val_words = _markers(tok, [dm.val_data])
    train_words = _markers(tok, [list(_take(dm._train_dataset(0, 1), 20))])
    assert val_words and train_words and not (val_words & train_words)


def test_missing_text_field_and_short_data_rejected(tok, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", ["hello"] * 3, field="content")
    dm = data_module(tok, "base", name="x", source="files", files=[str(f)], block_size=8, val_blocks=1)
    with pytest.raises(DataError, match="no field 'text'.*content"):
        dm.setup()
    g = write_jsonl(tmp_path / "short.jsonl", ["hi there"])
    dm = data_module(tok, "base", name="short", source="files", files=[str(g)], block_size=64, val_blocks=2)
    with pytest.raises(DataError, match="too short"):
        dm.setup()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    dm = data_module(tok, "base", name="empty", source="files", files=[str(empty)], block_size=8, val_blocks=1)
    with pytest.raises(DataError, match="empty"):
        dm.setup()
    with pytest.raises(DataError, match="matched no file"):
        data_module(tok, "base", name="none", source="files", files=[str(tmp_path / "nope*.txt")], block_size=8).setup()


def test_text_and_parquet_files_use_the_same_path(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [f"plain text document {i}. " * 10 for i in range(6)]
    for i, d in enumerate(docs):
        (tmp_path / f"{i}.txt").write_text(d)
    pq.write_table(pa.table({"text": docs}), tmp_path / "d.parquet")
    vals = []
    for files in ([str(tmp_path / "*.txt")], [str(tmp_path / "d.parquet")]):
        dm = data_module(tok, "base", name="x", source="files", files=files, block_size=16, micro_batch_size=2,
                         val_blocks=2)
        dm.setup()
        vals.append(dm.val_data)
    assert torch.equal(vals[0], vals[1])  # one document per .txt file == one per parquet row


def test_prepend_bos_puts_end_of_text_at_position_0_of_every_block():
    dm = data_module(corpus.load_tokenizer(), "builtin", block_size=32, micro_batch_size=4, val_blocks=3,
                     prepend_bos=True)
    dm.setup()
    batch = dm.calibration_batch()
    eot = dm.tokenizer.eos_token_id
    assert (batch[:, 0] == eot).all() and (dm.val_data[:, 0] == eot).all() and batch.shape == (4, 32)
    assert list(pack([[1, 2, 3, 4, 5, 6, 7]], 4, bos=0)) == [[0, 1, 2, 3], [0, 4, 5, 6]]


class _CountingPart:
    """A stream part that counts the rows read from it (what a shard really opens)."""

    def __init__(self, ds):
        self.ds, self.rows = ds, 0

    def iter(self, batch_size):
        for batch in self.ds.iter(batch_size=batch_size):
            self.rows += len(batch["text"])
            yield batch


def _multi_file(tmp_path, n_files=8, per_file=5):
    files = [write_jsonl(tmp_path / f"part{j}.jsonl", [f"doc{j}x{i} words here." for i in range(per_file)])
             for j in range(n_files)]
    return [str(f) for f in files]


def test_each_shard_opens_only_its_own_files(tok, tmp_path, capfd):
    files = _multi_file(tmp_path)
    parts = [(w, _CountingPart(ds)) for w, ds in open_stream("files", "train", files=files)]
    seen = []
    for shard in range(4):  # 2 ranks x 2 workers
        ds = PackedBlocks(lambda: parts, tok, "text", 16, rank=shard // 2, world_size=2)
        texts, interleave = ds._texts(shard, 4)
        texts = list(texts)
        assert not interleave
        assert {t.split("x")[0] for t in texts} == {f"doc{j}" for j in range(8) if j % 4 == shard}
        seen.append(texts)
    assert [p.rows for _, p in parts] == [5] * 8  # every file read once in all, by its own shard only
    assert sorted(sum(seen, [])) == sorted(f"doc{j}x{i} words here." for j in range(8) for i in range(5))
    assert "opens only its own" in capfd.readouterr().err


def test_a_hub_style_dataset_with_data_files_is_split_by_file(tok, tmp_path):
    import datasets

    files = _multi_file(tmp_path, n_files=4, per_file=3)
    hub_like = lambda: [("hub-like", datasets.load_dataset("json", data_files=files, split="train",  # noqa: E731
                                                          streaming=True))]
    got = [list(PackedBlocks(hub_like, tok, "text", 16)._texts(s, 2)[0]) for s in range(2)]
    assert {t.split("x")[0] for t in got[0]} == {"doc0", "doc2"}
    assert {t.split("x")[0] for t in got[1]} == {"doc1", "doc3"}


def test_too_few_files_fall_back_to_document_interleaving_and_say_so(tok, tmp_path, capfd):
    files = _multi_file(tmp_path, n_files=1, per_file=10)
    ds = PackedBlocks(lambda: open_stream("files", "train", files=files), tok, "text", 16, world_size=2)
    texts, interleave = ds._texts(0, 2)
    assert interleave and len(list(texts)) == 10  # reads everything; _documents keeps 1 in 2
    assert "document interleaving" in capfd.readouterr().err


def test_validation_hold_out_is_skipped_per_file_and_resume_is_exact(tok, tmp_path):
    files = _multi_file(tmp_path, n_files=4, per_file=5)
    opener = lambda: open_stream("files", "train", files=files)  # noqa: E731
    ds = PackedBlocks(opener, tok, "text", 16, skip_docs=7)  # the first 7 documents: all of file 0, 2 of file 1
    texts = [list(ds._texts(s, 2)[0]) for s in range(2)]
    assert [t.split(" ")[0] for t in texts[0]] == [f"doc2x{i}" for i in range(5)]
    assert [t.split(" ")[0] for t in texts[1]] == [f"doc1x{i}" for i in range(2, 5)] + [f"doc3x{i}" for i in range(5)]

    def loader(skip):
        return DataLoader(PackedBlocks(opener, tok, "text", 8, skip_batches=skip, micro_batch_size=2), batch_size=2,
                          num_workers=2)

    full = [b for b, _ in zip(loader(0), range(8))]
    resumed = [b for b, _ in zip(loader(5), range(3))]
    assert all(torch.equal(a, b) for a, b in zip(full[5:], resumed))
