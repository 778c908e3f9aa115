"""The norm site's statistics (lnfree/norm.py), each against a hand computation: the running std estimate (EMA
of per-step means, per token category, padding ignored) and what freezing it makes of the special sigmas."""

import pytest
import torch

from lnfree.norm import BOS, EOT, IGNORED, ORDINARY, NormSite


def _commit(site, momentum):
    site.commit(site.acc.clone(), momentum)


def test_running_estimate_is_the_ema_of_per_step_means_by_hand():
    site, m = NormSite(), 0.75
    steps = [torch.tensor([[1.0, 3.0]]), torch.tensor([[2.0, 2.0, 8.0]]), torch.tensor([[10.0]])]
    expected = None
    for stds in steps:
        site.record(stds, None)
        mean = float(stds.mean())
        expected = mean if expected is None else m * expected + (1 - m) * mean  # first step: the mean itself
        _commit(site, m)
        assert float(site.running[ORDINARY]) == pytest.approx(expected, rel=1e-6)
        assert torch.count_nonzero(site.acc) == 0  # the step's accumulators are emptied
    assert site.running[1:].isnan().all()  # no bos / eot token was seen


def test_categories_have_their_own_estimates_and_padding_never_counts():
    site = NormSite()
    stds = torch.tensor([[4.0, 1.0, 2.0, 100.0], [6.0, 3.0, 5.0, 7.0]])
    cat = torch.tensor([[BOS, ORDINARY, EOT, IGNORED], [BOS, ORDINARY, ORDINARY, EOT]])
    site.record(stds, cat)
    _commit(site, 0.5)
    assert site.running.tolist() == pytest.approx([(1 + 3 + 5) / 3, (4 + 6) / 2, (2 + 7) / 2])
    site.record(torch.tensor([[2.0, 9.0]]), torch.tensor([[ORDINARY, IGNORED]]))
    _commit(site, 0.5)  # a category absent from a step keeps its estimate
    assert site.running.tolist() == pytest.approx([0.5 * 3 + 0.5 * 2, 5.0, 4.5])


def test_freeze_takes_the_running_estimate_and_special_sigmas_fall_back_when_unseen():
    site = NormSite()
    site.record(torch.tensor([[4.0, 2.0]]), torch.tensor([[BOS, ORDINARY]]))
    _commit(site, 0.9)
    assert site.freeze(special_bos=True, special_eot=True) == pytest.approx(2.0)
    assert site.sigma.tolist() == pytest.approx([2.0, 4.0, 2.0])  # eot never seen: the ordinary sigma
    assert site.special.tolist() == [True, False]
    cat = torch.tensor([[BOS, ORDINARY, EOT, IGNORED]])
    assert site.divisor(cat).flatten().tolist() == pytest.approx([4.0, 2.0, 2.0, 2.0])
    assert float(site.divisor(None)) == pytest.approx(2.0)
    site.end_special(BOS)
    assert not site.special_active and float(site.divisor(cat)) == pytest.approx(2.0)  # one scalar again
    with pytest.raises(RuntimeError, match="already removed"):
        site.freeze()
