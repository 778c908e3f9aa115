"""hardware=cpu_ddp and hardware=cpu_fsdp: the multi-process paths (2 CPU processes, gloo) end to end, as
`python -m lnfree.train` runs them. FSDP is FSDP2 (Lightning's ModelParallelStrategy), the same code path as
hardware=gpu_fsdp. Below them, the callback's collectives (rank checks, summed statistics) in two gloo processes
and FSDP2 sharding in a one-process group."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, TINY_RUN, free_port, ids, stock_and_removable, two_ranks

from lnfree.norm import ORDINARY
from lnfree.schedule import Event
from lnfree.training.callbacks import LNRemovalCallback

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
    from lnfree.io import load
    from lnfree.model_record import logits

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


def test_rank_checks_happen_only_under_data_parallelism(tiny_run):
    from lnfree.training.callbacks import check_ranks_agree

    summary, _ = tiny_run
    assert summary["world_size"] == 1 and summary["rank_checks"] == 0  # one process: nothing to compare
    _, model = stock_and_removable()
    assert check_ranks_agree(model, 0) is False


def test_rank_check_gathers_on_the_model_device(monkeypatch):
    # NCCL gathers only CUDA tensors: the vector must be built where the model lives ("meta" stands in here)
    import lnfree.training.callbacks as cb_mod

    _, model = stock_and_removable()
    model.calibrate(ids(2, 16))
    model.remove("ln2", 0)
    meta_param = torch.nn.Parameter(torch.empty(1, device="meta"))
    monkeypatch.setattr(model, "parameters", lambda: iter([meta_param]))
    gathered = []

    def all_gather(out, t):
        gathered.append(t.device.type)
        raise StopIteration  # nothing to compare on meta

    monkeypatch.setattr(cb_mod, "is_distributed", lambda: True)
    monkeypatch.setattr(cb_mod.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(cb_mod.dist, "all_gather", all_gather)
    with pytest.raises(StopIteration):
        cb_mod.check_ranks_agree(model, 3)
    assert gathered == ["meta"]


def _two_rank_worker(rank, port, out_dir):
    """Rank `rank` of a two-process gloo group: the callback's collectives with different data on each rank."""
    import datetime
    import json

    import torch.distributed as dist

    from lnfree.training.callbacks import RankDisagreement, all_reduce_sum, check_ranks_agree

    # a short timeout (spawning rank 1 takes seconds): a failed rank must not leave the other waiting 30 min
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=90))
    try:
        torch.manual_seed(0)
        _, model = stock_and_removable()  # the same weights on both ranks
        out = {}
        t = torch.tensor([rank + 1.0, 10.0])
        all_reduce_sum(t)
        out["sum"] = t.tolist()
        # each rank calibrates on, then trains on, its own data: the callback keeps the estimates identical
        cb = LNRemovalCallback([], momentum=0.5)
        trainer = SimpleNamespace(global_step=0, world_size=2, datamodule=SimpleNamespace(
            calibration_batch=lambda: ids(2, 16, seed=10 + rank)), loggers=[])
        module = SimpleNamespace(model=model, device=torch.device("cpu"))
        cb.on_train_start(trainer, module)
        out["calibrated"] = float(model.site("ln2", 0).running[ORDINARY])
        model.train()
        model(ids(2 + rank, 16, seed=20 + rank))
        out["acc"] = model.site("ln2", 0).acc[:, ORDINARY].tolist()  # this rank's [sum of stds, count]
        trainer.global_step = 1
        cb.on_train_batch_end(trainer, module, None, None, 0)
        out["running"] = {n: s.running.tolist() for n, s in model.sites().items()}
        # step 5: both ranks remove ln2.0 (same running estimate) and check that they agree
        cb.events = [Event(5, "pre_mlp", 0), Event(7, "pre_mlp", 1)]
        trainer.global_step = 5
        cb.apply_due(trainer, module)
        out["rank_checks"] = cb.rank_checks
        out["agree"] = check_ranks_agree(model, 5)
        # step 7: rank 1 freezes ln2.1 one float32 step away from rank 0 (a small sigma, so that the difference,
        # 3.7e-9, is below any default tolerance): however small, a difference is a disagreement
        running = model.site("ln2", 1).running
        running[ORDINARY] = 0.05
        if rank == 1:
            running[ORDINARY] = torch.nextafter(running[ORDINARY], torch.tensor(1.0))
        trainer.global_step = 7
        try:
            cb.apply_due(trainer, module)
            out["disagree"] = None
        except RankDisagreement as e:
            out["disagree"] = str(e)
        # a rank whose ordinary sigma differs while its bos/eot sigmas (special_bos/eot) agree
        model.site("ln2", 1).sigma.fill_(0.05)  # ln2.1 made to agree again
        sigma = model.site("ln2", 0).sigma
        sigma[1:] = 0.5
        if rank == 1:
            sigma[ORDINARY] *= 1.5
        try:
            check_ranks_agree(model, 9)
            out["ordinary_differs"] = None
        except RankDisagreement as e:
            out["ordinary_differs"] = str(e)
        (out_dir / f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.mutation  # 13 s (a spawned rank), and the only test of the collectives with two real ranks
def test_two_ranks_with_different_data_keep_one_estimate_and_catch_a_sigma_disagreement(tmp_path):
    """Two real processes (gloo, CPU): calibration is averaged and per-step statistics are summed across ranks
    so that every rank holds the same running estimate, and check_ranks_agree raises when frozen sigmas differ."""
    r0, r1 = two_ranks(_two_rank_worker, tmp_path)
    assert r0["sum"] == r1["sum"] == [3.0, 20.0]
    assert r0["running"] == r1["running"]  # bit-identical on both ranks, although their data differ
    alone = []
    for rank in (0, 1):  # what each rank alone would have estimated from its calibration batch
        torch.manual_seed(0)
        _, m = stock_and_removable()
        m.calibrate(ids(2, 16, seed=10 + rank))
        alone.append(float(m.site("ln2", 0).running[ORDINARY]))
    assert alone[0] != pytest.approx(alone[1], rel=1e-4)
    assert r0["calibrated"] == r1["calibrated"] == pytest.approx((alone[0] + alone[1]) / 2, rel=1e-6)
    pooled = (r0["acc"][0] + r1["acc"][0]) / (r0["acc"][1] + r1["acc"][1])  # the step's mean over both ranks
    assert r0["running"]["ln2.0"][ORDINARY] == pytest.approx(0.5 * r0["calibrated"] + 0.5 * pooled, rel=1e-6)
    assert r0["agree"] is True and r1["agree"] is True
    assert r0["rank_checks"] == r1["rank_checks"] == 1  # the event step at which the ranks were compared
    for rank, r in enumerate((r0, r1)):
        assert r["disagree"] is not None, "a one-ulp sigma difference between ranks went unnoticed"
        assert r["disagree"].startswith(f"step 7: rank {1 - rank} has sigmas [")
        assert f"rank {rank} has " in r["disagree"] and "'ln2.1'" in r["disagree"]
        assert r["ordinary_differs"] is not None and r["ordinary_differs"].startswith("step 9: ")


def test_a_one_process_group_has_no_ranks_to_compare_or_sum(tmp_path):
    """torchrun with one process still initialises a process group: that is not data parallelism."""
    import torch.distributed as dist

    from lnfree.training.callbacks import all_reduce_sum, check_ranks_agree, is_distributed

    port = free_port()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        _, model = stock_and_removable()
        model.calibrate(ids(2, 16))
        model.remove("ln2", 0)
        assert is_distributed() is False
        assert check_ranks_agree(model, 3) is False  # nothing compared: no rank check counted
        t = torch.tensor([1.0, 2.0])
        all_reduce_sum(t)
        assert t.tolist() == [1.0, 2.0]
    finally:
        dist.destroy_process_group()


def _fsdp_worker(rank, port, out_dir):
    """A one-process gloo group: configure_model under Lightning's ModelParallelStrategy shards with FSDP2."""
    import json

    import torch.distributed as dist
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule

    from lnfree.training.module import LNFreeModule

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        out = {}
        mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("data_parallel",))
        for precision in ("bf16-mixed", "32-true"):
            torch.manual_seed(0)
            _, model = stock_and_removable()
            module = LNFreeModule(model, SimpleNamespace())
            module._device_mesh = mesh
            module.trainer = SimpleNamespace(strategy=ModelParallelStrategy(), precision=precision)
            module.configure_model()
            module.configure_model()  # Lightning may call it again: the model is sharded once
            blocks = list(model.transformer.h)
            with torch.no_grad():
                logits = model(ids(2, 8)).logits
            out[precision] = {
                "sharded": module._sharded,
                "fsdp": [isinstance(m, FSDPModule) for m in (*blocks, model)],
                "mesh": [list(m._get_fsdp_state()._fsdp_param_group.mesh_info.mesh.mesh_dim_names)
                         for m in blocks],
                "logits_dtype": str(logits.dtype),
            }
        (out_dir / "fsdp.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


def test_configure_model_shards_blocks_then_model_on_the_data_parallel_mesh(tmp_path):
    """FSDP2 (hardware=*_fsdp): every GPT2Block and then the whole model are sharded on the strategy's
    data-parallel mesh, with bf16 compute under bf16-mixed and fp32 otherwise, once however often it is called."""
    import json

    port = free_port()
    _fsdp_worker(0, port, tmp_path)  # a one-process group, torn down at the end
    out = json.loads((tmp_path / "fsdp.json").read_text())
    for precision, dtype in (("bf16-mixed", "torch.bfloat16"), ("32-true", "torch.float32")):
        r = out[precision]
        assert r["sharded"] is True and all(r["fsdp"]) and len(r["fsdp"]) == 3
        assert r["mesh"] == [["data_parallel"], ["data_parallel"]]
        assert r["logits_dtype"] == dtype
