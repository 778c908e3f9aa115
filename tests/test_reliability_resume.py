"""Reliability, third round: a resume applies or refuses what changed since its checkpoint (config fields and data
files), one undecodable row is one bad row (named by its real file and row, skipped alone, never the rest of its
file), and a run refused because its directory is taken leaves that directory byte-identical. One test per case of
the review that found them; all offline, on the tiny configs."""

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT, TINY_RUN, compose_train, copy_run, digest, write_lock

import lnfree.training.train as tr
from lnfree.data import corpus
from lnfree.data.streams import DataError, FaultLog, iter_texts, open_stream, preflight
from lnfree.io import RUN_INFO, read_checkpoint
from lnfree.training.safety import ResumeError
from lnfree.training.train import train


def weights_never_loaded(monkeypatch):
    monkeypatch.setattr(tr, "load_model", lambda *a, **k: pytest.fail("the model's weights were loaded"))


# -- 1. a resume applies or refuses what changed ----------------------------------------------------------
@pytest.mark.parametrize("override", ["optim.lr=1e-3", "optim.min_lr=0.0", "seed=7", "data.shuffle_buffer=8",
                                      "schedule.aux_weight=0.5"])
def test_a_resume_that_changes_what_the_run_computes_is_refused_naming_the_field(tiny_run, tmp_path, monkeypatch,
                                                                                  override):
    """Editing optim.lr (or min_lr) and resuming used to exit 0, train on the checkpoint's learning rate and record
    the new one in summary.json: now refused before compute, with the field and both values, the dir untouched."""
    run = copy_run(tiny_run, tmp_path / "run")
    ckpt = run / "checkpoints" / "step000012.ckpt"
    field, value = override.split("=")
    saved = read_checkpoint(ckpt)[RUN_INFO]["config"]
    old = saved[field.split(".")[0]][field.split(".")[1]] if "." in field else saved[field]
    before = digest(run)
    weights_never_loaded(monkeypatch)
    with pytest.raises(ResumeError, match=re.escape(f"{field}: checkpoint {old!r} vs config {type(old)(value)!r}")):
        train(compose_train(run, *TINY_RUN, override, f"ckpt_path={ckpt}"))
    assert digest(run) == before


def test_a_resume_may_change_how_the_run_is_logged_and_kept(tiny_run):
    """Fields that change no result (logging, checkpoint cadence, names, where it writes) are not compared."""
    from lnfree.training.safety import config_changes

    _, run = tiny_run
    saved = read_checkpoint(run / "checkpoints" / "step000012.ckpt")[RUN_INFO]["config"]
    edited = json.loads(json.dumps(saved))
    edited["trainer"].update(log_every=1, ckpt_every=3, keep_checkpoints=2, progress_bar=True, val_every=6)
    edited["paths"]["output_dir"], edited["logger"]["kind"], edited["export"] = "/elsewhere", "none", False
    assert config_changes(saved, edited, step=12) == ([], {})
    edited["optim"]["lr"] = 1.0
    assert config_changes(saved, edited, step=12)[0] == [f"optim.lr: checkpoint {saved['optim']['lr']!r} vs config 1.0"]


def test_a_checkpoint_from_before_recorded_configs_resumes_with_a_warning(tiny_run, tmp_path, monkeypatch, capsys):
    """Checkpoints written before they held their config (a run in progress when this version came) still resume,
    compared on model shape, tokens per step and schedule, and the run says so."""
    import torch

    _, run = tiny_run
    ckpt = read_checkpoint(run / "checkpoints" / "step000012.ckpt")
    for key in ("config", "data_files", "resumes"):
        del ckpt[RUN_INFO][key]
    old = tmp_path / "old" / "checkpoints" / "step000012.ckpt"
    old.parent.mkdir(parents=True)
    torch.save(ckpt, old)
    weights_never_loaded(monkeypatch)
    with pytest.raises(pytest.fail.Exception, match="weights were loaded"):  # past every check
        train(compose_train(tmp_path / "old", *TINY_RUN, "optim.lr=1e-3", f"ckpt_path={old}"))
    assert "predates checkpoints that hold their run's config" in capsys.readouterr().err


@pytest.mark.slow
def test_more_steps_on_the_same_horizon_are_applied_and_recorded(tiny_run, tmp_path, monkeypatch):
    """trainer.max_steps is the one result field a resume applies: with the learning-rate horizon kept (the steps
    already run followed it), the run goes on to the new step count and records both values and the step."""
    run = copy_run(tiny_run, tmp_path / "run")
    ckpt = run / "checkpoints" / "step000012.ckpt"
    with monkeypatch.context() as m:
        weights_never_loaded(m)
        with pytest.raises(ResumeError, match=r"learning-rate horizon .*checkpoint 24 vs config 28.*decay_steps=24"):
            train(compose_train(run, *TINY_RUN, "trainer.max_steps=28", f"ckpt_path={ckpt}"))
    summary = train(compose_train(run, *TINY_RUN, "trainer.max_steps=28", "optim.decay_steps=24", f"ckpt_path={ckpt}",
                                  "trainer.ckpt_every=14"))  # (a field a resume may change: it changes no result)
    assert summary["steps"] == 28
    assert summary["resumes"] == [{"step": 12, "changed": {"optim.decay_steps": [None, 24],
                                                           "trainer.max_steps": [24, 28]}}]
    # and the checkpoints written after the resume carry it on
    assert read_checkpoint(run / "checkpoints" / "step000028.ckpt")[RUN_INFO]["resumes"] == summary["resumes"]


