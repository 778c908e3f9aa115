import pytest

from lnfree.schedule import (
    Event,
    ScheduleError,
    build_events,
    kind_problems,
    kind_starts,
    normal_form,
    special_kinds,
    validate,
)


def sched(**kw):
    base = {"pre_mlp": {"start": 20, "gap": 2}, "attn_qk": {"start": None, "gap": 2},
            "attn_v": {"start": None, "gap": 3}, "final": {"start": None}}
    base.update(kw)
    return base


@pytest.mark.parametrize("n_layer,final", [(12, 104), (24, 188)])
def test_contiguous_rule_reproduces_published_small_and_medium(n_layer, final):
    starts = kind_starts(sched(), n_layer)
    assert starts["attn_qk"] == 20 + 2 * n_layer
    assert starts["attn_v"] == starts["attn_qk"] + 2 * n_layer
    assert starts["final"] == final
    events = build_events(sched(), n_layer)
    assert len(events) == 3 * n_layer + 1
    assert events[0] == Event(20, "pre_mlp", 0) and events[-1] == Event(final, "final", None)
    assert [e.step for e in events] == sorted(e.step for e in events)
    v = [e for e in events if e.kind == "attn_v"]
    assert [e.step for e in v[:3]] == [starts["attn_v"], starts["attn_v"] + 3, starts["attn_v"] + 6]


def test_gap_zero_puts_all_blocks_at_start_in_kind_then_block_order():
    s = sched(pre_mlp={"start": 5, "gap": 0}, attn_qk={"start": 5, "gap": 0}, attn_v={"start": 5, "gap": 0},
              final={"start": 5})
    events = build_events(s, 3)
    assert {e.step for e in events} == {5}
    assert [e.name for e in events] == ["pre_mlp.0", "pre_mlp.1", "pre_mlp.2", "attn_qk.0", "attn_qk.1", "attn_qk.2",
                                         "attn_v.0", "attn_v.1", "attn_v.2", "final"]


def test_single_layer_single_events():
    events = build_events(sched(pre_mlp={"start": 0, "gap": 7}), 1)
    assert [(e.step, e.name) for e in events] == [(0, "pre_mlp.0"), (7, "attn_qk.0"), (9, "attn_v.0"), (12, "final")]


def test_no_removal_gives_no_events():
    assert build_events({"remove": False, **sched()}, 12) == []
    assert special_kinds({"remove": False, "bos": {"start": 1}}) == {"eot": False, "bos": False}


def test_special_kinds_cover_blocks_and_final_norm():
    s = sched(pre_mlp={"start": 0, "gap": 0}, attn_qk={"start": 0, "gap": 0}, attn_v={"start": 0, "gap": 0},
              final={"start": 0}, bos={"start": 2, "gap": 1})
    events = validate(s, 2, max_steps=10)
    bos = [(e.step, e.block) for e in events if e.kind == "bos"]
    assert bos == [(2, 0), (3, 1), (4, 2)]  # stage 2 = the final norm of a 2-layer model
    assert special_kinds(s) == {"eot": False, "bos": True}


@pytest.mark.parametrize("bad,match", [
    (sched(pre_mlp={"start": 0, "gap": -1}), "gap must be >= 0"),
    (sched(pre_mlp={"start": -3, "gap": 1}), "start must be >= 0"),
    ({**sched(), "ln3": {"start": 0}}, "unknown schedule key"),
    (sched(eot={"start": None, "gap": 1}), "explicit start"),
])
def test_rejections(bad, match):
    with pytest.raises(ScheduleError, match=match):
        validate(bad, 4, max_steps=1000)


def test_a_kind_left_out_is_every_block_at_its_contiguous_start():
    left_out = {k: v for k, v in sched().items() if k != "attn_v"}
    assert build_events(left_out, 3) == build_events(sched(attn_v={"start": None, "gap": 0}), 3)
    assert [e.step for e in build_events(left_out, 3) if e.kind == "attn_v"] == [32, 32, 32]  # 20 + 3*2 + 3*2


