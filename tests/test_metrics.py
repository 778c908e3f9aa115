"""The evaluation's metric functions (lnfree/analysis/metrics.py) against hand computations on made-up inputs."""

import math

import numpy as np
import pytest
import torch

from lnfree.analysis.metrics import (
    bootstrap_ci,
    chunk_mean_ci,
    ece,
    jsd,
    percentile_ci,
    resample_counts,
    summarize,
    token_stats,
)


def hand_ece(conf, correct, bins):
    """L1 expected calibration error with `bins` equal-width bins (right-closed, like torchmetrics), in float64."""
    conf, correct = np.asarray(conf, np.float64), np.asarray(correct, np.float64)
    which = np.clip(np.ceil(conf * bins) - 1, 0, bins - 1)
    return sum(abs(conf[which == b].mean() - correct[which == b].mean()) * (which == b).mean()
               for b in range(bins) if (which == b).any())


def test_token_stats_by_hand():
    torch.manual_seed(0)
    logit = torch.randn(2, 5, 7)
    logit[0, 0] = torch.tensor([0.0, 50.0, 0, 0, 0, 0, 0])  # a near-certain, correct prediction: CE ~ 1e-21
    ids = torch.randint(0, 7, (2, 5))
    ids[0, 1] = 1
    stats, logp = token_stats(logit, ids)
    p = torch.softmax(logit[:, :-1].double(), -1)
    for b in range(2):
        for t in range(4):
            target = ids[b, t + 1]
            assert stats["ce"][b, t].item() == pytest.approx(-math.log(p[b, t, target]), abs=1e-5)
            assert stats["entropy"][b, t].item() == pytest.approx(-(p[b, t] * p[b, t].log()).sum().item(), abs=1e-5)
            assert stats["correct"][b, t].item() == float(p[b, t].argmax() == target)
            assert stats["maxprob"][b, t].item() == pytest.approx(p[b, t].max().item(), abs=1e-6)
    assert stats["ce"][0, 0].item() < 1e-6 and stats["correct"][0, 0].item() == 1.0
    assert stats["ce"].shape == stats["entropy"].shape == (2, 4)
    assert torch.allclose(logp.exp(), p.float(), atol=1e-6)


def test_jsd_bounds():
    logp = torch.log_softmax(torch.randn(3, 5, 11), -1)
    assert torch.allclose(jsd(logp, logp), torch.zeros(3, 5), atol=1e-6)
    p = torch.log(torch.tensor([1.0, 1e-12])), torch.log(torch.tensor([1e-12, 1.0]))
    assert jsd(*p).item() == pytest.approx(math.log(2), abs=1e-6)  # disjoint supports: the maximum


def test_jsd_per_token_by_hand():
    """Each token's divergence from its own two distributions: no sum over the other tokens leaks in."""
    torch.manual_seed(0)
    logp, logq = torch.log_softmax(torch.randn(2, 3, 7), -1), torch.log_softmax(torch.randn(2, 3, 7), -1)
    p, q = logp.double().exp(), logq.double().exp()
    m = (p + q) / 2
    by_hand = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    assert jsd(logp, logq).shape == (2, 3)
    assert torch.allclose(jsd(logp, logq).double(), by_hand, atol=1e-6)
    assert torch.allclose(jsd(logq, logp), jsd(logp, logq), atol=1e-7)  # symmetric


def test_ece_by_hand_with_the_bins_asked_for():
    # confidence 0.9 but 50% right in one bin, confidence 0.55 and 100% right in another
    conf, correct = np.array([0.9, 0.9, 0.55, 0.55]), np.array([1.0, 0.0, 1.0, 1.0])
    assert ece(conf, correct) == pytest.approx(0.5 * 0.4 + 0.5 * 0.45)
    rng = np.random.default_rng(0)
    conf, correct = rng.uniform(0.05, 1, 500), rng.integers(0, 2, 500).astype(float)
    for bins in (10, 4):  # 10 is the default; torchmetrics' own default (15) gives another number
        assert ece(conf, correct, bins=bins) == pytest.approx(hand_ece(conf, correct, bins), abs=1e-12)
    assert ece(conf, correct) == pytest.approx(hand_ece(conf, correct, 10), abs=1e-12)
    assert abs(hand_ece(conf, correct, 10) - hand_ece(conf, correct, 15)) > 1e-4


