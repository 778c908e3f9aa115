"""The family record's convergence criterion, on hand-made curves."""

from lnfree.analysis.family import converged


def test_convergence_criterion():
    flat = [(s, 4.0 + 0.5 * max(0, 1 - s / 800)) for s in range(0, 1001, 50)]  # flat from step 800
    assert converged(flat, 1000, tol=0.002)["met"]
    falling = [(s, 5.0 - s / 1000) for s in range(0, 1001, 50)]  # still falling 0.1 over the last 10%
    r = converged(falling, 1000, tol=0.002)
    assert not r["met"] and r["not_rising_last_20pct"] and abs(r["change_last_10pct"] - 0.1) < 1e-9
    rising = flat[:-2] + [(950, 4.01), (1000, 4.02)]
    assert not converged(rising, 1000, tol=0.002)["not_rising_last_20pct"]
