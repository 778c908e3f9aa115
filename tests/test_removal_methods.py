"""The removal methods that may need less data (docs/removal_methods.md): distillation from the original model,
soft removal (ramps), adaptive schedules and the compressed schedules. Each method's own semantics on small
objects; then, marked slow, runs that resume mid-ramp / mid-adaptive-wait bit-identically and runs of every
method on every family whose exports pass the export checks."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_RUN, compose_train, ids, needs, stock_and_removable, train_until_crash, two_ranks
from omegaconf import OmegaConf

from lnfree.io import read_checkpoint
from lnfree.norm import RemovableLayerNorm, SplitLayerNorm, TokenContext
from lnfree.schedule import Event, ScheduleError, build_events, event_groups, normal_form, ramp_alpha, validate
from lnfree.training.adaptive import AdaptiveTrigger
from lnfree.training.callbacks import LNRemovalCallback
from lnfree.training.config import LimitError, check_limits
from lnfree.training.module import distill_kl, frozen_teacher
from lnfree.training.run import ConfigError, check_config, train


# -- distillation ------------------------------------------------------------------------------------------
def test_distillation_loss_is_zero_when_the_student_is_the_teacher_and_positive_otherwise():
    _, model = stock_and_removable()
    teacher = frozen_teacher(model)
    x = ids(2, 16, seed=1)
    student_logits = model(input_ids=x).logits.detach()
    for t in (1.0, 2.0):
        assert float(distill_kl(student_logits, teacher(input_ids=x).logits, t)) == pytest.approx(0.0, abs=1e-6)
    model.calibrate(x)
    model.remove("ln2", 0)  # the student drifts from the teacher: a positive loss, with a gradient
    kl = distill_kl(model(input_ids=x).logits, teacher(input_ids=x).logits, 1.0)
    assert kl.requires_grad and float(kl.detach()) > 1e-6
    assert not teacher.removed_sites() and not any(p.requires_grad for p in teacher.parameters())


def test_distillation_loss_is_the_mean_kl_of_teacher_to_student_times_t_squared():
    s, t = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    p_t = torch.softmax(t / 2, -1)
    want = (p_t * (torch.log_softmax(t / 2, -1) - torch.log_softmax(s / 2, -1))).sum(-1).mean() * 4
    assert float(distill_kl(s, t, 2.0)) == pytest.approx(float(want), rel=1e-5)


def test_the_teacher_must_have_every_norm_real():
    _, model = stock_and_removable()
    model.calibrate(ids(2, 16))
    model.remove("ln2", 0)
    with pytest.raises(ValueError, match="every norm real"):
        frozen_teacher(model)


# -- soft removal ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("centre", [True, False])  # LayerNorm, RMSNorm
def test_ramp_divisor_is_std_then_halfway_then_sigma(centre):
    torch.manual_seed(0)
    ctx = TokenContext()
    ln = RemovableLayerNorm(16, 1e-5, ctx, centre)
    with torch.no_grad():
        ln.weight.normal_()
        if centre:
            ln.bias.normal_()
    x = torch.randn(2, 5, 16) * 3
    real = ln(x)
    ln.site.running.fill_(2.0)
    assert ln.site.start_ramp() == 2.0 and ln.site.is_ramping and not ln.site.is_removed
    std = torch.rand(2, 5, 1) + 0.5
    for alpha, want in ((0.0, std), (0.5, 0.5 * std + 1.0), (1.0, torch.full_like(std, 2.0))):
        ln.site.set_alpha(alpha)
        assert torch.allclose(ln.site.ramp_divisor(std, None), want)
    ln.site.set_alpha(0.0)
    assert torch.allclose(ln(x), real, atol=1e-6)  # alpha 0: the real norm
    ln.site.set_alpha(0.5)
    xc = x - x.mean(-1, keepdim=True) if centre else x
    half = xc / (0.5 * torch.sqrt(xc.pow(2).mean(-1, keepdim=True) + 1e-5) + 0.5 * 2.0) * ln.weight
    assert torch.allclose(ln(x), half + (ln.bias if centre else 0), atol=1e-5)
    ln.site.set_alpha(1.0)
    at_one = ln(x)
    ln.site.finish_ramp()
    assert ln.site.is_removed and not ln.site.is_ramping
    assert torch.allclose(ln(x), at_one, atol=1e-6)  # alpha 1: the removed site's output


@pytest.mark.parametrize("path", ["qk", "v"])
def test_a_ramping_attention_input_path_splits_and_leaves_the_other_path_real(path):
    torch.manual_seed(1)
    ln = SplitLayerNorm(16, 1e-5, TokenContext())
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x = torch.randn(2, 5, 16)
    real = ln(x)
    site = getattr(ln, path)
    site.running.fill_(1.5)
    site.start_ramp()
    site.set_alpha(0.0)
    for p in ln.paths(ln(x)):
        assert torch.allclose(p, real, atol=1e-5)
    site.set_alpha(1.0)
    x_qk, x_v = ln.paths(ln(x))
    frozen = (x - x.mean(-1, keepdim=True)) / 1.5 * ln.weight + ln.bias
    assert torch.allclose(x_qk if path == "qk" else x_v, frozen, atol=1e-5)
    assert torch.allclose(x_v if path == "qk" else x_qk, real, atol=1e-5)


def test_ramp_alpha_shapes():
    assert [ramp_alpha("linear", i, 4) for i in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert ramp_alpha("cosine", 2, 4) == pytest.approx(0.5)
    assert ramp_alpha("cosine", 1, 4) == pytest.approx((1 - math.cos(math.pi / 4)) / 2)
    with pytest.raises(ScheduleError, match="ramp.shape"):
        ramp_alpha("step", 1, 4)


def _fake(model, step=0):
    return SimpleNamespace(global_step=step, loggers=[], world_size=1, datamodule=None), \
        SimpleNamespace(model=model, device=torch.device("cpu"))


def test_a_ramped_event_freezes_sigma_at_its_step_ramps_alpha_and_removes_the_site_k_steps_later():
    _, model = stock_and_removable()
    model.calibrate(ids(2, 16))
    events = [e for e in build_events({"pre_mlp": {"start": 2, "gap": 0}}, 2) if e.kind == "pre_mlp"]
    cb = LNRemovalCallback(events, momentum=0.9, ramp_steps=4, ramp_shape="linear")
    trainer, module = _fake(model)
    site = model.site("ln2", 0)
    alphas = []
    for step in range(0, 8):
        trainer.global_step = step
        cb.apply_due(trainer, module)
        alphas.append(None if not site.is_ramping else float(site.alpha))
        if step == 2:
            sigma = float(site.sigma[0])
    assert alphas == [None, None, 0.0, 0.25, 0.5, 0.75, None, None]  # removed at 2 + 4
    assert site.is_removed and float(site.sigma[0]) == sigma  # sigma frozen at the ramp's start, kept
    assert [(r["applied_at"], r["removed_at"]) for r in cb.applied] == [(2, 6), (2, 6)]


def test_a_ramp_that_cannot_end_before_max_steps_is_refused():
    schedule = {"pre_mlp": {"start": 4, "gap": 1}, "ramp": {"steps": 10, "shape": "linear"}}
    validate(schedule, 2, 17)  # the other kinds follow at 6 (contiguous rule): the last ramp ends at 16
    with pytest.raises(ScheduleError, match="ramp.steps=10"):
        validate(schedule, 2, 16)


# -- adaptive schedule -----------------------------------------------------------------------------------------
def test_an_adaptive_trigger_fires_when_the_smoothed_loss_recovers_and_not_before():
    trig = AdaptiveTrigger(tolerance=0.01, window=3, max_gap=50)
    for ce in (4.0, 4.0, 4.0):
        trig.observe(ce)
    trig.fired(10)  # reference: 4.0
    trace = {11: 4.6, 12: 4.3, 13: 4.1, 14: 4.0, 15: 4.0, 16: 3.99}
    fired = None
    for step, ce in trace.items():
        trig.observe(ce)
        if trig.due(step):
            fired = step
            break
    # 13: window full of post-event losses but mean 4.33; 14: 4.13; 15: 4.03 <= 4.04
    assert fired == 15 and trig.due(15) == "recovered"
    assert trig.smoothed == pytest.approx(4.0333333)


def test_an_adaptive_trigger_waits_a_full_window_after_an_event():
    trig = AdaptiveTrigger(tolerance=0.01, window=3, max_gap=6)
    trig.observe(4.0)
    trig.fired(0)
    trig.observe(3.0)  # low at once, but the window still holds a pre-event loss: not a recovery
    assert trig.smoothed < 4.0 and trig.due(1) is None


def test_an_adaptive_trigger_fires_at_max_gap_when_the_loss_never_recovers():
    trig = AdaptiveTrigger(tolerance=0.01, window=3, max_gap=6)
    trig.observe(4.0)
    trig.fired(0)
    for step in range(1, 6):
        trig.observe(9.0)
        assert trig.due(step) is None
    trig.observe(9.0)
    assert trig.due(6) == "max_gap"


def test_an_adaptive_trigger_round_trips_through_its_state():
    trig = AdaptiveTrigger(tolerance=0.0, window=2, max_gap=9)
    for ce in (3.0, 2.0, 1.0):
        trig.observe(ce)
    trig.fired(7)
    other = AdaptiveTrigger(tolerance=0.0, window=2, max_gap=9)
    other.load_state_dict(json.loads(json.dumps(trig.state_dict())))
    assert other.state_dict() == trig.state_dict() and other.recent == [2.0, 1.0] and other.reference == 1.5


def test_the_adaptive_callback_fires_groups_in_planned_order_on_a_synthetic_loss_trace():
    _, model = stock_and_removable()
    model.calibrate(ids(2, 16))
    events = build_events({"pre_mlp": {"start": 2, "gap": 0}, "attn_qk": {"start": 3, "gap": 0},
                           "attn_v": {"start": 5, "gap": 10}}, 2)
    assert [len(g) for g in event_groups(events)] == [2, 2, 1, 1, 1]  # planned at 2, 3, 5, 15, 25
    cb = LNRemovalCallback(events, momentum=0.9, adaptive={"tolerance": 0.06, "window": 2, "max_gap": 5})
    trainer, module = _fake(model)
    cb.on_train_start(trainer, module)
    # the training CE of steps 1..16 (what train/ce logs)
    trace = [5.0, 5.0, 6.0, 5.5, 5.0, 6.0, 6.0, 6.0, 6.0, 6.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0]
    for step, ce in enumerate(trace, 1):
        trainer.global_step = step
        cb.on_train_batch_end(trainer, module, {"ce": torch.tensor(ce)}, None, step)
        if step == 4:  # the window after step 2 holds 6.0, 5.5: 5.75 > 1.06 x 5.0, so the second group waits
            assert len(cb.applied) == 2
    fired = sorted({(r["applied_at"], r["why"]) for r in cb.applied})
    # group 0 at its planned 2 (reference 5.0); group 1 at 5 (5.5, 5.0 -> 5.25 <= 5.3; reference 5.25); group 2 at
    # 5 + max_gap (6.0 never within 6% of 5.25); group 3 at 12 (5.0 <= 1.06 x 6.0); group 4 at 14 (5.0 <= 5.3)
    assert fired == [(2, "planned"), (5, "recovered"), (10, "max_gap"), (12, "recovered"), (14, "recovered")]
    assert not model.real_sites()


def test_adaptive_settings_are_checked_before_compute():
    ok = {"pre_mlp": {"start": 4, "gap": 1}, "attn_qk": {"gap": 2}, "attn_v": {"gap": 4},  # conf/schedule/builtin
          "adaptive": {"enabled": True, "tolerance": 0.01, "window": 2, "max_gap": 3}}
    validate(ok, 2, 4 + 6 * 3 + 1)  # builtin-like: 7 groups (pre_mlp, attn_qk, attn_v one block each, final)
    with pytest.raises(ScheduleError, match="adaptive on"):
        validate(ok, 2, 4 + 6 * 3)
    with pytest.raises(ScheduleError, match="bos/eot"):
        validate({**ok, "bos": {"start": 20, "gap": 1}}, 2, 100)


@pytest.mark.parametrize("override,match", [
    ("schedule.ramp.shape=step", "ramp.shape"),
    ("schedule.ramp.steps=-1", "ramp.steps"),
    ("schedule.adaptive.window=9", "exceeds adaptive.max_gap"),
    ("schedule.distill.ce_weight=0", "leaves no loss"),
    ("schedule.distill.temperature=0", "distill.temperature"),
])
def test_impossible_method_settings_are_refused_by_name(tmp_path, override, match):
    extra = ["schedule.adaptive.enabled=true", "schedule.adaptive.max_gap=4"] if "window" in override else []
    with pytest.raises(LimitError, match=match):
        check_limits(compose_train(tmp_path, override, *extra))


def test_distillation_under_fsdp_is_refused_before_compute(tmp_path):
    cfg = compose_train(tmp_path, *TINY_RUN, "hardware=cpu_fsdp", "schedule.distill.weight=1.0")
    with pytest.raises(ConfigError, match="distill.weight > 0 with hardware.strategy=fsdp"):
        check_config(cfg)


def test_every_method_is_off_by_default_and_an_older_saved_schedule_has_the_same_normal_form(tmp_path):
    cfg = compose_train(tmp_path)
    s = OmegaConf.to_container(cfg.schedule, resolve=True)
    assert s["ramp"]["steps"] == 0 and not s["adaptive"]["enabled"] and s["distill"]["weight"] == 0
    older = {k: v for k, v in s.items() if k not in ("ramp", "adaptive", "distill")}  # a summary.json from before
    assert normal_form(older) == normal_form(s)
    assert normal_form({**s, "ramp": {"steps": 3, "shape": "linear"}}) != normal_form(older)


# -- compressed schedules ----------------------------------------------------------------------------------------
COMPRESSED = {  # option -> [(n_layer, max_steps)] of the models it is for (the paper experiments' budgets)
    "builtin_compressed": [(2, None), (4, None)],  # the built-in family (None: conf/trainer's max_steps)
    "compressed": [(12, 300), (24, 500)],  # GPT-2 small, medium
    "compressed_large": [(36, 600)],
    "compressed_xl": [(48, 800)],
}


@pytest.mark.parametrize("option", sorted(COMPRESSED))
def test_compressed_schedules_remove_pre_mlp_then_qk_at_once_then_v_with_gaps_then_final(tmp_path, option):
    cfg = compose_train(tmp_path, f"schedule={option}")
    check_limits(cfg)
    for n_layer, max_steps in COMPRESSED[option]:
        events = validate(cfg.schedule, n_layer, max_steps or cfg.trainer.max_steps)
        steps = {k: [e.step for e in events if e.kind == k] for k in ("pre_mlp", "attn_qk", "attn_v", "final")}
        assert len(set(steps["pre_mlp"])) == 1 and len(steps["pre_mlp"]) == n_layer
        assert len(set(steps["attn_qk"])) == 1 and steps["attn_qk"][0] > steps["pre_mlp"][0]
        v = steps["attn_v"]
        assert len(set(v)) == n_layer and v == sorted(v) and v[0] > steps["attn_qk"][0]
        assert steps["final"][0] > v[-1]
        fixed = {"builtin_compressed": "builtin", "compressed": "standard"}.get(option)
        if fixed:  # fewer steps to the last removal than the fixed schedule it compresses
            assert events[-1].step < validate(compose_train(tmp_path, f"schedule={fixed}").schedule, n_layer,
                                              10_000)[-1].step


# -- end to end (slow): resume bit-identical, exports of every method on every family ----------------------------
RAMP = ["schedule.ramp.steps=4", "schedule.ramp.shape=cosine"]
ADAPTIVE = ["schedule.adaptive.enabled=true", "schedule.adaptive.window=2", "schedule.adaptive.max_gap=3"]
DISTILL = ["schedule.distill.weight=1.0", "schedule.distill.temperature=2.0"]


def _weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "export" / "folded" / "folded.safetensors"))


def _check_exports(summary):
    assert summary["all_removed"] and summary["export_error"] is None
    assert summary["exports"]["hf"]["relative_error"] <= 1e-4
    assert summary["exports"]["folded"]["relative_error"] <= 1e-5
    assert all(e.get("removed_at", e["applied_at"]) >= e["applied_at"] for e in summary["events"])


@pytest.mark.slow
@pytest.mark.parametrize("method,crash_at", [("ramp", 6), ("adaptive", 5)])
def test_resume_mid_ramp_or_mid_adaptive_wait_is_bit_identical_to_an_uninterrupted_run(tmp_path, monkeypatch,
                                                                                        method, crash_at):
    extra = RAMP if method == "ramp" else ADAPTIVE
    full = train(compose_train(tmp_path / "full", *TINY_RUN, *extra))
    _check_exports(full)
    ckpt = train_until_crash(compose_train(tmp_path / "part", *TINY_RUN, *extra), monkeypatch, step=crash_at)
    state = read_checkpoint(ckpt)["callbacks"]["LNRemovalCallback"]
    if method == "ramp":  # ramps started at 4, 5 and 6 (pre_mlp.0, pre_mlp.1, attn_qk.0): all under way at 6
        assert [(r["applied_at"], r["removed_at"]) for r in state["applied"]] == [(4, None), (5, None), (6, None)]
    else:  # the first group fired at 4; the second waits (a full window after 4 needs step 6)
        assert [r["applied_at"] for r in state["applied"]] == [4] and state["adaptive"]["last_fired"] == 4
    resumed = train(compose_train(tmp_path / "part", *TINY_RUN, *extra, f"ckpt_path={ckpt}"))
    assert resumed["events"] == full["events"]  # same steps, same sigmas, same adaptive decisions
    assert resumed["val_ce"] == full["val_ce"]
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("model,finetune", [("tiny", "full"), ("tiny_llama", "full"), ("tiny_neox", "full"),
                                            pytest.param("tiny", "lora", marks=needs("peft", "lora"))])
def test_every_method_together_on_every_family_and_lora_exports_a_checked_model(tmp_path, model, finetune):
    cfg = compose_train(tmp_path, *TINY_RUN, f"model={model}", f"finetune={finetune}", "schedule=builtin_compressed",
                        *RAMP, *ADAPTIVE, *DISTILL)
    summary = train(cfg)
    _check_exports(summary)
    assert {r["why"] for r in summary["events"]} <= {"planned", "recovered", "max_gap"}
    metrics = (tmp_path / "csv" / "metrics.csv").read_text()
    assert "train/kl" in metrics
    saved = summary["config"]["schedule"]
    assert saved["distill"]["weight"] == 1.0 and saved["ramp"]["steps"] == 4 and saved["adaptive"]["enabled"]


# -- DDP: ranks decide together ------------------------------------------------------------------------------------
def _adaptive_rank(rank, port, out_dir):
    """Rank `rank` of a two-process gloo group feeding its own training CE to an adaptive removal callback."""
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=90))
    try:
        torch.manual_seed(0)
        _, model = stock_and_removable()
        model.calibrate(ids(2, 16, seed=1))  # the same estimates on both ranks
        cb = LNRemovalCallback([Event(1, "pre_mlp", 0), Event(2, "pre_mlp", 1)], momentum=0.9,
                               adaptive={"tolerance": 0.0, "window": 1, "max_gap": 10})
        trainer, module = _fake(model)
        trainer.world_size = 2
        # per-rank CE at steps 1..4; alone, rank 0 would fire the second group at 3 and rank 1 at 2; their mean
        # (5.0, 5.25, 5.2, 4.9 against the reference 5.0) fires it at 4
        trace = {0: [4.0, 4.5, 3.9, 4.0], 1: [6.0, 6.0, 6.5, 5.8]}[rank]
        for step, ce in enumerate(trace, 1):
            trainer.global_step = step
            cb.on_train_batch_end(trainer, module, {"ce": torch.tensor(ce)}, None, step)
        out = {"fired": [r["applied_at"] for r in cb.applied], "trigger": cb.trigger.state_dict()}
        (out_dir / f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_take_the_same_adaptive_decision_from_their_mean_loss(tmp_path):
    r0, r1 = two_ranks(_adaptive_rank, tmp_path)
    assert r0 == r1 and r0["fired"] == [1, 4]
    assert r0["trigger"]["reference"] == pytest.approx(4.9) and r0["trigger"]["last_fired"] == 4