def test_events_past_max_steps_rejected():
    with pytest.raises(ScheduleError, match="max_steps=104"):
        validate(sched(), 12, max_steps=104)
    assert validate(sched(), 12, max_steps=105)[-1].step == 104


def test_special_event_before_removal_rejected():
    with pytest.raises(ScheduleError, match="precedes the removal"):
        validate(sched(bos={"start": 0, "gap": 0}), 2, max_steps=1000)


def test_special_stage_checks_its_own_sites_and_may_share_their_step():
    # blocks' norms go at step 0, final at 50; bos stages 0, 1 end at 2 and 26 (after their blocks' norms, before
    # final: fine) and stage 2, the final norm's, at 50: the same step as final's removal, which is applied first
    s = sched(pre_mlp={"start": 0, "gap": 0}, attn_qk={"gap": 0}, attn_v={"gap": 0}, final={"start": 50},
              bos={"start": 2, "gap": 24})
    events = validate(s, 2, max_steps=100)
    assert [(e.step, e.name) for e in events if e.step == 50] == [(50, "final"), (50, "bos.2")]
    with pytest.raises(ScheduleError, match=r"bos event at stage 2 \(step 49\) precedes the removal of \['final'\]"):
        validate({**s, "final": {"start": 50}, "bos": {"start": 1, "gap": 24}}, 2, max_steps=100)


def test_an_omegaconf_schedule_without_optional_keys_gives_the_same_events():
    # Hydra hands the schedule over as a DictConfig; "remove" and "gap" may be left out of its yaml
    from omegaconf import OmegaConf

    s = sched(pre_mlp={"start": 5}, bos={"start": 3})
    assert build_events(OmegaConf.create(s), 3) == build_events(s, 3)
    events = build_events(s, 3)
    assert [e.step for e in events if e.kind == "pre_mlp"] == [5, 5, 5]  # no gap given: every block at start
    assert [e.step for e in events if e.kind == "bos"] == [3, 3, 3, 3]


@pytest.mark.parametrize("bos,message", [({"start": -1, "gap": 1}, r"bos\.start must be >= 0"),
                                         ({"start": 2, "gap": -1}, r"bos\.gap must be >= 0"),
                                         ({"start": 2, "gap": None}, r"bos\.gap must be >= 0"),
                                         ({"start": None, "gap": 1}, "bos needs an explicit start"),
                                         ({"start": 2, "gap": 1, "strat": 3}, r"bos has unknown key\(s\) \['strat'\]")])
def test_special_kind_with_a_negative_or_null_start_or_gap_rejected(bos, message):
    with pytest.raises(ScheduleError, match=message):
        build_events(sched(bos=bos), 3)


def test_null_start_for_the_first_kind_starts_at_step_zero():
    starts = kind_starts(sched(pre_mlp={"start": None, "gap": 2}), 3)
    assert starts == {"pre_mlp": 0, "attn_qk": 6, "attn_v": 12, "final": 21}


def test_fit_fraction_rescales_to_the_budget_keeping_order():
    s = sched(fit_fraction=0.4)
    for max_steps in (50, 200, 1000):
        events = validate(s, 12, max_steps)
        assert events[-1].name == "final" and events[-1].step == int(0.4 * max_steps)
        unscaled = build_events(sched(), 12)
        assert [e.name for e in events] == [e.name for e in unscaled]
        assert [e.step for e in events] == sorted(e.step for e in events)
    with pytest.raises(ScheduleError, match="fit_fraction"):
        validate(sched(fit_fraction=1.5), 12, 100)


@pytest.mark.parametrize("fraction,max_steps", [(0.0, 100), (1.0, 100), (0.5, None)])
def test_fit_fraction_outside_the_open_interval_or_without_max_steps_rejected(fraction, max_steps):
    with pytest.raises(ScheduleError, match=r"fit_fraction must be in \(0, 1\) and needs max_steps"):
        build_events(sched(fit_fraction=fraction), 4, max_steps)


def test_fit_fraction_with_every_event_at_step_zero_keeps_them_there():
    s = sched(pre_mlp={"start": 0, "gap": 0}, attn_qk={"gap": 0}, attn_v={"gap": 0}, fit_fraction=0.5)
    events = validate(s, 3, 100)
    assert len(events) == 10 and {e.step for e in events} == {0}


