"""One run per directory: the run-dir lock (taken before the output-dir check, held for the run, released when it
ends, a stale one reported and never taken over), a directory taken by a live or finished run left byte-identical,
what a refusal suggests, leftovers of a killed run removed, Hydra's record written once the run holds its dir, and
an unwritable dir or a half-written summary named in one line."""

import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import ROOT, TINY_RUN, compose_train, copy_run, digest, write_lock

from lnfree.data.streams import DataError
from lnfree.records import RecordError
from lnfree.training import run_dir
from lnfree.training.run import train
from lnfree.training.run_dir import LOCK_FILE, RunDirError


# -- the lock ------------------------------------------------------------------------------------------------------
def test_a_second_run_on_a_locked_dir_is_refused_naming_the_holder(tmp_path):
    """Two runs started together: the first holds the lock on a still-empty dir (so both would pass the output-dir
    check); the second is refused with the holder named, and nothing of the first is touched."""
    holder = subprocess.Popen(["sleep", "60"])
    try:
        lock = write_lock(tmp_path / "run", holder.pid)
        before = lock.read_text()
        with pytest.raises(RunDirError, match=rf"in use by another run: pid {holder.pid} on host "
                                              rf"{socket.gethostname()}"):
            train(compose_train(tmp_path / "run", *TINY_RUN))
        assert lock.read_text() == before and sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_FILE]
    finally:
        holder.kill()
        holder.wait()


def test_two_runs_in_one_process_cannot_share_a_dir(tmp_path):
    lock = run_dir.acquire_run_lock(tmp_path / "run")  # what the first run did
    try:
        with pytest.raises(RunDirError, match=f"pid {os.getpid()}"):
            train(compose_train(tmp_path / "run", *TINY_RUN))
        assert lock.exists()  # the refused run released nothing of the first one's
    finally:
        run_dir.release_run_locks()
    assert not lock.exists()


def test_a_stale_lock_is_reported_not_taken_over(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock = write_lock(tmp_path / "run", dead.pid)
    with pytest.raises(RunDirError, match=rf"stale lock: pid {dead.pid}.*no longer running.*rm {lock}"):
        train(compose_train(tmp_path / "run", *TINY_RUN))
    assert lock.exists()
    lock.unlink()  # what the message says to do


def test_the_lock_is_held_during_the_run_and_released_when_it_ends(tiny_run, tmp_path, monkeypatch):
    from lnfree.data.datamodule import TextDataModule

    held = []

    def setup(self, stage=None):  # the run reads its data: the lock must be there, naming this process
        held.append(json.loads((tmp_path / "run" / LOCK_FILE).read_text()))
        raise DataError("stopped here")

    monkeypatch.setattr(TextDataModule, "setup", setup)
    with pytest.raises(DataError, match="stopped here"):
        train(compose_train(tmp_path / "run", *TINY_RUN))
    assert held[0]["pid"] == os.getpid() and held[0]["host"] == socket.gethostname()
    assert not (tmp_path / "run" / LOCK_FILE).exists()  # released by the failed run
    lock = run_dir.acquire_run_lock(tmp_path / "new")
    assert lock.exists()
    run_dir.release_run_locks()
    assert not (tmp_path / "new").exists()  # a dir the lock made and nothing used is not left behind
    _, run = tiny_run
    assert not (run / LOCK_FILE).exists()  # and by a finished one


def test_only_the_first_process_of_a_distributed_run_takes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")  # a DDP rank re-running train() on the same dir
    assert run_dir.acquire_run_lock(tmp_path) is None and not (tmp_path / LOCK_FILE).exists()


# -- a dir that is taken -------------------------------------------------------------------------------------------
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
    from lnfree.training.run_dir import write_hydra_files

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


def test_a_dir_holding_a_run_suggests_only_what_works_there(tmp_path):
    from lnfree.training.run_dir import RunDirError, check_output_dir

    finished = tmp_path / "finished"
    (finished / "export").mkdir(parents=True)
    (finished / "summary.json").write_text("{}")
    with pytest.raises(RunDirError) as e:
        check_output_dir(finished, None, overwrite=False)
    assert "skip_if_done=true" in str(e.value) and "overwrite=true" in str(e.value)
    assert "ckpt_path" not in str(e.value)  # keep_at_end=none: no checkpoint to resume from
    killed = tmp_path / "killed"
    (killed / "checkpoints").mkdir(parents=True)
    (killed / "checkpoints" / "step000012.ckpt").write_bytes(b"")
    with pytest.raises(RunDirError, match=r"ckpt_path=.*step000012\.ckpt") as e:
        check_output_dir(killed, None, overwrite=False)
    assert "last.ckpt" not in str(e.value) and "skip_if_done" not in str(e.value)


def test_skip_if_done_on_a_half_written_summary_names_the_file(tiny_run, tmp_path):
    import shutil

    from lnfree.training.run import train

    _, run = tiny_run
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    (dst / "summary.json").write_text((run / "summary.json").read_text()[:500])
    with pytest.raises(RecordError, match=r"summary.json:\d+: not valid JSON"):
        train(compose_train(dst, *TINY_RUN, "skip_if_done=true"))


# -- leftovers and unwritable dirs ---------------------------------------------------------------------------------
def test_leftovers_of_a_killed_run_are_removed_at_the_next_start(tmp_path):
    run = tmp_path / "run"
    (run / ".export.tmp" / "hf").mkdir(parents=True)
    (run / ".export.tmp" / "hf" / "model.safetensors").write_bytes(b"half")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / ".step000012.ckpt.tmp-12345").write_bytes(b"half")
    with pytest.raises(DataError):  # the next start gets past the lock and the dir check, then fails on data
        train(compose_train(run, *TINY_RUN, "data=local_text", f"data.files=[{tmp_path}/none*.txt]"))
    assert not (run / ".export.tmp").exists() and not (run / "checkpoints").exists()


def test_an_unwritable_run_dir_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "a_file").write_text("x")
    run_dir = tmp_path / "a_file" / "run"
    out = subprocess.run([sys.executable, "-m", "lnfree.train", *TINY_RUN, f"hydra.run.dir={run_dir}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "cannot write the run dir" in out.stderr and "a_file is not a directory" in out.stderr
