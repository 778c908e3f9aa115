"""The censored fit of T* ~ N^b (lnfree/analysis/censored.py): crossing intervals, the likelihood (against a brute-force
integral and against lifelines' interval-censored log-normal AFT fit where the two models coincide), the profile
intervals and the decision rule; and the seed-noise test of the size ordering (scaling.size_ordering)."""

import math

import numpy as np
import pytest
from scipy.special import ndtr

from lnfree.analysis.censored import PAPER_B, VERDICT_TAU_MAX, crossing_intervals, fit, loglik, verdict
from lnfree.analysis.scaling import seed_mean_curves, size_ordering

N = np.array([1.3e4, 1.0e5, 3.4e5, 7.9e5])
GRID = 32768.0 * 2.0 ** np.arange(7)


def test_crossing_intervals_bracket_the_seed_mean_crossing_and_censor_at_the_edges():
    gaps = np.array([[0.05, 0.03, 0.021, 0.019, 0.01, 0.005, 0.004],   # crosses 2% between budgets 3 and 4
                     [0.05, 0.04, 0.035, 0.03, 0.029, 0.025, 0.021],   # never: right-censored at the last budget
                     [0.015, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01]])     # already below at the first: left-censored
    seeds = np.stack([gaps * 0.9, gaps * 1.1], -1)  # [pretrained, budget, seed]: the seed mean is `gaps`
    iv = crossing_intervals(GRID, seeds, 0.02)
    assert iv[0].tolist() == [GRID[2], GRID[3]]
    assert iv[1].tolist() == [GRID[-1], math.inf]
    assert iv[2].tolist() == [0.0, GRID[0]]


def test_likelihood_integrates_the_lack_of_fit_correctly():
    """The size's likelihood at tau > 0 against a dense Riemann sum over u."""
    x = np.array([0.0])
    lo, hi = np.log([[[5e5, 1e6]]]), np.log([[[1e6, np.inf]]])
    for tau, sigma, a in ((0.25, 0.2, 13.5), (1.0, 0.05, 12.0), (1.5, 0.2, 15.0)):
        u = np.linspace(-10 * tau, 10 * tau, 200001)
        m = a + u
        dens = ((ndtr((hi[0, 0, 0] - m) / sigma) - ndtr((lo[0, 0, 0] - m) / sigma))
                * (1 - ndtr((lo[0, 0, 1] - m) / sigma)) * np.exp(-u ** 2 / (2 * tau ** 2))
                / (tau * math.sqrt(2 * math.pi)))
        ref = math.log(dens.sum() * (u[1] - u[0]))
        assert float(loglik(np.array([a]), np.array([0.0]), np.array([sigma]), tau, x, lo, hi)[0]) == pytest.approx(
            ref, abs=1e-3)


def _interval_data(rng, b=0.4, sd=0.6, per_size=3):
    y = (math.log(3e5) + b * (np.log(N) - np.log(N).mean()))[:, None] + rng.normal(0, sd, (len(N), per_size))
    grid = 2.0 ** np.arange(14, 24)
    idx = np.searchsorted(grid, np.exp(y))
    lo = np.where(idx == 0, 0.0, grid[np.maximum(idx - 1, 0)])
    hi = np.where(idx >= len(grid), np.inf, grid[np.minimum(idx, len(grid) - 1)])
    return np.stack([lo, hi], -1)


def test_without_lack_of_fit_the_fit_is_lifelines_interval_censored_lognormal_aft():
    """At tau = 0 the model is a log-normal AFT on log N with interval- and right-censored times: the same
    log-likelihood at lifelines' estimates, and the same b (up to the sigma grid the profile uses)."""
    lifelines = pytest.importorskip("lifelines")
    pd = pytest.importorskip("pandas")
    bounds = _interval_data(np.random.default_rng(0))
    assert np.isinf(bounds[..., 1]).any() or (bounds[..., 0] > 0).all()
    x = np.log(N) - np.log(N).mean()
    unit = 1e5  # lifelines starts from log T = 0: times in units near the data's
    df = pd.DataFrame({"lo": bounds[..., 0].ravel() / unit, "hi": bounds[..., 1].ravel() / unit,
                       "x": np.repeat(x, bounds.shape[1])})
    aft = lifelines.LogNormalAFTFitter().fit_interval_censoring(df, "lo", "hi")
    a = aft.params_[("mu_", "Intercept")] + math.log(unit)
    b = aft.params_[("mu_", "x")]
    sigma = math.exp(aft.params_[("sigma_", "Intercept")])
    with np.errstate(divide="ignore"):
        lo, hi = np.log(bounds[..., 0])[None], np.log(bounds[..., 1])[None]
    ours = float(loglik(np.array([a]), np.array([b]), np.array([sigma]), 0.0, x, lo, hi)[0])
    assert ours == pytest.approx(aft.log_likelihood_, abs=1e-6)
    f = fit(N, bounds, taus=(0.0,))["per_tau"][0.0]
    assert float(f["value"]) == pytest.approx(b, abs=0.02)
    assert float(f["loglik"]) <= aft.log_likelihood_ + 1e-6  # a profile over a grid of sigma never beats the MLE
    lo95, hi95 = aft.confidence_intervals_.loc[("mu_", "x")]
    assert float(f["ci_low"]) == pytest.approx(lo95, abs=0.05) and float(f["ci_high"]) == pytest.approx(hi95, abs=0.05)


