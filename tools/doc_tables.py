"""Every result table of README.md, docs/ and experiments/*/README.md, generated from the committed JSON records:

    python -m tools.doc_tables           # rewrite every marked table (`make tables`; from the repository root)
    python -m tools.doc_tables --check   # change nothing; exit 1 naming each table its JSON disagrees with

A table sits between `<!-- table:NAME -->` and `<!-- /table -->` (tools/table_markers.py); NAME is a key of
TABLES, a function of the repository root that reads the records and returns the Markdown. The same NAME may
appear in several files (the README's headline table is also in docs/results.md), and is the same text in each.
tests/test_doc_tables.py fails when a committed table differs from what its JSON gives. Every table is made (so
every record read) before any page is written: a half-written or malformed record stops `make tables` with its
file named and leaves every page as it was (all pages or none).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

from lnfree.errors import user_errors_as_messages
from lnfree.records import RecordError, read_json, write_text_atomic

from .table_markers import marked, replaced

ROOT = Path(__file__).resolve().parents[1]  # the repository: its README.md, docs/ and experiments/


def _json(root: Path, rel: str) -> dict:
    return read_json(root / rel)  # a half-written record: RecordError naming the file and line


def _seedless(name: str) -> str:
    return re.sub(r"_s\d+$", "", name)


def _groups(names) -> dict[str, list[str]]:
    """Model names grouped by their name without the seed suffix, in first-seen order: vanilla_s1..3 -> vanilla."""
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(_seedless(n), []).append(n)
    return groups


def _ci(lo, hi, digits=4) -> str:
    return f"[{lo:+.{digits}f}, {hi:+.{digits}f}]"


def _gap(p) -> tuple[str, str]:
    """(gap over seeds with its 95% CI in nats, the same relative in %) of a paired block of results.json."""
    g, r = p["gap_over_seeds"], p["relative_gap_over_seeds"]
    gap = f"{g['mean']:+.4f}" + (f" {_ci(*g['ci95'])}" if "ci95" in g else "")
    rel = f"{100 * r['mean']:+.2f}%" + (f" {_ci(100 * r['ci95'][0], 100 * r['ci95'][1], 2)}" if "ci95" in r else "")
    return gap, rel


# what each group of models in an evaluation is, for the tables' first column
MODEL_LABELS = {"vanilla": "vanilla fine-tune", "lnfree": "LN-free", "removed_no_finetune": "all norms removed, "
                "no fine-tuning", "lora_vanilla": "LoRA vanilla", "lora_lnfree": "LoRA LN-free"}


def _label(group: str, paths: dict) -> str:
    if group == "original":
        return f"original (`{paths['original']}`)"
    return MODEL_LABELS.get(group, group)


def _models_table(res: dict) -> str:
    """One row per model group (seeds joined by /): the statistics of every model on the first dataset."""
    results = next(iter(res["results"].values()))
    paths = {m["name"]: m["path"] for m in res["config"]["models"]}
    lines = ["| model | mean CE | median | 95% CI of the mean | top-1 acc. | entropy | ECE | JSD to original |",
             "|---|---|---|---|---|---|---|---|"]
    for group, names in _groups(results).items():
        rs = [results[n] for n in names]

        def col(key, fmt, rs=rs):
            return " / ".join("-" if key not in r else format(r[key], fmt) for r in rs)
        seeds = f", seeds {' / '.join(n.rsplit('_s', 1)[1] for n in names)}" if len(names) > 1 else ""
        ci = f"{rs[0]['ci95_low']:.3f}-{rs[0]['ci95_high']:.3f}" if len(rs) == 1 else ""
        median = col("median", ".4f" if len(rs) == 1 else ".3f")
        lines.append(f"| {_label(group, paths)}{seeds} | {col('mean', '.4f')} | {median} "
                     f"| {ci} | {col('accuracy', '.3f')} | {col('entropy', '.3f')} | {col('ece', '.3f')} "
                     f"| {col('jsd_to_reference', '.3f')} |")
    return "\n".join(lines)


def _pair_label(name: str) -> str:
    a, b = name.split("_minus_")
    words = {**MODEL_LABELS, "original": "original"}
    return f"{words.get(a, a)} - {words.get(b, b)}"


def eval_models(root: Path) -> str:
    return _models_table(_json(root, "experiments/builtin_eval/results.json"))


def eval_gaps(root: Path) -> str:
    """The paired gaps of `make eval`: per seed (bootstrap over chunks) and over seeds (t interval)."""
    paired = next(iter(_json(root, "experiments/builtin_eval/results.json")["paired"].values()))
    n = max(len(p["per_seed"]) for p in paired.values())
    lines = ["| pair | " + " | ".join(f"seed {i}" for i in range(1, n + 1)) + " | over seeds (95% CI) | relative |",
             "|---|" + "---|" * (n + 2)]
    for name, p in paired.items():
        seeds = " | ".join(f"{r['gap']:+.4f} {_ci(*r['ci95'])}" for r in p["per_seed"])
        lines.append(f"| {_pair_label(name)} | {seeds} | " + " | ".join(_gap(p)) + " |")
    return "\n".join(lines)


SHIFT_LABELS = {"in_domain_shakespeare_val": "in-domain", "near_license_prose": "near (license prose)",
                "far_python_docs": "far (Python docs)"}


# the shift study's records by fine-tuning length: make shift (100 steps) and make shift-long (300 steps)
SHIFT_RECORDS = {"100 steps": "experiments/shift/results.json", "300 steps": "experiments/shift/steps_300/results.json"}


def shift_gaps(root: Path) -> str:
    """Claim 1 under shift: the paired gaps of `make shift` per dataset (experiments/shift)."""
    paired = _json(root, SHIFT_RECORDS["100 steps"])["paired"]
    lines = ["| dataset | LN-free - vanilla, nats | relative | vanilla - original, relative |", "|---|---|---|---|"]
    for ds, label in SHIFT_LABELS.items():
        gap, rel = _gap(paired[ds]["lnfree_minus_vanilla"])
        lines.append(f"| {label} | {gap} | {rel} | {_gap(paired[ds]['vanilla_minus_original'])[1]} |")
    return "\n".join(lines)


def shift_by_length(root: Path) -> str:
    """Does a longer fine-tune close the shift gap? The LN-free - vanilla gap per dataset after 100 fine-tuning
    steps (`make shift`) and after 300 (`make shift-long`), each over seeds 1-3."""
    short, long = (_json(root, rec)["paired"] for rec in SHIFT_RECORDS.values())
    lines = ["| dataset | LN-free - vanilla, 100 steps | 300 steps | vanilla - original, 100 steps | 300 steps |",
             "|---|---|---|---|---|"]
    for ds, label in SHIFT_LABELS.items():
        cells = [_gap(r[ds][pair])[1] for pair in ("lnfree_minus_vanilla", "vanilla_minus_original")
                 for r in (short, long)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


ABLATION_ARMS = {"builtin": "default (`schedule=builtin`)", "noaux": "no auxiliary loss (`builtin_noaux`)",
                 "gradual": "slower removal (`builtin_gradual`)",
                 "special": "special bos/eot sigmas (`builtin_special`)"}


def ablations(root: Path) -> str:
    paired = next(iter(_json(root, "experiments/ablations/results.json")["paired"].values()))
    lines = ["| arm (3 seeds each) | minus vanilla (95% CI) | relative | minus the default LN-free run (95% CI) |",
             "|---|---|---|---|"]
    for arm, label in ABLATION_ARMS.items():
        gap, rel = _gap(paired[f"{arm}_minus_vanilla"])
        other = _gap(paired[f"{arm}_minus_builtin"])[0] if f"{arm}_minus_builtin" in paired else "-"
        lines.append(f"| {label} | {gap} | {rel} | {other} |")
    return "\n".join(lines)


def lora_gaps(root: Path) -> str:
    paired = next(iter(_json(root, "experiments/lora/results.json")["paired"].values()))
    lines = ["| pair (a - b), same tokens, over seeds | gap, nats (95% CI) | relative |", "|---|---|---|"]
    lines += [f"| {_pair_label(name)} | " + " | ".join(_gap(p)) + " |" for name, p in paired.items()]
    return "\n".join(lines)


def lora_models(root: Path) -> str:
    return _models_table(_json(root, "experiments/lora/results.json"))


def downstream(root: Path) -> str:
    res = _json(root, "experiments/downstream/results.json")["models"]
    paths = {n: m["path"] for n, m in res.items()}
    lines = ["| model | CE, nats/token | cloze acc | cloze acc (PMI) |", "|---|---|---|---|"]
    for group, names in _groups(res).items():
        def col(task, key, fmt, names=names):
            return " / ".join(format(res[n]["metrics"][task][key], fmt) for n in names)
        lines.append(f"| {_label(group, paths)} | {col('lnfree_builtin_ppl', 'token_ce', '.4f')} "
                     f"| {col('lnfree_builtin_cloze', 'acc', '.4f')} "
                     f"| {col('lnfree_builtin_cloze', 'acc_mutual_info', '.4f')} |")
    return "\n".join(lines)


def _threshold(key: str) -> str:
    return key.replace("nats", " nats") if key.endswith("nats") else f"{100 * float(key):g}%"


def _tokens(t: float) -> str:
    return f"{t / 1e3:.0f}k"


def _t_star_cell(size: dict, t: dict) -> str:
    """A size's T* as a table cell: beyond or below its measured budgets, or the value, marked "edge" when fewer than
    the required measured budgets lie on one side of it (scaling.BRACKET: not in the fit)."""
    first, last = size["budgets"][0], size["budgets"][-1]
    if t["value"] is None or t["value"] > last:
        return f"beyond {_tokens(last)}"
    if t["value"] < first:
        return f"below {_tokens(first)}"
    return _tokens(t["value"]) + ("" if t["bracketed"] else " (edge)")


def _scaling_table(s: dict, sizes: list[dict]) -> str:
    """A data-scaling study's scaling.json as a table: T* of the given sizes, the exponent b of T* ~ N^b with its
    interval, R^2, the leave-one-size-out range and the verdict, one row per threshold."""
    lines = ["| threshold | T* per size (" + " / ".join(z["name"].removeprefix("builtin_") for z in sizes)
             + ", tokens) | b [95% CI] | R^2 | leave-one-size-out b | verdict |", "|---|---|---|---|---|---|"]
    for key, e in s["exponent"].items():
        tstar = " / ".join(_t_star_cell(z, z["t_star"][key]) for z in sizes)
        b = "-" if e["value"] is None else (f"{e['value']:+.2f} {_ci(e['ci_low'], e['ci_high'], 2)}"
                                            if e["ci_low"] is not None else
                                            f"{e['value']:+.2f} ({len(e['sizes'])} sizes: no interval)")
        r2 = "-" if e["r2"] is None else f"{e['r2']:.2f}"
        loo = [x["value"] for x in e["leave_one_out"]]
        loo = f"{min(loo):+.2f} to {max(loo):+.2f}" if loo else "-"
        lines.append(f"| {_threshold(key)} | {tstar} | {b} | {r2} | {loo} | {s['verdict'][key].split(':')[0]} |")
    return "\n".join(lines)


def scaling_width(root: Path) -> str:
    """The width-only data-scaling study (its sizes with a complete row in some fit; the others stopped early)."""
    s = _json(root, "experiments/data_scaling/width_only/scaling.json")
    fit = {n for e in s["exponent"].values() for n in e["sizes"]}
    return _scaling_table(s, [z for z in s["sizes"] if z["name"] in fit])


def scaling_depth(root: Path) -> str:
    """The depth-and-width data-scaling study (issue 24), every size; the LN-free arm removes every site within the
    first 40% of the budget (schedule `scaled`)."""
    s = _json(root, "experiments/data_scaling/scaling.json")
    return _scaling_table(s, s["sizes"])


def scaling_depth_variant(root: Path) -> str:
    """The same study's variant arm: a fixed number of steps per removal event (first pretrained model per size)."""
    s = _json(root, "experiments/data_scaling/depth_fixed_steps/scaling.json")
    return _scaling_table(s, s["sizes"])