# -- the kinds have one name each: a family's site name (GPT-2's ln2, ln1qk, ln1v, lnf) is not a schedule key ------
GPT2_SITE_NAMES = {"ln2": "pre_mlp", "ln1qk": "attn_qk", "ln1v": "attn_v", "lnf": "final"}


@pytest.mark.parametrize("site_name,kind", GPT2_SITE_NAMES.items())
def test_a_gpt2_site_name_as_a_schedule_key_is_refused_naming_the_kind(site_name, kind):
    why = rf"unknown schedule key\(s\) \['{site_name}'\]; the kinds are \('pre_mlp', .*'bos'\); "
    with pytest.raises(ScheduleError, match=why + rf"{site_name} is gpt2's name for its {kind} sites; the kind is "
                                                  rf"named {kind}$"):
        build_events({**sched(), site_name: {"start": 5, "gap": 1}}, 3)
    with pytest.raises(ScheduleError, match=r"unknown schedule key\(s\) \['ln9'\]; the kinds are \(.*'bos'\)$"):
        build_events({**sched(), "ln9": {"start": 5}}, 3)  # no family's site name: no hint
    with pytest.raises(ScheduleError, match=rf"unknown event kind '{site_name}'; .*the kind is named {kind}\)$"):
        Event(0, site_name, None)


def test_normal_form_fills_each_kinds_defaults_so_equal_plans_compare_equal():
    spelt_out = {"name": "x", "remove": False, "aux_weight": 0.0, "pre_mlp": {"start": None, "gap": 0},
                 **{k: {"start": None, "gap": None} for k in ("attn_qk", "attn_v", "final")}}
    assert normal_form(spelt_out) == normal_form({"name": "x", "remove": False, "aux_weight": 0.0})
    # by hand: other keys kept, each norm kind once, defaults filled (gap 0), and only the first kind's null start
    # written as 0
    assert normal_form({"name": "y", "pre_mlp": {"start": None, "gap": 2}, "attn_v": {"start": 7, "gap": 3}}) == {
        "name": "y", "pre_mlp": {"start": 0, "gap": 2}, "attn_qk": {"start": None, "gap": 0},
        "attn_v": {"start": 7, "gap": 3}, "final": {"start": None, "gap": 0}}
    assert normal_form(sched()) != normal_form(sched(attn_v={"start": None, "gap": 4}))


def test_a_command_line_override_of_a_gpt2_site_name_is_refused_at_compose_or_before_compute(tmp_path):
    """The schema holds the four kinds only: schedule.ln1v.gap=1 does not compose, +schedule.ln1v.gap=1 is refused
    by the closed-schema check, naming the kind to use."""
    from conftest import compose_train
    from hydra.errors import ConfigCompositionException

    from lnfree.training.config import UnknownKeyError, check_limits

    check_limits(compose_train(tmp_path, "schedule=builtin", "schedule.attn_v.gap=1"))
    with pytest.raises(ConfigCompositionException, match=r"schedule\.ln1v\.gap"):
        compose_train(tmp_path, "schedule=builtin", "schedule.ln1v.gap=1")
    cfg = compose_train(tmp_path, "schedule=builtin", "+schedule.ln1v.gap=1")
    with pytest.raises(UnknownKeyError, match=r"schedule\.ln1v \(ln1v is gpt2's name for its attn_v sites; the "
                                              r"kind is named attn_v\)"):
        check_limits(cfg)


def test_a_norm_kinds_null_gap_is_zero_and_every_problem_is_named_in_one_error():
    s = sched(attn_qk={"start": 50, "gap": None})  # a null gap set beside a start: every block at that start
    assert kind_problems(s) == []
    assert [e.step for e in build_events(s, 3) if e.kind == "attn_qk"] == [50, 50, 50]
    two = sched(pre_mlp={"start": -1, "gap": -2})
    assert len(kind_problems(two)) == 2
    with pytest.raises(ScheduleError) as err:
        kind_starts(two, 3)
    assert str(err.value) == "; ".join(kind_problems(two))  # each problem, in order, "; " between them


