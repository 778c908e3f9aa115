"""The norm site's statistics (lnfree/norm.py), each against a hand computation: the running std estimate (EMA
of per-step means, per token category, padding ignored) and what freezing it makes of the special sigmas; and the
norm layers' dtypes and split-input projections, one layer at a time."""

import pytest
import torch
from torch import nn

from lnfree.families.gpt2 import SplitQKVProjection
from lnfree.norm import (
    BOS,
    EOT,
    IGNORED,
    ORDINARY,
    NormSite,
    RemovableLayerNorm,
    SplitInputLinear,
    SplitLayerNorm,
    TokenContext,
)


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


def test_momentum_one_keeps_the_calibrated_estimate_even_through_an_overflowing_step():
    site = NormSite()
    site.record(torch.tensor([[1.0, 3.0]]), None)
    _commit(site, 0.0)  # calibration: the first step's mean
    for stds in (torch.tensor([[50.0]]), torch.tensor([[float("inf"), 2.0]])):
        site.record(stds, None)
        _commit(site, 1.0)
        assert float(site.running[ORDINARY]) == 2.0  # an EMA with 1 * s + 0 * inf would give NaN
        assert torch.count_nonzero(site.acc) == 0


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


def _calibrate(module, x, sites, category=None, **freeze):
    """One recorded forward (training mode), then each of `sites` frozen at that step's mean."""
    module.ctx.category = category
    module.train()
    module(x)
    for site in sites:
        site.commit(site.acc.clone(), 0.9)
        site.freeze(**freeze)


def test_rmsnorm_real_and_frozen_keep_a_bf16_models_dtype_even_with_special_sigmas():
    ln = RemovableLayerNorm(8, 1e-6, TokenContext(), centre=False)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
    ln = ln.to(torch.bfloat16)
    x = torch.randn(2, 5, 8).to(torch.bfloat16)
    real = ln(x)
    xf = x.float()
    assert real.dtype == torch.bfloat16  # as Hugging Face's LlamaRMSNorm: fp32 inside, cast back before gamma
    assert torch.equal(real, ln.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16())
    category = torch.full((2, 5), ORDINARY)
    category[:, 0] = BOS
    _calibrate(ln, x, [ln.site], category, special_bos=True)
    assert ln.site.sigma.dtype == torch.float32 and ln.site.special_active  # per-token fp32 sigmas [2, 5, 1]
    frozen = ln(x)
    assert frozen.dtype == torch.bfloat16
    sigma = ln.site.sigma[category].unsqueeze(-1)
    assert torch.allclose(frozen.float(), xf * ln.weight.float() / sigma, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("centre,bias", [(True, True), (False, True), (False, False)])
def test_split_input_linear_under_autocast_returns_the_autocast_dtype_and_each_paths_projection(centre, bias):
    # a Llama q/k/v_proj (RMSNorm, with or without bias) or NeoX query_key_value (LayerNorm) reading ln_1's
    # [u, f_qk, f_v] once its query/key path is frozen: under bf16 autocast it returns bf16, as nn.Linear does
    ln = SplitLayerNorm(8, 1e-5, TokenContext(), centre=centre)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        if centre:
            ln.bias.normal_(0, 0.1)
    linear = nn.Linear(8, 6, bias=bias)
    proj = SplitInputLinear(linear, ln, torch.tensor([False] * 4 + [True] * 2))
    x = torch.randn(2, 5, 8)
    _calibrate(ln, x, [ln.qk])
    ln.eval()
    split = ln(x)
    assert split.shape == (2, 5, 10)
    x_qk, x_v = ln.paths(split)
    expected = torch.where(proj.v_cols, linear(x_v), linear(x_qk))
    assert torch.allclose(proj(split), expected, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, plain = proj(split), linear(x)
    assert out.dtype == plain.dtype == torch.bfloat16
    assert torch.allclose(out.float(), expected, atol=5e-2)


def test_split_qkv_projection_is_initialised_as_the_conv1d_it_stands_in_for():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    ours, stock = SplitQKVProjection(64, SplitLayerNorm(64, 1e-5, TokenContext()), 0.02), Conv1D(3 * 64, 64)
    assert ours.weight.shape == stock.weight.shape and torch.equal(ours.bias, stock.bias)
    assert float(ours.weight.detach().std()) == pytest.approx(float(stock.weight.detach().std()), rel=0.05)
    assert abs(float(ours.weight.detach().mean())) < 0.002


def test_a_removable_gpt2_from_a_config_follows_its_initializer_range():
    """HF's _init_weights skips SplitQKVProjection (not a Conv1D): c_attn must still get the config's std."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lnfree.model import make_removable

    cfg = GPT2Config(vocab_size=64, n_positions=16, n_embd=64, n_layer=2, n_head=4, initializer_range=0.2)
    torch.manual_seed(0)
    ours, stock = make_removable(cfg), GPT2LMHeadModel(cfg)
    for a, b in zip(ours.transformer.h, stock.transformer.h):
        assert float(a.attn.c_attn.weight.std()) == pytest.approx(float(b.attn.c_attn.weight.std()), rel=0.05)
        assert float(a.attn.c_attn.weight.std()) == pytest.approx(0.2, rel=0.05)
