"""Downstream evaluation of lnfree models with lm-evaluation-harness (`make downstream`).

    python -m lnfree.downstream                                 # the built-in default's runs, shipped tasks, offline
    python -m lnfree.downstream --config-name downstream_paper  # GPT-2 + HellaSwag, MMLU, Pile-10k (GPU, hub access)
    lm_eval --model hf --model_args pretrained=RUN/export/hf --include_path lnfree/downstream/tasks \\
        --tasks lnfree_builtin_ppl,lnfree_builtin_cloze         # the same shipped tasks through lm-eval's own CLI

Models are loaded through lnfree.io (any reference: builtin:<name>, run dirs, exports, .ckpt, hub names), so
LN-free exports are refused in float16 (their eps = 1e12 trick overflows fp16) and LoRA checkpoints are merged.
On the shipped perplexity task the harness's nats per token are checked against lnfree's own CE on the same
passages (`check_ce_tol`), so the two numbers can be put side by side.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from ..analysis.eval_config import seeds_written_out
from ..errors import UserError, user_errors_as_messages
from ..io import load, refuse_fp16
from ..model_record import logits, shape_of
from ..paths import CONF_DIR
from ..records import job_output_dir
from ..references import ModelRef, resolve

TASKS_DIR = Path(__file__).parent / "tasks"
PPL_TASK = "lnfree_builtin_ppl"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class DownstreamModel:
    name: str = MISSING
    path: str = MISSING


@dataclass
class DownstreamConfig:
    runs: str = MISSING  # conf/runs.yaml: where make eval / make lora train the runs named ${runs}/<run>
    seeds: list[int] = MISSING  # conf/runs.yaml: the seeds that a {seed} in a model's name stands for
    models: list[DownstreamModel] = MISSING
    tasks: list[str] = MISSING  # shipped (lnfree_builtin_*) or any lm-eval task name (hellaswag, mmlu, pile_10k)
    num_fewshot: int | None = MISSING  # null: each task's default
    limit: float | None = MISSING  # documents per task (an int) or a fraction; null: all
    batch_size: int = MISSING
    device: str = MISSING
    dtype: str = MISSING  # float32 | bfloat16 (float16 refuses LN-free exports)
    check_ce_tol: float | None = MISSING  # lm-eval's token CE vs lnfree's own on the shipped ppl task; null: skip
    cache_dir: str = MISSING
    output_dir: str | None = None  # None: the job's own new dir; experiments/ only when named on the command line
    extra: dict[str, Any] = field(default_factory=dict)  # passed to lm_eval.simple_evaluate


ConfigStore.instance().store(name="downstream_schema", node=DownstreamConfig)


class DownstreamError(UserError):
    pass


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise ImportError("downstream evaluation needs lm-eval: pip install 'lnfree[eval]'") from e


def check(cfg) -> dict:
    """Everything that can be refused before a model is loaded; returns each model's resolved reference by name
    (resolved once: run loads what was checked)."""
    _require_lm_eval()
    if cfg.dtype not in DTYPES:
        raise DownstreamError(f"dtype={cfg.dtype!r}; use one of {sorted(DTYPES)}")
    names = [m.name for m in cfg.models]
    if len(set(names)) != len(names):
        raise DownstreamError(f"model names must be unique: {names}")
    refs = {}
    for m in cfg.models:
        ref = refs[m.name] = resolve(m.path, cfg.cache_dir)  # a missing run / export fails here, by name
        if ref.kind == "folded":
            raise DownstreamError(f"{m.name}: {m.path!r} is a folded export, which lm-eval cannot run (it is not a "
                                  "transformers model); use the run's export/hf")
        if ref.kind == "hf_lnfree":
            refuse_fp16(DTYPES[cfg.dtype], f"{m.name}: {m.path!r}, an LN-free export:", "Use dtype=float32 or bfloat16")
    from lm_eval.tasks import TaskManager

    known = set(TaskManager(include_path=str(TASKS_DIR)).all_tasks)
    unknown = [t for t in cfg.tasks if t not in known]
    if unknown:
        raise DownstreamError(f"unknown lm-eval task(s) {unknown} (shipped: lnfree_builtin_ppl, lnfree_builtin_cloze)")
    return refs


def load_lm(ref: ModelRef, cfg):
    """(lm-eval HFLM wrapping the model, model, tokenizer) for a resolved model reference."""
    from lm_eval.models.huggingface import HFLM

    model, tok = load(ref, device=cfg.device, dtype=DTYPES[cfg.dtype])
    if tok is None:
        raise DownstreamError(f"{ref.reference!r} carries no tokenizer; lm-eval needs one")
    lm = HFLM(pretrained=model.eval(), tokenizer=tok, batch_size=cfg.batch_size,
              max_length=shape_of(model.config).n_ctx)  # each family names its context length
    return lm, model, tok


@torch.no_grad()
def own_token_ce(model, tokenizer, texts: list[str]) -> float:
    """lnfree's CE (nats per token) of each passage after an end-of-text prefix, pooled over all tokens: what the
    shipped perplexity task asks lm-eval for, computed by lnfree's training loss function."""
    from ..model import next_token_ce

    dev = next(model.parameters()).device
    nll, n = 0.0, 0
    for text in texts:
        ids = torch.tensor([[tokenizer.eos_token_id, *tokenizer(text).input_ids]], device=dev)
        nll += float(next_token_ce(logits(model, ids).float(), ids, reduction="sum"))
        n += ids.shape[1] - 1
    return nll / n


