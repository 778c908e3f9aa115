"""Every interval the README relies on covers the truth about 95% of the time on simulated data with a known
answer and the structure of the real measurement (lnfree/analysis/simulate.py; docs/statistics.md).

Each test runs >= 200 simulations with fixed seeds (deterministic) and asserts a coverage in [0.92, 0.98] for a
nominal 95% interval. A correct interval lands there with high probability (binomial sd at 0.95 over 300
simulations: 0.013); one that resamples tokens or positions instead of chunks or prompts, or that ignores the
text shared by every seed, does not (docs/statistics.md lists the coverages measured with such mistakes)."""

import importlib.util
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import ROOT

from lnfree.analysis.interp.dla import nmae_with_ci
from lnfree.analysis.interp.patching import agreement, agreement_ci
from lnfree.analysis.metrics import bootstrap_ci, chunk_mean_ci
from lnfree.analysis.scaling import exponent_coverage, gap_table, load_runs, measured_noise
from lnfree.analysis.simulate import (
    CEStructure,
    SweepStructure,
    dla_errors,
    estimate_structure,
    paired_ce,
    patching_values,
)
from lnfree.analysis.stats import over_seeds, paired_gap, seeds_and_text

LOW, HIGH = 0.92, 0.98


def covers(ci, truth) -> bool:
    return ci[0] <= truth <= ci[1]


def test_the_simulated_evaluation_has_the_measured_structure():
    """CEStructure's numbers are the variance components of the committed evaluation (LN-free - vanilla)."""
    npz = np.load(ROOT / "experiments/builtin_eval/per_token_ce.npz")
    d = np.stack([npz[f"shakespeare_val/lnfree_s{s}"].astype(np.float64)
                  - npz[f"shakespeare_val/vanilla_s{s}"].astype(np.float64) for s in (1, 2, 3)])
    est, st = estimate_structure(d), CEStructure()
    for k, v in est.items():
        assert getattr(st, k) == pytest.approx(v, rel=0.02), k
    assert (st.n_seeds, st.n_chunks, st.n_pos) == d.shape
    # and the estimator recovers a simulated evaluation's components
    a, b, _ = paired_ce(np.random.default_rng(0), st)
    sim = estimate_structure(a - b)
    for k in ("shared_sd", "own_sd", "token_shared_sd", "token_own_sd"):  # (position_sd: too small to recover)
        assert sim[k] == pytest.approx(getattr(st, k), rel=0.25), k


@pytest.mark.slow
def test_paired_gap_mean_ce_and_over_seed_intervals_cover():
    """Per seed, the paired gap's chunk bootstrap covers that seed's true gap; the mean CE's chunk bootstrap (the
    "95% CI of the mean" column) covers the true mean CE; over seeds, seeds_and_text covers the true gap."""
    rng, st, n_sim = np.random.default_rng(1), CEStructure(), 200
    per_seed, mean_ce, over, rel = [], [], [], []
    for i in range(n_sim):
        a, b, truth = paired_ce(rng, st)
        per_seed += [covers(paired_gap(a[s], b[s], n_boot=1000, seed=i)["ci95"], truth[s]) for s in range(3)]
        mean_ce.append(covers(chunk_mean_ci(b[0], n_boot=1000, seed=i), st.reference_ce))
        diff = (a - b).mean(2)
        over.append(covers(seeds_and_text(diff)["ci95"], st.gap))
        rel.append(covers(seeds_and_text(diff / b.mean((1, 2))[:, None])["ci95"], st.gap / st.reference_ce))
    for name, hits in (("paired gap", per_seed), ("mean CE", mean_ce), ("over seeds", over), ("relative", rel)):
        assert LOW <= np.mean(hits) <= HIGH, (name, np.mean(hits))


@pytest.mark.slow
def test_over_seed_interval_covers_when_seeds_vary_less_than_measured():
    """3 seeds measure the seed spread poorly. With a 3x smaller spread, or none, the text shared by every seed
    dominates: seeds_and_text still covers; a t interval over the seed values alone does not (no spread)."""
    base = CEStructure()
    for seed_sd, rng in ((base.seed_sd / 3, np.random.default_rng(2)), (0.0, np.random.default_rng(6))):
        st, ours, plain = replace(base, seed_sd=seed_sd), [], []
        for _ in range(200):
            a, b, _ = paired_ce(rng, st)
            diff = (a - b).mean(2)
            ours.append(covers(seeds_and_text(diff)["ci95"], st.gap))
            plain.append(covers(over_seeds(diff.mean(1))["ci95"], st.gap))
        assert LOW <= np.mean(ours) <= HIGH, seed_sd
    assert np.mean(plain) < 0.85  # the reason for seeds_and_text


