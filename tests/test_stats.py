"""Paired statistics and the data-scaling fit, on inputs with known answers."""

import numpy as np
import pytest
from scipy import stats as sps

from lnfree.analysis.stats import (
    exponent,
    over_seeds,
    paired_gap,
    paired_over_seeds,
    power_law,
    seeds_and_text,
    size_t_star,
    t_star,
    t_star_interval,
    verdicts,
)


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


def test_seeds_and_text_adds_the_shared_text_error_to_the_seed_error():
    rng = np.random.default_rng(2)
    shared = rng.normal(0, 1.0, 50)
    x = np.stack([0.5 + k * 0.1 + shared + rng.normal(0, 0.3, 50) for k in range(3)])  # [seed, chunk]
    r = seeds_and_text(x)
    m = x.mean(1)
    se_seeds = m.std(ddof=1) / np.sqrt(3)
    c = x - x.mean(1, keepdims=True)
    cov = np.mean([(c[i] * c[j]).sum() / 49 for i, j in ((0, 1), (0, 2), (1, 2))])
    se_text = np.sqrt(cov / 50)
    half = np.hypot(sps.t.ppf(0.975, 2) * se_seeds, sps.t.ppf(0.975, 49) * se_text)
    assert r["mean"] == pytest.approx(m.mean()) and r["ci95"] == pytest.approx([m.mean() - half, m.mean() + half])
    assert r["se_text"] == pytest.approx(se_text) and se_text > 0.1  # the shared chunk effects (sd 1) are seen
    # wider than the t interval over the three seed values, which cannot see the shared text
    assert r["ci95"][1] - r["ci95"][0] > np.diff(over_seeds(m)["ci95"])[0]
    # no correlation between seeds: no text term
    assert seeds_and_text(x - shared)["se_text"] < 0.05
    assert "ci95" not in seeds_and_text(x[:1])


def test_paired_over_seeds_pairs_every_seed_and_pools_them():
    rng = np.random.default_rng(3)
    b = [rng.gamma(2.0, 2.0, size=(40, 9)) for _ in range(3)]
    a = [x + 0.1 * (k + 1) + rng.normal(0, 0.2, x.shape) for k, x in enumerate(b)]
    r = paired_over_seeds(a, b, n_boot=200)
    assert [p["gap"] for p in r["per_seed"]] == pytest.approx([(x - y).mean() for x, y in zip(a, b)])
    assert r["gap_over_seeds"]["mean"] == pytest.approx(np.mean([(x - y).mean() for x, y in zip(a, b)]))
    rel = [(x - y).mean() / y.mean() for x, y in zip(a, b)]
    assert r["relative_gap_over_seeds"]["values"] == pytest.approx(rel)


def test_power_law_interval_is_the_t_interval_of_the_log_log_regression():
    n = np.array([1e4, 4e4, 1.6e5, 6.4e5, 2.56e6])
    t = 1e5 * (n / 1e4) ** 0.3 * np.exp([0.1, -0.2, 0.05, 0.15, -0.1])
    r = power_law(n, t)
    lr = sps.linregress(np.log(n), np.log(t))
    half = sps.t.ppf(0.975, 3) * lr.stderr
    assert r["value"] == pytest.approx(lr.slope) and r["df"] == 3
    assert [r["ci_low"], r["ci_high"]] == pytest.approx([lr.slope - half, lr.slope + half])
    assert r["r2"] == pytest.approx(lr.rvalue ** 2)
    exact = power_law(n, 7 * n ** 0.5)
    assert exact["value"] == pytest.approx(0.5) and exact["ci_high"] - exact["ci_low"] < 1e-9 and exact["r2"] == 1
    two = power_law(n[:2], t[:2])  # a value, but no residual to make an interval from
    assert two["value"] is not None and two["ci_low"] is None
    e = exponent(list("abcde"), n, t)
    assert [x["dropped"] for x in e["leave_one_out"]] == list("abcde")
    assert e["leave_one_out"][0]["value"] == pytest.approx(power_law(n[1:], t[1:])["value"])


