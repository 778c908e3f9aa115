"""Data loading and metrics of the shipped lnfree tasks (lm-eval imports this file by path)."""

import json
import math
from pathlib import Path

HERE = Path(__file__).parent


def _load(name):
    import datasets

    rows = [json.loads(line) for line in (HERE / f"{name}.jsonl").read_text().splitlines()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_ppl(**kwargs):
    return _load("ppl")


def load_cloze(**kwargs):
    return _load("cloze")


def ppl_results(doc, results):
    (ll,) = results if isinstance(results, (list, tuple)) else (results,)
    n_bytes = len(doc["text"].encode("utf-8"))
    return {"token_ce": (-ll, doc["n_tokens"]), "token_perplexity": (-ll, doc["n_tokens"]),
            "bits_per_byte": (ll, n_bytes)}


def mean_per_token(items):
    """Nats per token over all documents: sum of NLL / sum of tokens (a weighted, not per-document, mean)."""
    nll, n = zip(*items)
    return sum(nll) / sum(n)


def perplexity_per_token(items):
    return math.exp(mean_per_token(items))
