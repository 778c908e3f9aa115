"""hardware=cpu_ddp and hardware=cpu_fsdp: the multi-process paths (2 CPU processes, gloo) end to end, as
`python -m lnfree.train` runs them. FSDP is FSDP2 (Lightning's ModelParallelStrategy), the same code path as
hardware=gpu_fsdp."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY_RUN

# half the micro-batch per rank: the same tokens per optimizer step as the single-process TINY_RUN
PER_RANK = ["hardware.micro_batch_size=2"]


def run(out, hardware, *overrides):
    cmd = [sys.executable, "-m", "lnfree.train", *TINY_RUN, f"hardware={hardware}", *PER_RANK,
           f"hydra.run.dir={out}", f"paths.cache_dir={out}/cache", *overrides]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"})
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def ddp_full(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "full"
    return run(out, "cpu_ddp"), out


def check_full_and_resume(full, out, tmp_path, hardware):
    assert full["world_size"] == 2 and full["all_removed"] and set(full["exports"]) == {"hf", "folded"}
    # at every event step both ranks were checked to hold the same removed sites and sigmas
    assert full["rank_checks"] == len({e["applied_at"] for e in full["events"]}) >= 4
    assert full["tokens_seen"] == full["steps"] * full["tokens_per_step"]
    # interrupted at step 12 (its periodic checkpoint) and resumed on 2 processes: ends where the full run ends
    resumed = run(tmp_path / "resumed", hardware, f"ckpt_path={out / 'checkpoints' / 'step000012.ckpt'}")
    assert [(e["site"], e["applied_at"]) for e in resumed["events"]] == \
        [(e["site"], e["applied_at"]) for e in full["events"]]
    assert resumed["sigmas"] == pytest.approx(full["sigmas"], rel=1e-6)
    assert resumed["val_ce"] == pytest.approx(full["val_ce"], abs=1e-5)


@pytest.mark.slow
def test_ddp_removes_every_site_at_the_same_steps_on_both_ranks_and_resumes_exactly(ddp_full, tmp_path):
    check_full_and_resume(*ddp_full, tmp_path, "cpu_ddp")


@pytest.mark.slow
def test_fsdp_sharded_run_removes_resumes_and_exports_what_data_parallel_does(ddp_full, tmp_path):
    """FSDP2 shards the blocks; with the same per-rank data its math is DDP's (the mean loss of the global batch,
    i.e. a single-process step on the same tokens), so its sigmas, CE and exports must match the DDP run."""
    from lnfree.io import load, logits

    out = tmp_path / "full"
    full = run(out, "cpu_fsdp")
    check_full_and_resume(full, out, tmp_path, "cpu_fsdp")
    ddp, ddp_out = ddp_full
    assert full["sigmas"] == pytest.approx(ddp["sigmas"], rel=1e-4)
    assert full["val_ce"] == pytest.approx(ddp["val_ce"], abs=1e-4)
    ids = torch.randint(0, 4096, (2, 32), generator=torch.Generator().manual_seed(0))
    for form in ("hf", "folded"):
        a, b = logits(load(str(out / "export" / form))[0], ids), logits(load(str(ddp_out / "export" / form))[0], ids)
        assert ((a - b).abs().max() / b.abs().max()).item() < 1e-3