def _ppl_texts(limit) -> list[str]:
    rows = [json.loads(line) for line in (TASKS_DIR / "lnfree_builtin" / "ppl.jsonl").read_text().splitlines()]
    if limit is not None:
        rows = rows[: int(limit) if limit >= 1 else math.ceil(limit * len(rows))]
    return [r["text"] for r in rows]


def evaluate_model(lm, tasks, cfg) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                                  task_manager=TaskManager(include_path=str(TASKS_DIR)),
                                  log_samples=False, **dict(cfg.extra))
    metrics = {}
    for task, res in out["results"].items():
        metrics[task] = {k.split(",")[0]: v for k, v in res.items()
                         if isinstance(v, (int, float)) and not k.startswith("alias") and "_stderr" not in k}
        metrics[task] |= {k.split(",")[0]: v for k, v in res.items() if "_stderr" in k and isinstance(v, float)}
    return metrics


def run(cfg) -> dict:
    cfg = seeds_written_out(cfg)  # each seed's model by name (lnfree.analysis.eval_config): what is run and recorded
    refs = check(cfg)
    out = job_output_dir(cfg.output_dir, "downstream")  # before any compute: a refused dir costs nothing
    results = {"config": OmegaConf.to_container(cfg, resolve=True), "models": {}}
    for m in cfg.models:
        t0 = time.time()
        print(f"[downstream] {m.name}: {m.path}", flush=True)
        lm, model, tok = load_lm(refs[m.name], cfg)
        metrics = evaluate_model(lm, cfg.tasks, cfg)
        if PPL_TASK in cfg.tasks and cfg.check_ce_tol is not None:
            own = own_token_ce(model, tok, _ppl_texts(cfg.limit))
            harness = metrics[PPL_TASK]["token_ce"]
            metrics[PPL_TASK]["lnfree_token_ce"] = own
            if not abs(own - harness) <= cfg.check_ce_tol:
                raise DownstreamError(f"{m.name}: lm-eval's token CE {harness:.5f} and lnfree's own {own:.5f} differ "
                                      f"by more than {cfg.check_ce_tol} on the same passages")
        results["models"][m.name] = {"path": m.path, "metrics": metrics, "seconds": round(time.time() - t0, 1)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "table.md").write_text(table(results))
    print(table(results))
    return results


METRICS = {  # task -> (metric, label) shown in the table; other tasks show their first metric
    "lnfree_builtin_ppl": [("token_ce", "CE (nats/token)")],
    "lnfree_builtin_cloze": [("acc", "cloze acc"), ("acc_mutual_info", "cloze acc (PMI)")],
    "hellaswag": [("acc_norm", "HellaSwag acc_norm")],
    "mmlu": [("acc", "MMLU acc")],
    "pile_10k": [("bits_per_byte", "Pile-10k bits/byte"), ("word_perplexity", "Pile-10k word ppl")],
}


def table(results: dict) -> str:
    tasks = results["config"]["tasks"]
    cols = [(t, k, label) for t in tasks for k, label in METRICS.get(t, [])]
    lines = ["| model | " + " | ".join(c[2] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in results["models"].items():
        cells = []
        for t, k, _ in cols:
            v, se = r["metrics"].get(t, {}).get(k), r["metrics"].get(t, {}).get(f"{k}_stderr")
            cells.append("n/a" if v is None else f"{v:.4f}" + (f" ± {se:.4f}" if se is not None else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="downstream")
def main(cfg: DictConfig):
    with user_errors_as_messages():
        run(cfg)


__all__ = ["run", "check", "own_token_ce", "TASKS_DIR"]