def test_profile_intervals_widen_with_the_lack_of_fit_and_open_when_everything_is_censored():
    bounds = _interval_data(np.random.default_rng(1), sd=0.3, per_size=2)
    f = fit(N, bounds)
    widths = [float(f["per_tau"][t]["ci_high"] - f["per_tau"][t]["ci_low"]) for t in (0.0, 0.5, 1.0)]
    assert widths[0] < widths[1] < widths[2]
    inside = [t for t in f["per_tau"] if f["tau_ci"][0] <= t <= f["tau_ci"][1]]
    verdict_taus = sorted(set(inside) | {t for t in f["per_tau"] if t <= VERDICT_TAU_MAX})
    for name, taus in (("profile_envelope", inside), ("envelope", verdict_taus)):
        env = f[name]
        assert float(env["ci_low"]) == pytest.approx(min(float(f["per_tau"][t]["ci_low"]) for t in taus))
        assert float(env["ci_high"]) == pytest.approx(max(float(f["per_tau"][t]["ci_high"]) for t in taus))
    censored = np.tile([GRID[-1], np.inf], (4, 2, 1))  # nobody crosses: nothing is known about b
    e = fit(N, censored)["envelope"]
    assert np.isnan(e["ci_low"]) and np.isnan(e["ci_high"])


def test_decision_rule():
    assert verdict(-0.8, -0.2) == f"sublinear; does not grow; the paper's {PAPER_B} excluded"
    assert verdict(-0.5, 0.6) == "sublinear"
    assert verdict(0.5, 2.0) == f"the paper's {PAPER_B} excluded"
    assert verdict(None, 1.3) == "not established"
    assert verdict(float("nan"), 0.9) == "sublinear"


def _table(means_small, means_large, sd, rng):
    """Two sizes, two pretrained models each, three seeds: gap_table's shape at one budget."""
    def size(means, n):
        return {"n": n, "budgets": [1000], "gaps_by_pretrained": [[list(m + rng.normal(0, sd, 3))] for m in means]}
    return {"small": size(means_small, 1), "large": size(means_large, 2)}


def test_size_ordering_needs_every_pair_separated_from_seed_noise():
    rng = np.random.default_rng(0)
    far = size_ordering(_table([0.10, 0.11], [0.05, 0.06], 0.002, rng))["budgets"]["1000"]["pairs"][0]
    assert far["order"] == "ordered" and far["welch_p_max"] < 0.05
    # the seed means are ordered, but by less than the seeds' noise: not separated
    near = size_ordering(_table([0.0860, 0.09], [0.0848, 0.08], 0.004, np.random.default_rng(3)))
    pair = near["budgets"]["1000"]["pairs"][0]
    assert pair["order"] == "overlap" and pair["welch_p_max"] > 0.05
    rev = size_ordering(_table([0.05, 0.06], [0.10, 0.11], 0.002, rng))["budgets"]["1000"]["pairs"][0]
    assert rev["order"] == "reversed"


def test_seed_mean_curves_keep_budgets_measured_with_fewer_seeds():
    runs = []
    for p in ("a_s1", "a_s2"):
        for tokens, seeds in ((100, (1, 2, 3)), (200, (1,))):
            for s in seeds:
                for removes, ce in ((False, 4.0), (True, 4.0 * (1 + 0.01 * s))):
                    runs.append({"model": p, "pretrained": p, "size": "a", "seed": s, "tokens": tokens,
                                 "removes": removes, "val_ce": ce, "n_nonemb": 10, "schedule": "scaled"})
    c = seed_mean_curves(runs, "scaled")["a"]
    assert c["budgets"] == [100, 200] and c["seeds"] == [[1, 2, 3], [1]]
    assert c["gaps_by_pretrained"][0] == pytest.approx([0.02, 0.01])


