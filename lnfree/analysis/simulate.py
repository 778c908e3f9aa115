"""Simulated data with a known answer, for testing that the project's 95% intervals cover the truth about 95%
of the time (tests/test_coverage.py; docs/statistics.md) and for the coverage block of the data-scaling result.

Arrays only, no models. Four kinds of data, each with the structure of the real measurement it stands in for:
- per-token CE of paired models [seed, chunk, position] (the evaluation of `make eval`),
- per-prompt values of the interpretability analyses (DLA vs DE errors; AP and AtP per node),
- data-scaling sweeps: the relative gap per (size, pretrained model, seed, budget) around a power law T* ~ N^b,
- removal-methods studies: the relative gap per (arm, budget, seed, evaluation block) around each arm's power law.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


# -- per-token CE --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CEStructure:
    """Variance components of per-token CE differences (LN-free minus vanilla, same seed, same tokens):

        d[s, c, p] = gap + seed[s] + shared[c] + own[s, c] + position[p] + token_shared[c, p] + token_own[s, c, p]

    seed: a fine-tuning seed's offset; shared / own: a chunk's effect common to every seed (the same text is hard
    for every LN-free model) / in one seed only; position: a profile over positions (fixed by the design: every
    chunk has every position, so it is centred and not part of the truth); token_shared / token_own: token noise
    common to every seed / in one seed, heavy-tailed (Student t, `token_df`). The truth of one seed's gap is
    gap + seed[s]; over seeds (and over text like the validation chunks), `gap`.

    Defaults: estimated from experiments/builtin_eval/per_token_ce.npz (lnfree_s{1,2,3} - vanilla_s{1,2,3},
    256 chunks x 255 positions) by `estimate_structure` (method of moments: variances and cross-seed covariances
    of chunk means and of residuals; tests/test_coverage.py checks these numbers against that estimate).
    token_df = 3 matches the residuals' tails (their 0.1% / 99.9% quantiles are -2.0 / +1.8 nats at sd 0.30; a
    normal's would be -+0.93). seed_sd comes from 3 seeds and is uncertain: the tests also run with a seed
    spread 3x smaller, where the text's shared part matters more."""

    gap: float = 0.0282
    seed_sd: float = 0.0047
    shared_sd: float = 0.0154
    own_sd: float = 0.0078
    position_sd: float = 0.0097
    token_shared_sd: float = 0.254
    token_own_sd: float = 0.158
    token_df: float = 3.0
    n_chunks: int = 256
    n_pos: int = 255  # positions per chunk
    n_seeds: int = 3
    reference_ce: float = 4.50  # vanilla CE level (for relative gaps), measured 4.497
    reference_chunk_sd: float = 0.180  # vanilla CE: a chunk's effect on its mean CE, measured 0.180


def estimate_structure(diffs: np.ndarray) -> dict:
    """Method-of-moments estimate of CEStructure's components from per-token differences [seed, chunk, pos]."""
    d = np.asarray(diffs, np.float64)
    n_seeds, n_chunks, n_pos = d.shape
    pairs = [(i, j) for i in range(n_seeds) for j in range(i + 1, n_seeds)]

    def var_cov(x):  # x [seed, units]: mean variance over seeds, mean covariance over pairs of seeds
        x = x - x.mean(1, keepdims=True)
        return (x ** 2).sum(1).mean() / (x.shape[1] - 1), np.mean([(x[i] * x[j]).sum() / (x.shape[1] - 1)
                                                                   for i, j in pairs])

    chunk_means, pos_means = d.mean(2), d.mean(1)
    resid = d - chunk_means[:, :, None] - pos_means[:, None, :] + d.mean((1, 2))[:, None, None]
    tok_var, tok_cov = var_cov(resid.reshape(n_seeds, -1))
    chunk_var, chunk_cov = var_cov(chunk_means)
    shared = chunk_cov - tok_cov / n_pos
    own = chunk_var - chunk_cov - (tok_var - tok_cov) / n_pos
    gaps = d.mean((1, 2))
    return {"gap": float(gaps.mean()),
            # the spread of per-seed gaps minus what their own chunk and token noise contribute
            "seed_sd": math.sqrt(max(gaps.var(ddof=1) - own / n_chunks - (tok_var - tok_cov) / d[0].size, 0.0)),
            "shared_sd": math.sqrt(max(shared, 0.0)), "own_sd": math.sqrt(max(own, 0.0)),
            "position_sd": math.sqrt(max(var_cov(pos_means)[0] - tok_var / n_chunks, 0.0)),
            "token_shared_sd": math.sqrt(max(tok_cov, 0.0)), "token_own_sd": math.sqrt(max(tok_var - tok_cov, 0.0))}


