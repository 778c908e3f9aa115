"""Details of the core that a small bug could change without any other test noticing, each pinned against a
hand computation: the running std estimate (EMA over several steps, per token category, padding ignored),
statistics committed once per optimizer step under gradient accumulation, the auxiliary loss's target, the
LR schedule's first warm-up steps and its cosine, and the next-token CE's shift. (Written against survivors
of mutation testing, `make mutation`; report in experiments/quality/.)"""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import ids, stock_and_removable

from lnfree.model import next_token_ce
from lnfree.norm import BOS, EOT, IGNORED, ORDINARY, NormSite
from lnfree.schedule import Event, build_events
from lnfree.training.callbacks import LNRemovalCallback
from lnfree.training.module import lr_lambda, residual_std_aux


def _commit(site, momentum):
    site.commit(site.acc.clone(), momentum)


def test_running_estimate_is_the_ema_of_per_step_means_by_hand():
    site, m = NormSite(), 0.75
    steps = [torch.tensor([[1.0, 3.0]]), torch.tensor([[2.0, 2.0, 8.0]]), torch.tensor([[10.0]])]
    expected = None
    for stds in steps:
        site.record(stds, None)
        mean = float(stds.mean())
        expected = mean if expected is None else m * expected + (1 - m) * mean  # first step: the mean itself
        _commit(site, m)
        assert float(site.running[ORDINARY]) == pytest.approx(expected, rel=1e-6)
        assert torch.count_nonzero(site.acc) == 0  # the step's accumulators are emptied
    assert site.running[1:].isnan().all()  # no bos / eot token was seen


def test_categories_have_their_own_estimates_and_padding_never_counts():
    site = NormSite()
    stds = torch.tensor([[4.0, 1.0, 2.0, 100.0], [6.0, 3.0, 5.0, 7.0]])
    cat = torch.tensor([[BOS, ORDINARY, EOT, IGNORED], [BOS, ORDINARY, ORDINARY, EOT]])
    site.record(stds, cat)
    _commit(site, 0.5)
    assert site.running.tolist() == pytest.approx([(1 + 3 + 5) / 3, (4 + 6) / 2, (2 + 7) / 2])
    site.record(torch.tensor([[2.0, 9.0]]), torch.tensor([[ORDINARY, IGNORED]]))
    _commit(site, 0.5)  # a category absent from a step keeps its estimate
    assert site.running.tolist() == pytest.approx([0.5 * 3 + 0.5 * 2, 5.0, 4.5])


def test_freeze_takes_the_running_estimate_and_special_sigmas_fall_back_when_unseen():
    site = NormSite()
    site.record(torch.tensor([[4.0, 2.0]]), torch.tensor([[BOS, ORDINARY]]))
    _commit(site, 0.9)
    assert site.freeze(special_bos=True, special_eot=True) == pytest.approx(2.0)
    assert site.sigma.tolist() == pytest.approx([2.0, 4.0, 2.0])  # eot never seen: the ordinary sigma
    assert site.special.tolist() == [True, False]
    cat = torch.tensor([[BOS, ORDINARY, EOT, IGNORED]])
    assert site.divisor(cat).flatten().tolist() == pytest.approx([4.0, 2.0, 2.0, 2.0])
    assert float(site.divisor(None)) == pytest.approx(2.0)
    site.end_special(BOS)
    assert not site.special_active and float(site.divisor(cat)) == pytest.approx(2.0)  # one scalar again
    with pytest.raises(RuntimeError, match="already removed"):
        site.freeze()


