import torch
from conftest import calibrated_all_removed, ids, stock_and_removable

from lnfree.analysis.interp.dla import components, dla_vs_de
from lnfree.export import to_stock


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
    exported = dla_vs_de(to_stock(lnfree), x, u)  # the stock-loadable LN-free export, same answer
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


def test_sink_alpha_and_massive_ratio_on_hand_made_tensors():
    from lnfree.analysis.interp.residual import SINK_THRESHOLD, massive_ratio, sink_alpha

    t = 10
    uniform = torch.tril(torch.ones(t, t)) / torch.arange(1, t + 1)[:, None]  # causal uniform attention
    sink = torch.zeros(t, t)
    sink[:, 0] = 0.8
    sink[torch.arange(t), torch.arange(t)] += 0.2
    sink[0, 0] = 1.0
    attn = [torch.stack([uniform, sink])[None]]  # 1 layer, batch 1, heads: uniform, sink
    alpha = sink_alpha(attn)
    assert torch.allclose(alpha, torch.tensor([[sum(1 / (i + 1) for i in range(1, t)) / (t - 1), 0.8]]))
    assert ((alpha > SINK_THRESHOLD).float().mean()) == 0.5
    x = torch.ones(2, 4, 8)
    x[1, 0, 3] = 500.0  # one massive feature at position 0
    x[0, 2, 1] = -7.0
    assert massive_ratio(x) == (500.0, 7.0)


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


def test_per_head_nmae_with_cis_and_grid():
    from lnfree.analysis.interp.dla import nmae_with_ci, per_head_grid

    stock, lnfree = calibrated_all_removed()
    x = ids(24, 16, seed=3)
    u = stock.lm_head.weight[x[:, -1]]
    for model, exact in ((stock, False), (lnfree, True)):
        r = dla_vs_de(model, x, u)
        per = {k: nmae_with_ci(r["dla"][k], r["de"][k], n_boot=200) for k in r["dla"]}
        heads, mlps = per_head_grid(per, 2, 2)
        assert heads.shape == (2, 2) and mlps.shape == (2,)
        for v in per.values():
            assert v["ci95"][0] <= v["nmae_percent"] <= v["ci95"][1]
        if exact:
            assert heads.max() < 1e-2 and mlps.max() < 1e-2
        else:
            assert heads.max() > 1.0
    # the global number from the stacked components equals mean|DLA-DE| / mean|DE| over everything
    whole = nmae_with_ci(torch.stack(list(r["dla"].values())), torch.stack(list(r["de"].values())), n_boot=50)
    assert abs(whole["nmae_percent"] - r["nmae_percent"]) < 1e-6 + 1e-3 * r["nmae_percent"]


def _linear_lnfree_model():
    """A GPT-2 whose residual-to-metric map is affine: norms frozen, attention pattern fixed (Q = K = 0 gives
    uniform causal attention whatever the input), linear MLP activation."""
    from conftest import remove_all, tiny_config

    from lnfree.model import make_removable

    model = make_removable(tiny_config(activation_function="linear")).eval()
    model.calibrate(ids(4, 16))
    remove_all(model)
    d = model.config.n_embd
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight[:, : 2 * d] = 0
            block.attn.c_attn.bias[: 2 * d] = 0
    return model


def test_attribution_patching_equals_activation_patching_on_an_affine_model():
    from lnfree.analysis.interp.patching import activation_patching, attribution_patching, induction_pairs

    model = _linear_lnfree_model()
    clean, corrupt, correct, wrong = induction_pairs(97, 6, half=6, seed=1)
    ap_r, ap_h = activation_patching(model, clean, corrupt, correct, wrong)
    atp_r, atp_h = attribution_patching(model, clean, corrupt, correct, wrong)
    assert ap_r.abs().max() > 1e-3  # the nodes matter
    assert torch.allclose(ap_r, atp_r, atol=1e-4 * ap_r.abs().max()) and torch.allclose(ap_h, atp_h, atol=1e-4)


def test_patching_is_zero_where_clean_and_corrupted_agree_and_not_exact_on_a_real_model():
    from lnfree.analysis.interp.patching import activation_patching, attribution_patching, compare, induction_pairs

    stock, _ = stock_and_removable()
    clean, corrupt, correct, wrong = induction_pairs(97, 8, half=6, seed=2)
    ap_r, _ = activation_patching(stock, clean, corrupt, correct, wrong)
    atp_r, _ = attribution_patching(stock, clean, corrupt, correct, wrong)
    differs = 5  # the only position where the two prompts differ (half - 1)
    same = [p for p in range(clean.shape[1]) if p != differs]
    assert ap_r[:, 0, same].abs().max() == 0 and atp_r[:, 0, same].abs().max() == 0
    assert ap_r[:, 0, differs].abs().max() > 0
    r = compare(stock, clean, corrupt, correct, wrong, n_boot=50)
    assert r["nmae_percent"] > 0.1 and -1 <= r["pearson"] <= 1  # LayerNorm and softmax: first order is not exact


