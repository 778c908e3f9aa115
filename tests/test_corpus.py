import gzip
import json
import math
from collections import Counter

import pytest
import torch

from lnfree.data import corpus
from lnfree.paths import SHIPPED_DIR


def titles(split):
    with gzip.open(corpus.corpus_file(split), "rt") as f:
        return [json.loads(line)["title"] for line in f]


def test_split_is_fixed_and_disjoint():
    train, val = titles("train"), titles("validation")
    assert len(train) == 40 and sorted(val) == ["julius_caesar", "twelfth_night"]
    assert not set(train) & set(val)
    assert titles("train") == train  # same order every time: the split is in the shipped files
    with pytest.raises(ValueError, match="splits"):
        corpus.corpus_file("test")


def test_missing_corpus_fails_clearly(monkeypatch, tmp_path):
    monkeypatch.setattr(corpus, "CORPUS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="built-in corpus file .* is missing"):
        corpus.corpus_file("train")


def test_tokenizer_round_trips_text_and_has_eot():
    tok = corpus.load_tokenizer()
    assert len(tok) == corpus.VOCAB_SIZE and tok.eos_token == corpus.EOT
    text = next(corpus.iter_texts("validation"))[:5000] + "\nunicode: café ☃ 日本\ttabs  spaces\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert len(ids) < len(text) / 2.5  # BPE actually compresses English


def _val_tokens(tok, n):
    ids = []
    for t in corpus.iter_texts("validation"):
        ids += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return torch.tensor(ids[:n])


@pytest.mark.slow
def test_shipped_default_model_loads_with_stock_transformers_and_beats_unigram():
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from lnfree.model_record import SHARED_TOKENIZER_FILE

    path = SHIPPED_DIR / "w128"
    model = GPT2LMHeadModel.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path, tokenizer_file=str(SHARED_TOKENIZER_FILE))  # shipped without its own copy
    info = json.loads((path / "pretrain_info.json").read_text())
    assert info["shape"]["n_layer"] == 2 and model.config.n_embd == 128
    val = _val_tokens(tok, 8 * 256).view(8, 256)
    with torch.no_grad():
        logits = model(val).logits
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), val[:, 1:].flatten()).item()
    counts = Counter()
    for t in corpus.iter_texts("train"):
        counts.update(tok(t, add_special_tokens=False)["input_ids"])
    total = sum(counts.values()) + len(tok)
    unigram = -sum(math.log((counts[i] + 1) / total) for i in val[:, 1:].flatten().tolist()) / val[:, 1:].numel()
    assert ce < unigram - 1.0, (ce, unigram)  # a real language model, not random weights
