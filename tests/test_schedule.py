import pytest

from lnfree.schedule import Event, ScheduleError, build_events, kind_starts, special_kinds, validate


def sched(**kw):
    base = {"ln2": {"start": 20, "gap": 2}, "ln1qk": {"start": None, "gap": 2},
            "ln1v": {"start": None, "gap": 3}, "lnf": {"start": None}}
    base.update(kw)
    return base


@pytest.mark.parametrize("n_layer,lnf", [(12, 104), (24, 188)])
def test_contiguous_rule_reproduces_published_small_and_medium(n_layer, lnf):
    starts = kind_starts(sched(), n_layer)
    assert starts["ln1qk"] == 20 + 2 * n_layer
    assert starts["ln1v"] == starts["ln1qk"] + 2 * n_layer
    assert starts["lnf"] == lnf
    events = build_events(sched(), n_layer)
    assert len(events) == 3 * n_layer + 1
    assert events[0] == Event(20, "ln2", 0) and events[-1] == Event(lnf, "lnf", None)
    assert [e.step for e in events] == sorted(e.step for e in events)
    v = [e for e in events if e.kind == "ln1v"]
    assert [e.step for e in v[:3]] == [starts["ln1v"], starts["ln1v"] + 3, starts["ln1v"] + 6]


def test_gap_zero_puts_all_blocks_at_start_in_kind_then_block_order():
    s = sched(ln2={"start": 5, "gap": 0}, ln1qk={"start": 5, "gap": 0}, ln1v={"start": 5, "gap": 0},
              lnf={"start": 5})
    events = build_events(s, 3)
    assert {e.step for e in events} == {5}
    assert [e.name for e in events] == ["ln2.0", "ln2.1", "ln2.2", "ln1qk.0", "ln1qk.1", "ln1qk.2",
                                         "ln1v.0", "ln1v.1", "ln1v.2", "lnf"]


def test_single_layer_single_events():
    events = build_events(sched(ln2={"start": 0, "gap": 7}), 1)
    assert [(e.step, e.name) for e in events] == [(0, "ln2.0"), (7, "ln1qk.0"), (9, "ln1v.0"), (12, "lnf")]


def test_no_removal_gives_no_events():
    assert build_events({"remove": False, **sched()}, 12) == []
    assert special_kinds({"remove": False, "bos": {"start": 1}}) == {"eot": False, "bos": False}


def test_special_kinds_cover_blocks_and_final_norm():
    s = sched(ln2={"start": 0, "gap": 0}, ln1qk={"start": 0, "gap": 0}, ln1v={"start": 0, "gap": 0},
              lnf={"start": 0}, bos={"start": 2, "gap": 1})
    events = validate(s, 2, max_steps=10)
    bos = [(e.step, e.block) for e in events if e.kind == "bos"]
    assert bos == [(2, 0), (3, 1), (4, 2)]  # stage 2 = the final norm of a 2-layer model
    assert special_kinds(s) == {"eot": False, "bos": True}


@pytest.mark.parametrize("bad,match", [
    (sched(ln2={"start": 0, "gap": -1}), "gap must be >= 0"),
    (sched(ln2={"start": -3, "gap": 1}), "start must be >= 0"),
    ({**sched(), "ln3": {"start": 0}}, "unknown schedule kind"),
    ({k: v for k, v in sched().items() if k != "ln1v"}, "no entry for 'ln1v'"),
    (sched(eot={"start": None, "gap": 1}), "explicit start"),
])
def test_rejections(bad, match):
    with pytest.raises(ScheduleError, match=match):
        validate(bad, 4, max_steps=1000)


def test_events_past_max_steps_rejected():
    with pytest.raises(ScheduleError, match="max_steps=104"):
        validate(sched(), 12, max_steps=104)
    assert validate(sched(), 12, max_steps=105)[-1].step == 104


def test_special_event_before_removal_rejected():
    with pytest.raises(ScheduleError, match="precedes the removal"):
        validate(sched(bos={"start": 0, "gap": 0}), 2, max_steps=1000)


def test_special_stage_checks_its_own_sites_and_may_share_their_step():
    # blocks' norms go at step 0, lnf at 50; bos stages 0, 1 end at 2 and 26 (after their blocks' norms, before
    # lnf: fine) and stage 2, the final norm's, at 50: the same step as lnf's removal, which is applied first
    s = sched(ln2={"start": 0, "gap": 0}, ln1qk={"gap": 0}, ln1v={"gap": 0}, lnf={"start": 50},
              bos={"start": 2, "gap": 24})
    events = validate(s, 2, max_steps=100)
    assert [(e.step, e.name) for e in events if e.step == 50] == [(50, "lnf"), (50, "bos.2")]
    with pytest.raises(ScheduleError, match=r"bos event at stage 2 \(step 49\) precedes the removal of \['lnf'\]"):
        validate({**s, "lnf": {"start": 50}, "bos": {"start": 1, "gap": 24}}, 2, max_steps=100)


def test_an_omegaconf_schedule_without_optional_keys_gives_the_same_events():
    # Hydra hands the schedule over as a DictConfig; "remove" and "gap" may be left out of its yaml
    from omegaconf import OmegaConf

    s = sched(ln2={"start": 5}, bos={"start": 3})
    assert build_events(OmegaConf.create(s), 3) == build_events(s, 3)
    events = build_events(s, 3)
    assert [e.step for e in events if e.kind == "ln2"] == [5, 5, 5]  # no gap given: every block at start
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
    starts = kind_starts(sched(ln2={"start": None, "gap": 2}), 3)
    assert starts == {"ln2": 0, "ln1qk": 6, "ln1v": 12, "lnf": 21}


def test_fit_fraction_rescales_to_the_budget_keeping_order():
    s = sched(fit_fraction=0.4)
    for max_steps in (50, 200, 1000):
        events = validate(s, 12, max_steps)
        assert events[-1].name == "lnf" and events[-1].step == int(0.4 * max_steps)
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
    s = sched(ln2={"start": 0, "gap": 0}, ln1qk={"gap": 0}, ln1v={"gap": 0}, fit_fraction=0.5)
    events = validate(s, 3, 100)
    assert len(events) == 10 and {e.step for e in events} == {0}
