"""Every relative link in README.md and docs/ points to a file that exists and, with an anchor, to a heading that
exists (the slug mkdocs gives it), so a moved file or a renamed section fails `make test`, not only `make docs`.
Also: every `docs/<page>.md#<anchor>` that a code comment, config or README cites names a real heading, and
mkdocs.yml's nav lists every page of docs/ and nothing else."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE = re.compile(r"`[^`\n]*`")


def slug(heading: str) -> str:
    """Python-Markdown's toc slug (what mkdocs uses for anchors): drop markup and punctuation, lower, hyphens."""
    text = re.sub(r"[`*_]", "", heading).strip()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", text, re.M)}


def links(page: Path) -> list[str]:
    text = CODE.sub("", FENCE.sub("", page.read_text()))
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]  # skip http:, mailto:, ...


def broken(page: Path) -> list[str]:
    bad = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target} (no such heading in {dest.name})")
    return bad


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    assert broken(page) == []


def test_link_check_catches_a_broken_file_and_anchor(tmp_path):
    (tmp_path / "a.md").write_text("# Title here\n\n## The `x` rule (v2)\n")
    page = tmp_path / "b.md"
    page.write_text("[ok](a.md#the-x-rule-v2) [top](a.md) [gone](c.md) [bad](a.md#nope) `[code](c.md)` "
                    "[web](https://example.org/x.md)\n```\n[fenced](c.md)\n```\n")
    assert broken(page) == ["c.md (no such file)", "a.md#nope (no such heading in a.md)"]


CITED = re.compile(r"docs/([\w/]+\.md)#([\w-]+)")
CITING = [p for d in ("lnfree", "conf", "tests", "experiments") for p in (ROOT / d).rglob("*")
          if p.suffix in {".py", ".yaml", ".md"} and p.name != "test_docs.py"]


def test_cited_doc_sections_exist():
    bad = [f"{p.relative_to(ROOT)}: docs/{page}#{anchor}" for p in [ROOT / "README.md", *CITING]
           for page, anchor in CITED.findall(p.read_text(errors="replace"))
           if not (DOCS / page).exists() or anchor not in anchors(DOCS / page)]
    assert bad == []


def test_nav_lists_every_page():
    nav = set(re.findall(r":\s*([\w/]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M))
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert nav == pages
