"""Resuming a run (`ckpt_path=`): a resume applies or refuses what changed since its checkpoint (config fields, more
steps on the same learning-rate horizon, data files), a checkpoint from before checkpoints held their config resumes
with a warning, and the printed resume command runs as printed whatever its path holds. The data stream's exact
resume: tests/test_data.py; bit-identical resumed training: tests/test_train.py."""

import json
import re
import shlex

import pytest
from conftest import TINY_RUN, compose_train, copy_run, digest, local_files, weights_never_loaded

from lnfree.io import RUN_INFO, read_checkpoint
from lnfree.training.resume import ResumeError
from lnfree.training.run import train


# -- what changed since the checkpoint -----------------------------------------------------------------------------
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
    from lnfree.training.resume import config_changes

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


# -- the resume command --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["a,b", "runs/ünïcode", "it's here", "sp ace=x"])
def test_the_resume_command_runs_as_printed_for_any_path(tmp_path, name):
    """Split as the shell does, each override parses in Hydra to exactly the path (a comma would make a sweep,
    a non-ASCII letter or a quote would not parse)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from lnfree.training.resume import resume_command

    out = tmp_path / name
    cmd = resume_command(out, out / "checkpoints" / "last.ckpt")
    parser = OverridesParser.create()
    parsed = {o.key_or_group: o for o in parser.parse_overrides(shlex.split(cmd)[3:])}
    assert parsed["hydra.run.dir"].value() == str(out.resolve())
    assert parsed["ckpt_path"].value() == str((out / "checkpoints" / "last.ckpt").resolve())
    assert not parsed["hydra.run.dir"].is_sweep_override()
