"""Result tables cannot drift from their records: every table between `<!-- table:NAME -->` markers in README.md,
docs/ and experiments/*/README.md equals what tools/doc_tables.py generates from the committed JSON, and
every result table of those pages is marked."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tools.doc_tables import ROOT, TABLES, pages, stale, write
from tools.table_markers import marked, replaced, write_table

# Markdown tables in the scanned pages that are not results (design, definitions, options), each with the reason
NOT_RESULTS = {
    "docs/method.md": "the site kinds (a definition)",
    "docs/families.md": "the families and their site kinds (definitions)",
    "docs/statistics.md": "which interval is used where, with the coverage the tests' simulations measure",
    "docs/reference/configuration.md": "config groups and entry points",
    "docs/reference/gpus_and_clusters.md": "hardware options",
    "experiments/depth_family/README.md": "the family's design: shapes and parameter counts",
    "docs/removal_methods.md": "the removal methods and the shipped compressed schedules (definitions)",
    "experiments/README.md": "the index of the studies: folders, commands, records",
}


def test_every_committed_table_matches_its_json():
    cache = {}
    bad = {str(p.relative_to(ROOT)): names for p in pages() if (names := stale(p, ROOT, cache))}
    assert bad == {}, "run `make tables` (python -m tools.doc_tables)"
    assert set(cache) == set(TABLES), f"generated but shown nowhere: {set(TABLES) - set(cache)}"


def test_an_edited_number_in_a_committed_table_fails_and_make_tables_restores_it(tmp_path):
    text = (ROOT / "README.md").read_text()
    table = marked(text)["eval_gaps"]
    number = re.search(r"\+0\.0\d{3}", table).group(0)
    edited = text.replace(table, table.replace(number, f"{number[:-1]}{(int(number[-1]) + 1) % 10}", 1))
    assert edited != text
    page = tmp_path / "README.md"
    page.write_text(edited)
    assert stale(page, ROOT) == ["eval_gaps"]
    assert replaced(edited, {"eval_gaps": TABLES["eval_gaps"](ROOT)}) == text


def test_write_rewrites_only_stale_tables(tmp_path):
    """`make tables` on a checkout whose table was edited by hand: that table is rewritten, the text around it and
    every other page are left alone."""
    (tmp_path / "docs").mkdir()
    for rel in ("experiments/builtin_eval/results.json",):
        (tmp_path / rel).parent.mkdir(parents=True)
        (tmp_path / rel).write_bytes((ROOT / rel).read_bytes())
    good = f"intro\n<!-- table:eval_models -->\n{TABLES['eval_models'](ROOT)}\n<!-- /table -->\nend\n"
    (tmp_path / "README.md").write_text(good.replace("4.4792", "4.4793"))
    (tmp_path / "docs" / "results.md").write_text(good)
    assert write(tmp_path) == ["README.md: eval_models"]
    assert (tmp_path / "README.md").read_text() == good == (tmp_path / "docs" / "results.md").read_text()


def test_markers_replace_only_their_content(tmp_path):
    text = "a\n<!-- table:x -->\nold\n| 1 |\n<!-- /table -->\nb\n<!-- table:y -->\nkeep\n<!-- /table -->\n"
    assert marked(text) == {"x": "old\n| 1 |", "y": "keep"}
    assert replaced(text, {"x": "new"}) == text.replace("old\n| 1 |", "new")
    page = tmp_path / "p.md"
    page.write_text(text)
    write_table(page, "y", "| 2 |")
    assert marked(page.read_text()) == {"x": "old\n| 1 |", "y": "| 2 |"}
    with pytest.raises(ValueError, match="no table marked"):
        write_table(page, "z", "")
    with pytest.raises(ValueError, match="marked twice"):
        marked(text + text)


def test_an_unknown_table_name_is_refused(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("<!-- table:no_such_table -->\n| 1 |\n<!-- /table -->\n")
    with pytest.raises(KeyError, match="no_such_table"):
        stale(page, ROOT)


def _tables_outside_markers(page: Path) -> int:
    text = re.sub(r"^(```|~~~).*?^\1", "", page.read_text(), flags=re.S | re.M)
    text = re.sub(r"<!-- table:[\w-]+ -->\n.*?<!-- /table -->", "", text, flags=re.S)
    return len(re.findall(r"^\|[-| ]+\|$", text, re.M))


def test_every_result_table_is_generated():
    """A table typed by hand in a results page (README, docs/, experiments/*/README.md) fails here: generate it
    (add a function to doc_tables.TABLES and mark it), or, when it is not a result, list it in NOT_RESULTS."""
    hand = [str(p.relative_to(ROOT)) for p in pages() if _tables_outside_markers(p)
            and str(p.relative_to(ROOT)) not in NOT_RESULTS]
    assert hand == []


def test_the_table_check_sees_a_hand_typed_table(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("x\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n<!-- table:t -->\n| c |\n|---|\n<!-- /table -->\n"
                    "```\n| code |\n|---|\n```\n")
    assert _tables_outside_markers(page) == 1


@pytest.mark.slow
def test_make_papers_regeneration_gives_back_the_committed_records(tmp_path):
    """`make paper` with every record present only regenerates: on a copy of the committed records whose paired
    gaps, paired tables, a README table and a figure were damaged, every JSON and Markdown file comes back byte for
    byte as committed (figures are redrawn; their bytes depend on the plotting library's build, so only their
    presence is checked)."""
    import shutil

    from tools.paper import EVALUATIONS, FAMILIES, regenerate

    shutil.copytree(ROOT / "experiments", tmp_path / "experiments")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    readme = (ROOT / "README.md").read_text()
    (tmp_path / "README.md").write_text(readme.replace("+0.0282", "+0.0999"))
    for rel in EVALUATIONS:
        out = tmp_path / rel
        res = json.loads((out / "results.json").read_text())
        (out / "results.json").write_text(json.dumps({**res, "paired": {}}, indent=1))
        table = (out / "table.md").read_text()
        start = table.index("## Paired gaps")
        (out / "table.md").write_text(table[:start] + table[start:].replace("+0.0", "+9.9", 1))
        (out / "ce_hist.png").unlink()
    families = [rel for rel in FAMILIES if (ROOT / rel / "family.json").exists()]
    for rel in families:
        (tmp_path / rel / "family.png").unlink()
    regenerate(tmp_path)
    texts = [p for p in tmp_path.rglob("*") if p.suffix in {".json", ".md"}]
    assert len(texts) > 40
    assert [str(p.relative_to(tmp_path)) for p in texts
            if p.read_bytes() != (ROOT / p.relative_to(tmp_path)).read_bytes()] == []
    assert all((tmp_path / rel / "ce_hist.png").exists() for rel in EVALUATIONS)
    assert families and all((tmp_path / rel / "family.png").exists() for rel in families)