def paired_ce(rng: np.random.Generator, st: CEStructure = CEStructure()):
    """One simulated evaluation: (ce_a, ce_b) [seed, chunk, position] and the true gap per seed [seed].
    ce_b is a vanilla model's CE; ce_a = ce_b + the difference above."""
    s, c, p = st.n_seeds, st.n_chunks, st.n_pos
    t_unit = 1 / math.sqrt(st.token_df / (st.token_df - 2))  # a Student t with unit variance
    seed = rng.normal(0, st.seed_sd, s)
    position = rng.normal(0, st.position_sd, p)
    position -= position.mean()  # a design effect: every chunk has every position
    diff = (st.gap + seed[:, None, None] + rng.normal(0, st.shared_sd, c)[None, :, None]
            + rng.normal(0, st.own_sd, (s, c))[:, :, None] + position[None, None, :]
            + rng.standard_t(st.token_df, (c, p))[None] * (st.token_shared_sd * t_unit)
            + rng.standard_t(st.token_df, (s, c, p)) * (st.token_own_sd * t_unit))
    ce_b = ce_levels(rng, st, (s, c, p))
    return ce_b + diff, ce_b, st.gap + seed


def ce_levels(rng: np.random.Generator, st: CEStructure, shape) -> np.ndarray:
    """Per-token CE of one model [..., chunk, position], mean `reference_ce`: gamma token noise (CE is >= 0 and
    right-skewed; sd 2.7 nats as measured) plus a normal chunk effect."""
    sd = 2.70
    k = (st.reference_ce / sd) ** 2
    return rng.gamma(k, st.reference_ce / k, shape) + rng.normal(0, st.reference_chunk_sd, shape[:-1])[..., None]


# -- per-prompt values of the interpretability analyses --------------------------------------------------------
def dla_errors(rng: np.random.Generator, n_prompts: int, nmae: float, cv_err: float, cv_ref: float, corr: float,
               n_components: int = 1, prompt_err_sd: float = 0.0):
    """Per component and prompt |DLA - DE| and |DE| ([component, prompt] each) whose population NMAE
    E|DLA - DE| / E|DE| is `nmae` (a fraction), with coefficients of variation cv_err / cv_ref and correlation
    corr between them: a prompt's scale s (lognormal, mean 1, shared by both and by every component: gives the
    correlation, and makes the components of one prompt correlated) times independent gamma draws (mean 1);
    prompt_err_sd: a further lognormal factor (mean 1) on every component's error of a prompt (prompts on which
    the attribution is worse everywhere), which makes the prompt, not the (component, prompt) cell, the unit.

    Realistic values, measured on builtin:w128 over all 1,217 validation prompts of 64 tokens (the DLA of
    `python -m lnfree.analysis.interp.dla`): all components together cv 0.70 / 0.74, corr 0.23; per head up to
    cv 2.0 / 1.2, corr 0.22 (L0H0) and 1.7 / 1.6, corr 0.46 (embeddings)."""
    e_var = corr * cv_err * cv_ref  # = Var(s) = exp(sigma^2) - 1
    sigma = math.sqrt(math.log1p(e_var))
    s = np.exp(rng.normal(-sigma ** 2 / 2, sigma, n_prompts))

    def gamma(cv):  # mean 1 and, times s, coefficient of variation cv
        k = 1 / ((1 + cv ** 2) / (1 + e_var) - 1)
        return rng.gamma(k, 1 / k, (n_components, n_prompts))

    worse = np.exp(rng.normal(-prompt_err_sd ** 2 / 2, prompt_err_sd, n_prompts))
    return nmae * s * worse * gamma(cv_err), s * gamma(cv_ref)