def test_analysis_reports_the_fixed_grid_and_the_grid_with_stage_2(tmp_path):
    """scaling.json keeps the fixed grid's result and adds the censored fit on it and, from the records beyond
    --max-steps (stage 2, here seed 1 only), on every measured budget, with `stage` saying which budgets each size
    has; the coverage is quoted only for the design the record simulated."""
    import json

    from conftest import depth_records

    from lnfree.analysis.scaling import analyse

    rec = [r for r in depth_records(lambda i, rep, st: 0.042 * (st / 8) ** -0.5 * (1.0, 0.85, 0.75)[i],
                                    lrs=(1.5e-4,), steps=(8, 16, 32, 64, 128))
           if r["steps"] <= 64 or r["seed"] == 1]
    f = tmp_path / "runs.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rec))
    res = analyse(f, tmp_path / "out", thresholds=(0.01,), absolute=None, n_boot=0, n_sim=0, schedule="scaled",
                  max_steps=64)
    assert set(res["exponent"]) == set(res["censored"]) == set(res["censored_extended"]) == {"0.01"}
    c = res["censored"]["0.01"]
    assert {"value", "ci_low", "ci_high", "coverage", "lack_of_fit", "sizes_censored"} <= set(c)
    assert set(c["lack_of_fit"]) == {"0", "0.25", "0.5", "1"} and c["coverage"] is None
    assert c["sizes_censored"] == ["l1w32", "l2w64", "l3w96"]  # nobody reaches 1% by 64 steps
    assert res["censored_extended"]["0.01"]["intervals"]["l3w96"][0] == [4096 * 64, 4096 * 128]
    stage = res["stage"]["l2w64"]
    assert stage["fixed_grid"] == [4096 * s for s in (8, 16, 32, 64)] and stage["stage2"] == [4096 * 128]
    assert stage["seeds"][str(4096 * 128)] == [1] and stage["seeds"][str(4096 * 8)] == [1, 2, 3]
    assert "fixed grid + stage 2" in (tmp_path / "out" / "scaling.md").read_text()


def test_the_papers_counting_from_its_published_schedules():
    """The four published GPT-2 runs (conf/experiment/gpt2_*_paper.yaml): total tokens and tokens until the last
    removal event; the total grows as N^0.37 in total parameters (PAPER_B, the reference line), the last removal as
    about N^0.8."""
    from lnfree.analysis.paper_counting import exponents, schedules

    rows = schedules()
    small, xl = rows[0], rows[-1]
    assert (small["steps"], small["tokens_per_step"], small["last_removal_step"]) == (300, 2 ** 19, 104)
    assert small["total_tokens"] == 300 * 2 ** 19 and xl["last_removal_step"] == 722
    assert small["params"] == pytest.approx(124.4e6, rel=1e-3) and xl["params"] == pytest.approx(1557.6e6, rel=1e-3)
    k = exponents(rows)
    assert k["total_tokens"] == pytest.approx(PAPER_B, abs=0.01)
    assert 0.75 < k["tokens_until_last_removal"] < 0.85


def test_stage_2_design_measures_each_sizes_own_budgets_with_its_seeds():
    from dataclasses import replace

    from lnfree.analysis.censored import coverage
    from lnfree.analysis.simulate import SweepStructure, grid_gaps

    grid = replace(SweepStructure(), sizes_n=(1e4, 1e5, 1e6), budgets=(1000, 2000, 4000), n_seeds=3)
    st2 = replace(grid, stage2_budgets=((8000, 16000), (8000,), ()), stage2_seeds=1)
    assert st2.size_budgets(0) == (1000, 2000, 4000, 8000, 16000) and st2.size_budgets(2) == grid.budgets
    assert st2.all_budgets() == (1000, 2000, 4000, 8000, 16000)
    g = grid_gaps(np.random.default_rng(0), st2, (0.01,), 5)  # [sweep, size, pretrained, budget, seed]
    assert g.shape == (5, 3, 2, 5, 3)
    assert np.isfinite(g[:, :, :, :3]).all()  # the fixed grid: every size, every seed
    assert np.isfinite(g[:, 0, :, 3:, 0]).all() and np.isnan(g[:, 0, :, 3:, 1:]).all()  # stage 2: seed 1 only
    assert np.isfinite(g[:, 1, :, 3, 0]).all() and np.isnan(g[:, 1, :, 4]).all() and np.isnan(g[:, 2, :, 3:]).all()
    # without stage 2 the draws are the fixed grid's, number for number (committed coverage records stay valid)
    np.testing.assert_array_equal(grid_gaps(np.random.default_rng(0), grid, (0.01,), 5),
                                  grid_gaps(np.random.default_rng(0), replace(grid, stage2_budgets=((), (), ())),
                                            (0.01,), 5))
    # a seed missing at a budget is left out of that budget's seed mean, not counted as zero
    gaps = np.array([[[0.03, np.nan, np.nan], [0.02, 0.004, np.nan]]])  # [pretrained, budget, seed]
    assert crossing_intervals([1000, 2000], gaps, 0.015).tolist() == [[1000.0, 2000.0]]  # as zeros: (0, 1000]
    assert crossing_intervals([1000, 2000], gaps, 0.01).tolist() == [[2000.0, np.inf]]
    # stage 2 uncensors: with a truth crossing just beyond the grid, stage 2 brackets more crossings
    truth = replace(st2, t0=5000.0, b=0.0, lack_of_fit_sd=0.0)
    with_s2 = coverage(truth, (0.01,), 20, seed=1)["0.01"]["right_censored"]
    without = coverage(replace(truth, stage2_budgets=()), (0.01,), 20, seed=1)["0.01"]["right_censored"]
    assert with_s2 < without