def test_statistics_are_committed_once_per_optimizer_step_under_accumulation():
    """Two micro-batches in one optimizer step: the estimate moves once, to the EMA of their pooled mean."""
    _, model = stock_and_removable()
    model.calibrate(ids(4, 32, seed=3))
    site = model.site("ln2", 0)
    r0 = float(site.running[ORDINARY])
    stds = []
    hook = model.transformer.h[0].ln_2.register_forward_pre_hook(
        lambda mod, args: stds.append(torch.sqrt(args[0].var(-1, unbiased=False) + mod.eps).flatten()))
    cb = LNRemovalCallback([], momentum=0.8)
    trainer = SimpleNamespace(global_step=0, world_size=1, datamodule=None, loggers=[])
    module = SimpleNamespace(model=model, device=torch.device("cpu"))
    cb.on_train_start(trainer, module)
    model.train()
    for micro, x in enumerate((ids(2, 16, seed=1), ids(3, 16, seed=2))):
        model(x)  # a training forward (grad enabled) records; no backward needed here
        if micro == 1:
            trainer.global_step = 1  # the optimizer steps after the second micro-batch
        cb.on_train_batch_end(trainer, module, None, x, micro)
        if micro == 0:  # inside the accumulation window: nothing committed yet
            assert float(site.running[ORDINARY]) == r0 and float(site.acc[1, ORDINARY]) == 2 * 16
    hook.remove()
    pooled = float(torch.cat(stds).mean())
    assert float(site.running[ORDINARY]) == pytest.approx(0.8 * r0 + 0.2 * pooled, rel=1e-5)
    cb.on_train_batch_end(trainer, module, None, None, 2)  # the same step again: no second commit
    r1 = float(site.running[ORDINARY])
    assert r1 == pytest.approx(0.8 * r0 + 0.2 * pooled, rel=1e-5)
    model(ids(2, 16, seed=4))  # the first micro-batch of the next accumulation window (step 1 -> 2)
    cb.on_train_batch_end(trainer, module, None, None, 3)
    assert float(site.running[ORDINARY]) == r1 and float(site.acc[1, ORDINARY]) == 2 * 16  # held for the step


def test_rank_checks_happen_only_under_data_parallelism(tiny_run):
    from lnfree.training.callbacks import check_ranks_agree

    summary, _ = tiny_run
    assert summary["world_size"] == 1 and summary["rank_checks"] == 0  # one process: nothing to compare
    _, model = stock_and_removable()
    assert check_ranks_agree(model, 0) is False


def test_events_fire_at_their_step_and_never_twice():
    _, model = stock_and_removable()
    model.calibrate(ids(4, 32))
    events = build_events({"ln2": {"start": 2, "gap": 1}, "ln1qk": {"gap": 1}, "ln1v": {"gap": 1}, "lnf": {}}, 2)
    cb = LNRemovalCallback(events, momentum=0.9)
    trainer = SimpleNamespace(global_step=0, loggers=[])
    module = SimpleNamespace(model=model)
    for step in range(0, 10):
        trainer.global_step = step
        new = cb.apply_due(trainer, module)
        assert [r["site"] for r in new] == [e.name for e in events if e.step == step]
    assert len(cb.applied) == len(events) == 7 and not model.real_sites()


def test_aux_loss_target_is_the_mean_std_of_ordinary_tokens_by_hand():
    torch.manual_seed(0)
    h = torch.randn(2, 5, 8) * torch.tensor([3.0, 1, 1, 1, 1]).view(1, 5, 1)  # position 0 is an outlier
    x = torch.tensor([[7, 1, 2, 9, 3], [7, 9, 4, 5, 6]])  # 9 = end-of-text
    h.requires_grad_(True)
    loss = residual_std_aux(h, x, eot_id=9)
    s = torch.sqrt(h.detach().var(-1, unbiased=False) + 1e-5)
    ordinary = torch.tensor([[0, 1, 1, 0, 1], [0, 0, 1, 1, 1]], dtype=torch.bool)  # not pos 0, not eot
    tau = s[ordinary].mean()
    assert float(loss) == pytest.approx(float(((s - tau) ** 2).mean()), rel=1e-5)
    # tau is a target, not a path for gradients: d loss / d s_t = 2 (s_t - tau) / N only
    loss.backward()
    hs = h.detach().clone().requires_grad_(True)
    s2 = torch.sqrt(hs.var(-1, unbiased=False) + 1e-5)
    ((s2 - tau) ** 2).mean().backward()
    assert torch.allclose(h.grad, hs.grad, atol=1e-6)
    no_eot = residual_std_aux(h.detach(), x, eot_id=None)  # without an eot id only position 0 is excluded
    tau_all = s[:, 1:].mean()
    assert float(no_eot) == pytest.approx(float(((s - tau_all) ** 2).mean()), rel=1e-5)
    one = residual_std_aux(h.detach()[:1, :2], x[:1, :2], eot_id=9)  # a single ordinary token: tau is its std
    assert float(one) == pytest.approx(float(((s[0, :2] - s[0, 1]) ** 2).mean()), rel=1e-5)