def test_ece_over_millions_of_float32_confidences_is_exact():
    # per-token maxprob arrives as float32; summed in float32 over ~1e6 tokens a bin's mean would drift
    conf = np.full(2_000_000, 0.7, np.float32)
    correct = np.zeros(conf.size)
    correct[: conf.size // 2] = 1
    assert ece(conf, correct) == pytest.approx(float(np.float32(0.7)) - 0.5, abs=1e-9)


def test_bootstrap_ci_is_the_percentile_bootstrap_over_whole_units():
    samples = np.random.default_rng(1).normal(size=(40, 3))  # 40 units of 3 correlated values
    stat = lambda x: float(x.mean())  # noqa: E731
    lo, hi = bootstrap_ci(samples, stat=stat)
    rng = np.random.default_rng(0)  # default seed 0, 1000 resamples of whole rows, 95%
    boots = [stat(samples[rng.integers(0, 40, 40)]) for _ in range(1000)]
    assert (lo, hi) == pytest.approx((np.percentile(boots, 2.5), np.percentile(boots, 97.5)), abs=1e-12)
    assert bootstrap_ci(samples, stat=stat) == (lo, hi)  # seeded: the same interval every time
    lo90 = bootstrap_ci(samples, stat=stat, n_boot=300, seed=5, level=0.9)
    rng = np.random.default_rng(5)
    boots = [stat(samples[i]) for i in rng.integers(0, 40, (300, 40))]
    assert lo90 == pytest.approx((np.percentile(boots, 5), np.percentile(boots, 95)), abs=1e-12)
    # a unit that is the only outlier must be resampled too (draws include index 0)
    outlier = np.zeros(5)
    outlier[0] = 100.0
    assert bootstrap_ci(outlier, n_boot=200)[1] > 0


def test_bootstrap_ci_takes_the_vectorised_mean_only_for_the_mean_of_one_value_per_unit():
    """The shortcut (every resample's mean at once) is for stat=np.mean over 1-D samples only: another statistic
    of 1-D samples, or the mean of 2-D units (over all their values), is the loop's, by hand."""
    x = np.random.default_rng(3).exponential(size=30)
    idx = np.random.default_rng(0).integers(0, 30, (200, 30))
    for stat in (np.median, np.mean):
        hand = percentile_ci(np.array([stat(x[i]) for i in idx]))
        assert bootstrap_ci(x, stat=stat, n_boot=200) == pytest.approx(hand, abs=1e-12)
    units = np.random.default_rng(4).normal(size=(30, 3)) * [1.0, 5.0, 20.0]
    hand = percentile_ci(np.array([np.mean(units[i]) for i in idx]))
    assert bootstrap_ci(units, n_boot=200) == pytest.approx(hand, abs=1e-12)


def test_chunk_mean_ci_bootstraps_the_float64_chunk_means():
    """[chunks, positions] -> the default bootstrap (1000 resamples, seed 0) of each chunk's mean, in float64 even
    for float32 input (the per-token CE arrives as float32)."""
    ce = np.random.default_rng(5).exponential(3.0, size=(40, 50)).astype(np.float32)
    assert chunk_mean_ci(ce) == bootstrap_ci(ce.astype(np.float64).mean(1), n_boot=1000, seed=0)
    assert chunk_mean_ci(ce, n_boot=300, seed=2) == bootstrap_ci(ce.astype(np.float64).mean(1), n_boot=300, seed=2)


def test_resample_counts_are_bootstrap_ci_draws_counted():
    """Row b counts how often each unit is drawn in bootstrap_ci's resample b (same seed, default 0), so
    counts @ values / n are its resampled means and give its interval (DLA and patching rely on this)."""
    x = np.random.default_rng(1).normal(size=7)
    for kw in ({}, {"seed": 4}):
        w = resample_counts(7, 300, **kw)
        idx = np.random.default_rng(kw.get("seed", 0)).integers(0, 7, (300, 7))
        assert w.dtype == np.float64
        np.testing.assert_array_equal(w, [np.bincount(row, minlength=7) for row in idx])
        assert percentile_ci(w @ x / 7) == pytest.approx(bootstrap_ci(x, n_boot=300, **kw), abs=1e-12)
    for seed in range(8):  # units never drawn in the last resample still get their (zero) column
        for n in (1, 2, 3):
            w = resample_counts(n, 2, seed)
            assert w.shape == (2, n) and (w.sum(1) == n).all()


def test_summarize_by_hand():
    rng = np.random.default_rng(2)
    ce = rng.exponential(3.0, size=(12, 9))
    per_token = {"ce": ce, "entropy": rng.uniform(0, 5, ce.shape), "correct": rng.integers(0, 2, ce.shape) * 1.0,
                 "maxprob": rng.uniform(0.1, 1, ce.shape), "jsd": rng.uniform(0, 0.1, ce.shape)}
    s = summarize(per_token, n_boot=50, seed=3)
    flat = ce.reshape(-1)
    expected = {
        "mean": flat.mean(), "median": np.median(flat),
        "p2.5": np.percentile(flat, 2.5), "p97.5": np.percentile(flat, 97.5),
        "p0.05": np.percentile(flat, 0.05), "p99.95": np.percentile(flat, 99.95),
        "accuracy": per_token["correct"].mean(), "entropy": per_token["entropy"].mean(),
        "ece": hand_ece(per_token["maxprob"].reshape(-1), per_token["correct"].reshape(-1), 10),
        "n_tokens": ce.size, "jsd_to_reference": per_token["jsd"].mean(),
    }
    lo, hi = bootstrap_ci(ce.mean(1), n_boot=50, seed=3)  # per-chunk means are the resampled units
    expected.update(ci95_low=lo, ci95_high=hi)
    assert set(s) == set(expected)
    for k, v in expected.items():
        assert s[k] == pytest.approx(v, abs=1e-12), k
    assert (lo, hi) != bootstrap_ci(ce.mean(1), n_boot=1000, seed=3)
    assert (lo, hi) != bootstrap_ci(ce.mean(1), n_boot=50, seed=0)
    assert "jsd_to_reference" not in summarize({k: v for k, v in per_token.items() if k != "jsd"}, 50, 3)
    ones = np.ones_like(ce)
    perfect = summarize({"ce": ce, "entropy": ones, "correct": ones, "maxprob": ones}, n_boot=50, seed=0)
    assert perfect["accuracy"] == 1.0 and perfect["ece"] == 0.0
