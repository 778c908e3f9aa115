import torch
from test_model import calibrated_all_removed, ids, stock_and_removable

from lnfree.export import to_stock_gpt2
from lnfree.interp.dla import components, dla_vs_de


def test_components_sum_to_the_final_residual():
    stock, _ = stock_and_removable()
    comps, resid = components(stock, ids(2, 16))
    assert torch.allclose(sum(comps.values()), resid, atol=1e-5)
    assert len(comps) == 1 + 2 * (2 + 2)  # embed + per layer: 2 heads, attn bias, mlp


def test_dla_equals_de_only_without_layernorm():
    stock, lnfree = calibrated_all_removed()
    x = ids(3, 16, seed=2)
    u = stock.lm_head.weight[5] - stock.lm_head.weight[7]  # a logit difference
    with_ln = dla_vs_de(stock, x, u)
    without = dla_vs_de(lnfree, x, u)
    exported = dla_vs_de(to_stock_gpt2(lnfree), x, u)  # the stock-loadable LN-free export, same answer
    assert with_ln["decomposition_error"] < 1e-4 and without["decomposition_error"] < 1e-4
    assert with_ln["nmae_percent"] > 1.0  # LayerNorm's scale moves: DLA is not the direct effect
    assert without["nmae_percent"] < 1e-3 and exported["nmae_percent"] < 1e-2
