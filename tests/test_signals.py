"""A run stopped by a signal (SIGTERM, what SLURM and most schedulers send; SIGINT, Ctrl-C) leaves its on-exception
checkpoint, prints the resume command, releases its run-dir lock and exits 143 or 130, never 0: also when the signal
comes before training starts, and as the `python -m lnfree.train` process a scheduler sees."""

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, TINY_RUN, compose_train

from lnfree.training.callbacks import LNRemovalCallback
from lnfree.training.run import train
from lnfree.training.run_dir import LOCK_FILE, RunInterrupted


def signal_at_step(monkeypatch, sig, step=12):
    original = LNRemovalCallback.on_train_batch_end

    def send(self, trainer, *args):
        original(self, trainer, *args)
        if trainer.global_step == step and not getattr(self, "_sent", False):
            self._sent = True
            if sig == signal.SIGINT:
                raise KeyboardInterrupt  # what Python makes of SIGINT
            os.kill(os.getpid(), sig)  # Lightning's handler notes it; the loop stops at the next check

    monkeypatch.setattr(LNRemovalCallback, "on_train_batch_end", send)


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_checkpoints_prints_the_resume_command_and_exits_non_zero(tmp_path, monkeypatch, capsys, sig, code):
    signal_at_step(monkeypatch, sig)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(RunInterrupted) as stopped:
            train(compose_train(tmp_path, *TINY_RUN))
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    assert stopped.value.code == code
    err = capsys.readouterr().err
    ckpt = tmp_path / "checkpoints" / "on_exception_step000012.ckpt"
    assert ckpt.exists() and f"ckpt_path={ckpt.resolve()}" in err and f"exit code {code}" in err
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / LOCK_FILE).exists()


def test_sigterm_before_training_starts_releases_the_lock_and_exits_143(tmp_path, monkeypatch):
    """Outside trainer.fit (here: while the data is read) no Lightning handler is installed: the run stops the same
    way instead of dying with its lock in place."""
    from lnfree.data.datamodule import TextDataModule

    def setup(self, stage=None):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the signal arrives before this ends
        pytest.fail("SIGTERM did not stop the run")

    monkeypatch.setattr(TextDataModule, "setup", setup)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RunInterrupted) as stopped:
        train(compose_train(tmp_path / "run", *TINY_RUN))
    assert stopped.value.code == 143 and not (tmp_path / "run" / LOCK_FILE).exists()
    assert signal.getsignal(signal.SIGTERM) is handler  # the caller's handler is back


@pytest.mark.slow
def test_sigterm_to_the_cli_exits_143(tmp_path):
    """What a scheduler sees: the process, sent SIGTERM mid-run, leaves its checkpoint and exits 143."""
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    args = [a for a in TINY_RUN if not a.startswith("trainer.max_steps")]
    proc = subprocess.Popen([sys.executable, "-m", "lnfree.train", *args, "trainer.max_steps=100000",
                             "trainer.ckpt_every=4", f"hydra.run.dir={run}", f"paths.cache_dir={tmp_path}/cache"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not (run / "checkpoints" / "step000004.ckpt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 143, out[-3000:]
    assert list((run / "checkpoints").glob("on_exception_step*.ckpt")) and "resume with" in out
    assert not (run / "summary.json").exists() and not (run / LOCK_FILE).exists()
