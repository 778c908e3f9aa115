"""Held-out text away from the built-in corpus (Shakespeare's plays and poems), built offline and deterministically,
for claim 1 under distribution shift (conf/eval_shift.yaml, `make shift`):

- near: modern English prose, the license texts that Debian and Ubuntu ship in /usr/share/common-licenses (GPL,
  LGPL, GFDL, Apache, MPL, Artistic, BSD, CC0): English sentences, none of it Shakespeare, legal register;
- far: Python's own reference documentation, `pydoc_data.topics` of the running Python (what `help("if")`
  shows): technical English with code and grammar rules.
Which is nearer is measured, not assumed: the original model's cross-entropy on each (experiments/shift/).

One document per source file or help topic, in sorted order, as JSON lines {"title", "text"}; a manifest records
every source's sha256 and the Python version, so that two builds can be compared. Running it twice on the same
machine gives the same bytes (tested).

    python -m lnfree.data.shift [--out outputs/shift_corpora]
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

LICENSES = Path("/usr/share/common-licenses")
DEFAULT_OUT = Path("outputs/shift_corpora")


class ShiftCorpusError(RuntimeError):
    pass


def license_documents(root: Path = LICENSES) -> list[dict]:
    """Every regular file of `root` (symlinks left out: they repeat a file), sorted by name."""
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.is_symlink()) if root.is_dir() else []
    if not files:
        raise ShiftCorpusError(f"no license texts in {root}: this corpus is built from a Debian/Ubuntu base system's "
                               "common-licenses; pass --licenses DIR for another copy")
    return [{"title": p.name, "text": p.read_text(encoding="utf-8", errors="replace")} for p in files]


def python_doc_documents() -> list[dict]:
    """The running Python's reference documentation topics (pydoc_data.topics), sorted by topic."""
    from pydoc_data.topics import topics

    return [{"title": k, "text": topics[k]} for k in sorted(topics)]


def write_jsonl(docs: list[dict], path: Path) -> str:
    """Write the documents, one JSON object a line; returns the file's sha256."""
    data = "".join(json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n" for d in docs).encode("utf-8")
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def build(out: Path = DEFAULT_OUT, licenses: Path = LICENSES) -> dict:
    """near.jsonl, far.jsonl and manifest.json under `out`; returns the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"python": sys.version.split()[0], "licenses_dir": str(licenses)}
    for name, docs in (("near", license_documents(licenses)), ("far", python_doc_documents())):
        manifest[name] = {"file": f"{name}.jsonl", "documents": len(docs),
                          "characters": sum(len(d["text"]) for d in docs),
                          "sha256": write_jsonl(docs, out / f"{name}.jsonl")}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description="build the near- and far-domain held-out corpora offline")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--licenses", type=Path, default=LICENSES)
    a = p.parse_args(argv)
    m = build(a.out, a.licenses)
    for name in ("near", "far"):
        print(f"[lnfree] {name}: {m[name]['documents']} documents, {m[name]['characters']:,} characters, "
              f"sha256 {m[name]['sha256'][:12]} -> {a.out / m[name]['file']}")


if __name__ == "__main__":
    main()