def patching_values(rng: np.random.Generator, ap_true: np.ndarray, atp_true: np.ndarray, n_prompts: int,
                    prompt_sd: float = 0.25, node_sd: float = 0.40, diff_sd: float = 0.56):
    """Per-prompt normalised AP and AtP [prompt, node] around true node effects (their expectations): a prompt's
    overall strength m (mean 1, sd `prompt_sd`; it makes the nodes of one prompt correlated, which is why prompts
    are the resampled unit), each node's AP scattering by `node_sd` of its effect, and AtP - AP scattering by
    `diff_sd` of its true value. A node with no effect has none on any prompt (as in the real data).

    Defaults measured on builtin:synth_w64 (original) on 1,024 back-copy prompts (AP and AtP per prompt, 104
    nodes, 92 of them exactly 0): median sd/|mean| over the nonzero nodes 0.40 for AP and 0.56 for AtP - AP;
    prompt_sd is an assumption (0.25)."""
    m = 1 + rng.normal(0, prompt_sd, (n_prompts, 1))
    ap = m * ap_true * (1 + rng.normal(0, node_sd, (n_prompts, ap_true.size)))
    atp = ap + m * (atp_true - ap_true) * (1 + rng.normal(0, diff_sd, (n_prompts, ap_true.size)))
    return ap, atp


# -- data-scaling sweeps ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SweepStructure:
    """A simulated data-scaling sweep: for size i with N_i parameters, T*_i = t0 (N_i / N_0)^b * exp(lack of fit)
    and, per pretrained model p and budget B, the seed-mean relative gap follows
        gap(B) = threshold * (B / T*_ip)^(-slope),   T*_ip = T*_i * exp(pretrain effect)
    with multiplicative seed noise on each run's gap. Defaults (see experiments/data_scaling/README.md and
    scaling.measured_noise, which measures seed_cv, slope and pretrain_sd in a real sweep's records): seed_cv from
    the width-only sweep's runs.jsonl (the sd of log gap over the 3 seeds at a budget, median over (size, budget)
    with gaps within 0.5%-4%); pretrain_sd and lack_of_fit_sd are assumptions where a sweep has not measured them:
    0.15 in log T* between two pretraining runs of one size (a 15% spread in the data needed), and 0.25 in log T*
    of a size away from the power law (the width-only family's residuals about its fit are 0.2-0.5 in log T*)."""

    b: float = 0.4
    sizes_n: tuple = (5e4, 2e5, 8e5, 3.2e6)
    t0: float = 2e5
    slope: float = 1.1
    seed_cv: float = 0.095
    pretrain_sd: float = 0.15
    lack_of_fit_sd: float = 0.25
    n_pretrained: int = 2
    n_seeds: int = 3
    budget_step: float = math.sqrt(2)
    margin: int = 3  # budgets beyond the outermost thresholds' true crossings, on each side
    budgets: tuple = ()  # a fixed grid (tokens) for every size instead (the depth study's design: censored edges)
    stage2_budgets: tuple = ()  # per size, budgets (tokens) measured beyond the fixed grid (the depth study's stage 2)
    stage2_seeds: int = 1  # the seeds measured at those budgets (stage 2 runs seed 1 of every cell first)

    def size_budgets(self, i: int) -> tuple:
        """Size i's budgets (tokens): the fixed grid, then its stage-2 budgets."""
        return tuple(sorted({*self.budgets, *(self.stage2_budgets[i] if self.stage2_budgets else ())}))

    def all_budgets(self) -> tuple:
        """Every budget of any size, sorted: grid_gaps' budget axis."""
        return tuple(sorted({b for i in range(len(self.sizes_n)) for b in self.size_budgets(i)}))


