"""Paired statistics and the data-scaling fit, on inputs with known answers."""

import numpy as np
import pytest
from scipy import stats as sps

from lnfree.analysis.stats import over_seeds, paired_gap, scaling_fit, t_star


def test_paired_gap_on_known_inputs():
    rng = np.random.default_rng(0)
    base = rng.gamma(2.0, 2.0, size=(200, 31))  # chunk-to-chunk variation much larger than the gap
    shifted = base + 0.01
    r = paired_gap(shifted, base)
    assert r["gap"] == pytest.approx(0.01) and r["ci95"] == pytest.approx([0.01, 0.01])  # paired: no noise
    assert r["relative_gap"] == pytest.approx(0.01 / base.mean())
    noisy = base + 0.01 + rng.normal(0, 0.05, size=base.shape)
    r = paired_gap(noisy, base, n_boot=1000)
    assert r["ci95"][0] < 0.01 < r["ci95"][1] and r["ci95"][1] - r["ci95"][0] < 0.01
    # the unpaired spread of the means is far wider than the paired interval
    assert base.mean(1).std() / np.sqrt(200) > 5 * (r["ci95"][1] - r["ci95"][0]) / 4
    with pytest.raises(ValueError, match="same tokens"):
        paired_gap(base[:10], base)


def test_over_seeds_uses_the_t_quantile():
    r = over_seeds([1.0, 2.0, 3.0])
    half = sps.t.ppf(0.975, 2) * 1.0 / np.sqrt(3)
    assert r["mean"] == 2.0 and r["ci95"] == pytest.approx([2 - half, 2 + half])
    assert "ci95" not in over_seeds([1.0])


def test_t_star_reads_the_crossing_of_a_power_law():
    budgets = [1e4, 2e4, 4e4, 8e4]
    gaps = [0.01 * (b / 3e4) ** -1.5 for b in budgets]
    assert t_star(budgets, gaps, 0.01) == pytest.approx(3e4, rel=1e-6)
    assert t_star(budgets, [0.01, 0.01, 0.02, 0.03], 0.01) is None  # rising: no crossing


def test_scaling_fit_recovers_a_known_exponent_with_a_covering_ci():
    rng = np.random.default_rng(1)
    b_true, threshold, seeds = 0.4, 0.01, 5
    budgets = [2 ** (k / 2) * 1e4 for k in range(12)]
    sizes = {}
    for i, n in enumerate([5e4, 2e5, 8e5, 3.2e6]):
        t_true = 1e5 * (n / 1e5) ** b_true
        gaps = [[threshold * (b / t_true) ** -1.2 * np.exp(rng.normal(0, 0.15)) for _ in range(seeds)]
                for b in budgets]
        sizes[f"s{i}"] = {"n": n, "budgets": budgets, "gaps": gaps}
    res = scaling_fit(sizes, threshold, n_boot=400)
    e = res["exponent"]
    assert e["ci_low"] < b_true < e["ci_high"] and abs(e["value"] - b_true) < 0.1
    assert e["ci_high"] - e["ci_low"] < 0.4  # informative, not just wide
    for s, n in zip(res["sizes"], [5e4, 2e5, 8e5, 3.2e6]):
        t_true = 1e5 * (n / 1e5) ** b_true
        assert s["t_star"]["ci_low"] < t_true < s["t_star"]["ci_high"]
