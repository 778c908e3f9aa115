"""Runs that cannot silently go wrong (training/checkpoints.py, run_dir.py, resume.py, data faults): divergence
guard, checkpoint safety, output-dir policy, limits, bad data, and the resume command. All on the built-in
default, offline."""

import json
import signal

import pytest
import torch
from conftest import TINY_RUN, compose_train, copy_run, digest

from lnfree.data.streams import DataError, FaultLog, iter_texts, open_stream
from lnfree.io import read_checkpoint
from lnfree.training import checkpoints, resume
from lnfree.training.callbacks import LNRemovalCallback
from lnfree.training.checkpoints import DivergenceError, non_finite_entries
from lnfree.training.config import LimitError
from lnfree.training.resume import ResumeError
from lnfree.training.run import train
from lnfree.training.run_dir import RunDirError


@pytest.mark.slow
def test_divergence_stops_within_a_few_steps_and_leaves_only_finite_checkpoints(tmp_path, capsys):
    with pytest.raises(FloatingPointError, match=r"step \d+") as err:
        train(compose_train(tmp_path, *TINY_RUN, "optim.lr=1e30", "optim.warmup_steps=1", "trainer.ckpt_every=1"))
    step = int(str(err.value).split("step ")[1].split(":")[0].split(" ")[0])
    assert step <= 5, str(err.value)
    ckpts = list((tmp_path / "checkpoints").glob("*.ckpt")) if (tmp_path / "checkpoints").exists() else []
    assert not any("on_exception" in p.name for p in ckpts)
    for p in ckpts:
        assert not non_finite_entries(read_checkpoint(p)["state_dict"]), p
    assert not list(tmp_path.rglob("*.tmp-*"))  # no half-written checkpoint left behind


def test_removal_event_refuses_a_non_finite_estimate():
    from conftest import stock_and_removable

    _, model = stock_and_removable()
    model.calibrate(torch.randint(0, 97, (2, 16)))
    model.site("ln2", 0).running.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="ln2.0.*non-finite"):
        model.remove("ln2", 0)
    assert "ln2.0" in model.real_sites()
    model.site("ln2", 1).running.fill_(0.0)
    with pytest.raises(FloatingPointError, match="ln2.1"):
        model.remove("ln2", 1)


@pytest.mark.slow
def test_max_loss_ceiling_stops_the_run(tmp_path):
    with pytest.raises(DivergenceError, match=r"diverged at step 1: .*trainer.max_loss=1.0"):
        train(compose_train(tmp_path, *TINY_RUN, "trainer.max_loss=1.0"))


@pytest.mark.parametrize("bad", [["optim.lr=-1"], ["data.block_size=32"], ["schedule.pre_mlp.start=2"],
                                 ["model.shape.n_embd=32"], ["crash_at_start"]])
@pytest.mark.slow
def test_failed_resume_leaves_the_checkpoint_byte_identical(tiny_run, tmp_path, monkeypatch, bad):
    run = copy_run(tiny_run, tmp_path / "run")
    ckpt = run / "checkpoints" / "step000012.ckpt"
    before = digest(run)
    log_before = (run / "train.log").read_text()
    error = (LimitError, ResumeError, RuntimeError)
    if bad == ["crash_at_start"]:
        def crash(self, trainer, pl_module):
            raise RuntimeError("simulated crash right after the restore")
        monkeypatch.setattr(LNRemovalCallback, "on_train_start", crash)
        bad = []
    with pytest.raises(error):
        train(compose_train(run, *TINY_RUN, *bad, f"ckpt_path={ckpt}"))
    after = digest(run)
    assert after == before or set(after) - set(before) <= {p for p in after if p.startswith(("csv/", ".hydra"))}
    assert (run / "train.log").read_text().startswith(log_before)  # the log only grows: the attempt is in it
    before.pop("train.log"), after.pop("train.log")
    assert {k: after[k] for k in before} == before  # nothing else that was there changed


