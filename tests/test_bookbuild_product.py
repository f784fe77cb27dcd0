"""The book build's additions for the published book: the Colab install cell, the run line at the
end of each staged chapter, and summary pages (the reproduction page) rerun when a chapter changes."""

import nbformat

from catchtag.book import bookbuild

SUMMARY = """---
jupytext:
  text_representation:
    extension: .md
    format_name: myst
kernelspec:
  display_name: Python 3
  language: python
  name: python3
catchtag:
  summary: true
---

# Summary
"""


def test_colab_cell_does_nothing_outside_colab():
    cell = bookbuild.colab_cell()
    assert cell.metadata["tags"] == ["remove-cell"]
    assert "google.colab" in cell.source and "git+https://" in cell.source
    exec(compile(cell.source, "colab-cell", "exec"), {})  # no Colab here: must not install anything


def test_run_line():
    line = bookbuild.run_line({"seconds": 12.34, "executed_at": "2026-01-01 10:00 UTC",
                               "parameters": {"eps": 0.3}})
    assert "in 12 s" in line and "2026-01-01 10:00 UTC" in line and "`eps = 0.3`" in line
    assert "default parameters" in bookbuild.run_line({})


def test_stage_notebook_adds_colab_cell_and_run_line(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")])
    nb.metadata["catchtag"] = {"seconds": 3.0, "parameters": {}}
    src, dest = tmp_path / "a.ipynb", tmp_path / "b.ipynb"
    nbformat.write(nb, src)
    dest.write_text(bookbuild.stage_notebook(src))
    out = nbformat.read(dest, as_version=4)
    assert out.cells[0].metadata.get("catchtag") == "colab-install"
    assert out.cells[-1].cell_type == "markdown" and "in 3 s" in out.cells[-1].source
    src.write_text(bookbuild.stage_notebook(dest))  # staging twice does not add a second install cell
    assert sum(c.metadata.get("catchtag") == "colab-install" for c in nbformat.read(src, as_version=4).cells) == 1
    assert bookbuild.stage_notebook(src) == bookbuild.stage_notebook(src)  # same input, same bytes


def test_summary_page_key_follows_the_chapters(tmp_path, monkeypatch):
    monkeypatch.setattr(bookbuild, "EXECUTED", tmp_path / "executed")
    (tmp_path / "executed").mkdir()
    md = tmp_path / "summary.md"
    md.write_text(SUMMARY)
    plain = tmp_path / "plain.md"
    plain.write_text(SUMMARY.replace("catchtag:\n  summary: true\n", ""))
    assert bookbuild.is_summary(md) and not bookbuild.is_summary(plain)
    before = bookbuild.cache_key(md, {})
    chapter = nbformat.v4.new_notebook()
    chapter.metadata["catchtag"] = {"cache_key": "aaaa"}
    nbformat.write(chapter, tmp_path / "executed" / "sinks.ipynb")
    after = bookbuild.cache_key(md, {})
    assert after != before
    chapter.metadata["catchtag"] = {"cache_key": "bbbb"}
    nbformat.write(chapter, tmp_path / "executed" / "sinks.ipynb")
    assert bookbuild.cache_key(md, {}) != after
    assert bookbuild.cache_key(plain, {}) == bookbuild.cache_key(plain, {})


def test_the_reproduction_page_is_a_summary_in_the_toc():
    assert bookbuild.is_summary(bookbuild.BOOK / "reproduction.md")
    assert "reproduction" in bookbuild.chapters_in_toc()
    assert "bibliography" in bookbuild.chapters_in_toc()