def test_size_t_star_is_the_geometric_mean_over_pretrained_models():
    budgets = [1e4, 2e4, 4e4, 8e4]

    def curve(t):
        return [[0.01 * (b / t) ** -1.5] * 3 for b in budgets]  # [budget][seed]

    r = size_t_star(budgets, [curve(2e4), curve(5e4)], 0.01)
    assert r["per_pretrained"] == pytest.approx([2e4, 5e4], rel=1e-6)
    assert r["value"] == pytest.approx(np.sqrt(2e4 * 5e4), rel=1e-6)
    rising = [[g] * 3 for g in (0.01, 0.01, 0.02, 0.03)]
    assert size_t_star(budgets, [curve(2e4), rising], 0.01)["value"] is None
    lo, hi = t_star_interval(budgets, [curve(2e4), curve(5e4)], 0.01, n_boot=200)
    assert lo == pytest.approx(2e4, rel=1e-3) and hi == pytest.approx(5e4, rel=1e-3)  # resamples of the 2 models


def test_verdicts_follow_the_decision_rule():
    def e(lo, hi, loo_hi):
        return {"value": (lo + hi) / 2, "ci_low": lo, "ci_high": hi, "sizes": list("abcd"),
                "leave_one_out": [{"dropped": k, "value": 0.5, "ci_low": -1, "ci_high": h}
                                  for k, h in zip("abcd", loo_hi)]}

    good = e(0.2, 0.6, [0.9, 0.8, 0.7, 0.9])
    v = verdicts({"0.01": good, "0.02": e(-0.1, 0.7, [0.9] * 4)})
    assert v["0.01"].startswith("sublinear and grows with size: b = 0.40 [0.20, 0.60]")
    assert v["0.02"].startswith("sublinear: ") and "lower bound -0.10 <= 0" in v["0.02"]
    v = verdicts({"0.01": good, "0.02": e(0.1, 0.7, [0.9, 1.5, 0.9, 0.9])})  # one leave-one-out fit fails
    assert v["0.01"].startswith("grows with size: ") and "another threshold fails" in v["0.01"]
    assert v["0.02"].startswith("grows with size: ") and "without b" in v["0.02"]
    v = verdicts({"0.01": e(-0.5, 1.2, [2.0] * 4)})
    assert v["0.01"].startswith("not established: ") and "upper bound 1.20 >= 1" in v["0.01"]
    none = {"value": None, "ci_low": None, "ci_high": None, "sizes": ["a"], "leave_one_out": []}
    assert verdicts({"0.01": none})["0.01"].startswith("not established: 1 size")


def test_paired_tables_recompute_the_paired_block_from_the_per_token_ce(tmp_path):
    """python -m lnfree.analysis.paired_tables: results.json's paired block and table.md's paired section come
    from per_token_ce.npz with the current statistics; the rest of table.md stays."""
    import json

    from lnfree.analysis.paired_tables import recompute
    from lnfree.analysis.tables import PAIRED_HEADER

    rng = np.random.default_rng(4)
    ce = {f"d/{m}": rng.gamma(2.0, 2.0, (30, 7)).astype(np.float32) for m in ("a1", "a2", "b1", "b2")}
    np.savez(tmp_path / "per_token_ce.npz", **ce)
    cfg = {"pairs": [{"name": "a_minus_b", "a": ["a1", "a2"], "b": ["b1", "b2"]}], "bootstrap": 100, "seed": 0}
    (tmp_path / "results.json").write_text(json.dumps({"results": {"d": {}}, "paired": {"d": {"old": 1}},
                                                       "config": cfg}))
    (tmp_path / "table.md").write_text("## Mean\n\nx\n\n## Paired gaps (old)\n\nold rows\n\n## All statistics\n\ny\n")
    recompute(tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())["paired"]["d"]
    want = paired_over_seeds([ce["d/a1"], ce["d/a2"]], [ce["d/b1"], ce["d/b2"]], 100, 0)
    got = saved["a_minus_b"]["gap_over_seeds"]
    assert list(saved) == ["a_minus_b"] and got["ci95"] == pytest.approx(want["gap_over_seeds"]["ci95"])
    md = (tmp_path / "table.md").read_text()
    assert PAIRED_HEADER in md and "old rows" not in md and "| d | a_minus_b |" in md
    assert md.startswith("## Mean\n\nx\n\n") and md.endswith("## All statistics\n\ny\n")
