"""The removal-methods study (experiments/efficient): the runner's pure functions (lnfree.sweeps.efficient) and the
analysis (lnfree.sweeps.efficient_analysis) on synthetic records with known answers. The intervals' coverage is
tested in tests/test_coverage.py."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import yaml
from conftest import ROOT
from scipy import stats as sps

from lnfree.analysis.simulate import StudyStructure, study_gaps
from lnfree.analysis.stats import seeds_and_text
from lnfree.records import RecordError
from lnfree.sweeps import efficient
from lnfree.sweeps import efficient_analysis as ea

PROTOCOL = yaml.safe_load((ROOT / "experiments/efficient/protocol.yaml").read_text())


# -- the runner ---------------------------------------------------------------------------------------------------
def test_cells_run_seed_by_seed_with_the_control_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no combination.json here: the arms are the protocol's
    cells = efficient.cells(PROTOCOL)
    arms = [PROTOCOL["control"]["name"], *PROTOCOL["arms"]]
    n_budgets = sum(len(f["budgets"]) for f in PROTOCOL["families"].values())
    assert len(cells) == len(PROTOCOL["seeds"]) * n_budgets * len(arms)
    assert [c[3] for c in cells] == sorted(c[3] for c in cells)  # every cell of seed 1 first, then 2, then 3
    for i in range(0, len(cells), len(arms)):  # each (family, budget, seed): the control, then the arms in order
        block = cells[i:i + len(arms)]
        assert [c[1] for c in block] == arms and len({(c[0], c[2], c[3]) for c in block}) == 1
    assert efficient.cells(PROTOCOL, [2]) == [c for c in cells if c[3] == 2]


def test_a_missing_control_dir_is_retrained_and_checked_against_its_record(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trained, val_ce = [], {"now": 3.0}

    def fake_train(protocol, family, arm, budget, seed):
        out = efficient.run_dir(family, arm, budget, seed)
        out.mkdir(parents=True, exist_ok=True)
        (out / efficient.RUN_SUMMARY).write_text(json.dumps({"val_ce": val_ce["now"]}))
        trained.append((family, arm, budget, seed))
        return out, 1.0

    monkeypatch.setattr(efficient, "train", fake_train)
    control = PROTOCOL["control"]["name"]
    record = {"family": "gpt2", "arm": control, "budget": 25, "seed": 1, "val_ce": 3.0}
    efficient.ensure_control(PROTOCOL, "gpt2", 25, 1, [record])
    assert trained == [("gpt2", control, 25, 1)]
    efficient.ensure_control(PROTOCOL, "gpt2", 25, 1, [record])  # its dir exists now: not trained again
    assert len(trained) == 1
    val_ce["now"] = 3.1  # a retrained control that does not match its record is refused
    with pytest.raises(RuntimeError, match="not reproducible"):
        efficient.ensure_control(PROTOCOL, "gpt2", 50, 1, [{**record, "budget": 50}])


def _train_ce_records(ce: dict, seed=1) -> list[dict]:
    """gpt2 records of one seed: ce {arm: final training CE at every budget, or a list per budget}."""
    budgets = PROTOCOL["families"]["gpt2"]["budgets"]
    return [{"family": "gpt2", "arm": arm, "budget": b, "seed": seed,
             "final_train_ce": v[i] if isinstance(v, list) else v}
            for arm, v in ce.items() for i, b in enumerate(budgets)]


def test_choose_combination_follows_the_protocols_rule():
    base = PROTOCOL["baseline"]
    some = _train_ce_records({base: 4.0, "distill": 3.9, "ramp": 4.1, "adaptive": 4.0})
    assert efficient.choose_combination(PROTOCOL, some) is None  # compressed has not run: no choice yet
    # distill wins everywhere, compressed at 3 of 4 budgets (a majority), ramp at 2 of 4 (not), adaptive ties
    recs = _train_ce_records({base: 4.0, "distill": 3.9, "ramp": [3.9, 3.9, 4.1, 4.1], "adaptive": 4.0,
                              "compressed": [3.9, 3.9, 3.9, 4.1]})
    c = efficient.choose_combination(PROTOCOL, recs + _train_ce_records({"distill": 5.0}, seed=2))  # seed 2 ignored
    assert c["methods"] == ["distill", "compressed"]
    assert c["wins_of_budgets"] == {"distill": 4, "ramp": 2, "adaptive": 0, "compressed": 3}
    # compressed replaces the builtin schedule; distill's own overrides are added, its schedule=builtin is not
    assert c["overrides"] == ["schedule=builtin_compressed",
                              *[o for o in PROTOCOL["arms"]["distill"] if not o.startswith("schedule=")]]
    assert c["name"] == PROTOCOL["combination"]["name"]
    ramp_only = efficient.choose_combination(PROTOCOL, _train_ce_records(
        {base: 4.0, "distill": 4.1, "ramp": 3.9, "adaptive": 4.1, "compressed": 4.1}))
    assert ramp_only["overrides"] == ["schedule=builtin", *[o for o in PROTOCOL["arms"]["ramp"]
                                                            if not o.startswith("schedule=")]]
    none = efficient.choose_combination(PROTOCOL, _train_ce_records(
        {base: 4.0, "distill": 4.1, "ramp": 4.0, "adaptive": 4.2, "compressed": 4.1}))
    assert none["methods"] == [] and none["overrides"] == []  # no method qualifies: no combination arm


def test_cpu_hours_counts_distillation_steps_at_their_own_rate(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = [("gpt2", "builtin", 100, 1), ("gpt2", "distill", 50, 1), ("llama", "vanilla", 100, 2)]
    s = efficient.SECONDS_PER_STEP
    want = (s["plain"] * 200 + s["distill"] * 50 + efficient.SECONDS_PER_RUN * 3) / 3600
    assert efficient.cpu_hours(PROTOCOL, missing) == pytest.approx(want)
    assert efficient.cpu_hours(PROTOCOL, []) == 0


def test_paired_summary_block_gaps_mean_and_tail():
    rng = np.random.default_rng(0)
    control = {"a": rng.gamma(2, 2, (4, 255)).astype(np.float32)}
    shift = np.zeros((4, 255))
    shift[1] = 0.5
    shift[3, :3] = 10.0  # three tokens with a large difference: the tail, not the mean
    arm = {"a": (control["a"] + shift).astype(np.float32)}
    s = efficient.paired_summary(arm, control)["a"]
    assert s["block_gaps"] == pytest.approx([0, 0.5, 0, 30 / 255], abs=1e-5)
    assert s["mean_gap"] == pytest.approx(np.mean(s["block_gaps"]), abs=1e-5)
    assert s["control_ce"] == pytest.approx(float(control["a"].mean()), abs=1e-5)
    assert s["p99_token_diff"] == pytest.approx(0.5, abs=1e-5)  # 255 of 1,020 tokens at 0.5, 3 at 10


# -- T* -----------------------------------------------------------------------------------------------------------
TOKENS = np.array([25, 50, 100, 200]) * 4096.0


def power_curve(t_star, threshold=0.01, slope=1.1):
    return threshold * (TOKENS / t_star) ** -slope


def test_crossing_interpolates_a_power_law_exactly_and_bounds_outside_the_budgets():
    for t in (130e3, 300e3, 700e3):
        value, low, high = ea.crossing(TOKENS, power_curve(t), 0.01)
        assert value == pytest.approx(t) and low == high == value
    value, low, high = ea.crossing(TOKENS, power_curve(2e6), 0.01)  # never reaches 1%: above the budgets
    assert math.isnan(value) and low == TOKENS[-1] and high == math.inf
    value, low, high = ea.crossing(TOKENS, power_curve(5e4), 0.01)  # already there at 25 steps: below
    assert math.isnan(value) and low == 0 and high == TOKENS[0]
    # the first crossing counts (a curve that rises again later), and a gap <= 0 at the lower budget: linear
    value, *_ = ea.crossing(TOKENS, [0.03, 0.005, 0.02, 0.001], 0.01)
    assert TOKENS[0] < value < TOKENS[1]
    value, *_ = ea.crossing(TOKENS, [0.03, 0.02, -0.02, -0.03], 0.01)
    assert value == pytest.approx(math.exp(math.log(TOKENS[1]) + 0.25 * math.log(2)))
    # vectorised over leading dimensions
    curves = np.stack([power_curve(t) for t in (130e3, 300e3, 2e6)])[None].repeat(2, 0)
    value, low, high = ea.crossing(TOKENS, curves, 0.01)
    assert value.shape == (2, 3) and value[1, 1] == pytest.approx(300e3) and np.isinf(high[0, 2])


def test_t_star_and_ratio_give_bounds_not_extrapolations():
    inside = ea.t_star(TOKENS, power_curve(300e3), None, 0.01)
    assert inside == {"value": pytest.approx(300e3), "ci_low": None, "ci_high": None, "censored": None}
    above = ea.t_star(TOKENS, power_curve(2e6), None, 0.01)
    assert above == {"value": None, "ci_low": TOKENS[-1], "ci_high": None, "censored": "above"}
    r = ea.t_star_ratio(TOKENS, power_curve(150e3), power_curve(300e3), None, 0.01)
    assert r["value"] == pytest.approx(0.5) and r["censored"] is None and r["ci_low"] is r["ci_high"] is None
    r = ea.t_star_ratio(TOKENS, power_curve(2e6), power_curve(300e3), None, 0.01)  # the arm never gets there
    assert r["value"] is None and r["ci_low"] == pytest.approx(TOKENS[-1] / 300e3) and r["ci_high"] is None
    assert r["censored"] == {"arm": "above", "baseline": None}
    r = ea.t_star_ratio(TOKENS, power_curve(5e4), power_curve(300e3), None, 0.01)  # the arm is there at once
    assert r["value"] is None and r["ci_low"] is None and r["ci_high"] == pytest.approx(TOKENS[0] / 300e3)
    # with bootstrap curves, a draw censored on one side counts at its bound there
    boot = np.stack([np.stack([power_curve(t), power_curve(300e3)]) for t in (150e3, 2e6)] * 50)
    r = ea.t_star_ratio(TOKENS, power_curve(150e3), power_curve(300e3), boot, 0.01)
    assert r["value"] == pytest.approx(0.5) and r["ci_low"] == pytest.approx(0.5) and r["ci_high"] is None


def test_ratio_verdicts():
    def v(lo, hi):
        return ea.ratio_verdict({"ci_low": lo, "ci_high": hi})
    assert v(0.2, 0.5) == "meets the goal (ratio <= 0.5)"
    assert v(0.3, 0.9) == "fewer tokens than the baseline"
    assert v(1.1, 2.0) == "more tokens" and v(1.1, None) == "more tokens"
    assert v(0.4, 1.0) == "not established" and v(None, 0.8) == "fewer tokens than the baseline"
    assert v(None, None) == "not established"


# -- the intervals --------------------------------------------------------------------------------------------------
def test_draws_have_seeds_and_texts_two_parts():
    """Seeds that agree exactly: the draws spread as the text's t (blocks - 1 df); blocks that agree within each
    seed: as the seeds' t (seeds - 1 df), each at seeds_and_text's standard error; two identical cells move
    together."""
    rng = np.random.default_rng(0)
    text = np.broadcast_to(rng.normal(0.02, 0.01, 64), (3, 64))
    seeds = np.broadcast_to(rng.normal(0.02, 0.003, (3, 1)), (3, 64))
    for x, se, df in ((text, "se_text", 63), (seeds, "se_seeds", 2)):
        s = seeds_and_text(x)
        d = ea.draws(np.stack([x, x]), 200_000, np.random.default_rng(1))
        assert np.quantile(d[:, 0], 0.975) - s["mean"] == pytest.approx(sps.t.ppf(0.975, df) * s[se], rel=0.03)
        assert np.allclose(d[:, 0], d[:, 1])
    with pytest.raises(ValueError, match="2 seeds"):
        ea.draws(text[:1][None], 10, rng)


def test_gap_ratio_interval_inverts_seeds_and_text():
    rng = np.random.default_rng(2)
    shared = rng.normal(0, 0.01, 64)
    b = 0.02 + shared + rng.normal(0, 0.004, (3, 1)) + rng.normal(0, 0.005, (3, 64))
    a = 0.5 * b + rng.normal(0, 0.003, (3, 64))
    g = ea.gap_ratio_interval(a, b)
    assert g["value"] == pytest.approx(a.mean() / b.mean())
    assert g["ci_low"] < g["value"] < g["ci_high"]
    # at each end the interval of a - r b just reaches 0; inside, it covers 0; outside, it does not
    for r, side in ((g["ci_low"], 0), (g["ci_high"], 1)):
        assert seeds_and_text(a - r * b)["ci95"][side] == pytest.approx(0, abs=1e-9)
    assert seeds_and_text(a - g["value"] * b)["ci95"][0] < 0 < seeds_and_text(a - g["value"] * b)["ci95"][1]
    assert ea.gap_ratio_interval(a[:1], b[:1])["ci_low"] is None  # one seed: the value only
    noise = ea.gap_ratio_interval(a, b - b.mean())  # a baseline gap not separated from 0: no interval
    assert noise["ci_low"] is None and noise["ci_high"] is None


# -- the analysis end to end ----------------------------------------------------------------------------------------
def synthetic_records(t_stars: dict, st: StudyStructure, seed=0, families=("gpt2", "llama")) -> list[dict]:
    """Records in the runner's shape: the control and each arm (t_stars: {arm: true T* at 1%, tokens}) of every
    family, budget and seed, with relative block gaps of a simulated study on every evaluation set."""
    rng = np.random.default_rng(seed)
    sets = [s["name"] for s in PROTOCOL["evaluation"]["sets"]]
    arms = list(t_stars)
    gaps = {name: study_gaps(rng, st, [t_stars[a] for a in arms], 0.01) for name in sets}  # [arm, budget, seed, block]
    out = []
    for family in families:
        budgets = PROTOCOL["families"][family]["budgets"]
        for k, budget in enumerate(st.budgets):
            if budget not in budgets:
                continue
            for s in range(st.n_seeds):
                base = {"family": family, "budget": budget, "seed": s + 1, "tokens": budget * st.tokens_per_step,
                        "final_train_ce": 4.0, "wall_time_s": 1.0, "events": []}
                control_ce = {name: 4.5 + 0.5 * i + 0.01 * s for i, name in enumerate(sets)}
                out.append({**base, "arm": PROTOCOL["control"]["name"], "val_ce": 4.5})
                for i, arm in enumerate(arms):
                    blocks = {n: gaps[n][i, k, s] * control_ce[n] for n in sets}
                    out.append({**base, "arm": arm, "val_ce": 4.6, "overrides": PROTOCOL["arms"].get(arm, []),
                                "sets": {n: {"control_ce": control_ce[n], "block_gaps": blocks[n].tolist(),
                                             "mean_gap": float(blocks[n].mean()),
                                             "p99_token_diff": float(np.quantile(blocks[n], 0.99))} for n in sets}})
    return out


def test_the_analysis_regenerates_its_outputs_from_records(tmp_path):
    base = PROTOCOL["baseline"]
    truth = {base: 140 * 4096, "distill": 70 * 4096, "ramp": 40 * 4096 * 100}  # ramp: never reaches 1% here
    records = synthetic_records(truth, StudyStructure())
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    res = ea.main(["--records", str(tmp_path / "runs.jsonl"), "--out", str(tmp_path / "out"), "--draws", "1000",
                   "--protocol", str(ROOT / "experiments/efficient/protocol.yaml")])
    for f in ("efficient.json", "efficient.md", "efficient.png"):
        assert (tmp_path / "out" / f).stat().st_size > 0
    assert json.loads((tmp_path / "out/efficient.json").read_text()) == json.loads(json.dumps(res))
    assert res["baseline"] == base
    keys = [f"{t:g}" for t in PROTOCOL["thresholds"]]
    by = {(a["family"], a["name"]): a for a in res["arms"]}
    assert set(by) == {(f, a) for f in ("gpt2", "llama") for a in truth}
    assert set(res["verdict"]) == {f"{f}/{a}" for f, a in by} and all(isinstance(v, str) for v in
                                                                        res["verdict"].values())
    for a in res["arms"]:
        assert {"name", "overrides", "family", "seeds", "budgets", "t_star", "t_star_ratio"} <= set(a)
        assert a["seeds"] == [1, 2, 3] and a["overrides"] == PROTOCOL["arms"][a["name"]]
        assert [e["steps"] for e in a["budgets"]] == PROTOCOL["families"][a["family"]]["budgets"]
        for e in a["budgets"]:
            assert e["tokens"] == e["steps"] * 4096
            assert set(e["gap_rel"]) == {"value", "ci_low", "ci_high"} and e["gap_rel"]["ci_low"] is not None
            assert all(f"gap_rel_{s['name']}" in e for s in PROTOCOL["evaluation"]["sets"][1:])
        for block in ("t_star", "t_star_ratio"):
            assert set(a[block]) == set(keys)
            assert all({"value", "ci_low", "ci_high"} <= set(v) for v in a[block].values())
    # the gap at a budget is seeds_and_text over the seeds' relative block gaps
    e = by[("gpt2", "distill")]["budgets"][2]
    rel = [ea.relative_blocks(r, "in_domain") for r in records
           if (r["family"], r["arm"], r["budget"], r.get("sets") is not None) == ("gpt2", "distill", 100, True)]
    assert e["gap_rel"]["value"] == pytest.approx(seeds_and_text(np.stack(rel))["mean"])
    # T*: the baseline's crossing inside the budgets, its ratio to itself not computed; distill's ratio covers
    # the truth 0.5 (this seed); ramp's crossing lies beyond the budgets: a lower bound, never a value
    t = by[("gpt2", base)]["t_star"]["0.01"]
    assert t["ci_low"] < 140 * 4096 < t["ci_high"] and by[("gpt2", base)]["t_star_ratio"]["0.01"]["value"] is None
    r = by[("gpt2", "distill")]["t_star_ratio"]["0.01"]
    assert r["ci_low"] <= 0.5 <= r["ci_high"]
    r = by[("gpt2", "ramp")]["t_star_ratio"]["0.01"]
    assert r["value"] is None and r["ci_low"] > 1 and r["ci_high"] is None
    assert by[("gpt2", "ramp")]["t_star"]["0.01"]["censored"] == "above"
    assert "more tokens" in res["verdict"]["gpt2/ramp"]
    # one budget (llama): no curve, the verdict compares the gap with the baseline's at that budget
    assert all(v["value"] is None for v in by[("llama", "distill")]["t_star"].values())
    assert "lower gap than the baseline at 100 steps" in res["verdict"]["llama/distill"]
    assert "higher gap than the baseline at 100 steps" in res["verdict"]["llama/ramp"]
    # the noise measured in the records is the simulated study's (what the coverage test assumes can be checked)
    st, noise = StudyStructure(), res["measured_noise"]
    assert noise["block_cv"] == pytest.approx(st.block_cv, rel=0.15) and noise["shared"] == pytest.approx(
        st.shared, abs=0.1) and noise["seed_cv"] == pytest.approx(st.seed_cv, rel=0.5)


def test_an_arm_with_a_clear_advantage_meets_the_goal(tmp_path):
    st = replace(StudyStructure(), seed_cv=0.02, block_cv=0.2)
    base = PROTOCOL["baseline"]
    res = ea.analyse(synthetic_records({base: 180 * 4096, "compressed": 45 * 4096}, st, families=("gpt2",)),
                     PROTOCOL, n_draws=1000)
    arm = next(a for a in res["arms"] if a["name"] == "compressed")
    assert all(r["ci_high"] <= 0.5 for r in arm["t_star_ratio"].values())
    assert res["verdict"]["gpt2/compressed"].count("meets the goal") == len(PROTOCOL["thresholds"])
    # its gap at equal tokens: (1/4)^1.1 of the baseline's, half the gap established at every budget
    assert "half the gap at equal tokens at 25, 50, 100, 200 steps" in res["verdict"]["gpt2/compressed"]
    assert res["goal_met_by"]["gpt2"] == ["compressed"]


def test_partial_records_give_values_without_intervals_and_no_t_star_before_every_budget():
    base = PROTOCOL["baseline"]
    records = [r for r in synthetic_records({base: 140 * 4096, "distill": 70 * 4096}, StudyStructure(),
                                            families=("gpt2",)) if r["seed"] == 1]
    res = ea.analyse(records, PROTOCOL, n_draws=100)
    arm = next(a for a in res["arms"] if a["name"] == "distill")
    assert arm["budgets"][0]["gap_rel"]["ci_low"] is None  # one seed: seeds_and_text gives no interval
    assert arm["t_star"]["0.01"]["value"] is not None and arm["t_star_ratio"]["0.01"]["value"] is not None
    assert res["verdict"]["gpt2/distill"].count("not established (one seed") == len(PROTOCOL["thresholds"])
    few = ea.analyse([r for r in records if r["budget"] == 25], PROTOCOL, n_draws=100)
    arm = next(a for a in few["arms"] if a["name"] == "distill")
    assert arm["t_star"]["0.01"]["value"] is None and "every budget" in arm["t_star_note"]
    assert ea.analyse([], PROTOCOL)["arms"] == []
    kept_a_norm = [{**r, "all_removed": False} if r["arm"] == "distill" else r for r in records]
    with pytest.raises(RecordError, match="not every norm was removed"):
        ea.analyse(kept_a_norm, PROTOCOL)


# -- the depth-and-width part (lnfree.sweeps.efficient_depth) -------------------------------------------------------
def _depth_records(pretrained: str, c: float, budgets, seeds, schedule="scaled", lr=1.5e-4, noise=None) -> list[dict]:
    """A vanilla control at CE 4 and a run whose relative gap is c * steps^-0.5 (times 1 + noise[seed])."""
    out = []
    for s in seeds:
        for b in budgets:
            gap = c * b ** -0.5 * (1 + (noise or {}).get(s, 0.0))
            base = {"pretrained": pretrained, "size": pretrained.split("_s")[0], "steps": b, "tokens": 1024 * b,
                    "seed": s, "lr": lr}
            out.append({**base, "schedule": "none", "val_ce": 4.0})
            out.append({**base, "schedule": schedule, "val_ce": 4.0 * (1 + gap)})
    return out


def test_depth_part_reads_t_star_ratios_off_the_grid_records():
    from lnfree.sweeps import efficient_depth as ed

    protocol = {"arm": "distill", "overrides": ["schedule.distill.weight=1.0"], "sizes": ["builtin_l3w96"],
                "budgets": [64, 128, 256, 512], "seeds": [1]}
    grid = _depth_records("l3w96_s1", 0.3, [8, 64, 128, 256, 512, 1024], [1, 2, 3], noise={2: 0.05, 3: -0.05})
    arm = [r for r in _depth_records("l3w96_s1", 0.15, protocol["budgets"], [1]) if r["schedule"] == "scaled"]
    res = ed.analyse(arm, grid, protocol)
    (m,) = res["models"]
    assert [e["steps"] for e in m["budgets"]] == protocol["budgets"]
    assert m["budgets"][0]["gap_rel"] == pytest.approx(0.15 / 8) and m["budgets"][0]["baseline_gap_rel"] == \
        pytest.approx(0.3 / 8)
    t1 = m["t_star"]["0.01"]  # gap = c t^-0.5: half the gap is a quarter of the tokens, exact under interpolation
    assert t1["baseline"]["value"] == pytest.approx(1024 * (0.3 / 0.01) ** 2)
    assert t1["arm"]["value"] == pytest.approx(1024 * (0.15 / 0.01) ** 2)
    assert t1["ratio"]["value"] == pytest.approx(0.25)
    assert t1["baseline_seeds"] == 3 and t1["baseline_seed_sd_log"] > 0
    assert t1["verdict"].startswith("meets the goal")  # 0.25, far inside half
    assert ed.seed_band_verdict({"value": 0.6, "low": 0.6, "high": 0.6}, 0.05).startswith("fewer tokens")
    t2 = m["t_star"]["0.02"]  # the arm is below 2% from its first budget on: a bound, and the ratio's upper end
    assert t2["arm"]["value"] is None and t2["arm"]["censored"] == "below" and t2["arm"]["high"] == 64 * 1024
    assert t2["ratio"]["value"] is None and t2["ratio"]["low"] is None
    assert t2["ratio"]["high"] == pytest.approx(64 * 1024 / t2["baseline"]["value"])
    # an arm no better than the baseline: within the seed band, not established
    same = [r for r in _depth_records("l3w96_s1", 0.3, protocol["budgets"], [1]) if r["schedule"] == "scaled"]
    assert ed.analyse(same, grid, protocol)["models"][0]["t_star"]["0.01"]["verdict"].startswith("not established")
    md = ed.markdown(res)
    assert "l3w96_s1" in md and "0.25" in md


def test_depth_part_jobs_skip_recorded_runs_and_go_replicate_by_replicate():
    from lnfree.sweeps import efficient_depth as ed

    protocol = {"sizes": ["builtin_l3w96", "builtin_l4w128"], "budgets": [64, 128], "seeds": [1]}
    lrs = {m: {"lr": 1.5e-4} for m in protocol["sizes"]}
    pairs = {"builtin_l3w96": [1, 2], "builtin_l4w128": [2, 3]}
    done = [{"pretrained": "l3w96_s1", "steps": 64, "schedule": "scaled", "seed": 1, "lr": 1.5e-4}]
    jobs = ed.jobs(protocol, done, lrs, pairs)
    assert [(j[1], j[2], j[0]) for j in jobs] == [
        ("builtin_l3w96", 1, 128), ("builtin_l4w128", 2, 64), ("builtin_l4w128", 2, 128),
        ("builtin_l3w96", 2, 64), ("builtin_l3w96", 2, 128), ("builtin_l4w128", 3, 64), ("builtin_l4w128", 3, 128)]
    assert all(j[3] == "scaled" and j[5] == [1] for j in jobs)
