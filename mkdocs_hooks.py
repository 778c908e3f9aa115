"""mkdocs hooks (mkdocs.yml `hooks:`): the figures the docs embed, served from experiments/ where they are made.

A page embeds a figure by its path in the repository, `![what](../experiments/<result>/<figure>.png)`, which
GitHub renders and tests/test_docs.py checks like every link. mkdocs only serves files under docs/, so these hooks
add each embedded figure to the site as figures/<result>/<figure>.png (read from experiments/ at build time: no
copy to go stale) and point the page's image at it.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent
FIGURE = re.compile(r"(!\[[^\]]*\]\()\.\./((?:\.\./)*)experiments/([^)\s]+\.(?:png|svg|jpg))\)")


def on_files(files, config):
    for page in [f for f in files.documentation_pages()]:
        for m in FIGURE.finditer(Path(page.abs_src_path).read_text()):
            uri = f"figures/{m.group(3)}"
            source = ROOT / "experiments" / m.group(3)
            if files.get_file_from_path(uri) is None and source.is_file():
                files.append(File.generated(config, uri, abs_src_path=str(source)))
    return files


def on_page_markdown(markdown, page, config, files):
    # ../experiments/x.png from docs/<page>.md is figures/x.png in the site (one ../ fewer: docs/ is the site root)
    return FIGURE.sub(lambda m: f"{m.group(1)}{m.group(2)}figures/{m.group(3)})", markdown)
