"""hardware=cpu_ddp: the multi-process path (2 CPU processes, gloo) end to end, as `python -m lnfree.train` runs it."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, TINY_RUN

# half the micro-batch per rank: the same tokens per optimizer step as the single-process TINY_RUN
DDP_RUN = [*TINY_RUN, "hardware=cpu_ddp", "hardware.micro_batch_size=2"]


def run(out, *overrides):
    cmd = [sys.executable, "-m", "lnfree.train", *DDP_RUN, f"hydra.run.dir={out}", f"paths.cache_dir={out}/cache",
           *overrides]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"})
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_two_processes_remove_every_site_at_the_same_steps_and_resume_exactly(tmp_path):
    full = run(tmp_path / "full")
    assert full["world_size"] == 2 and full["all_removed"] and set(full["exports"]) == {"hf", "folded"}
    # at every event step both ranks were checked to hold the same removed sites and sigmas
    assert full["rank_checks"] == len({e["applied_at"] for e in full["events"]}) >= 4
    assert full["tokens_seen"] == full["steps"] * full["tokens_per_step"]
    # interrupted at step 12 (its periodic checkpoint) and resumed on 2 processes: ends where the full run ends
    resumed = run(tmp_path / "resumed", f"ckpt_path={tmp_path / 'full' / 'checkpoints' / 'step000012.ckpt'}")
    assert [(e["site"], e["applied_at"]) for e in resumed["events"]] == \
        [(e["site"], e["applied_at"]) for e in full["events"]]
    assert resumed["sigmas"] == pytest.approx(full["sigmas"], rel=1e-6)
    assert resumed["val_ce"] == pytest.approx(full["val_ce"], abs=1e-5)
