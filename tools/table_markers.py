"""Generated tables inside Markdown files: the text between `<!-- table:NAME -->` and `<!-- /table -->` belongs to
the generator named NAME and is rewritten from the committed JSON, never edited by hand."""

from __future__ import annotations

import re
from pathlib import Path

BEGIN, END = "<!-- table:{} -->", "<!-- /table -->"
MARKED = re.compile(r"<!-- table:([\w-]+) -->\n(.*?)<!-- /table -->", re.S)


def marked(text: str) -> dict[str, str]:
    """{name: current content} of every marked table in `text` (content without the markers' newlines)."""
    found = {}
    for m in MARKED.finditer(text):
        if m.group(1) in found:
            raise ValueError(f"table {m.group(1)!r} is marked twice in one file")
        found[m.group(1)] = m.group(2).rstrip("\n")
    return found


def replaced(text: str, tables: dict[str, str]) -> str:
    """`text` with the content of each marked table whose name is in `tables` replaced by the new content."""
    def sub(m):
        name = m.group(1)
        return f"{BEGIN.format(name)}\n{tables[name]}\n{END}" if name in tables else m.group(0)
    return MARKED.sub(sub, text)


def write_table(path: Path, name: str, table: str):
    """Rewrite one marked table of one file (the benchmarks call this right after a measurement)."""
    text = path.read_text()
    if name not in marked(text):
        raise ValueError(f"{path} has no table marked {BEGIN.format(name)}")
    path.write_text(replaced(text, {name: table}))
