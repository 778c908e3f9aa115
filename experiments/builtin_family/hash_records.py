"""Add whole-file hashes to the shipped built-in models' records (lnfree/pretrained/*/lnfree_export.json).

    python experiments/builtin_family/hash_records.py

The shipped models were pretrained before export records carried a sha256 per file and the tokenizer's identity;
this writes both into their records, from the files as they are (weights and tokenizer untouched, byte for byte),
after checking that the logits fingerprint still matches them, so only the files that were verified get blessed.
A model pretrained now gets both from `lnfree.export.export_hf` directly.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from transformers import AutoTokenizer, GPT2LMHeadModel  # noqa: E402

from lnfree.io import (  # noqa: E402
    EXPORT_INFO,
    file_sha256,
    model_files,
    record_text,
    resolve,
    tokenizer_sha256,
    verify_record,
)
from lnfree.paths import SHIPPED_DIR  # noqa: E402


def main():
    for d in sorted(p for p in SHIPPED_DIR.iterdir() if (p / EXPORT_INFO).exists()):
        model = GPT2LMHeadModel.from_pretrained(str(d)).eval()
        verify_record(resolve(str(d)), model)  # the fingerprint still holds for these files
        record = json.loads((d / EXPORT_INFO).read_text())
        record["tokenizer_sha256"] = tokenizer_sha256(AutoTokenizer.from_pretrained(str(d)))
        record["files"] = {p.name: file_sha256(p) for p in model_files(d)}
        (d / EXPORT_INFO).write_text(record_text(record))
        print(f"{d.name}: {len(record['files'])} files hashed")


if __name__ == "__main__":
    main()