def test_lr_schedule_warm_up_steps_and_cosine_by_hand():
    lr, min_lr, warm, decay = 6e-4, 6e-5, 4, 20
    got = [lr * lr_lambda(s, warm, decay, lr, min_lr) for s in range(25)]
    assert got[:4] == pytest.approx([lr / 4, 2 * lr / 4, 3 * lr / 4, lr])  # never 0 at the first step
    for s in range(4, 20):
        p = (s - warm) / (decay - warm)
        assert got[s] == pytest.approx(min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * p)))
    assert got[12] == pytest.approx((lr + min_lr) / 2)  # halfway through the cosine
    assert got[20:] == pytest.approx([min_lr] * 5)  # flat at the floor after decay_steps
    assert lr_lambda(0, 0, 10, lr, min_lr) == pytest.approx(1.0)  # no warm-up
    assert lr_lambda(4, 4, 4, lr, min_lr) == pytest.approx(min_lr / lr)  # no cosine: the floor right after warm-up


def test_next_token_ce_predicts_the_following_token():
    torch.manual_seed(0)
    logits, x = torch.randn(2, 6, 11), torch.randint(0, 11, (2, 6))
    by_hand = -torch.stack([F.log_softmax(logits[b, t], -1)[x[b, t + 1]] for b in range(2) for t in range(5)])
    assert float(next_token_ce(logits, x)) == pytest.approx(float(by_hand.mean()), rel=1e-6)
    assert float(next_token_ce(logits, x, reduction="sum")) == pytest.approx(float(by_hand.sum()), rel=1e-6)


def test_checkpoints_carry_the_run_info_that_the_resume_check_compares(tiny_run):
    from lnfree.io import RUN_INFO, read_checkpoint

    summary, run = tiny_run
    info = read_checkpoint(run / "checkpoints" / "last.ckpt")[RUN_INFO]
    assert info["tokens_per_step"] == summary["tokens_per_step"] == 4 * 64
    assert [tuple(e) for e in info["events"]] == [(e["site"], e["step"]) for e in summary["events"]]


def test_token_counter_is_an_exact_integer_and_callback_state_round_trips():
    from types import SimpleNamespace as NS

    from lnfree.training.module import LNFreeModule

    _, model = stock_and_removable()
    module = LNFreeModule(model, NS())
    assert module.tokens_seen.dtype == torch.int64  # a float32 counter would stop counting exactly at 2^24 tokens
    assert module.run_info == {} and module.aux_weight == 0.0 and module.lr_scale == 1.0  # the documented defaults
    assert module.max_steps == 1 and module._use_compile is False and module._sharded is False
    cb = LNRemovalCallback([], momentum=0.9)
    cb.load_state_dict({})  # a checkpoint written before the log existed
    assert cb.applied == []
    cb.load_state_dict({"applied": [{"site": "ln2.0", "step": 4}]})
    assert cb.state_dict() == {"applied": [{"site": "ln2.0", "step": 4}]}


def test_final_residual_is_kept_only_for_a_training_step_with_the_aux_loss():
    from types import SimpleNamespace as NS

    from lnfree.training.module import LNFreeModule

    _, model = stock_and_removable()
    x = ids(2, 16)
    for aux, training, kept in ((0.1, True, True), (0.1, False, False), (0.0, True, False)):
        module = LNFreeModule(model, NS(), aux_weight=aux)
        module.train(training)
        module(x)
        assert (module._final_resid is not None) == kept, (aux, training)
        if kept:  # ln_f's input: [batch, pos, d]
            assert module._final_resid.shape == (2, 16, model.config.n_embd)