def test_induction_pairs_with_bos_and_a_token_range():
    from lnfree.analysis.interp.patching import induction_pairs

    clean, corrupt, correct, wrong = induction_pairs(68, 50, half=7, seed=3, low=4, bos=0)
    assert clean.shape == (50, 14) and (clean[:, 0] == 0).all() and (corrupt[:, 0] == 0).all()
    assert ((clean[:, 1:] >= 4) & (clean[:, 1:] < 68)).all() and ((wrong >= 4) & (wrong < 68)).all()
    assert torch.equal(clean[:, 1:8][:, :6], clean[:, 8:])  # the repeat
    assert ((clean != corrupt).sum(1) == 1).all() and (corrupt[:, 7] == wrong).all() and (clean[:, 7] == correct).all()
    assert (correct != wrong).all()


def test_backcopy_pairs_ask_for_the_token_before_the_trigger():
    from lnfree.analysis.interp.patching import backcopy_pairs
    from lnfree.data.synthetic import BigramBackcopy

    task = BigramBackcopy(vocab=20, n_triggers=3, low=1)
    clean, corrupt, correct, wrong = backcopy_pairs(task, 40, length=16, seed=0, bos=0)
    assert clean.shape == (40, 16) and (clean[:, 0] == 0).all()
    assert ((clean[:, -1] >= 1) & (clean[:, -1] <= 3)).all()  # ends with a trigger
    assert (clean[:, -2] == correct).all() and (corrupt[:, -2] == wrong).all() and (correct != wrong).all()
    assert ((clean != corrupt).sum(1) == 1).all()
    assert ((correct > 3) & (wrong > 3)).all() and (clean[:, -3] > 3).all()  # a, b and the token before: ordinary


def test_ioi_generator_builds_aligned_pairs():
    from lnfree.analysis.interp.patching import ioi_pairs
    from lnfree.data import corpus

    tok = corpus.load_tokenizer()  # has three single-token names (John, Kate, Anne)
    clean, corrupt, correct, wrong = ioi_pairs(tok, 4, seed=0)
    assert clean.shape == corrupt.shape and ((clean != corrupt).sum(1) == 1).all() and (correct != wrong).all()
    pos = (clean != corrupt).float().argmax(1)  # the second mention of B, replaced by C
    assert (clean[torch.arange(4), pos] == wrong).all() and (clean[:, :6] == corrupt[:, :6]).all()
    assert (clean == correct[:, None]).any(1).all()  # the answer A is the name mentioned once


def test_entropy_neuron_total_effect_equals_direct_effect_only_without_layernorm():
    from lnfree.analysis.interp.neurons import ablation_effects, candidates, summary

    stock, lnfree = calibrated_all_removed()
    x = ids(4, 24, seed=4)
    for model, exact in ((stock, False), (lnfree, True), (to_stock(lnfree), True)):
        cands = candidates(model, k=3)
        assert len(cands) == 3 and all(0 <= c["null_space_fraction"] <= 1 for c in cands)
        assert cands[0]["w_out_norm"] >= cands[-1]["w_out_norm"]
        e = ablation_effects(model, x, cands[0]["neuron"])
        assert e["te_entropy"].abs().max() > 1e-6  # the ablation does something
        gap = (e["te_entropy"] - e["de_entropy"]).abs().max() / e["te_entropy"].abs().max()
        if exact:
            assert gap < 1e-4 and abs(summary(e)["ln_mediated_fraction"]) < 1e-3
        else:
            assert gap > 1e-3  # the final norm's scale moves with the ablation


def test_the_neuron_search_ranks_by_the_criterion_asked_for(tmp_path):
    import json

    from lnfree.analysis.interp.neurons import main

    for by, key in (("norm", "w_out_norm"), ("null", "null_space_fraction")):
        main(["original=builtin:w128", "--out", str(tmp_path / by), "--blocks", "1", "--top", "3", "--by", by])
        res = json.loads((tmp_path / by / "neurons.json").read_text())["original"]
        ranked = [n[key] for n in res["neurons"]]
        assert res["ranked_by"] == by and len(ranked) == 3 and ranked == sorted(ranked, reverse=True)


def test_the_analyses_default_models_compose_in_a_fresh_process():
    """Every analysis command without name=path arguments compares conf/eval.yaml's models: composing that config
    in a process that imported nothing else (as `python -m lnfree.analysis.interp.dla` does) must work."""
    import subprocess
    import sys

    code = "from lnfree.analysis.interp.cli import default_models; print(default_models('/x'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "'original=builtin:w128', 'vanilla=/x/vanilla_s1', 'lnfree=/x/lnfree_s1'" in out.stdout