@pytest.mark.parametrize("shape", [(0.86, 0.70, 0.74, 0.23),  # all components together, builtin:w128
                                   (0.24, 2.02, 1.20, 0.22),  # one head (L0H0): heavy right tails
                                   # 13 components sharing a strong prompt scale: resampling (component, prompt)
                                   # cells instead of prompts would be too narrow
                                   (0.5, 0.8, 0.8, 0.2, 13, 0.5)])
def test_dla_interval_covers(shape):
    rng, n_sim, hits = np.random.default_rng(3), 300, []
    for i in range(n_sim):
        err, ref = dla_errors(rng, 256, *shape)
        de = torch.as_tensor(ref)
        hits.append(covers(nmae_with_ci(de + torch.as_tensor(err), de, seed=i)["ci95"], 100 * shape[0]))
    assert LOW <= np.mean(hits) <= HIGH


@pytest.mark.slow
def test_patching_nmae_interval_covers():
    """The AtP-vs-AP NMAE interval over 128 prompts, around the committed prompt-mean effects of the positive
    control's original model (the README's 45.5% [42.9, 47.8])."""
    m = json.loads((ROOT / "experiments/interp/synth_w64/patching.json").read_text())["models"]["original"]
    ap = np.concatenate([np.ravel(m["ap_resid"]), np.ravel(m["ap_heads"])])
    atp = np.concatenate([np.ravel(m["atp_resid"]), np.ravel(m["atp_heads"])])
    truth = agreement(ap, atp)[2]
    rng, n_sim, hits = np.random.default_rng(4), 300, []
    for i in range(n_sim):
        a, b = patching_values(rng, ap, atp, 128)
        hits.append(covers(agreement_ci(a, b, seed=i)[1][2], truth))
    assert LOW <= np.mean(hits) <= HIGH


def test_scaling_exponent_interval_covers():
    """1,000 simulated sweeps (4 sizes, 2 pretrained models per size, 3 seeds, seed noise measured in the
    committed width-only sweep, assumed pretraining spread and lack of fit; every crossing bracketed by the
    simulated grid): the interval covers the true b in >= 93% at every threshold (issue 24) and within
    [0.92, 0.98] (issue 29). 1,000 rather than the issue's 200: at 200 the binomial sd is 0.015, so a correct
    interval (true coverage about 0.95) falls below 0.93 at one of four thresholds by chance about 1 time in 6;
    at 1,000 (sd 0.007) it does not."""
    noise = measured_noise(gap_table(load_runs(ROOT / "experiments/data_scaling/runs.jsonl")))
    st = replace(SweepStructure(), seed_cv=noise["seed_cv"], slope=noise["slope"])
    assert st.n_pretrained >= 2 and st.n_seeds >= 3 and len(st.sizes_n) >= 4
    c = exponent_coverage(st)
    assert c["simulations"] >= 1000 and all(n == c["simulations"] for n in c["fits"].values())
    assert c["covered"] >= 0.93 and max(c["per_threshold"].values()) <= HIGH


@pytest.mark.slow
def test_resampling_tokens_or_positions_is_visibly_narrower():
    """With strong chunk correlation, an interval that treats tokens or positions as independent units is much
    narrower than the width the gap's sampling error needs; the project's (chunks) is not."""
    st = replace(CEStructure(), shared_sd=0.06, own_sd=0.03, n_seeds=1)
    # the true sd of one evaluation's gap: chunk effects and token noise over the chunks (positions are centred)
    sd = np.sqrt((st.shared_sd ** 2 + st.own_sd ** 2) / st.n_chunks
                 + (st.token_shared_sd ** 2 + st.token_own_sd ** 2) / (st.n_chunks * st.n_pos))
    needed = 2 * 1.96 * sd
    rng = np.random.default_rng(5)
    ours, tokens, positions = [], [], []
    for i in range(10):
        a, b, _ = paired_ce(rng, st)
        d = (a - b)[0]
        ci = paired_gap(a[0], b[0], n_boot=500, seed=i)["ci95"]
        ours.append(ci[1] - ci[0])
        lo, hi = bootstrap_ci(d.reshape(-1), n_boot=200, seed=i)
        tokens.append(hi - lo)
        lo, hi = bootstrap_ci(d.mean(0), n_boot=500, seed=i)
        positions.append(hi - lo)
    assert 0.85 < np.mean(ours) / needed < 1.15
    assert np.mean(tokens) < 0.6 * needed and np.mean(positions) < 0.6 * needed


