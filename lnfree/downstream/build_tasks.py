"""Build the shipped lm-eval task data from the built-in corpus's validation text (deterministic).

    python -m lnfree.downstream.build_tasks      # rewrites lnfree/downstream/tasks/lnfree_builtin/*.jsonl

- ppl.jsonl: passages of whole lines, at most MAX_TOKENS tokens each (one context window of the built-in
  models with the end-of-text prefix: lm-eval's rolling log-likelihood then scores every token once, exactly as
  lnfree's own CE does); n_tokens is the built-in tokenizer's count, so the task reports nats per token.
- cloze.jsonl: multiple choice: a passage's first CONTEXT_WORDS words, then which of 4 spans of SPAN_WORDS
  words comes next: the true one, or the same-position span of three other passages (chance: 25%). Two words:
  on the built-in LoRA LN-free model, 200 items scored 39.5% (acc) / 48.5% (acc_mutual_info) with 2 words,
  37% / 43.5% with 4 and 35% / 43% with 8: longer spans let the spans' own likelihood drown the context.
tests/test_downstream.py checks that the shipped files equal a fresh build.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from ..data import corpus

TASK_DIR = Path(__file__).parent / "tasks" / "lnfree_builtin"
MAX_TOKENS = 200  # < 256, the built-in models' context, with room for the end-of-text prefix
N_PPL = 128
CONTEXT_WORDS, SPAN_WORDS, N_CHOICES, N_CLOZE = 40, 2, 4, 400
SEED = 20251


def passages(tokenizer, max_tokens: int = MAX_TOKENS) -> list[str]:
    """Consecutive lines grouped into passages of at most max_tokens tokens (lines longer than that dropped)."""
    out = []
    for text in corpus.iter_texts("validation"):
        cur, n = [], 0
        for line in text.split("\n"):
            k = len(tokenizer(line + "\n").input_ids)
            if k > max_tokens:
                continue
            if n + k > max_tokens and cur:
                out.append("\n".join(cur).strip())
                cur, n = [], 0
            cur.append(line)
            n += k
        if cur:
            out.append("\n".join(cur).strip())
    return [p for p in out if p]


def ppl_rows(tokenizer, ps: list[str]) -> list[dict]:
    return [{"id": i, "text": p, "n_tokens": len(tokenizer(p).input_ids)} for i, p in enumerate(ps[:N_PPL])]


def _words(p: str) -> list[str]:
    return re.findall(r"\S+", p)


def _context(p: str, n_words: int) -> str:
    """The passage's text (original whitespace) up to the end of its n_words-th word."""
    m = list(re.finditer(r"\S+", p))[n_words - 1]
    return p[: m.end()]


def cloze_rows(ps: list[str]) -> list[dict]:
    rng = random.Random(SEED)
    long = [p for p in ps if len(_words(p)) >= CONTEXT_WORDS + SPAN_WORDS]
    spans = [" ".join(_words(p)[CONTEXT_WORDS:CONTEXT_WORDS + SPAN_WORDS]) for p in long]
    rows = []
    for i in rng.sample(range(len(long)), min(N_CLOZE, len(long))):
        others = rng.sample([j for j in range(len(long)) if spans[j] != spans[i]], N_CHOICES - 1)
        choices = [spans[j] for j in others]
        gold = rng.randrange(N_CHOICES)
        choices.insert(gold, spans[i])
        rows.append({"id": len(rows), "context": _context(long[i], CONTEXT_WORDS), "choices": choices, "gold": gold})
    return rows


def build() -> dict[str, list[dict]]:
    tok = corpus.load_tokenizer()
    ps = passages(tok)
    return {"ppl": ppl_rows(tok, ps), "cloze": cloze_rows(ps)}


def write(rows: dict[str, list[dict]], out_dir: Path = TASK_DIR):
    for name, items in rows.items():
        (out_dir / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items))


if __name__ == "__main__":
    data = build()
    write(data)
    print({k: len(v) for k, v in data.items()}, "->", TASK_DIR)
