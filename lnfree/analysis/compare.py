"""Cross-entropy tables of original vs vanilla fine-tune vs LN-free (docs/method.md#evaluation-protocol): `make eval`.

    python -m lnfree.eval                                  # the built-in default (what `make eval` runs)
    python -m lnfree.eval 'models=[{name: a, path: gpt2}, {name: b, path: runs/x}]' datasets=[owt]

Every model is loaded through lnfree.io (so a non-GPT-2 model, a tampered export or an unsafe checkpoint is
refused before anything is evaluated) and evaluated on the same chunks in turn, so that the Jensen-Shannon
divergence to the first model (the reference) is computed token by token. Per model and dataset: mean, median,
95% and 99.9% ranges, a bootstrap 95% CI of the mean over chunks, top-1 accuracy, mean entropy, expected
calibration error and mean JSD (analysis/metrics.py). Outputs (analysis/tables.py) in `output_dir`: table.md,
results.json, results.csv, ce_hist.png, ce_by_position.png, training_curves.png. Without `output_dir` they go to
the job's own new dir (outputs/eval/<time>); committed results (experiments/) only when output_dir is named on the
command line, as the Makefile's targets do (lnfree.records.job_output_dir).
"""

from __future__ import annotations

import hydra
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from ..errors import user_errors_as_messages
from ..io import load, load_tokenizer, read_record
from ..model_record import check_tokenizer, logits
from ..paths import CONF_DIR
from ..records import job_output_dir
from ..references import hub_offline, resolve
from .eval_config import SOURCES, EvalError, seeds_written_out
from .eval_config import EvalConfig as EvalConfig  # noqa: F401  (registers the schema)
from .eval_data import eval_chunks
from .metrics import jsd, summarize, token_stats
from .stats import paired_over_seeds
from .tables import write_outputs


def active_pairs(cfg) -> list:
    """The pairs that name at least one evaluated model: the default pairs drop out, with a note, when the
    command line replaces the models."""
    names = {m.name for m in cfg.models}
    active = [p for p in cfg.pairs if names & {*p.a, *p.b}]
    for p in cfg.pairs:
        if p not in active:
            print(f"[lnfree] pair {p.name!r} skipped: none of its models is evaluated")
    return active


def check(cfg) -> dict:
    """Unknown models or datasets fail here, before any model is loaded; returns each model's resolved reference
    by name (resolved once: evaluate loads what was checked)."""
    if not cfg.models:
        raise EvalError("eval needs at least one model")
    names = [m.name for m in cfg.models]
    if len(set(names)) != len(names):
        raise EvalError(f"model names must be unique: {names}")
    # ModelIOError: missing, not GPT-2, not pretrained yet, offline hub
    refs = {m.name: resolve(m.path, cfg.cache_dir) for m in cfg.models}
    for d in cfg.datasets:
        if d.source not in SOURCES:
            raise EvalError(f"dataset {d.name!r}: unknown source {d.source!r}; use one of {SOURCES}")
        if d.source in ("hf", "owt_nanogpt") and hub_offline():
            raise EvalError(f"dataset {d.name!r} streams from the hub, which is offline (HF_HUB_OFFLINE=1)")
        if d.source == "hf" and not d.path:
            raise EvalError(f"dataset {d.name!r}: source=hf needs a path (dataset repo id)")
        if d.source == "files" and not d.files:
            raise EvalError(f"dataset {d.name!r}: source=files needs files")
    for p in active_pairs(cfg):
        unknown = [m for m in [*p.a, *p.b] if m not in names]
        if unknown or len(p.a) != len(p.b) or not p.a:
            raise EvalError(f"pair {p.name!r}: a and b must be equally long lists of model names; "
                            f"unknown: {unknown}")
    if cfg.precision not in ("bf16", "fp32"):
        raise EvalError(f"precision must be bf16 or fp32, not {cfg.precision!r}")
    return refs


