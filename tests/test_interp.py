import torch
from conftest import calibrated_all_removed, ids, stock_and_removable

from lnfree.analysis.interp.dla import components, dla_vs_de
from lnfree.export import to_stock_gpt2


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


def test_residual_norms_match_hidden_states():
    from lnfree.analysis.interp.residual import residual_norms

    stock, _ = stock_and_removable()
    x = ids(2, 16)
    norms = residual_norms(stock, x)
    hidden = stock(x, output_hidden_states=True).hidden_states  # embeddings, block 0 output, ...
    assert len(norms["pos0"]) == stock.config.n_layer + 1
    assert abs(norms["pos0"][0] - float(hidden[0][:, 0].norm(dim=-1).mean())) < 1e-4
    assert abs(norms["rest"][1] - float(hidden[1][:, 1:].norm(dim=-1).mean())) < 1e-4


def test_attention_sinks_on_uniform_attention():
    """Q and K weights zeroed: every query attends uniformly, A[i, 0] = 1 / (i + 1) exactly."""
    from lnfree.analysis.interp.residual import attention_sinks

    stock, _ = stock_and_removable()
    d = stock.config.n_embd
    with torch.no_grad():
        for block in stock.transformer.h:
            block.attn.c_attn.weight[:, : 2 * d] = 0
            block.attn.c_attn.bias[: 2 * d] = 0
    t = 16
    res = attention_sinks(stock, ids(2, t))
    expected = sum(1 / (i + 1) for i in range(1, t)) / (t - 1)  # about 0.17: no sink
    assert torch.allclose(torch.tensor(res["alpha"]), torch.full((2, 2), expected), atol=1e-5)
    assert res["sink_rate"] == 0.0
    assert attention_sinks(stock, ids(2, 2))["sink_rate"] == 1.0  # A[1, 0] = 1/2 > 0.3 in every head
    assert stock.config._attn_implementation != "eager"  # the caller's attention implementation is restored