def scaling_depth_ordering(root: Path) -> str:
    """The depth-and-width study without a fit: per budget, each size's seed-mean gap (range over its pretrained
    models) against the next smaller size's, and whether every pretrained model of the larger size lies below
    every one of the smaller (scaling.size_ordering)."""
    from lnfree.analysis.scaling import ORDER_WORDS

    s = _json(root, "experiments/data_scaling/scaling.json")
    o = s["size_ordering"]["budgets"]
    pairs = [(p["larger"], p["smaller"]) for p in next(iter(o.values()))["pairs"]]

    def rng(v: list) -> str:
        return f"{100 * min(v):.2f}" if len(v) == 1 else f"{100 * min(v):.2f}-{100 * max(v):.2f}"

    lines = ["| budget (tokens) | " + " | ".join(f"{a} vs {b} (gap %)" for a, b in pairs) + " |",
             "|---|" + "---|" * len(pairs)]
    for b, v in o.items():
        cells = [f"{rng(v['per_pretrained'][a])} vs {rng(v['per_pretrained'][c])}: {ORDER_WORDS[p['order']]}"
                 for (a, c), p in zip(pairs, v["pairs"])]
        lines.append(f"| {_tokens(int(b))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scaling_depth_censored(root: Path) -> str:
    """The depth-and-width study's exponent by censored maximum likelihood (issue 39; scaling.censored_lines'
    columns, compact): per threshold the censored verdict and its interval, b at each fixed lack of fit, the
    lack of fit's profile interval, the coverage on this design, and today's rule beside it; for the fixed grid and,
    once measured, the fixed grid with stage 2's budgets."""
    from lnfree.analysis.scaling import b_interval_text

    s = _json(root, "experiments/data_scaling/scaling.json")
    blocks = [("fixed grid", s["censored"])] + ([("fixed grid + stage 2", s["censored_extended"])]
                                                  if s.get("censored_extended") else [])
    sds = list(next(iter(s["censored"].values()))["lack_of_fit"])
    lines = ["| budgets | threshold | today's rule (measured crossings) | censored verdict | b [95%, every sd <= 1 and "
             "in its profile interval] | sd profile interval | " + " | ".join(f"b at sd {t}" for t in sds)
             + " | coverage on this design |", "|---|---|---|---|---|---|" + "---|" * len(sds) + "---|"]
    for name, block in blocks:
        for key, c in block.items():
            cov = "not tested" if c["coverage"] is None else f"{c['coverage']:.3f}"
            lines.append(f"| {name} | {_threshold(key)} | {s['verdict'][key].split(':')[0]} | {c['verdict']} | "
                         f"{b_interval_text(c)} | {c['lack_of_fit_ci'][0]:g}-{c['lack_of_fit_ci'][1]:g} | "
                         + " | ".join(b_interval_text(c["lack_of_fit"][t]) for t in sds) + f" | {cov} |")
    return "\n".join(lines)


def censored_coverage(root: Path) -> str:
    """The censored fit's coverage on the depth study's design (experiments/data_scaling/censored_coverage.json): per
    truth and threshold, the verdict interval's two-sided coverage, the profile-interval-only union's, the fixed-tau
    intervals' at tau 0 and at the true tau, how often "b < 1" is claimed, and the measured-crossings estimator's
    coverage and number of sweeps with an interval."""
    r = _json(root, "experiments/data_scaling/censored_coverage.json")
    lines = ["| true b | true lack of fit | threshold | verdict interval | profile-interval union | b at sd 0 | "
             "b at the true sd | claims b < 1 | measured crossings: coverage (sweeps with an interval) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in r["cells"]:
        for key, v in c["censored"].items():
            at = v["coverage_at_tau"]
            true_sd = at.get(f"{c['lack_of_fit_sd']:g}")
            today, fits = c["measured_crossings"]["coverage"][key], c["measured_crossings"]["fits"][key]
            lines.append(f"| {c['b']:g} | {c['lack_of_fit_sd']:g} | {_threshold(key)} | {v['coverage']:.3f} | "
                         f"{v['coverage_profile_envelope']:.3f} | {at['0']:.3f} | "
                         + ("-" if true_sd is None else f"{true_sd:.3f}") + f" | {v['claims']['sublinear']:.3f} | "
                         + ("- (0)" if today is None else f"{today:.3f} ({fits})") + " |")
    return "\n".join(lines)


def paper_counting(root: Path) -> str:
    """The paper's four published GPT-2 schedules (conf/experiment/gpt2_*_paper.yaml) counted two ways, their
    exponents, and this study's T* in the same unit (tokens) beside them (analysis/paper_counting.py)."""
    from lnfree.analysis.paper_counting import exponents, schedules

    rows = schedules()  # the source checkout's configs (conf/ is code, not a record under `root`)
    lines = ["| published run | parameters (non-embedding) | steps | tokens per step | total tokens | last removal "
             "at step | tokens until the last removal |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['params'] / 1e6:,.0f}M ({r['non_embedding_params'] / 1e6:,.0f}M) | "
                     f"{r['steps']} | {r['tokens_per_step']:,} | {r['total_tokens'] / 1e6:,.0f}M | "
                     f"{r['last_removal_step']} | {r['tokens_until_last_removal'] / 1e6:,.0f}M |")
    k, k_ne = exponents(rows), exponents(rows, "non_embedding_params")
    lines.append(f"| tokens ~ N^k (least squares, 4 runs; non-embedding N) | | | | k = {k['total_tokens']:.2f} "
                 f"({k_ne['total_tokens']:.2f}) | | k = {k['tokens_until_last_removal']:.2f} "
                 f"({k_ne['tokens_until_last_removal']:.2f}) |")
    s = _json(root, "experiments/data_scaling/scaling.json")
    keys = [k for k in s["censored"] if not k.endswith("nats")]
    lines += ["", "| this study's size | non-embedding parameters | "
              + " | ".join(f"T* at {_threshold(k)} (tokens, bracket of both pretrained models)" for k in keys) + " |",
              "|---|---|" + "---|" * len(keys)]
    for z in s["sizes"]:
        cells = []
        for k in keys:
            iv = s["censored"][k]["intervals"][z["name"]]
            lo = min(x[0] for x in iv)
            hi = None if any(x[1] is None for x in iv) else max(x[1] for x in iv)
            cells.append(f"> {_tokens(lo)}" if hi is None else f"< {_tokens(hi)}" if lo == 0 else
                         f"{_tokens(lo)}-{_tokens(hi)}")
        lines.append(f"| {z['name']} | {z['non_embedding_params'] / 1e6:.3f}M | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def depth_family(root: Path) -> str:
    """The depth-and-width family's finished pretrained replicates (experiments/depth_family/family.json)."""
    from lnfree.analysis.family import replicates_table

    return replicates_table(_json(root, "experiments/depth_family/family.json"))


def depth_lr_probe(root: Path) -> str:
    """The depth family's LR probe (experiments/depth_family/lr.json): per size the chosen fine-tuning LR, whether
    the rule was met, and each LR's largest drift of the vanilla control from its pretrained model over the budgets."""
    res = _json(root, "experiments/depth_family/lr.json")
    lrs = sorted({lr for c in res["sizes"].values() for lr in c["max_abs_drift"]}, key=float)
    lines = ["| size | chosen LR | rule met | " + " | ".join(f"largest drift at {lr}" for lr in lrs) + " |",
             "|" + "---|" * (3 + len(lrs))]
    for m, c in res["sizes"].items():
        drift = [f"{c['max_abs_drift'][lr]:.2%}" if lr in c["max_abs_drift"] else "-" for lr in lrs]
        lines.append(f"| {m.removeprefix('builtin_')} | {c['lr']:g} | {'yes' if c['rule_met'] else '**no**'} | "
                     + " | ".join(drift) + " |")
    return "\n".join(lines)


def family(root: Path) -> str:
    """The built-in width family (recipe dropout 0.1) with the dropout-0.2 recipe's validation CE beside it."""
    f = _json(root, "experiments/builtin_family/family.json")
    other = {z["name"]: z for z in _json(root, "experiments/builtin_family/dropout_0.2/family.json")["sizes"]}
    lines = ["| model | layers x width | parameters | non-embedding | pretraining tokens | validation CE "
             "| change over the last 10% | dropout 0.2 instead |", "|---|---|---|---|---|---|---|---|"]
    for z in f["sizes"]:
        alt = f"{other[z['name']]['val_ce']:.4f}" if z["name"] in other else "-"
        lines.append(f"| {z['name']} | {z['n_layer']} x {z['n_embd']} | {z['params'] / 1e6:.2f}M "
                     f"| {z['non_embedding_params'] / 1e6:.3f}M | {z['pretrain_tokens'] / 1e6:.1f}M "
                     f"| {z['val_ce']:.4f} | {z['convergence']['change_last_10pct']:.4f} | {alt} |")
    return "\n".join(lines)


def distributed(root: Path) -> str:
    runs = _json(root, "experiments/distributed/default_runs.json")["runs"]
    single = runs["cpu"]["val_ce"]
    lines = [f"| hardware | processes | every site removed | val CE (before {runs['cpu']['val_ce_before']:.4f}) "
             "| vs single process | export errors hf / folded | event steps checked across ranks |",
             "|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        vs = "-" if r["world_size"] == 1 else f"{r['val_ce'] - single:+.4f}"
        checks = "-" if r["world_size"] == 1 else f"{r['rank_checks']} of {len(r['removed_sites'])}"
        lines.append(f"| `{name}` | {r['world_size']} | {'yes' if r['all_removed'] else 'no'} | {r['val_ce']:.4f} "
                     f"| {vs} | {r['exports']['hf']:.1e} / {r['exports']['folded']:.1e} | {checks} |")
    return "\n".join(lines)


DLA_LABELS = {"original": "original", "vanilla": "vanilla fine-tune", "lnfree": "LN-free"}


def _pct(v: float) -> str:  # one decimal, or four where the error is exactly what LN removal makes vanish
    return f"{v:.1f}" if v >= 0.05 else f"{v:.4f}"


def dla_builtin(root: Path) -> str:
    """NMAE(DLA, DE) of the built-in default and its fine-tunes: global, per head, per MLP (experiments/interp)."""
    d = _json(root, "experiments/interp/dla.json")
    n_layer = d["original"]["n_layer"]
    lines = ["| model | NMAE(DLA, DE), all components | 95% CI | per head: median (range) | "
             + " / ".join(f"MLP layer {i}" for i in range(n_layer)) + " |", "|---|---|---|---|---|"]
    for key, m in d.items():
        comp = m["per_component"]
        heads = sorted(v["nmae_percent"] for k, v in comp.items() if re.fullmatch(r"L\d+H\d+", k))
        med = statistics.median(heads)
        lines.append(f"| {DLA_LABELS.get(key, key)} (`{m['path']}`) | {_pct(m['nmae_percent'])}% "
                     f"| {_pct(m['ci95'][0])}-{_pct(m['ci95'][1])}% "
                     f"| {_pct(med)}% ({_pct(heads[0])}-{_pct(heads[-1])}%) | "
                     + " / ".join(f"{_pct(comp[f'L{i}.mlp']['nmae_percent'])}%" for i in range(n_layer)) + " |")
    return "\n".join(lines)


# the families' evaluations (make eval-families) beside GPT-2's (make eval, make interp): results and DLA records
FAMILY_RECORDS = {"GPT-2": ("experiments/builtin_eval/results.json", "experiments/interp/dla.json"),
                  "Llama architecture": ("experiments/families/llama/results.json",
                                         "experiments/families/llama/dla.json"),
                  "GPT-NeoX": ("experiments/families/neox/results.json", "experiments/families/neox/dla.json")}


def families_eval(root: Path) -> str:
    """Per family, its built-in member's original, vanilla and LN-free CE (seeds 1-3), the paired LN-free - vanilla
    gap over seeds, and NMAE(DLA, DE) of the original and the seed-1 LN-free model."""
    lines = ["| family (built-in member) | original CE | vanilla CE, seeds 1 / 2 / 3 | LN-free CE, seeds 1 / 2 / 3 "
             "| LN-free - vanilla, nats (95% CI) | relative | NMAE(DLA, DE): original -> LN-free |",
             "|---|---|---|---|---|---|---|"]
    for fam, (res_path, dla_path) in FAMILY_RECORDS.items():
        res = _json(root, res_path)
        results = next(iter(res["results"].values()))
        pair = next(iter(res["paired"].values()))["lnfree_minus_vanilla"]
        original = next(m["path"] for m in res["config"]["models"] if m["name"] == "original")
        groups = _groups(results)

        def ces(group, results=results, groups=groups):
            return " / ".join(f"{results[n]['mean']:.4f}" for n in groups[group])
        dla = _json(root, dla_path)
        lines.append(f"| {fam} (`{original}`) | {results['original']['mean']:.4f} | {ces('vanilla')} "
                     f"| {ces('lnfree')} | " + " | ".join(_gap(pair)) + f" | {_pct(dla['original']['nmae_percent'])}% "
                     f"-> {_pct(dla['lnfree']['nmae_percent'])}% |")
    return "\n".join(lines)


def _heads(comp: dict) -> list[float]:
    return sorted(v["nmae_percent"] for k, v in comp.items() if re.fullmatch(r"L\d+H\d+", k))


# the paper's numbers (Baroni et al. 2025, GPT-2 small), quoted for comparison: not measured here
PAPER_INTERP = {"dla": "10-40%, up to ~150% in the last layer; LN-free 0%",
                "patching": "not markedly better without LN (IOI)", "sinks": "present in GPT-2",
                "norms": "~3000 vs 50-500 with LN; < ~300 without", "neurons": "11.584: 0.052 / 0.012 / ~0"}


def interp_summary(root: Path) -> str:
    """The interpretability analyses next to the paper's numbers: original / vanilla / LN-free in each cell."""
    dla = _json(root, "experiments/interp/dla.json")
    patch = _json(root, "experiments/interp/synth_w64/patching.json")["models"]
    sinks = _json(root, "experiments/interp/synth_w64/sinks.json")
    builtin_sinks = _json(root, "experiments/interp/builtin/sinks.json")
    neurons = _json(root, "experiments/interp/builtin/neurons.json")
    models = ("original", "vanilla", "lnfree")

    def per_model(f):
        return " / ".join(f(m) for m in models)

    heads = {m: _heads(dla[m]["per_component"]) for m in models}
    dla_cell = "built-in: median " + per_model(lambda m: f"{_pct(statistics.median(heads[m]))}% "
                                                         f"({_pct(heads[m][0])}-{_pct(heads[m][-1])}%)")
    patch_cell = ("positive control, back-copy task: "
                  + per_model(lambda m: f"{patch[m]['nmae_percent']:.1f}% [{patch[m]['nmae_ci95'][0]:.1f}, "
                                        f"{patch[m]['nmae_ci95'][1]:.1f}]")
                  + "; Pearson " + per_model(lambda m: f"{patch[m]['pearson']:.3f}"))
    sink_heads = {m: [(layer, a) for layer, row in enumerate(sinks[m]["sinks"]["alpha"]) for a in row
                      if a > sinks[m]["sinks"]["threshold"]] for m in models}
    n_heads = sum(len(row) for row in sinks["original"]["sinks"]["alpha"])
    counts = {len(v) for v in sink_heads.values()}
    layers = sorted({layer for v in sink_heads.values() for layer, _ in v})
    count = (f"{counts.pop()} of {n_heads} heads in all three" if len(counts) == 1
             else per_model(lambda m: f"{len(sink_heads[m])} of {n_heads} heads"))
    builtin_max = max(a for m in models for row in builtin_sinks[m]["sinks"]["alpha"] for a in row)
    sink_cell = (f"positive control: {count} (layer {', '.join(map(str, layers))}, alpha "
                 + per_model(lambda m: f"{min(a for _, a in sink_heads[m]):.2f}-{max(a for _, a in sink_heads[m]):.2f}")
                 + f"); built-in models: none (every alpha <= {builtin_max:.3f})")
    norms = {m: sinks[m]["norms"] for m in models}
    norm_cell = ("positive control: " + per_model(lambda m: f"{norms[m]['pos0'][-1]:.1f} vs {norms[m]['rest'][-1]:.1f}")
                 + "; top/median activation " + per_model(lambda m: f"{norms[m]['massive_pos0'][-1]:.1f}"))
    strongest = {m: max(neurons[m]["neurons"], key=lambda r: r["median_abs_te_entropy"]) for m in models}
    neuron_cell = ("built-in: none of GPT-2's kind; strongest entropy neuron "
                   + per_model(lambda m: f"{strongest[m]['median_abs_te_entropy']:.3f}") + ", LN-mediated "
                   + per_model(lambda m: f"{100 * strongest[m]['ln_mediated_fraction']:.1f}%"))
    rows = [("DLA vs DE, per-head NMAE", PAPER_INTERP["dla"], dla_cell, "`dla.json`, `dla.png`"),
            ("AtP vs AP (residual x position and heads), NMAE", PAPER_INTERP["patching"], patch_cell,
             "`synth_w64/patching.json`, `synth_w64/patching.png`"),
            ("attention sinks (heads with alpha > 0.3)", PAPER_INTERP["sinks"], sink_cell,
             "`synth_w64/sinks.json`, `synth_w64/sinks.png`; `builtin/`"),
            ("position-0 residual norm (ln_f input) vs the other positions", PAPER_INTERP["norms"], norm_cell,
             "`synth_w64/sinks.json`"),
            ("confidence neurons, median abs delta entropy", PAPER_INTERP["neurons"], neuron_cell,
             "`builtin/neurons.json`, `builtin/neurons.png`")]
    return "\n".join(["| analysis | paper (GPT-2 small) | here: original / vanilla / LN-free | file |",
                      "|---|---|---|---|", *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows)])


RANDOM_NULL_FRACTION = 0.10  # a random direction's null-space fraction at these widths (experiments/interp)


def _small(rel: dict, limit: float = 0.01) -> str:
    """Claim 1's verdict on a relative gap: below `limit` (1%) with its whole interval, above it, or neither."""
    lo, hi = rel["ci95"]
    return "**reproduced**" if hi < limit else "**contradicted**" if lo > limit else "**not established**"


def _mci(o: dict, digits: int, scale: float = 1.0, unit: str = "") -> str:
    return (f"{scale * o['mean']:.{digits}f}{unit} [{scale * o['ci95'][0]:.{digits}f}, "
            f"{scale * o['ci95'][1]:.{digits}f}]")


def interp_verdicts(root: Path) -> str:
    """A verdict per claim, each decided from its interval by the rule written in its row."""
    rels = {steps: {ds: _json(root, rec)["paired"][ds]["lnfree_minus_vanilla"]["relative_gap_over_seeds"]
                    for ds in SHIFT_LABELS} for steps, rec in SHIFT_RECORDS.items()}
    dla = _json(root, "experiments/interp/dla.json")
    heads = {k: statistics.median(v["nmae_percent"] for c, v in m["per_component"].items()
                                  if re.fullmatch(r"L\d+H\d+", c)) for k, m in dla.items()}
    sw = _json(root, "experiments/interp/patching.json")["patching"]["switch"]
    po, pl = sw["original"]["pearson"], sw["lnfree"]["pearson"]
    no, nl = sw["original"]["nmae_percent"], sw["lnfree"]["nmae_percent"]
    overlap = po["ci95"][1] >= pl["ci95"][0] and pl["ci95"][1] >= po["ci95"][0]
    null = _json(root, "experiments/interp/neurons.json")["neurons"]["original"]["null_space_fraction"]
    sinks = _json(root, "experiments/interp/sinks.json")["sinks"]["original"]["sink_heads"]
    shifted = "; ".join(f"{steps}: " + ", ".join(f"{SHIFT_LABELS[ds].split(' ')[0]} {100 * r['mean']:+.2f}% "
                                                   f"[{100 * r['ci95'][0]:+.2f}, {100 * r['ci95'][1]:+.2f}]"
                                                   for ds, r in rel.items()) for steps, rel in rels.items())
    shift_verdicts = "; ".join(f"{steps}: " + ", ".join(f"{SHIFT_LABELS[ds].split(' ')[0]} {_small(r)}"
                                                         for ds, r in rel.items()) for steps, rel in rels.items())
    rows = [
        ("1. removing LN costs little CE (below 1%), also off-distribution", "small gaps on OpenWebText and the Pile",
         f"built-in default, LN-free - vanilla over 3 seeds (`../shift/`), by fine-tuning length: {shifted}",
         shift_verdicts + " (this 2-layer model and these recipes)"),
        ("3. DLA equals the direct effect without LN", "per-head NMAE 10-40%, ~0% LN-free",
         f"built-in, per-head median NMAE: {heads['original']:.1f}% / {heads['vanilla']:.1f}% / "
         f"{heads['lnfree']:.4f}%", "**reproduced**" if heads["lnfree"] < 0.1 < heads["original"]
         else "**not established**"),
        ("4. AtP is not markedly more accurate without LN", "IOI on GPT-2 (a correlation of AtP with AP)",
         f"switch task: Pearson {_mci(po, 3)} original vs {_mci(pl, 3)} LN-free; NMAE {_mci(no, 1, unit='%')} vs "
         f"{_mci(nl, 1, unit='%')}",
         ("correlation: **not established** (intervals overlap; consistent with the paper)" if overlap
          else "correlation: **contradicted**") + "; NMAE: "
         + ("**contradicted on this control**" if nl["ci95"][1] < no["ci95"][0] else "**not established**")),
        ("5. confidence neurons stop working without LN", "11.584: median abs delta H 0.052 -> ~0",
         f"top entropy neuron's null-space fraction {_mci(null, 3)} (a random direction's: {RANDOM_NULL_FRACTION})",
         "**not tested** (no control has a confidence neuron)" if null["ci95"][1] < RANDOM_NULL_FRACTION
         else "see neurons.json"),
        ("attention sinks stay, position-0 peak goes", "sinks; pos-0 norm ~3000 -> < ~300",
         f"sink heads per layer in the 3 originals: {sinks['values']}",
         "**not established** over seeds (no sinks in the controls)" if not any(map(any, sinks["values"]))
         else "see sinks.json"),
    ]
    return "\n".join(["| claim | paper (GPT-2 small) | here | verdict |", "|---|---|---|---|",
                      *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows)])


def interp_controls(root: Path) -> str:
    """The positive controls over replicates: patching, sinks, entropy neurons (experiments/interp/*.json)."""
    from lnfree.analysis.interp.controls_plot import tables

    return tables(root / "experiments/interp")


def bench_cpu(root: Path) -> str:
    from lnfree.bench.cpu import table

    runs = [_json(root, f"experiments/bench/{f}.json")
            for f in ("cpu", "cpu_run2", "cpu_run3", "cpu_run4", "cpu_distill")]
    return table(runs[0], runs[1:])


def bench_profile(root: Path) -> str:
    from lnfree.bench.profile import table

    return table(_json(root, "experiments/bench/profile.json"))


def efficient(root: Path) -> str:
    from lnfree.sweeps.efficient_analysis import summary_table

    return summary_table(_json(root, "experiments/efficient/efficient.json"))


TABLES = {f.__name__: f for f in (eval_models, eval_gaps, ablations, lora_gaps, lora_models, downstream, scaling_width,
                                   family, distributed, dla_builtin, interp_summary, interp_controls, interp_verdicts,
                                   shift_gaps, bench_cpu, bench_profile, families_eval,
                                   shift_by_length, depth_family, depth_lr_probe, scaling_depth,
                                   scaling_depth_ordering, scaling_depth_variant, scaling_depth_censored,
                                   paper_counting, censored_coverage, efficient)}


def pages(root: Path = ROOT) -> list[Path]:
    """Every Markdown file that may hold a generated table."""
    return [p for p in [root / "README.md", *sorted((root / "docs").rglob("*.md")),
                        *sorted((root / "experiments").rglob("README.md"))] if p.exists()]


def stale(page: Path, root: Path = ROOT, cache: dict | None = None) -> list[str]:
    """Names of the marked tables of `page` whose committed text differs from what the JSON gives."""
    cache = {} if cache is None else cache
    bad = []
    for name, text in marked(page.read_text()).items():
        if name not in TABLES:
            raise KeyError(f"{page}: unknown table {name!r} (known: {', '.join(TABLES)})")
        if name not in cache:
            cache[name] = _table(name, root)
        if text != cache[name]:
            bad.append(name)
    return bad


def _table(name: str, root: Path) -> str:
    """The table NAME from its records; a record it cannot read is a RecordError naming the table."""
    try:
        return TABLES[name](root)
    except RecordError:
        raise
    except (KeyError, IndexError, StopIteration, TypeError, ValueError, OSError) as e:
        raise RecordError(f"table {name!r}: its record does not hold what the table needs ({type(e).__name__}: "
                          f"{e}); no page was written") from e


def write(root: Path = ROOT) -> list[str]:
    """Rewrite every marked table of every page from the JSON; returns the 'page: table' entries that changed.
    Every page's new text is made first, so one bad record leaves every page unchanged."""
    cache, changed, new = {}, [], {}
    for page in pages(root):
        names = stale(page, root, cache)
        if names:
            new[page] = replaced(page.read_text(), {n: cache[n] for n in names})
            changed += [f"{page.relative_to(root)}: {n}" for n in names]
    for page, text in new.items():
        write_text_atomic(page, text)
    return changed


def main(argv=None):
    p = argparse.ArgumentParser(description="regenerate the result tables of the README, docs/ and experiments/")
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a committed table is stale")
    a = p.parse_args(argv)
    with user_errors_as_messages():
        _main(a)


def _main(a):
    if a.check:
        cache = {}
        bad = [f"{page.relative_to(ROOT)}: {n}" for page in pages() for n in stale(page, ROOT, cache)]
        print("\n".join(f"[lnfree] stale table {b}" for b in bad) or f"[lnfree] all {len(cache)} tables up to date")
        sys.exit(1 if bad else 0)
    changed = write()
    print("\n".join(f"[lnfree] rewrote {c}" for c in changed) or "[lnfree] every table already matches its JSON")


if __name__ == "__main__":
    main()
