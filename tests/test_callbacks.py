"""The removal callback and the throughput meter (lnfree/training/callbacks.py) in one process: statistics
committed once per optimizer step under gradient accumulation, events firing at their step and never twice,
calibration before training, and what each event logs. The multi-rank paths are in test_distributed.py."""

from types import SimpleNamespace

import pytest
import torch
from conftest import ids, stock_and_removable

from lnfree.norm import ORDINARY, NormSite
from lnfree.schedule import build_events
from lnfree.training.callbacks import LNRemovalCallback, event_site


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


def test_events_fire_at_their_step_and_never_twice():
    _, model = stock_and_removable()
    model.calibrate(ids(4, 32))
    events = build_events({"pre_mlp": {"start": 2, "gap": 1}, "attn_qk": {"gap": 1}, "attn_v": {"gap": 1}}, 2)
    cb = LNRemovalCallback(events, momentum=0.9)
    trainer = SimpleNamespace(global_step=0, loggers=[])
    module = SimpleNamespace(model=model)
    for step in range(0, 10):
        trainer.global_step = step
        new = cb.apply_due(trainer, module)
        assert [r["site"] for r in new] == [event_site(model, e)[0] for e in events if e.step == step]
    assert [r["kind"] for r in cb.applied[:2]] == ["ln2", "ln2"]  # GPT-2's own names, as its summaries had them
    assert len(cb.applied) == len(events) == 7 and not model.real_sites()


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
    events = build_events({"pre_mlp": {"start": 0, "gap": 0}, "attn_qk": {"gap": 1}, "attn_v": {"gap": 1}}, 2)
    cb = LNRemovalCallback(events, momentum=0.9)
    cb.on_train_start(trainer, module)
    for name, site in model.sites().items():
        assert torch.equal(site.running.nan_to_num(-1), reference.sites()[name].running.nan_to_num(-1)), name
        assert torch.isfinite(site.running[ORDINARY])
    step0 = [event_site(model, e)[0] for e in events if e.step == 0]
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
    events = build_events({"pre_mlp": {"start": 0, "gap": 0}, "attn_qk": {"gap": 0}, "attn_v": {"gap": 0}, "final": {},
                           "bos": {"start": 2, "gap": 1}, "eot": {"start": 3, "gap": 1}}, 2)
    special = [e.name for e in events if e.kind in ("bos", "eot")]
    assert special and all(e.step >= 2 for e in events if e.kind in ("bos", "eot"))
    cb, module = LNRemovalCallback(events, momentum=0.9), SimpleNamespace(model=model)
    trainer = SimpleNamespace(global_step=0, loggers=[])
    for step in range(12):
        trainer.global_step = step
        new = cb.apply_due(trainer, module)
        assert [r["site"] for r in new] == [event_site(model, e)[0] for e in events if e.step == step]
    assert [r["site"] for r in cb.applied] == [event_site(model, e)[0] for e in events]  # each exactly once
    assert not any(s.special_active for s in model.sites().values())
    restored = LNRemovalCallback(events, momentum=0.9)  # a resume: the log comes back with the checkpoint
    restored.load_state_dict(cb.state_dict())
    assert restored.apply_due(trainer, module) == []


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
    cb = LNRemovalCallback([Event(2, "pre_mlp", 0), Event(2, "eot", 1), Event(3, "final", None)], momentum=0.9)
    assert cb.rank_checks == 0  # a new run has compared no ranks yet (the summary reports this count)
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