def sweep(rng: np.random.Generator, st: SweepStructure, thresholds) -> list[dict]:
    """Records (the shape of runs.jsonl) of one simulated sweep: both arms of every (size, pretrained model, seed,
    budget), budgets on a geometric grid (ratio budget_step) from `margin` budgets below the size's true crossing
    of the largest threshold to `margin` above that of the smallest (as a grid fixed from a pilot would be), so
    that every threshold's crossing is bracketed by measured budgets (scaling.BRACKET) and the coverage measures
    the interval, not the grid."""
    thresholds = sorted(thresholds)
    mid = thresholds[len(thresholds) // 2]
    runs = []
    for i, n in enumerate(st.sizes_n):
        t_size = st.t0 * (n / st.sizes_n[0]) ** st.b * math.exp(rng.normal(0, st.lack_of_fit_sd))
        first = math.log(t_size * (thresholds[-1] / mid) ** (-1 / st.slope), st.budget_step) - st.margin
        last = math.log(t_size * (thresholds[0] / mid) ** (-1 / st.slope), st.budget_step) + st.margin
        budgets = (np.asarray(st.size_budgets(i), int) if st.budgets else
                   np.unique(np.round(st.budget_step ** np.arange(math.floor(first), math.ceil(last) + 1)).astype(int)))
        stage2 = set(st.size_budgets(i)) - set(st.budgets)
        for p in range(st.n_pretrained):
            t_p = t_size * math.exp(rng.normal(0, st.pretrain_sd))
            for seed in range(1, st.n_seeds + 1):
                for bud in budgets:
                    if bud in stage2 and seed > st.stage2_seeds:
                        continue
                    gap = mid * (bud / t_p) ** -st.slope * math.exp(rng.normal(0, st.seed_cv))
                    base = {"model": f"s{i}", "pretrained": f"s{i}_p{p}", "seed": seed, "tokens": int(bud),
                            "n_nonemb": int(n), "fit_fraction": 0.4}
                    runs.append({**base, "removes": False, "val_ce": 4.0, "all_removed": False})
                    runs.append({**base, "removes": True, "val_ce": 4.0 * (1 + gap), "all_removed": True})
    return runs


def grid_gaps(rng: np.random.Generator, st: SweepStructure, thresholds, n_sweeps: int) -> np.ndarray:
    """Relative gaps [sweep, size, pretrained, budget, seed] of n_sweeps simulated sweeps on the fixed grid
    st.budgets, drawn as `sweep` draws them (the same model, vectorised over sweeps for the censored fit's
    coverage check, which needs thousands). With stage-2 budgets the budget axis is st.all_budgets(): NaN where a
    size has no such budget, and at a stage-2 budget for the seeds beyond st.stage2_seeds."""
    if not st.budgets:
        raise ValueError("grid_gaps needs a fixed grid: SweepStructure(budgets=...)")
    thresholds = sorted(thresholds)
    mid = thresholds[len(thresholds) // 2]
    n = np.asarray(st.sizes_n, float)
    k, p, s = len(n), st.n_pretrained, st.n_seeds
    log_t = (math.log(st.t0) + st.b * np.log(n / n[0]) + rng.normal(0, st.lack_of_fit_sd, (n_sweeps, k)))[..., None] \
        + rng.normal(0, st.pretrain_sd, (n_sweeps, k, p))  # log T*_ip [sweep, size, pretrained]
    budgets = st.all_budgets()
    log_b = np.log(np.asarray(budgets, float))
    noise = rng.normal(0, st.seed_cv, (n_sweeps, k, p, len(log_b), s))
    gaps = mid * np.exp(-st.slope * (log_b[:, None] - log_t[..., None, None]) + noise)
    for i in range(k):
        mine, grid = set(st.size_budgets(i)), set(st.budgets)
        for j, b in enumerate(budgets):
            if b not in mine:
                gaps[:, i, :, j, :] = np.nan
            elif b not in grid:
                gaps[:, i, :, j, st.stage2_seeds:] = np.nan
    return gaps


# -- the removal-methods study --------------------------------------------------------------------------------
def _chunk_shared_fraction(st: CEStructure = CEStructure()) -> float:
    """The part of a 256-token chunk's gap variance that every seed shares (the text), from CEStructure."""
    shared = st.shared_sd ** 2 + st.token_shared_sd ** 2 / st.n_pos
    return shared / (shared + st.own_sd ** 2 + st.token_own_sd ** 2 / st.n_pos)


@dataclass(frozen=True)
class StudyStructure:
    """A simulated removal-methods study (experiments/efficient): per arm a, budget B, seed s and evaluation block b
    the relative block gap (arm - control, over the control's CE) is

        x[a, B, s, b] = G_a(B) * (1 + seed_cv * e[a, B, s] + block_cv * (sqrt(shared) * u[a, B, b]
                                                                         + sqrt(1 - shared) * v[a, B, s, b]))
        G_a(B) = threshold * (B / T*_a)^(-slope)   (a power law through the arm's true crossing T*_a)

    e: a seed's offset, correlated between the budgets of one seed (same data order: seed_corr_budgets) and between
    the arms of one seed (same data order and the same control: seed_corr_arms); u: a block's text effect, the same
    text at every budget and arm (correlation text_corr_cells between cells), shared by every seed; v: the seed's
    own noise on the block. Every noise term has mean 0, so the expected mean over seeds and blocks is G_a(B).

    Defaults: the study's design (4 budgets of 4 x 1,024 tokens, 3 seeds, 64 blocks of 256 tokens); slope and
    seed_cv as measured in the width-only sweep (SweepStructure: slope of log gap against log budget 1.1, seed sd
    of log gap 0.095); shared: the text's share of a 256-token chunk's gap variance in experiments/builtin_eval
    (CEStructure, 0.75); block_cv: the sd over blocks of one run's block gaps over their mean, 0.35 in the study's
    first record (builtin, 25 steps, seed 1, in-domain gap 3.1%) and 0.9 in experiments/builtin_eval (gap 0.6%),
    so 0.6 near the 1-2% thresholds; the correlations are assumptions (the records of one seed cannot show them)."""

    budgets: tuple = (25, 50, 100, 200)
    tokens_per_step: int = 4096
    n_seeds: int = 3
    n_blocks: int = 64
    slope: float = SweepStructure.slope
    seed_cv: float = SweepStructure.seed_cv
    block_cv: float = 0.6
    shared: float = round(_chunk_shared_fraction(), 3)
    seed_corr_budgets: float = 0.5
    seed_corr_arms: float = 0.5
    text_corr_cells: float = 0.8

    @property
    def tokens(self) -> np.ndarray:
        return np.asarray(self.budgets, float) * self.tokens_per_step


def study_gaps(rng: np.random.Generator, st: StudyStructure, t_stars, threshold: float) -> np.ndarray:
    """Relative block gaps [arm, budget, seed, block] of one simulated study whose arms' true mean gap curves cross
    `threshold` at t_stars (tokens, one per arm)."""
    n_a, n_k, n_s, n_b = len(t_stars), len(st.budgets), st.n_seeds, st.n_blocks
    curve = threshold * (st.tokens[None, :] / np.asarray(t_stars, float)[:, None]) ** -st.slope  # [arm, budget]

    def corr(n, r):
        return np.full((n, n), r) + (1 - r) * np.eye(n)

    chol = np.linalg.cholesky(np.kron(corr(n_a, st.seed_corr_arms), corr(n_k, st.seed_corr_budgets)))
    seed = (rng.standard_normal((n_s, n_a * n_k)) @ chol.T).T.reshape(n_a, n_k, n_s)
    text = (math.sqrt(st.text_corr_cells) * rng.standard_normal(n_b)
            + math.sqrt(1 - st.text_corr_cells) * rng.standard_normal((n_a, n_k, n_b)))
    own = rng.standard_normal((n_a, n_k, n_s, n_b))
    noise = st.seed_cv * seed[..., None] + st.block_cv * (math.sqrt(st.shared) * text[:, :, None, :]
                                                           + math.sqrt(1 - st.shared) * own)
    return curve[:, :, None, None] * (1 + noise)