def test_throughput_counts_optimizer_steps_after_the_warm_up_and_excludes_validation(monkeypatch):
    from lnfree.training import callbacks
    from lnfree.training.callbacks import Throughput

    clock = [100.0]
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: clock[0])
    logged = {}
    module = SimpleNamespace(log=lambda k, v: logged.__setitem__(k, v))
    trainer = SimpleNamespace(global_step=0)
    cb = Throughput(tokens_per_step=1000, skip=2)

    def micro_batch(seconds, steps_after):
        cb.on_train_batch_start(trainer, module, None, 0)
        clock[0] += seconds
        trainer.global_step = steps_after
        cb.on_train_batch_end(trainer, module, None, None, 0)

    micro_batch(9.0, 1)   # step 1: warm-up, not counted
    micro_batch(9.0, 2)   # step 2: still warm-up (counted only after `skip` steps)
    assert cb.tokens_per_s is None and not logged
    micro_batch(1.0, 2)   # a micro-batch inside an accumulation window: no optimizer step yet
    micro_batch(1.0, 3)   # step 3 completes: 2 s for one step
    cb.on_validation_start(trainer, module)
    clock[0] += 50.0      # validation time is not training time
    micro_batch(2.0, 4)   # step 4: 2 s
    assert cb.steps == 2 and cb.seconds == pytest.approx(4.0)
    assert cb.tokens_per_s == pytest.approx(2 * 1000 / 4.0)
    assert logged == {"perf/tokens_per_s": pytest.approx(500.0)}
    assert Throughput(1000).skip == 3 and Throughput(1000).tokens_per_s is None  # the default warm-up


