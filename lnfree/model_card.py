"""Model cards (README.md with Hugging Face front matter) for a run's exports: what the model is, how it was
made, its sigmas and cross-entropies, the fp16 warning, and how to load it in each stack.

Written by training into export/hf and export/folded once the run's summary exists; `make eval` (lnfree.eval)
rewrites them with the vanilla control's CE when it evaluates a pair of runs.
"""

from __future__ import annotations

import json
from pathlib import Path

from .references import BUILTIN_PREFIX, RANDOM

CARD = "README.md"
PAPER = "Baroni et al. 2025, Transformers Don't Need LayerNorm at Inference Time (arXiv:2507.02559)"
REPO = "lnfree"

FP16_WARNING = (
    "**Do not load the HF-compatible LN-free form in float16.** Every LayerNorm here has eps = 1e12 and weights "
    "of order 1e6 / sigma, which overflow fp16 (max 65504): the logits become NaN without an error. Use float32 or "
    "bfloat16 (`lnfree.io.load(..., dtype=torch.float16)` refuses it). The folded form has no such constants."
)


def _fmt(x, spec=".4f"):
    return "n/a" if x is None else format(x, spec)


def _front_matter(summary: dict, form: str) -> str:
    source = summary.get("config", {}).get("model", {}).get("source", "")
    lines = ["---", "library_name: transformers" if form == "hf" else "library_name: lnfree",
             "tags:", f"- {summary.get('family', 'gpt2')}",
             "- layernorm-free" if summary.get("all_removed") else "- vanilla-finetune",
             f"- {REPO}", "- interpretability", "pipeline_tag: text-generation"]
    local = source == RANDOM or source.startswith((BUILTIN_PREFIX, "/", ".", "~")) or Path(source).exists()
    if source and not local:
        lines.append(f"base_model: {source}")  # a hub name (gpt2, openai-community/gpt2-medium, ...)
    return "\n".join([*lines, "---", ""])


def card_text(summary: dict, form: str, control_ce: float | None = None) -> str:
    cfg = summary.get("config", {})
    model, schedule, ft = cfg.get("model", {}), cfg.get("schedule", {}), cfg.get("finetune", {}) or {}
    lnfree = bool(summary.get("all_removed"))
    hf_class = summary.get("hf_class", "GPT2LMHeadModel")  # runs from before other families have no hf_class
    gpt2 = hf_class == "GPT2LMHeadModel"
    what = (f"a {'GPT-2' if gpt2 else hf_class} with every {'LayerNorm' if gpt2 else 'norm'} removed by fine-tuning"
            if lnfree
            else "the vanilla fine-tuning control (same data and steps, norms kept)")
    label = summary.get("model") or model.get("name", "gpt2")  # runs from before the label have only the name
    title = f"{label} {'LN-free' if lnfree else 'vanilla control'} ({form} export)"
    sig = summary.get("sigmas") or {}
    sig_rows = "\n".join(f"| {k} | {v:.6g} |" for k, v in sig.items() if v is not None and v == v)
    finetune = ft.get("kind", "full")
    if finetune == "lora":
        targets = ", ".join(ft.get("target_modules", []))
        finetune = f"LoRA (rank {ft.get('rank')}, alpha {ft.get('alpha')}, on {targets}; merged)"
    rows = [("original (before fine-tuning)", summary.get("val_ce_before")), ("this model", summary.get("val_ce")),
            ("vanilla control", control_ce)]
    ce = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in rows)
    hf_load = (f"from transformers import {hf_class}, AutoTokenizer\n"
               f"model = {hf_class}.from_pretrained(path)          # float32 or bfloat16, never float16\n"
               "tok = AutoTokenizer.from_pretrained(path)")
    folded_load = ("from lnfree.folded import load_folded\nmodel = load_folded(path)  # "
                   + ("plain torch, no norm at all" if gpt2 else f"{hf_class} with every norm an identity"))
    sites = ("ln_2, the query/key and value paths of ln_1, ln_f" if gpt2 else
             "the MLP-input norm, the query/key and value paths of the attention-input norm, the final norm")
    norm_math = ("each LayerNorm computes (x - mean) * gamma / sigma + beta" if gpt2 else
                 "each norm computes its affine frozen form, docs/families.md")
    body = f"""# {title}

This is {what}, made with {REPO} following {PAPER}.
Each norm site ({sites}) was frozen to a constant scale sigma,
measured as a running mean of its per-token std, on a step schedule while the model was fine-tuned.
The `hf` form is stock `{hf_class}` ({norm_math} through
eps = 1e12); the `folded` form has no norm at all (the scales are folded into the next linear layers).

- source model: `{model.get('source')}`; schedule: `{schedule.get('name')}`; fine-tuning: {finetune}
- {summary.get('steps')} optimizer steps, {summary.get('tokens_seen', 0):,} tokens; seed {cfg.get('seed')}
- export check: relative logits error {_fmt((summary.get('exports') or {}).get(form, {}).get('relative_error'), '.2e')}

## Validation cross-entropy (nats/token, the run's held-out text)

| model | CE |
|---|---|
{ce}

## Frozen sigmas

| site | sigma |
|---|---|
{sig_rows or '| (none: vanilla control) | |'}

## Precision

{FP16_WARNING if lnfree and form == 'hf' else 'float32 or bfloat16.'}

## Loading

transformers (the `hf` form):
```python
{hf_load if form == 'hf' else folded_load}
```
TransformerLens (4.x TransformerBridge) and NNsight, through lnfree:
```python
from lnfree.bridges import to_transformer_lens, to_nnsight
tl_model = to_transformer_lens(path)
nn_model = to_nnsight(path)
```
"""
    return _front_matter(summary, form) + body


def write_model_cards(export_dir: str | Path, summary: dict, control_ce: float | None = None) -> list[Path]:
    """A README.md in every export form found under export_dir; returns the paths written."""
    written = []
    for form in ("hf", "folded"):
        d = Path(export_dir) / form
        if d.is_dir():
            (d / CARD).write_text(card_text(summary, form, control_ce))
            written.append(d / CARD)
    return written


def update_cards_with_control(run_dir: str | Path, control_ce: float) -> list[Path]:
    """Rewrite a finished run's cards with the vanilla control's CE (used by make eval)."""
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    return write_model_cards(run_dir / "export", summary, control_ce)
