"""Cross-entropy tables of original vs vanilla fine-tune vs LN-free (METHOD.md section 7).

    python -m lnfree.eval                                  # the built-in default (what `make eval` runs)
    python -m lnfree.eval 'models=[{name: a, path: gpt2}, {name: b, path: runs/x}]' datasets=[owt]

Protocol: next-token CE (nats/token) over fixed `context`-token chunks, end-of-text kept as a target, no
BOS prepended; the same `tokens` for every model. Every model is evaluated on the same batch in turn, so
Jensen-Shannon divergence to the first model (the reference) is computed token by token.
Per model and dataset: mean, median, 95% and 99.9% ranges, a bootstrap 95% CI of the mean (resampling
chunks, since tokens within a chunk are correlated), top-1 accuracy, mean entropy, expected calibration
error (10 equal-width confidence bins) and mean JSD. Outputs in `output_dir`: table.md, results.json,
results.csv, ce_hist.png, ce_by_position.png, training_curves.png (for models that are training runs).
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from tqdm.auto import tqdm

from .data import iter_texts, open_stream, pack, tokenize
from .load import describe, load_any, logits
from .sources import hub_offline

# nanoGPT's OpenWebText split: 0.05% held out with seed 2357 (needs the whole dataset once, ~40 GB)
OWT_TEST_SIZE, OWT_SEED = 0.0005, 2357
SOURCES = ("builtin", "hf", "files", "owt_nanogpt")


@dataclass
class ModelSpec:
    name: str = MISSING
    path: str = MISSING  # hub name | builtin:<name> | HF dir | export dir | run dir | .ckpt


@dataclass
class FilterSpec:
    """Drop chunks containing any token never seen in `docs` documents of a reference (fine-tuning) set."""
    source: str = "hf"
    path: Optional[str] = None
    config_name: Optional[str] = None
    split: str = "train"
    text_field: str = "text"
    files: List[str] = field(default_factory=list)
    docs: int = 1_000_000


@dataclass
class DatasetSpec:
    name: str = MISSING
    source: str = "builtin"  # builtin | hf | files | owt_nanogpt
    path: Optional[str] = None
    config_name: Optional[str] = None
    revision: Optional[str] = None
    split: str = "validation"
    text_field: str = "text"
    files: List[str] = field(default_factory=list)
    filter: Optional[FilterSpec] = None


@dataclass
class EvalConfig:
    models: List[ModelSpec] = MISSING
    datasets: List[DatasetSpec] = MISSING
    tokenizer: Optional[str] = None  # default: the first model that carries one
    tokens: int = 65536  # per dataset
    context: int = 256
    batch: int = 8
    precision: str = "bf16"  # bf16 (autocast) | fp32
    device: str = "cpu"
    bootstrap: int = 1000
    seed: int = 0
    cache_dir: str = "~/.cache/lnfree"
    output_dir: str = MISSING


ConfigStore.instance().store(name="eval_schema", node=EvalConfig)


class EvalError(ValueError):
    pass


# -- data ------------------------------------------------------------------------------------------------
def documents(spec):
    """Texts of a dataset spec (streamed, except nanoGPT's OpenWebText split, which needs the whole set)."""
    if spec.source == "owt_nanogpt":
        import datasets

        full = datasets.load_dataset(spec.path or "Skylion007/openwebtext", split="train")
        held_out = full.train_test_split(test_size=OWT_TEST_SIZE, seed=OWT_SEED, shuffle=True)["test"]
        return (row[spec.text_field] for row in held_out)
    stream = open_stream(spec.source, spec.split, spec.path, spec.config_name, getattr(spec, "revision", None),
                         spec.files)
    return iter_texts(stream, spec.text_field)


def seen_tokens(texts, tokenizer, vocab_size: int, max_docs: int) -> torch.Tensor:
    """Boolean mask [vocab] of the token ids that occur in the first `max_docs` texts."""
    seen = torch.zeros(vocab_size, dtype=torch.bool)
    for text in itertools.islice(texts, max_docs):
        seen[torch.tensor(tokenize(tokenizer, text), dtype=torch.long)] = True
    return seen


def filter_unseen(chunks: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """Keep the chunks [n, context] whose every token is in `seen` (METHOD.md's token-filtered Pile)."""
    return chunks[seen[chunks].all(dim=1)]


def eval_chunks(spec, tokenizer, context: int, tokens: int) -> torch.Tensor:
    """[n_chunks, context] token ids, n_chunks = ceil(tokens / context) (fewer if the data runs out)."""
    n = math.ceil(tokens / context)
    eot = tokenizer.eos_token_id
    docs = (tokenize(tokenizer, t) + [eot] for t in documents(spec))
    blocks = (torch.tensor(b, dtype=torch.long) for b in pack(docs, context))
    if spec.filter is not None:
        seen = seen_tokens(documents(spec.filter), tokenizer, len(tokenizer), spec.filter.docs)
        blocks = (b for b in blocks if bool(seen[b].all()))
    chunks = list(itertools.islice(blocks, n))
    if not chunks:
        raise EvalError(f"dataset {spec.name!r} yielded no {context}-token chunk")
    return torch.stack(chunks)


# -- statistics --------------------------------------------------------------------------------------------
def token_stats(logit: torch.Tensor, ids: torch.Tensor):
    """Per predicted token [batch, context-1]: CE, entropy, top-1 correct, max prob, and log-probs."""
    logp = F.log_softmax(logit[:, :-1].float(), dim=-1)
    target = ids[:, 1:]
    ce = (-logp.gather(-1, target[..., None]).squeeze(-1)).clamp_min(0)  # no -0.0 from round-off
    p = logp.exp()
    entropy = -(p * logp).sum(-1)
    maxp, top1 = p.max(-1)
    return {"ce": ce, "entropy": entropy, "correct": (top1 == target).float(), "maxprob": maxp}, logp


def jsd(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (nats) per token between two log-prob tensors [..., vocab]."""
    logm = torch.logaddexp(logp, logq) - math.log(2)
    return 0.5 * ((logp.exp() * (logp - logm)).sum(-1) + (logq.exp() * (logq - logm)).sum(-1))


def ece(conf: np.ndarray, correct: np.ndarray, bins: int = 10) -> float:
    idx = np.minimum((conf * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(total)


def summarize(per_token: dict, n_boot: int, seed: int) -> dict:
    """per_token: arrays [n_chunks, context-1] of ce, entropy, correct, maxprob (and jsd)."""
    ce = per_token["ce"]
    flat = ce.reshape(-1)
    rng = np.random.default_rng(seed)
    chunk_means = ce.mean(1)
    boots = chunk_means[rng.integers(0, len(chunk_means), (n_boot, len(chunk_means)))].mean(1)
    q = np.percentile(flat, [2.5, 97.5, 0.05, 99.95])
    out = {
        "mean": float(flat.mean()), "median": float(np.median(flat)),
        "p2.5": float(q[0]), "p97.5": float(q[1]), "p0.05": float(q[2]), "p99.95": float(q[3]),
        "ci95_low": float(np.percentile(boots, 2.5)), "ci95_high": float(np.percentile(boots, 97.5)),
        "accuracy": float(per_token["correct"].mean()), "entropy": float(per_token["entropy"].mean()),
        "ece": ece(per_token["maxprob"].reshape(-1), per_token["correct"].reshape(-1)),
        "n_tokens": int(flat.size),
    }
    if "jsd" in per_token:
        out["jsd_to_reference"] = float(per_token["jsd"].mean())
    return out


# -- evaluation ------------------------------------------------------------------------------------------
def check(cfg) -> None:
    """Unknown models or datasets fail here, before any model is loaded."""
    if not cfg.models:
        raise EvalError("eval needs at least one model")
    names = [m.name for m in cfg.models]
    if len(set(names)) != len(names):
        raise EvalError(f"model names must be unique: {names}")
    for m in cfg.models:
        describe(m.path, cfg.cache_dir)
    for d in cfg.datasets:
        if d.source not in SOURCES:
            raise EvalError(f"dataset {d.name!r}: unknown source {d.source!r}; use one of {SOURCES}")
        if d.source in ("hf", "owt_nanogpt") and hub_offline():
            raise EvalError(f"dataset {d.name!r} streams from the hub, which is offline (HF_HUB_OFFLINE=1)")
        if d.source == "hf" and not d.path:
            raise EvalError(f"dataset {d.name!r}: source=hf needs a path (dataset repo id)")
        if d.source == "files" and not d.files:
            raise EvalError(f"dataset {d.name!r}: source=files needs files")
    if cfg.precision not in ("bf16", "fp32"):
        raise EvalError(f"precision must be bf16 or fp32, not {cfg.precision!r}")


@torch.inference_mode()
def evaluate(cfg) -> dict:
    check(cfg)
    models, tok = {}, None
    for m in cfg.models:
        models[m.name], t = load_any(m.path, cfg.cache_dir, cfg.device)
        tok = tok or t
    if cfg.tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(cfg.tokenizer)
    if tok is None:
        raise EvalError("no model carries a tokenizer: set `tokenizer`")
    ref = cfg.models[0].name
    autocast = torch.autocast(torch.device(cfg.device).type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    results, per_token_all = {}, {}
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
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_outputs(results, per_token_all, cfg, out)
    return results


# -- outputs -------------------------------------------------------------------------------------------
def markdown_table(results: dict, key: str = "mean") -> str:
    datasets = list(results)
    models = list(results[datasets[0]])
    lines = ["| model | " + " | ".join(datasets) + " |", "|---|" + "---|" * len(datasets)]
    for m in models:
        cells = []
        for d in datasets:
            best = min(results[d][x][key] for x in models)
            v = results[d][m][key]
            cells.append(f"{v:.4f} (best)" if v == best else f"{v:.4f} (+{v - best:.4f})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def detail_table(results: dict) -> str:
    cols = ["mean", "ci95_low", "ci95_high", "median", "p2.5", "p97.5", "p0.05", "p99.95", "accuracy",
            "entropy", "ece", "jsd_to_reference"]
    lines = ["| dataset | model | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for d, per_model in results.items():
        for m, s in per_model.items():
            lines.append(f"| {d} | {m} | " + " | ".join(f"{s[c]:.4f}" if c in s else "-" for c in cols) + " |")
    return "\n".join(lines)


def write_outputs(results, per_token, cfg, out: Path):
    table = ("## Mean cross-entropy (nats/token), gap to the best model in brackets\n\n" + markdown_table(results)
             + "\n\n## Median\n\n" + markdown_table(results, "median")
             + "\n\n## All statistics\n\n" + detail_table(results) + "\n")
    (out / "table.md").write_text(table)
    (out / "results.json").write_text(json.dumps(
        {"results": results, "config": OmegaConf.to_container(cfg, resolve=True)}, indent=1))
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        keys = sorted({k for per_model in results.values() for s in per_model.values() for k in s})
        w.writerow(["dataset", "model", *keys])
        for d, per_model in results.items():
            for m, s in per_model.items():
                w.writerow([d, m, *[s.get(k, "") for k in keys]])
    from .plots import plot_ce_by_position, plot_ce_hist, plot_training_curves

    plot_ce_hist(per_token, out / "ce_hist.png")
    plot_ce_by_position(per_token, out / "ce_by_position.png")
    runs = {m.name: m.path for m in cfg.models}
    plot_training_curves(runs, out / "training_curves.png")
    print(table)
    print(f"[lnfree] evaluation written to {out.resolve()}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig):
    evaluate(cfg)


if __name__ == "__main__":
    main()