def test_calibration_batch_goes_to_the_module_device():
    class Model:  # records where the calibration batch was (a "meta" module on a machine without a GPU)
        def __init__(self):
            self._sites = {"ln2.0": NormSite()}
            self.seen = []

        def sites(self):
            return self._sites

        def calibrate(self, batch):
            self.seen.append(batch.device.type)

    model = Model()
    trainer = SimpleNamespace(global_step=0, world_size=1, loggers=[],
                              datamodule=SimpleNamespace(calibration_batch=lambda: ids(2, 8)))
    cb = LNRemovalCallback([], momentum=0.9)
    cb.on_train_start(trainer, SimpleNamespace(model=model, device=torch.device("meta")))
    assert model.seen == ["meta"]


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

    monkeypatch.setattr(cb_mod, "_distributed", lambda: True)
    monkeypatch.setattr(cb_mod.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(cb_mod.dist, "all_gather", all_gather)
    with pytest.raises(StopIteration):
        cb_mod.check_ranks_agree(model, 3)
    assert gathered == ["meta"]


def test_training_starts_from_calibrated_estimates_unless_restored():
    """A removal event at step 0 freezes the calibration estimate: on_train_start must have made it."""
    import copy

    _, model = stock_and_removable()
    batch = ids(4, 32, seed=5)
    reference = copy.deepcopy(model)
    reference.calibrate(batch)
    dm = SimpleNamespace(calibration_batch=lambda: batch)
    trainer = SimpleNamespace(global_step=0, world_size=1, datamodule=dm, loggers=[])
    module = SimpleNamespace(model=model, device=torch.device("cpu"))
    events = build_events({"ln2": {"start": 0, "gap": 0}, "ln1qk": {"gap": 1}, "ln1v": {"gap": 1}, "lnf": {}}, 2)
    cb = LNRemovalCallback(events, momentum=0.9)
    cb.on_train_start(trainer, module)
    for name, site in model.sites().items():
        assert torch.equal(site.running.nan_to_num(-1), reference.sites()[name].running.nan_to_num(-1)), name
        assert torch.isfinite(site.running[ORDINARY])
    step0 = [e.name for e in events if e.step == 0]
    assert "ln2.0" in step0 and [r["site"] for r in cb.applied] == step0  # step-0 events, at the calibrated sigma
    assert cb.applied[0]["sigma"] == pytest.approx(float(reference.site("ln2", 0).running[ORDINARY]))
    restored = {n: s.running.clone() for n, s in model.sites().items()}
    dm.calibration_batch = lambda: ids(4, 32, seed=6)  # a restored run keeps its estimates: no recalibration
    LNRemovalCallback(events, momentum=0.9).on_train_start(trainer, module)
    assert all(torch.equal(s.running.nan_to_num(-1), restored[n].nan_to_num(-1)) for n, s in model.sites().items())


def test_special_sigma_events_apply_once_and_survive_a_restore():
    _, model = stock_and_removable()
    model.config.lnfree_special_bos = model.config.lnfree_special_eot = True
    model.calibrate(ids(4, 32, seed=3))
    events = build_events({"ln2": {"start": 0, "gap": 0}, "ln1qk": {"gap": 0}, "ln1v": {"gap": 0}, "lnf": {},
                           "bos": {"start": 2, "gap": 1}, "eot": {"start": 3, "gap": 1}}, 2)
    special = [e.name for e in events if e.kind in ("bos", "eot")]
    assert special and all(e.step >= 2 for e in events if e.kind in ("bos", "eot"))
    cb, module = LNRemovalCallback(events, momentum=0.9), SimpleNamespace(model=model)
    trainer = SimpleNamespace(global_step=0, loggers=[])
    for step in range(12):
        trainer.global_step = step
        new = cb.apply_due(trainer, module)
        assert [r["site"] for r in new] == [e.name for e in events if e.step == step]
    assert [r["site"] for r in cb.applied] == [e.name for e in events]  # each exactly once
    assert not any(s.special_active for s in model.sites().values())
    restored = LNRemovalCallback(events, momentum=0.9)  # a resume: the log comes back with the checkpoint
    restored.load_state_dict(cb.state_dict())
    assert restored.apply_due(trainer, module) == []


def test_training_and_validation_steps_compute_and_log_what_the_dashboards_read():
    from lnfree.training.module import LNFreeModule

    class LogRecorder(LNFreeModule):
        """Records each self.log call (value and options) instead of handing it to a Trainer."""

        def log(self, name, value, **options):
            self.logged[name] = (value, options)

    _, model = stock_and_removable()
    x = ids(2, 16)
    x[0, 5] = x[1, 9] = model.config.eos_token_id  # end-of-text tokens are left out of the aux target
    groups = [{"lr": 3e-4}, {"lr": 1.0}]  # the first group's LR is the one logged
    for aux_weight in (0.0, 0.25):
        module = LogRecorder(model, SimpleNamespace(), aux_weight=aux_weight)
        module.logged = {}
        module.trainer = SimpleNamespace(world_size=3, optimizers=[SimpleNamespace(param_groups=groups)])
        module.train()
        logits = module(x)  # the same forward the step makes (no dropout): expected values by hand
        ce = next_token_ce(logits, x)
        aux = residual_std_aux(module._final_resid, x, model.config.eos_token_id) if aux_weight else None
        out = module.training_step(x, 0)
        module.training_step(x, 1)
        assert module._final_resid is None  # not kept past its step
        expected_loss = ce + aux_weight * aux if aux_weight else ce
        assert float(out["loss"]) == pytest.approx(float(expected_loss), rel=1e-6)
        assert float(out["ce"]) == pytest.approx(float(ce), rel=1e-6) and not out["ce"].requires_grad
        names = {"train/ce", "train/loss", "train/tokens_seen", "train/lr"} | ({"train/aux"} if aux_weight else set())
        assert set(module.logged) == names
        assert module.logged["train/ce"][1] == {"prog_bar": True}
        assert float(module.logged["train/loss"][0]) == pytest.approx(float(expected_loss), rel=1e-6)
        if aux_weight:
            assert float(module.logged["train/aux"][0]) == pytest.approx(float(aux), rel=1e-6)
        assert module.logged["train/tokens_seen"] == (pytest.approx(2 * (2 * 16 * 3)), {"reduce_fx": "max"})
        assert module.logged["train/lr"] == (3e-4, {})
    module.eval()
    module.validation_step(x, 0)
    value, options = module.logged["val/ce"]
    assert float(value) == pytest.approx(float(next_token_ce(module(x), x)), rel=1e-6)
    assert options == {"prog_bar": True, "sync_dist": True, "batch_size": 2}  # mean over ranks, weighted by batch


def _free_port() -> int:
    """A TCP port on localhost that nothing listens on, for a gloo process group's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_rank_worker(rank, port, out_dir):
    """Rank `rank` of a two-process gloo group: the callback's collectives with different data on each rank."""
    import datetime
    import json

    import torch.distributed as dist

    from lnfree.training.callbacks import RankDisagreement, _all_reduce_sum, check_ranks_agree

    # a short timeout (spawning rank 1 takes seconds): a failed rank must not leave the other waiting 30 min
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=90))
    try:
        torch.manual_seed(0)
        _, model = stock_and_removable()  # the same weights on both ranks
        out = {}
        t = torch.tensor([rank + 1.0, 10.0])
        _all_reduce_sum(t)
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
        cb.events = [Event(5, "ln2", 0), Event(7, "ln2", 1)]
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
def test_two_ranks_with_different_data_keep_one_estimate_and_catch_a_sigma_disagreement(tmp_path):
    """Two real processes (gloo, CPU): calibration is averaged and per-step statistics are summed across ranks
    so that every rank holds the same running estimate, and check_ranks_agree raises when frozen sigmas differ."""
    import json
    import multiprocessing

    port = _free_port()
    # rank 1 in a fresh (spawned: forking a process that has run other tests' threads can deadlock) process,
    # rank 0 here, so that the functions under test run in the test's own process
    other = multiprocessing.get_context("spawn").Process(target=_two_rank_worker, args=(1, port, tmp_path))
    other.start()
    _two_rank_worker(0, port, tmp_path)
    other.join(120)
    assert other.exitcode == 0
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
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

    from lnfree.training.callbacks import _all_reduce_sum, _distributed, check_ranks_agree

    port = _free_port()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        _, model = stock_and_removable()
        model.calibrate(ids(2, 16))
        model.remove("ln2", 0)
        assert _distributed() is False
        assert check_ranks_agree(model, 3) is False  # nothing compared: no rank check counted
        t = torch.tensor([1.0, 2.0])
        _all_reduce_sum(t)
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

    port = _free_port()
    _fsdp_worker(0, port, tmp_path)  # a one-process group, torn down at the end
    out = json.loads((tmp_path / "fsdp.json").read_text())
    for precision, dtype in (("bf16-mixed", "torch.bfloat16"), ("32-true", "torch.float32")):
        r = out[precision]
        assert r["sharded"] is True and all(r["fsdp"]) and len(r["fsdp"]) == 3
        assert r["mesh"] == [["data_parallel"], ["data_parallel"]]
        assert r["logits_dtype"] == dtype