def test_scaling_exponent_interval_covers_with_the_depth_sweeps_measured_noise():
    """The depth-and-width study's design (its 4 sizes' non-embedding parameters, 2 pretrained models per size, 3
    seeds) with the noise measured in its committed records so far (experiments/depth_family/runs.jsonl at each
    size's probed LR: seed noise, and slope and pretraining spread once the grid has budgets near the thresholds;
    the defaults until then, `measured_noise` in the test's output): >= 0.93 at every threshold on 1,000 sweeps."""
    from omegaconf import OmegaConf
    from transformers import GPT2Config, GPT2LMHeadModel

    from lnfree.analysis.scaling import at_chosen_lr, simulated_design
    from lnfree.model import non_embedding_params

    depth = ROOT / "experiments/depth_family"
    runs = at_chosen_lr(load_runs(depth / "runs.jsonl"), json.loads((depth / "lr.json").read_text())["sizes"])
    table = gap_table(runs, "scaled")
    noise = measured_noise(table)
    assert noise["seed_cv"] is not None  # the grid has measured seed noise near the thresholds
    models = str(OmegaConf.load(ROOT / "conf/experiment/data_scaling_depth.yaml").hydra.sweeper.params.model)
    sizes = sorted(non_embedding_params(GPT2LMHeadModel(GPT2Config(
        vocab_size=4096, **OmegaConf.load(ROOT / f"conf/model/{m}.yaml").shape))) for m in models.split(","))
    st = replace(simulated_design(table, {}, (0.005, 0.01, 0.02), noise), sizes_n=tuple(map(float, sizes)))
    print("measured_noise", noise, "structure", st)
    assert len(st.sizes_n) >= 4 and st.n_pretrained == 2 and st.n_seeds == 3
    c = exponent_coverage(st)
    assert all(n == c["simulations"] for n in c["fits"].values())
    assert c["covered"] >= 0.93 and max(c["per_threshold"].values()) <= HIGH


CENSORED_RECORD = ROOT / "experiments/data_scaling/censored_coverage.json"


