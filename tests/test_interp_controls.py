"""The positive controls' measurements (issue 25): the frozen-LN arm, the trigger-switch task, the agreement metrics
on live nodes, the over-replicate tables and the distribution-shift corpora."""

import json
import math

import numpy as np
import torch
from conftest import ids, stock_and_removable, tiny_config


def _manual_forward(model, x, scales=None):
    """GPT-2 by hand (eager attention, causal): every norm divides by sqrt(var + eps) of its input, or by the
    given per-norm scales [n, t, 1] in order ln_1, ln_2 of each block, then ln_f. Returns (logits, scales used)."""
    t = model.transformer
    used = []

    def norm(m, h):
        s = torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + m.eps) if scales is None else scales[len(used)]
        used.append(s)
        return (h - h.mean(-1, keepdim=True)) / s * m.weight + m.bias

    n, T = x.shape
    H, d = model.config.n_head, model.config.n_embd
    h = t.wte(x) + t.wpe(torch.arange(T))
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for block in t.h:
        q, k, v = block.attn.c_attn(norm(block.ln_1, h)).split(d, dim=-1)
        q, k, v = (z.view(n, T, H, d // H).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-1, -2) / math.sqrt(d // H)).masked_fill(~mask, float("-inf")).softmax(-1)
        h = h + block.attn.c_proj((att @ v).transpose(1, 2).reshape(n, T, d))
        h = h + block.mlp(norm(block.ln_2, h))
    return model.lm_head(norm(t.ln_f, h)), used


def test_frozen_ln_arm_equals_a_forward_by_hand_with_the_clean_scales():
    from lnfree.analysis.interp.frozen import norms_frozen_at

    stock, _ = stock_and_removable()
    clean, corrupt = ids(3, 12, seed=1), ids(3, 12, seed=2)
    with torch.no_grad():
        ref_clean, clean_scales = _manual_forward(stock, clean)
        ref_frozen, _ = _manual_forward(stock, corrupt, clean_scales)
        ref_real, _ = _manual_forward(stock, corrupt)
        assert torch.allclose(stock(corrupt).logits, ref_real, atol=1e-4)  # the by-hand GPT-2 is GPT-2
        with norms_frozen_at(stock, clean):
            frozen_clean, frozen_corrupt = stock(clean).logits, stock(corrupt).logits
        after = stock(corrupt).logits
    assert torch.allclose(frozen_clean, ref_clean, atol=1e-4)  # on the clean run nothing changes
    assert torch.allclose(frozen_corrupt, ref_frozen, atol=1e-4)
    assert (frozen_corrupt - ref_real).abs().max() > 1e-2  # and freezing does change the corrupted run
    assert torch.allclose(after, ref_real, atol=1e-4)  # the hooks are gone afterwards


def test_frozen_ln_arm_makes_attribution_patching_exact_when_layernorm_is_the_only_nonlinearity():
    from lnfree.analysis.interp.patching import compare, induction_pairs

    stock, _ = stock_and_removable(activation_function="linear")
    d = stock.config.n_embd
    with torch.no_grad():  # Q = K = 0: uniform causal attention whatever the input
        for block in stock.transformer.h:
            block.attn.c_attn.weight[:, : 2 * d] = 0
            block.attn.c_attn.bias[: 2 * d] = 0
    pairs = induction_pairs(97, 8, half=6, seed=2)
    real = compare(stock, *pairs, n_boot=20)
    frozen = compare(stock, *pairs, n_boot=20, freeze=True)
    assert real["nmae_percent"] > 1 and frozen["nmae_percent"] < 0.05 and abs(frozen["scale"] - 1) < 1e-4  # round-off
    assert frozen["frozen_ln"] and not real["frozen_ln"]


def test_agreement_scale_and_live_nodes():
    from lnfree.analysis.interp.patching import AGREEMENT, agreement, compare, induction_pairs

    a = np.array([1.0, -2.0, 3.0, 0.5])
    r = dict(zip(AGREEMENT, agreement(a, 0.5 * a)))
    assert abs(r["pearson"] - 1) < 1e-12 and abs(r["scale"] - 0.5) < 1e-12
    assert abs(r["nmae_percent"] - 50) < 1e-9 and r["nmae_scaled_percent"] < 1e-9
    stock, _ = stock_and_removable()
    pairs = induction_pairs(97, 4, half=6, seed=0)  # the prompts differ at position 5 of 11
    res = compare(stock, *pairs, n_boot=10)
    L, H, t = stock.config.n_layer, stock.config.n_head, pairs[0].shape[1]
    assert res["first_differing_position"] == 5 and res["n_live_nodes"] == (L + 1) * (t - 5) + L * H


def test_switch_pairs_replace_the_trigger_and_ask_for_a_successor():
    from lnfree.analysis.interp.patching import switch_pairs
    from lnfree.data.synthetic import BigramBackcopy

    task = BigramBackcopy(vocab=20, n_triggers=3, low=1)
    clean, corrupt, correct, wrong = switch_pairs(task, 30, length=16, seed=0, bos=0)
    assert clean.shape == (30, 16) and ((clean != corrupt).sum(1) == 1).all() and (clean[:, -1] != corrupt[:, -1]).all()
    assert ((clean[:, -1] >= 1) & (clean[:, -1] <= 3)).all() and (corrupt[:, -1] > 3).all()  # trigger -> ordinary
    assert (clean[:, -2] == correct).all() and (correct != wrong).all() and (wrong > 3).all()
    k, lo = task.n_triggers, task.low
    for x, a, c in zip(corrupt[:, -1].tolist(), correct.tolist(), wrong.tolist()):
        row = task.transition[x - lo - k]
        assert row[a - lo - k] < 0.01 and row[c - lo - k] == max(p for i, p in enumerate(row) if i != a - lo - k)


def test_the_switch_corruption_moves_the_controls_attention_and_the_backcopy_one_does_not():
    from lnfree.analysis.interp.cli import synthetic_task
    from lnfree.analysis.interp.patching import attention_shift, backcopy_pairs, switch_pairs
    from lnfree.data.synthetic import BigramBackcopy
    from lnfree.io import load

    model, tok = load("builtin:synth_w64")  # the shipped control
    task = BigramBackcopy(**synthetic_task()[0])
    moved = {}
    for name, make in (("backcopy", backcopy_pairs), ("switch", switch_pairs)):
        clean, corrupt, _, _ = make(task, 16, 24, seed=0, bos=tok.eos_token_id)
        moved[name] = np.asarray(attention_shift(model, clean, corrupt)["tv"])[0].max()  # layer 0, any head
    assert moved["switch"] > 0.5 and moved["backcopy"] < 0.2


def _fake_replicate(r):
    from lnfree.analysis.interp.controls import ARMS, MODEL_ARMS
    from lnfree.analysis.interp.patching import AGREEMENT, SYNTHETIC_TASKS

    p = {k: 1.0 + r for k in ("clean_logit_diff", "corrupted_logit_diff", "clean_positive_fraction", *AGREEMENT)}
    shift = {"tv": [[0.5, 0.5], [0.1, 0.1]]}
    pat = {t: {arm: {**p, "nmae_percent": 10.0 if arm == "frozen_ln" else 40.0 + r, "attention_shift": shift}
               for arm in ARMS} for t in SYNTHETIC_TASKS}
    sink = {"sink_heads": [2, 0], "pos0_ratio": [0.5, 1.0, 2.0 + r], "pos0_norm": [1, 2, 3], "rest_norm": [1, 1, 1],
            "massive_pos0": [1, 2, 3]}
    top = {arm: {"median_abs_te_entropy": 0.2, "median_abs_de_entropy": 0.1, "ln_mediated_fraction": 0.5,
                 "null_space_fraction": 0.3, "mean_te_ce": 0.0} for arm in MODEL_ARMS}
    return {"patching": pat, "sinks": {arm: sink for arm in MODEL_ARMS}, "neurons": {"top": top, "top_neuron": 7}}


def test_aggregate_over_replicates_and_the_generated_readme_tables(tmp_path):
    from lnfree.analysis.interp import controls, controls_plot
    from tools.table_markers import write_table

    agg = controls.aggregate({r: _fake_replicate(r) for r in range(3)})
    nmae = agg["patching"]["switch"]["original"]["nmae_percent"]
    assert nmae["mean"] == 41 and nmae["values"] == [40, 41, 42] and nmae["ci95"][0] < 41 < nmae["ci95"][1]
    share = agg["patching"]["backcopy"]["ln_share_of_atp_error"]
    assert abs(share["mean"] - np.mean([1 - 10 / 40, 1 - 10 / 41, 1 - 10 / 42])) < 1e-12
    ratio = agg["sinks"]["original"]["pos0_ratio"]
    assert ratio["mean"] == [0.5, 1.0, 3.0] and ratio["ci95"][2][0] < 3 < ratio["ci95"][2][1]
    for key in ("patching", "sinks", "neurons"):
        (tmp_path / f"{key}.json").write_text(json.dumps({"replicates": agg["replicates"], key: agg[key]}))
    (tmp_path / "README.md").write_text("intro\n<!-- table:interp_controls -->\n<!-- /table -->\n")
    write_table(tmp_path / "README.md", "interp_controls", controls_plot.tables(tmp_path))
    once = (tmp_path / "README.md").read_text()
    write_table(tmp_path / "README.md", "interp_controls", controls_plot.tables(tmp_path))  # replaces, not appends
    assert (tmp_path / "README.md").read_text() == once and once.startswith("intro\n")
    assert "41.0 [" in once and "| switch | LN-free |" in once and "ln_f input" in once


def test_shift_corpora_are_deterministic(tmp_path):
    import pytest

    from lnfree.data import shift

    lic = tmp_path / "licenses"
    lic.mkdir()
    (lic / "B").write_text("Second license text.\n")
    (lic / "A").write_text("First license text.\n")
    (lic / "A-link").symlink_to(lic / "A")
    one, two = shift.build(tmp_path / "one", lic), shift.build(tmp_path / "two", lic)
    for name in ("near", "far"):
        assert one[name]["sha256"] == two[name]["sha256"] and one[name]["documents"] > 0
        assert (tmp_path / "one" / f"{name}.jsonl").read_bytes() == (tmp_path / "two" / f"{name}.jsonl").read_bytes()
    near = [json.loads(x) for x in (tmp_path / "one" / "near.jsonl").read_text().splitlines()]
    assert [d["title"] for d in near] == ["A", "B"]  # sorted, the symlink left out
    with pytest.raises(shift.ShiftCorpusError):
        shift.build(tmp_path / "three", tmp_path / "missing")


def test_null_space_fraction_over_the_tasks_tokens_only():
    from lnfree.analysis.interp.neurons import weight_signature

    stock, _ = stock_and_removable()
    tokens = torch.arange(10, 20)  # fewer tokens than dimensions: their unembedding leaves an exact null space
    w_u = stock.lm_head.weight[tokens] * stock.transformer.ln_f.weight
    with torch.no_grad():
        stock.transformer.h[-1].mlp.c_proj.weight[0] = w_u[0] - w_u.mean(0)  # in the row space
    _, frac_tokens = weight_signature(stock, tokens=tokens)
    _, frac_all = weight_signature(stock)
    assert frac_tokens[0] < 1e-6 and frac_all[0] > 1e-4
    assert tiny_config().n_embd > len(tokens)


def test_null_space_fraction_with_a_whole_vocabulary_matches_an_eigendecomposition(monkeypatch):
    """More tokens than dimensions (every real model): the reduced SVD must give the same null space as the
    eigenvectors of W_U^T W_U (the full SVD would build a [vocab, vocab] matrix: 19 GB at 49k tokens)."""
    from lnfree.analysis.interp.neurons import weight_signature

    stock, _ = stock_and_removable()
    w_u = (stock.lm_head.weight * stock.transformer.ln_f.weight).detach().double()
    assert w_u.shape[0] > w_u.shape[1]
    w_u = w_u - w_u.mean(0)
    _, eigvec = torch.linalg.eigh(w_u.T @ w_u)  # ascending eigenvalues: the first columns span the null space
    with torch.no_grad():
        stock.transformer.h[-1].mlp.c_proj.weight[0] = eigvec[:, 0].float()  # the weakest direction
        stock.transformer.h[-1].mlp.c_proj.weight[1] = eigvec[:, -1].float()  # the strongest
    calls, svd = [], torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda a, full_matrices=True: calls.append(full_matrices) or svd(
        a, full_matrices=full_matrices))
    _, frac = weight_signature(stock)
    assert abs(float(frac[0]) - 1.0) < 1e-5 and float(frac[1]) < 1e-5
    assert calls == [False]  # no [vocab, vocab] factor