def test_optimizer_groups_decay_only_matrices_and_scale_the_lr():
    from lnfree.training.module import LNFreeModule

    _, model = stock_and_removable()
    params = dict(model.named_parameters())
    matrices = {n for n, p in params.items() if p.ndim >= 2}
    embeddings = {n for n in params if n.endswith(("wte.weight", "wpe.weight"))}
    assert len(embeddings) == 2 and {n for n in params if "ln_" in n} <= set(params) - matrices
    for decay_embeddings in (False, True):
        optim = SimpleNamespace(weight_decay=0.1, decay_embeddings=decay_embeddings, lr=1e-3, min_lr=1e-4,
                                betas=[0.9, 0.95], eps=1e-6, warmup_steps=2, decay_steps=None)
        module = LNFreeModule(model, optim, max_steps=10, lr_scale=2.0)
        out = module.configure_optimizers()
        opt, sched = out["optimizer"], out["lr_scheduler"]["scheduler"]
        decay, no_decay = opt.param_groups
        names = {id(p): n for n, p in params.items()}
        expected = matrices if decay_embeddings else matrices - embeddings
        assert {names[id(p)] for p in decay["params"]} == expected
        assert {names[id(p)] for p in no_decay["params"]} == set(params) - expected  # biases, norm gains
        assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
        assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-6
        assert opt.defaults["fused"] is None  # on the CPU
        assert out["lr_scheduler"]["interval"] == "step"
        peak = 2e-3  # lr * lr_scale, and min_lr * lr_scale at the end of the cosine (decay_steps = max_steps)
        assert [g["initial_lr"] for g in opt.param_groups] == [peak, peak]
        for step in (0, 1, 5, 10, 12):
            assert sched.lr_lambdas[0](step) == lr_lambda(step, 2, 10, peak, 2e-4)
    module._device = SimpleNamespace(type="cuda", index=0)  # on CUDA: the fused AdamW (CPU params accept it)
    assert module.configure_optimizers()["optimizer"].defaults["fused"] is True
    frozen = LNFreeModule(model, optim)
    for p in model.transformer.wte.parameters():
        p.requires_grad_(False)
    opt = frozen.configure_optimizers()["optimizer"]
    assert all(p is not model.transformer.wte.weight for g in opt.param_groups for p in g["params"])


