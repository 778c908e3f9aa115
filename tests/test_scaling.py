"""The data-scaling analysis reads a sweep's summaries (paired by seed) and writes scaling.json."""

import json

import numpy as np
import pytest

from lnfree.analysis.scaling import analyse


def write_run(d, model, n, seed, removes, tokens, ce):
    d.mkdir(parents=True)
    d.joinpath("summary.json").write_text(json.dumps({
        "config": {"model": {"name": model}, "seed": seed,
                   "schedule": {"remove": removes, "fit_fraction": 0.4 if removes else None}},
        "n_params_non_embedding": n, "tokens_seen": tokens, "val_ce": ce, "all_removed": removes}))


@pytest.mark.slow
def test_analyse_pairs_by_seed_and_writes_the_result_file(tmp_path):
    rng = np.random.default_rng(0)
    i = 0
    # d crosses far beyond its largest budget: its T* is an extrapolation and stays out of the exponent
    for model, n, t_true in (("a", 10_000, 4e4), ("b", 40_000, 8e4), ("c", 160_000, 1.6e5), ("d", 640_000, 1e7)):
        for tokens in (10_000, 20_000, 40_000, 80_000, 160_000, 320_000):
            for seed in (1, 2, 3):
                van = 4.0 + rng.normal(0, 0.01)
                gap = 0.01 * (tokens / t_true) ** -1.0 * np.exp(rng.normal(0, 0.1))
                write_run(tmp_path / "sweep" / str(i), model, n, seed, False, tokens, van)
                write_run(tmp_path / "sweep" / str(i + 1), model, n, seed, True, tokens, van * (1 + gap))
                i += 2
    write_run(tmp_path / "sweep" / "unpaired", "a", 10_000, 9, True, 10_000, 5.0)  # seed 9 has no control
    res = analyse(tmp_path / "sweep", 0.01, tmp_path / "out", n_boot=300)
    saved = json.loads((tmp_path / "out" / "scaling.json").read_text())
    assert saved["seeds"] == [1, 2, 3]
    assert [s["non_embedding_params"] for s in saved["sizes"]] == [10_000, 40_000, 160_000, 640_000]
    assert saved["sizes"][3]["t_star"]["extrapolated"] and saved["exponent"]["sizes"] == ["a", "b", "c"]
    assert set(saved["exponent"]) >= {"value", "ci_low", "ci_high"}
    assert saved["exponent"]["ci_low"] < 0.5 < saved["exponent"]["ci_high"]  # T* doubles per 4x in N: b = 0.5
    a = saved["sizes"][0]
    assert a["t_star"]["value"] == pytest.approx(4e4, rel=0.25)
    assert a["removal_phase_tokens"]["value"] == pytest.approx(0.4 * a["t_star"]["value"])
    assert set(a["gap_by_budget"]) == {str(t) for t in (10_000, 20_000, 40_000, 80_000, 160_000, 320_000)}
    # the direct reading: the smallest budget whose seed-mean gap is within 1% (true crossing 40k; noise 10%)
    assert a["first_budget_within"]["mean"] in (40_000, 80_000)
    assert a["first_budget_within"]["ci_upper"] >= a["first_budget_within"]["mean"]
    assert (tmp_path / "out" / "scaling.png").stat().st_size > 1000
    md = (tmp_path / "out" / "scaling.md").read_text()
    assert "| a | 0.010M | 4" in md and md.count("\n| ") >= 8  # T* row per size, gap row per size
    assert res["exponent"] == saved["exponent"]


def test_sources_merge_records_and_sweep_dirs_and_refuse_conflicts(tmp_path):
    """A sweep finished in two sittings: the committed runs.jsonl plus a new sweep dir make one table; the
    same run in both is counted once; the same run with two different results is an error."""
    from lnfree.analysis.scaling import gap_table, load_runs, load_sources

    write_run(tmp_path / "first" / "0", "a", 10, 1, False, 100, 4.0)
    write_run(tmp_path / "first" / "1", "a", 10, 1, True, 100, 4.4)
    records = tmp_path / "runs.jsonl"
    records.write_text("".join(json.dumps(r) + "\n" for r in load_runs(tmp_path / "first")))
    write_run(tmp_path / "second" / "0", "a", 10, 1, False, 200, 4.0)
    write_run(tmp_path / "second" / "1", "a", 10, 1, True, 200, 4.2)
    runs = load_sources([records, tmp_path / "first", tmp_path / "second"])
    assert len(runs) == 4
    t = gap_table(runs)["a"]
    assert t["budgets"] == [100, 200]
    assert t["gaps"] == [[pytest.approx(0.1)], [pytest.approx(0.05)]]
    write_run(tmp_path / "third" / "0", "a", 10, 1, True, 200, 4.3)  # same run, another result
    with pytest.raises(ValueError, match="two different results"):
        load_sources([tmp_path / "second", tmp_path / "third"])


def test_sweep_runner_finds_missing_jobs_and_stops_a_size_once_within(tmp_path):
    """experiments/data_scaling/run_missing.py: the grid comes from the experiment config; a job is missing per
    seed; --until-within skips a size's budgets beyond one whose seed-mean gap is within the threshold."""
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("run_missing", ROOT / "experiments/data_scaling/run_missing.py")
    rm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rm)
    models, budgets, seeds, schedules, step_tokens = rm.grid()
    assert step_tokens == 16 * 256 and seeds == [1, 2, 3] and set(schedules) == {"none", "scaled"}
    m, b0, b1 = models[0], budgets[0], budgets[1]
    rec = []
    for s in seeds:  # budget b0: gap 0.5% for every seed, both arms; b1: only seed 1's vanilla run
        rec += [{"model": m, "removes": False, "seed": s, "tokens": b0 * step_tokens, "val_ce": 4.0, "n_nonemb": 10,
                 "all_removed": False, "fit_fraction": None},
                {"model": m, "removes": True, "seed": s, "tokens": b0 * step_tokens, "val_ce": 4.02, "n_nonemb": 10,
                 "all_removed": True, "fit_fraction": 0.4}]
    rec.append({**rec[0], "tokens": b1 * step_tokens})
    f = tmp_path / "runs.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rec))
    jobs = {(b, mm, arm): tuple(ss) for b, mm, arm, ss in rm.missing_jobs([f])}
    assert (b0, m, "none") not in jobs and (b0, m, "scaled") not in jobs
    assert jobs[(b1, m, "none")] == (2, 3) and jobs[(b1, m, "scaled")] == (1, 2, 3)
    assert rm.within([f], m, b1, 0.01, step_tokens) == b0  # 0.5% at b0: larger budgets are skipped
    assert rm.within([f], m, b1, 0.001, step_tokens) is None