def censored_coverage_script():
    """experiments/data_scaling/censored_coverage.py as a module (its design and one cell's computation)."""
    spec = importlib.util.spec_from_file_location("censored_coverage", ROOT / "experiments/data_scaling/"
                                                  "censored_coverage.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


@pytest.mark.parametrize("record", [CENSORED_RECORD, CENSORED_RECORD.with_name("censored_coverage_stage2.json")],
                         ids=["fixed_grid", "grid_and_stage2"])
def test_censored_exponent_coverage_record_on_the_depth_design(record):
    """The committed coverage of the censored fit (experiments/data_scaling/censored_coverage.py, >= 200 simulated
    sweeps per truth on the depth study's fixed grid, and on the grid with stage 2 as measured: b in {-0.5, 0, 0.37,
    1} x lack of fit in {0, 0.25, 0.5}): the verdict's interval covers b in >= 0.93 of the sweeps at every truth and
    threshold, and claims "b < 1" in at most 5% of the sweeps whose true b is 1. The record's design is the
    committed records' fixed grid (budgets, sizes), its stage-2 budgets among the protocol's."""
    from lnfree.analysis.censored import LACK_OF_FIT_SDS

    rec = json.loads(record.read_text())
    script = censored_coverage_script()
    st, _ = script.design()
    assert rec["design"]["budgets"] == list(st.budgets) and rec["design"]["sizes_n"] == list(st.sizes_n)
    planned, _ = script.design(1)  # the protocol's stage 2, every budget
    for measured, every in zip(rec["design"].get("stage2_budgets") or [], planned.stage2_budgets):
        assert set(measured) <= set(every)
    assert rec["sweeps"] >= 200
    assert {(c["b"], c["lack_of_fit_sd"]) for c in rec["cells"]} == {
        (b, s) for b in script.TRUE_B for s in script.TRUE_LACK_OF_FIT}
    for c in rec["cells"]:
        for key, v in c["censored"].items():
            assert v["coverage"] >= 0.93, (c["b"], c["lack_of_fit_sd"], key, v["coverage"])
            assert set(v["coverage_at_tau"]) == {f"{t:g}" for t in LACK_OF_FIT_SDS}
            if c["b"] >= 1:
                assert v["claims"]["sublinear"] <= 0.05, (c["lack_of_fit_sd"], key)
    assert min(rec["lowest_envelope_coverage"].values()) >= 0.93


@pytest.mark.slow
def test_censored_exponent_coverage_record_reproduces():
    """One truth of the record (b = 1, lack of fit 0.5: the hardest for "b < 1"), recomputed from its seed."""
    rec = json.loads(CENSORED_RECORD.read_text())
    script = censored_coverage_script()
    st, _ = script.design()
    i = next(j for j, c in enumerate(rec["cells"]) if c["b"] == 1.0 and c["lack_of_fit_sd"] == 0.5)
    again = script.cell((st, 1.0, 0.5, rec["sweeps"], i))
    assert again["censored"] == rec["cells"][i]["censored"]


def efficient_coverage(st, ratio: float, n_sim: int, seed: int, base_steps: float = 140) -> dict:
    """Coverage of the removal-methods study's intervals (lnfree.sweeps.efficient_analysis) on n_sim simulated
    studies (analysis.simulate.StudyStructure) whose arm needs `ratio` times the baseline's tokens: T*(arm) /
    T*(baseline) at 1% and 2% (parametric bootstrap of seeds and text) and, at 100 steps, the gap ratio arm /
    baseline (Fieller's interval, seeds_and_text inverted; none where the baseline's gap is not separated from 0,
    which claims nothing and so covers), whose truth is ratio^slope on power laws. The baseline's true 1% crossing
    lies at base_steps."""
    from lnfree.analysis.simulate import study_gaps
    from lnfree.sweeps.efficient_analysis import draws, gap_ratio_interval, t_star_ratio

    rng, base = np.random.default_rng(seed), base_steps * st.tokens_per_step
    hits = {"0.01": [], "0.02": [], "gap_ratio": []}
    for _ in range(n_sim):
        x = study_gaps(rng, st, [ratio * base, base], 0.01)  # [arm, budget, seed, block]
        boot = draws(x.reshape(-1, st.n_seeds, st.n_blocks), 2000, rng).reshape(2000, 2, len(st.budgets))
        for thr in (0.01, 0.02):
            r = t_star_ratio(st.tokens, x[0].mean((1, 2)), x[1].mean((1, 2)), boot, thr)
            hits[f"{thr:g}"].append(covers((r["ci_low"] or 0, r["ci_high"] or np.inf), ratio))
        g = gap_ratio_interval(x[0, 2], x[1, 2])
        hits["gap_ratio"].append(g["ci_low"] is None or covers((g["ci_low"], g["ci_high"]), ratio ** st.slope))
    return {k: float(np.mean(v)) for k, v in hits.items()}


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_efficient_ratio_intervals_cover(ratio):
    """300 simulated removal-methods studies per truth with the study's design (4 budgets of 25-200 steps, 3 seeds,
    64 blocks; power-law gap curves, seed, block and shared-text noise as measured: StudyStructure), every true
    crossing inside the budgets: the T* ratio's interval covers the truth in >= 0.93 at both thresholds. It is
    conservative (0.98-0.99 here, 0.98-1.00 with the slow test's other noise; the seeds' part is a t with 2 df,
    and draws censored at an edge count at their bound), but not vacuous (<= 0.995: a [0, inf] interval would
    always cover). The gap ratio's Fieller interval covers as seeds_and_text does (0.97 here)."""
    from lnfree.analysis.simulate import StudyStructure

    c = efficient_coverage(StudyStructure(), ratio, 300, seed=11)
    assert 0.93 <= c["0.01"] <= 0.995 and 0.93 <= c["0.02"] <= 0.995, c
    assert LOW <= c["gap_ratio"] <= HIGH, c


@pytest.mark.slow
def test_efficient_ratio_intervals_cover_with_other_noise():
    """The same with 3x less seed noise and noisier blocks (the text dominates), with 2x the seed noise and no
    correlation between a seed's budgets and arms (the seeds dominate, and pairing does not help), and with the
    crossings where the study's first records put them (the baseline's 1% gap near 50 steps: at ratio 0.5 the arm's
    crossings lie at or below the smallest budget, and their intervals are bounds)."""
    from lnfree.analysis.simulate import StudyStructure

    base = StudyStructure()
    for st, base_steps in ((replace(base, seed_cv=base.seed_cv / 3, block_cv=0.9), 140),
                           (replace(base, seed_cv=2 * base.seed_cv, seed_corr_budgets=0.0, seed_corr_arms=0.0), 140),
                           (base, 50)):
        for ratio in (1.0, 0.5):
            c = efficient_coverage(st, ratio, 300, seed=12, base_steps=base_steps)
            assert min(c["0.01"], c["0.02"]) >= 0.93 and c["gap_ratio"] >= 0.93, (st, base_steps, ratio, c)