@pytest.mark.slow
def test_compile_wraps_the_model_once_and_raises_the_recompile_limit():
    """model.compile=true: one torch.compile wrapper, made at first use (compilation itself happens at its first
    call, which this test never makes), and a recompile limit of 4 x (sites + 2), never lowered."""
    import torch._dynamo

    from lnfree.training.module import LNFreeModule

    cfg = torch._dynamo.config
    names = [n for n in ("recompile_limit", "cache_size_limit") if hasattr(cfg, n)]
    assert names
    saved = {n: getattr(cfg, n) for n in names}  # restored by hand: pytest's monkeypatch would delete them
    try:
        for n in names:
            setattr(cfg, n, 2)
        _, model = stock_and_removable()
        assert LNFreeModule(model, SimpleNamespace())._runner() is model  # compile off: the model itself
        module = LNFreeModule(model, SimpleNamespace(), compile=True)
        runner = module._runner()
        assert runner is not model and runner._orig_mod is model and module._runner() is runner
        assert [getattr(cfg, n) for n in names] == [4 * (7 + 2)] * len(names)  # 7 sites in a 2-block model
        for n in names:
            setattr(cfg, n, 1000)
        LNFreeModule(model, SimpleNamespace(), compile=True)._runner()
        assert [getattr(cfg, n) for n in names] == [1000] * len(names)
        assert module.state_dict().keys() == LNFreeModule(model, SimpleNamespace()).state_dict().keys()  # no wrapper
    finally:
        for n, v in saved.items():
            setattr(cfg, n, v)


def test_apply_due_records_logs_and_announces_each_event(capsys):

    from lnfree.schedule import Event

    class Recorder:
        def __init__(self):
            self.calls = []

        def log_metrics(self, metrics, step):
            self.calls.append((metrics, step))

    _, model = stock_and_removable()
    model.calibrate(ids(4, 32))
    logger = Recorder()
    cb = LNRemovalCallback([Event(2, "ln2", 0), Event(2, "eot", 1), Event(3, "lnf", None)], momentum=0.9)
    cb.rank_checks = 5  # a count carried over from earlier event steps
    trainer = SimpleNamespace(global_step=2, loggers=[logger])
    new = cb.apply_due(trainer, SimpleNamespace(model=model))
    sigma = float(model.site("ln2", 0).sigma[0])
    assert new == cb.applied == [
        {"step": 2, "applied_at": 2, "site": "ln2.0", "kind": "ln2", "block": 0, "sigma": sigma},
        {"step": 2, "applied_at": 2, "site": "eot.1", "kind": "eot", "block": 1, "sigma": None}]
    assert logger.calls == [({"lnfree/sigma/ln2.0": sigma, "lnfree/n_removed": 1}, 2)]
    assert "[lnfree] step 2: removed ln2.0, eot.1 (1/7 sites removed)\n" in capsys.readouterr().out
    assert cb.rank_checks == 5  # one process: nothing to check
    assert cb.apply_due(trainer, SimpleNamespace(model=model)) == [] and len(logger.calls) == 1