@pytest.mark.slow
def test_second_run_into_a_used_dir_is_refused_and_leaves_it_intact(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    before = digest(run)
    with pytest.raises(RunDirError, match="already holds a run"):
        train(compose_train(run, *TINY_RUN))
    assert digest(run) == before


@pytest.mark.slow
def test_overwrite_replaces_the_old_run_entirely(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    summary = train(compose_train(run, *TINY_RUN, "schedule=none", "overwrite=true", "trainer.max_steps=4",
                                  "trainer.val_every=2", "trainer.ckpt_every=2"))
    assert summary["steps"] == 4 and not summary["all_removed"]
    assert not (run / "export" / "folded").exists()  # the old LN-free run's folded export went with it
    assert sorted(p.name for p in (run / "checkpoints").glob("step*.ckpt")) == ["step000002.ckpt", "step000004.ckpt"]


@pytest.mark.parametrize("override", ["optim.lr=-1", "schedule.momentum=1.5", "trainer.max_steps=-1",
                                      "trainer.val_every=0", "+schedule.pre_mlp.strat=3", "optim.betas=[0.9,1.5]",
                                      "data.block_size=1", "trainer.max_loss=0", "optim.min_lr=1",
                                      "schedule.attn_qk.gap=-2", "hardware.micro_batch_size=0"])
def test_impossible_numbers_refused_before_any_data_or_weights(tmp_path, monkeypatch, override):
    import lnfree.training.run as tr

    monkeypatch.setattr(tr, "open_source", lambda *a, **k: pytest.fail("the model or its tokenizer was looked up"))
    key = override.lstrip("+").split("=")[0]
    with pytest.raises(LimitError, match=key.split(".")[-1]):
        train(compose_train(tmp_path, *TINY_RUN, override))


def docs_with_null(tmp_path, n=60, bad_row=25):
    from lnfree.data import corpus

    texts = [t[:400] for t, _ in zip(corpus.iter_texts("train"), range(n))]
    rows = [{"text": None if i == bad_row else t} for i, t in enumerate(texts)]
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    val_file = tmp_path / "val.jsonl"
    val_file.write_text("".join(json.dumps({"text": t[:1500]}) + "\n" for t in corpus.iter_texts("validation")))
    return train_file, val_file


def local_data(train_file, val_file):
    return ["data=local_text", f"data.files=[{train_file}]", f"data.val_files=[{val_file}]", "data.block_size=64",
            "data.val_blocks=4"]


@pytest.mark.slow
def test_null_row_is_skipped_with_file_and_row_named(tmp_path, capsys):
    train_file, val_file = docs_with_null(tmp_path)
    summary = train(compose_train(tmp_path / "run", *TINY_RUN, *local_data(train_file, val_file),
                                  "data.on_bad_row=skip"))
    assert summary["steps"] == 24 and summary["data_faults"]["skipped"] == 1
    fault = summary["data_faults"]["first"][0]
    assert fault["where"] == str(train_file) and fault["row"] == 25 and "None" in fault["what"]
    assert f"skipping {train_file}, row 25" in capsys.readouterr().err


@pytest.mark.slow
def test_null_row_fails_with_file_and_row_then_the_resume_completes(tmp_path, capsys):
    train_file, val_file = docs_with_null(tmp_path)
    run = tmp_path / "run"
    with pytest.raises(DataError, match=rf"{train_file}, row 25: field 'text' is None"):
        train(compose_train(run, *TINY_RUN, *local_data(train_file, val_file)))
    ckpt = next((run / "checkpoints").glob("on_exception_step*.ckpt"))
    assert f"ckpt_path={ckpt}" in capsys.readouterr().err  # the exact resume command was printed
    summary = train(compose_train(run, *TINY_RUN, *local_data(train_file, val_file), f"ckpt_path={ckpt}"))
    assert summary["steps"] == 24 and summary["data_faults"]["failed"] == 1  # reported once, not re-hit


def test_undecodable_file_is_named(tmp_path):
    good = tmp_path / "a.txt"
    good.write_text("to be or not to be " * 20)
    bad = tmp_path / "b.txt"
    bad.write_bytes(b"fine start \xff\xfe\xfa invalid utf-8 " * 20)
    parts = open_stream("files", "train", files=[str(tmp_path / "*.txt")])
    with pytest.raises(DataError, match=rf"{bad}.*cannot be read"):
        list(iter_texts(parts, "text"))
    log = tmp_path / "faults.jsonl"
    texts = list(iter_texts(open_stream("files", "train", files=[str(tmp_path / "*.txt")]), "text",
                            FaultLog("skip", str(log))))
    assert texts == [good.read_text()]
    assert json.loads(log.read_text())["where"] == str(bad)


@pytest.mark.slow
def test_failed_checkpoint_save_keeps_previous_checkpoints_and_reports_the_original_error(tmp_path, monkeypatch):
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        if "step000012" in str(f.name) or "on_exception" in str(f.name):
            f.write(b"partial")  # the write starts, then the disk is full
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(checkpoints.torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        train(compose_train(tmp_path, *TINY_RUN, "trainer.ckpt_every=6"))
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert "step000006.ckpt" in ckpts and "step000012.ckpt" not in ckpts
    assert not [c for c in ckpts if ".tmp-" in c]  # no truncated file left
    assert read_checkpoint(tmp_path / "checkpoints" / "step000006.ckpt")["global_step"] == 6  # intact


@pytest.mark.slow
def test_ctrl_c_prints_the_exact_resume_command(tmp_path, monkeypatch, capsys):
    original = LNRemovalCallback.on_train_batch_end

    def interrupt_at_12(self, trainer, *args):
        original(self, trainer, *args)
        if trainer.global_step == 12:
            raise KeyboardInterrupt

    monkeypatch.setattr(LNRemovalCallback, "on_train_batch_end", interrupt_at_12)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises((SystemExit, KeyboardInterrupt)):
            train(compose_train(tmp_path, *TINY_RUN))
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores further Ctrl-C while shutting down
    err = capsys.readouterr().err
    ckpt = tmp_path / "checkpoints" / "on_exception_step000012.ckpt"
    assert ckpt.exists() and f"hydra.run.dir={tmp_path.resolve()}" in err and f"ckpt_path={ckpt.resolve()}" in err


def test_skip_if_done_returns_a_finished_run_and_refuses_a_different_one(tiny_run, tmp_path):
    summary, _ = tiny_run
    run = copy_run(tiny_run, tmp_path / "run")
    before = digest(run)
    again = train(compose_train(run, *TINY_RUN, "skip_if_done=true"))
    assert again["val_ce"] == summary["val_ce"] and digest(run) == before  # nothing was rerun or written
    with pytest.raises(RunDirError, match="different config"):
        train(compose_train(run, *TINY_RUN, "skip_if_done=true", "seed=5"))


def test_checkpoints_carry_the_run_info_that_the_resume_check_compares(tiny_run):
    from lnfree.io import RUN_INFO, read_checkpoint

    summary, run = tiny_run
    info = read_checkpoint(run / "checkpoints" / "last.ckpt")[RUN_INFO]
    assert info["tokens_per_step"] == summary["tokens_per_step"] == 4 * 64
    assert [tuple(e) for e in info["events"]] == [(e["site"], e["step"]) for e in summary["events"]]


@pytest.mark.parametrize("job, config, expected", [
    ("train", "train", "-m lnfree.train seed=3 "),
    ("pretrain", "pretrain_depth", "-m lnfree.pretrain --config-name pretrain_depth seed=3 "),
])
def test_the_resume_command_names_the_command_that_ran(tmp_path, job, config, expected):
    """An interrupted pretraining is resumed by lnfree.pretrain with its own config, not by lnfree.train."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from lnfree.paths import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name=job):
        cfg = compose(config, overrides=["seed=3", "overwrite=true"], return_hydra_config=True)
    cfg.hydra.job.config_name = config  # what @hydra.main sets from --config-name
    HydraConfig.instance().set_config(cfg)
    try:
        cmd = resume.resume_command(tmp_path, tmp_path / "last.ckpt")
    finally:
        HydraConfig.instance().cfg = None
    assert expected in cmd and "overwrite" not in cmd
    assert cmd.endswith(f"hydra.run.dir={tmp_path.resolve()} ckpt_path={(tmp_path / 'last.ckpt').resolve()}")