@torch.inference_mode()
def evaluate(cfg) -> dict:
    cfg = seeds_written_out(cfg)  # each seed's model by name: what is checked, evaluated and recorded
    refs = check(cfg)
    out_dir = job_output_dir(cfg.output_dir, "eval")  # before any compute: a refused dir costs nothing
    models, tok = {}, None
    for m in cfg.models:
        models[m.name], t = load(refs[m.name], device=cfg.device)
        tok = tok or t
    if cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer)
    if tok is None:
        raise EvalError("no model carries a tokenizer: set `tokenizer`")
    for m in cfg.models:  # one tokenizer for every model: each must be able to read its ids (before any compute)
        check_tokenizer(models[m.name].config, tok, read_record(refs[m.name]), where=f"model {m.name!r}")
    ref = cfg.models[0].name
    autocast = torch.autocast(torch.device(cfg.device).type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    results, per_token_all, paired = {}, {}, {}
    for d in cfg.datasets:
        chunks = eval_chunks(d, tok, cfg.context, cfg.tokens)
        acc = {name: {k: [] for k in ("ce", "entropy", "correct", "maxprob", "jsd")} for name in models}
        bar = tqdm(range(0, len(chunks), cfg.batch), desc=f"eval {d.name}", unit="batch", mininterval=2)
        for i in bar:
            ids = chunks[i : i + cfg.batch].to(cfg.device)
            ref_logp = None
            for name, model in models.items():
                with autocast:
                    out = logits(model, ids)
                stats, logp = token_stats(out, ids)
                if ref_logp is None:
                    ref_logp = logp
                stats["jsd"] = jsd(logp, ref_logp)
                for k, v in stats.items():
                    acc[name][k].append(v.float().cpu())
            bar.set_postfix(tokens=(i + len(ids)) * cfg.context)
        for name in models:
            per_token = {k: torch.cat(v).numpy() for k, v in acc[name].items()}
            if name == ref:
                per_token.pop("jsd")
            results.setdefault(d.name, {})[name] = summarize(per_token, cfg.bootstrap, cfg.seed)
            per_token_all[(d.name, name)] = per_token
        for p in active_pairs(cfg):
            paired.setdefault(d.name, {})[p.name] = {
                "a": list(p.a), "b": list(p.b),
                **paired_over_seeds([per_token_all[(d.name, a)]["ce"] for a in p.a],
                                    [per_token_all[(d.name, b)]["ce"] for b in p.b], cfg.bootstrap, cfg.seed)}
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"[lnfree] writing to {out_dir}")
    write_outputs(results, per_token_all, cfg, out_dir, paired)
    update_model_cards(cfg)
    return results


def update_model_cards(cfg) -> list:
    """For every pair (a, b) of runs whose b is a vanilla control (no site removed), rewrite a's model cards
    with b's validation CE (both runs' summaries measure the same held-out text)."""
    import json

    from ..model_card import update_cards_with_control
    from ..paths import RUN_SUMMARY
    from ..references import find_run_dir

    paths = {m.name: m.path for m in cfg.models}
    written = []
    for p in active_pairs(cfg):
        for a, b in zip(p.a, p.b):
            da, db = find_run_dir(paths.get(a, "")), find_run_dir(paths.get(b, ""))
            if da is None or db is None or not (da / "export").is_dir() or not (db / RUN_SUMMARY).exists():
                continue
            control = json.loads((db / RUN_SUMMARY).read_text())
            if not control.get("removed_sites"):
                written += update_cards_with_control(da, control["val_ce"])
    return written


HYDRA_VALUE_FLAGS = ("--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd", "--experimental-rerun")
HYDRA_INFO = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")  # --info's optional value


def positional_hint(args: list[str]) -> str | None:
    """The command a user meant when they gave model paths as plain arguments (`python -m lnfree.eval runs/x`),
    which Hydra would refuse with a grammar error (every argument is a key=value override or a Hydra flag); None
    when there are none. The entry point prints it and exits 2."""
    paths, skip = [], False
    for a in args:
        if skip:  # the value of a Hydra flag (--config-name eval_llama)
            skip = False
        elif a in HYDRA_VALUE_FLAGS:
            skip = True
        elif "=" not in a and not a.startswith("-") and a not in HYDRA_INFO:
            paths.append(a)
    if not paths:
        return None
    models = ", ".join(f"{{name: m{i}, path: '{p}'}}" for i, p in enumerate(paths))
    return (f"python -m lnfree.eval takes key=value overrides, not paths ({' '.join(paths)}). To evaluate these "
            f"models on the built-in validation text:\n  python -m lnfree.eval \"models=[{models}]\"\n"
            "(a path: a run dir, an export, a .ckpt, builtin:<name> or a hub name; docs/reference/evaluation.md)")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
def main(cfg: DictConfig):
    with user_errors_as_messages():
        evaluate(cfg)
