import json
import math

import pytest

from lnfree.analysis.scaling import analyse, power_law, threshold_budget


def test_threshold_budget_interpolates_in_log_budget():
    tokens, gap = [100, 200, 400, 800], [0.05, 0.03, 0.005, 0.002]
    t = threshold_budget(tokens, gap, 0.01)
    # crossing between 200 (3%) and 400 (0.5%): 0.8 of the way in log space
    assert t == pytest.approx(math.exp(math.log(200) + 0.8 * math.log(2)))
    assert threshold_budget(tokens, [0.05, 0.03, 0.02, 0.02], 0.01) is None
    assert threshold_budget(tokens, [0.005, 0.02, 0.005, 0.002], 0.01) == pytest.approx(
        math.exp(math.log(200) + (0.02 - 0.01) / 0.015 * math.log(2)))  # must stay within the gap after it


def test_power_law_recovers_a_known_exponent():
    n = [1e5, 4e5, 1.6e6, 6.4e6]
    fit = power_law(n, [3.0 * x**0.37 for x in n])
    assert fit["exponent"] == pytest.approx(0.37) and fit["prefactor"] == pytest.approx(3.0)
    assert fit["stderr"] == pytest.approx(0.0, abs=1e-9)
    noisy = power_law(n, [3.0 * x**0.5 * f for x, f in zip(n, (1.1, 0.9, 1.05, 0.95))])
    assert noisy["ci95"][0] < noisy["exponent"] < noisy["ci95"][1]


def test_analyse_reads_sweep_summaries(tmp_path):
    for i, (name, emb, steps, sched, ce) in enumerate([
        ("a", 64, 10, "none", 4.0), ("a", 64, 10, "scaled", 4.2), ("a", 64, 20, "none", 3.9),
        ("a", 64, 20, "scaled", 3.91), ("b", 128, 10, "none", 3.5), ("b", 128, 10, "scaled", 3.8),
        ("b", 128, 20, "none", 3.4), ("b", 128, 20, "scaled", 3.6), ("b", 128, 40, "none", 3.3),
        ("b", 128, 40, "scaled", 3.31)]):
        d = tmp_path / str(i)
        d.mkdir()
        shape = {"n_positions": 16, "n_embd": emb, "vocab_size": 100}
        d.joinpath("summary.json").write_text(json.dumps({
            "config": {"model": {"name": name, "shape": shape}, "schedule": {"name": sched, "remove": sched != "none"}},
            "n_params": 10 * emb * emb + 116 * emb, "n_params_non_embedding": 10 * emb * emb,
            "tokens_seen": steps * 100, "val_ce": ce,
            "all_removed": sched != "none"}))
    res = analyse(tmp_path, 0.01, tmp_path / "out")
    assert res["models"]["a"]["gap"] == pytest.approx([0.05, 0.01 / 3.9])
    assert res["models"]["b"]["tokens"] == [1000, 2000, 4000]
    assert res["fit"]["points"] == 2 and (tmp_path / "out" / "scaling.png").exists()