def local_files(tmp_path, n=40):
    texts = [t[:400] for t, _ in zip(corpus.iter_texts("train"), range(n))]
    train_file, val_file = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    val_file.write_text("".join(json.dumps({"text": t[:1500]}) + "\n" for t in corpus.iter_texts("validation")))
    return train_file, val_file


@pytest.mark.slow
def test_a_resume_on_changed_data_is_refused_unless_allowed_and_then_recorded(tmp_path):
    """A data file edited between a run and its resume (held-out documents could become training data) is refused,
    naming the file; resume_allow_data_change=true lets it through, and the run records it."""
    train_file, val_file = local_files(tmp_path)
    args = [*TINY_RUN, "schedule=none", "data=local_text", f"data.files=[{train_file}]", f"data.val_files=[{val_file}]",
            "data.block_size=64", "data.val_blocks=4", "trainer.max_steps=4", "trainer.ckpt_every=2",
            "trainer.val_every=2"]
    run = tmp_path / "run"
    train(compose_train(run, *args))
    starts = json.loads((run / "data_files.json").read_text())
    assert [s["step"] for s in starts] == [0] and set(starts[0]["files"]) == {str(train_file), str(val_file)}
    ckpt = run / "checkpoints" / "step000002.ckpt"
    with train_file.open("a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    before = digest(run)
    changed = rf"(?s){re.escape(str(train_file))} changed: sha256 .*resume_allow_data_change=true"
    with pytest.raises(ResumeError, match=changed):
        train(compose_train(run, *args, f"ckpt_path={ckpt}"))
    assert digest(run) == before
    summary = train(compose_train(run, *args, f"ckpt_path={ckpt}", "resume_allow_data_change=true"))
    assert summary["steps"] == 4 and summary["resumes"][-1]["step"] == 2
    assert summary["resumes"][-1]["changed"]["data files"][0].startswith(f"{train_file} changed")
    assert [s["step"] for s in json.loads((run / "data_files.json").read_text())] == [0, 2]


# -- 2. one bad row is one bad row --------------------------------------------------------------------------
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


# -- 4. a refused run leaves its directory byte-identical ----------------------------------------------------
def cli(run, *overrides):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    return subprocess.run([sys.executable, "-m", "lnfree.train", *TINY_RUN, f"hydra.run.dir={run}",
                           f"paths.cache_dir={run.parent}/cache", *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # a CLI process each (about 25 s on a busy 2-core machine)
@pytest.mark.parametrize("taken", ["live run", "finished run"])
def test_a_run_refused_because_its_dir_is_taken_leaves_it_byte_identical(tiny_run, tmp_path, taken):
    """Hydra used to write .hydra/config.yaml and overrides.yaml into the directory before the lock was taken,
    a live run's included."""
    run = tmp_path / "run"
    holder = subprocess.Popen(["sleep", "120"])
    try:
        if taken == "live run":
            write_lock(run, holder.pid)
        else:
            copy_run(tiny_run, run)
        (run / ".hydra").mkdir()
        for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
            (run / ".hydra" / name).write_text(f"the {taken}'s own {name}\n")
        before = digest(run)
        out = cli(run, "seed=5")
    finally:
        holder.kill()
        holder.wait()
    assert out.returncode == 2, out.stderr[-2000:]
    assert "RunDirError" in out.stderr and "Traceback" not in out.stderr
    assert digest(run) == before


def test_the_run_writes_hydras_record_once_it_holds_its_dir(tmp_path):
    """What Hydra no longer writes (hydra.output_subdir=null), the run writes: .hydra/ with the job's config, Hydra
    settings and overrides (what sweep tables and resumes read)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from lnfree.paths import CONF_DIR
    from lnfree.training.safety import write_hydra_files

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="train"):
        cfg = compose("train", overrides=["seed=3", "model=tiny"], return_hydra_config=True)
    assert cfg.hydra.output_subdir is None
    HydraConfig.instance().set_config(cfg)
    try:
        task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        write_hydra_files(tmp_path, task)
    finally:
        HydraConfig.instance().cfg = None
    assert [str(o) for o in OmegaConf.load(tmp_path / ".hydra" / "overrides.yaml")] == ["seed=3", "model=tiny"]
    assert OmegaConf.load(tmp_path / ".hydra" / "config.yaml").seed == 3
    assert "hydra" in OmegaConf.load(tmp_path / ".hydra" / "hydra.yaml")
