"""Bad data is found before compute and named by its file and row: globs that match directories or FIFOs, no file
at all, a file the pre-flight cannot read, an undecodable row (skipped alone under on_bad_row=skip, stopping the run
under fail, and skipped alone on the resume), and a file unreadable from a row on. Null rows and the fault record
of a whole run: tests/test_safety.py."""

import json
import os
import re

import pytest
from conftest import TINY_RUN, compose_train, local_files, weights_never_loaded

from lnfree.data import corpus
from lnfree.data.streams import DataError, FaultLog, iter_texts, open_stream, preflight
from lnfree.training.run import train


# -- before compute ------------------------------------------------------------------------------------------------
def test_a_data_glob_matching_a_directory_is_a_clear_error(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    (tmp_path / "sub.jsonl").mkdir()
    with pytest.raises(DataError, match=r"match directories .*sub\.jsonl"):
        open_stream("files", "train", files=[str(tmp_path / "*.jsonl")])


def test_a_fifo_in_data_files_is_refused_in_one_line(tmp_path):
    from lnfree.data.streams import DataError, open_stream

    good = tmp_path / "a.jsonl"
    good.write_text('{"text": "hello there"}\n')
    os.mkfifo(tmp_path / "b.jsonl")  # reading it would block forever
    with pytest.raises(DataError, match=r"b\.jsonl.*not regular files \(a FIFO"):
        open_stream("files", "train", files=[str(tmp_path / "*.jsonl")])


def test_a_data_error_comes_before_a_run_dir_exists(tmp_path):
    from lnfree.data.streams import DataError
    from lnfree.training.run import train

    run = tmp_path / "run"
    with pytest.raises(DataError, match="matched no file"):
        train(compose_train(run, *TINY_RUN, "data=local_text", "data.files=[/nonexistent/*.jsonl]",
                            "data.block_size=64"))
    assert not run.exists()


@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_preflight_finds_an_unreadable_file_before_compute(tmp_path, monkeypatch, policy):
    import lnfree.training.run as tr

    texts = [t[:400] for t, _ in zip(corpus.iter_texts("train"), range(60))]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    bad = tmp_path / "b.jsonl"
    bad.write_bytes(b"{not json at all\n" * 50)  # a file the stream would reach only after all of a.jsonl
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"text": t[:1500]}) + "\n" for t in corpus.iter_texts("validation")))
    monkeypatch.setattr(tr, "load_model", lambda *a, **k: pytest.fail("the model's weights were loaded"))
    cfg = compose_train(tmp_path / "run", *TINY_RUN, "data=local_text", f"data.files=[{tmp_path}/a.jsonl,{bad}]",
                        f"data.val_files=[{val}]", "data.block_size=64", "data.val_blocks=4",
                        f"data.on_bad_row={policy}")
    if policy == "fail":
        with pytest.raises(DataError, match=rf"{bad}, row 0: line 1 is not JSON"):
            train(cfg)
    else:  # skip: named and recorded at the start, before the model exists
        with pytest.raises(pytest.fail.Exception):
            train(cfg)
    faults = [json.loads(line) for line in (tmp_path / "run" / "data_faults.jsonl").read_text().splitlines()]
    assert faults[0]["where"] == str(bad) and faults[0]["action"] == policy


# -- one bad row is one bad row ------------------------------------------------------------------------------------
def two_files(tmp_path, bad_row: bytes, at: int = 5):
    """a.jsonl and b.jsonl, ten rows each; row `at` of the second is `bad_row`."""
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"a{i}"}) + "\n" for i in range(10)))
    rows = [json.dumps({"text": f"b{i}"}).encode() + b"\n" for i in range(10)]
    rows[at] = bad_row
    (tmp_path / "b.jsonl").write_bytes(b"".join(rows))
    return lambda: open_stream("files", "train", files=[str(tmp_path / "?.jsonl")]), tmp_path / "b.jsonl"


EVERY_OTHER_ROW = [f"a{i}" for i in range(10)] + [f"b{i}" for i in range(10) if i != 5]


LATIN_1 = '{"text": "café"}\n'.encode("latin-1")


def test_skip_drops_the_undecodable_row_alone_and_names_its_row(tmp_path):
    """Latin-1 bytes at row 5 of the second file: the whole file used to be dropped, recorded as row 0."""
    parts, bad = two_files(tmp_path, LATIN_1)
    log = tmp_path / "faults.jsonl"
    assert list(iter_texts(parts(), "text", FaultLog("skip", str(log)))) == EVERY_OTHER_ROW
    faults = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(f["where"], f["row"], f["action"]) for f in faults] == [(str(bad), 5, "skip")]
    assert "line 6 is not UTF-8" in faults[0]["what"]


def test_fail_finds_the_undecodable_row_at_the_preflight_before_compute(tmp_path, monkeypatch):
    """It used to pass the pre-flight and stop the run at step 2, blaming row 0."""
    parts, bad = two_files(tmp_path, LATIN_1)
    _, val_file = local_files(tmp_path)
    weights_never_loaded(monkeypatch)
    with pytest.raises(DataError, match=rf"{re.escape(str(bad))}, row 5: line 6 is not UTF-8"):
        train(compose_train(tmp_path / "run", *TINY_RUN, "data=local_text", f"data.files=[{tmp_path}/?.jsonl]",
                            f"data.val_files=[{val_file}]", "data.block_size=64", "data.val_blocks=4"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_resume_skips_the_row_that_stopped_the_run_and_reads_every_other(tmp_path):
    """A row that is UTF-8 but not JSON passes the pre-flight; `fail` stops at it, naming it, and the resume
    (a new FaultLog on the same record) skips that row alone, never the rest of its file."""
    parts, bad = two_files(tmp_path, b'{"text": not json}\n')
    log = str(tmp_path / "faults.jsonl")
    preflight(parts(), "text", FaultLog("fail", log))
    with pytest.raises(DataError, match=rf"{re.escape(str(bad))}, row 5: line 6 is not JSON"):
        list(iter_texts(parts(), "text", FaultLog("fail", log)))
    assert list(iter_texts(parts(), "text", FaultLog("fail", log))) == EVERY_OTHER_ROW


class _FailsPartWay:
    """A part read by `datasets` (.parquet, .json, the hub) that breaks after its first rows."""

    def iter(self, batch_size):
        yield {"text": ["r0", "r1"]}
        raise ValueError("corrupt block")


@pytest.mark.parametrize("policy", ["skip", "fail"])
def test_a_file_unreadable_from_a_row_on_stops_the_run_under_either_policy(tmp_path, policy):
    """Skipping it would drop the rest of the file unseen; a resume stops there again. A .txt file is one row,
    so skipping an unreadable one drops that row alone."""
    log = str(tmp_path / "faults.jsonl")
    for _ in range(2):  # the run, then its resume
        with pytest.raises(DataError, match=r"x\.parquet, row 2: cannot be read from here on .*rest of the file"):
            list(iter_texts([("x.parquet", _FailsPartWay())], "text", FaultLog(policy, log)))
    assert len(open(log).readlines()) == 1  # recorded once
    assert list(iter_texts([("x.txt", _FailsPartWay())], "text", FaultLog("skip"))) == ["r0", "r1"]
