"""Links between pages: the staged book holds executed chapters as notebooks, so a link to a chapter
must name its .ipynb (a .md link to a chapter is a broken cross-reference that fails the -W build)."""

import re
from pathlib import Path

import pytest

BOOK = Path(__file__).resolve().parents[1] / "book"
NOTEBOOKS = {p.stem for p in BOOK.glob("*.md") if "kernelspec:" in p.read_text().split("\n---", 1)[0]}
PAGES = sorted(BOOK.glob("*.md"))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_to_chapters_name_their_notebook(page):
    bad = [m.group(1) for m in re.finditer(r"\]\(([\w-]+)\.md(?:#[^)]*)?\)", page.read_text())
           if m.group(1) in NOTEBOOKS]
    assert not bad, f"{page.name} links {', '.join(b + '.md' for b in bad)}: write <chapter>.ipynb"


def test_some_chapters_are_notebooks():
    assert {"sinks", "reproduction", "kvcache"} <= NOTEBOOKS and "definitions" not in NOTEBOOKS
