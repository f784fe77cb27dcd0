"""The reproduction table: reading glued values back, verdict rules, and the glue names it relies on."""

from pathlib import Path

import nbformat
import pytest

from catchtag import reproduction as R

BOOK = Path(__file__).resolve().parents[1] / "book"


def glue_output(name, text=None, plain=None):
    prefix = "application/papermill.record/"
    data = {}
    if text is not None:
        data[prefix + "text/markdown"] = text
        data[prefix + "text/plain"] = "<IPython.core.display.Markdown object>"
    else:
        data[prefix + "text/plain"] = plain
    return nbformat.v4.new_output("display_data", data=data,
                                  metadata={"scrapbook": {"name": name, "mime_prefix": prefix}})


def notebook(path, outputs, params=None):
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("glue(...)")
    cell.outputs = outputs
    nb.cells.append(cell)
    nb.metadata["papermill"] = {"parameters": params or {}}
    nbformat.write(nb, path)
    return path


def test_read_glue_markdown_plain_and_strings(tmp_path):
    p = notebook(tmp_path / "x.ipynb", [glue_output("a", "54%"), glue_output("b", plain="0.123456"),
                                        glue_output("c", plain="'similar'"),
                                        glue_output("d", plain="np.float64(0.44013392080476654)")], {"eps": 0.3})
    assert R.read_glue(p) == {"a": "54%", "b": "0.123456", "c": "similar", "d": "0.44013392080476654"}
    assert R.parameters(p) == {"eps": 0.3}


@pytest.mark.parametrize("text,value", [("54%", 0.54), ("1.25", 1.25), ("72.3% [68.1, 76.2]", 0.723),
                                        ("1.9e-06", 1.9e-06), ("n/a", None), ("nan", None), ("-3", -3.0),
                                        ("1,234", 1234.0), ("2 of 10", 2.0)])
def test_number(text, value):
    assert R.number(text) == (pytest.approx(value) if value is not None else None)


def sinks_values(**over):
    v = {"m1": "SmolLM2", "m2": "Gemma", "m1_first_share": "88%", "m2_first_share": "99%",
         "m1_punct_share": "23%", "m1_newline_share": "0%", "m2_punct_share": "60%", "m2_newline_share": "5%",
         "m1_separating": "1", "m2_separating": "0", "m1_n_heads": "270", "m2_n_heads": "72"}
    v.update(over)
    return v


def test_verdicts_from_sinks(tmp_path):
    notebook(tmp_path / "sinks.ipynb", [glue_output(k, t) for k, t in sinks_values().items()])
    rows = {r.claim.key: r for r in R.evaluate(tmp_path)}
    assert rows["first_sink"].verdict == R.REPRODUCED
    assert rows["first_sink"].ours == "SmolLM2: 88% of (head, prompt) pairs; Gemma: 99%"
    assert rows["sink_kinds"].verdict == R.PARTLY  # one model >= 50%
    assert rows["teaser"].verdict == R.PARTLY
    assert rows["probe_truth"].verdict == R.PENDING and not rows["probe_truth"].built
    table = R.markdown_table(list(rows.values()))
    assert "[sinks: How many sinks, and where](sinks.ipynb#how-many-sinks-and-where)" in table
    assert "`book/probing.md`" in table


def test_missing_name_is_pending_and_chapter_verdict_wins(tmp_path):
    values = sinks_values()
    del values["m2_first_share"]
    values["claim_teaser_verdict"] = "not reproduced"
    values["claim_teaser"] = "no head does"
    notebook(tmp_path / "sinks.ipynb", [glue_output(k, t) for k, t in values.items()])
    rows = {r.claim.key: r for r in R.evaluate(tmp_path)}
    assert rows["first_sink"].verdict == R.PENDING and "m2_first_share" in rows["first_sink"].note
    assert rows["teaser"].verdict == R.NOT_REPRODUCED and rows["teaser"].ours == "no head does"


def test_chapters_outside_the_toc_are_pending(tmp_path):
    notebook(tmp_path / "sinks.ipynb", [glue_output(k, t) for k, t in sinks_values().items()])
    assert all(r.verdict == R.PENDING for r in R.evaluate(tmp_path, chapters=["intro"]))


def test_rules():
    v = R.Values({"n_ctr": "2"})
    assert R._verdict_training(v) == R.REPRODUCED
    assert R._verdict_training(R.Values({"n_ctr": "0"})) == R.NOT_REPRODUCED
    assert R._verdict_training(R.Values({"n_ctr": "7"})) == R.PARTLY
    assert R._verdict_reasoning(R.Values({"sph_ratio": "2.0"})) == R.OFFLINE
    hub = R.Values({"sph_ratio": "1.9", "hev_base": "3", "hev_tuned": "9"},
                   params={"base_model": "a", "reasoning_model": "b"})
    assert R._verdict_reasoning(hub) == R.REPRODUCED
    assert R._verdict_qk_total(R.Values({"verdict_total": "not compared (one model)"})) == R.OFFLINE
    assert R._verdict_probe("cities", 0.925)(R.Values({"cities_tag_0": "95.0% [93, 97]", "cities_tag_1": "97%"})) == R.REPRODUCED
    assert R._verdict_probe("cities", 0.925)(R.Values({"cities_tag_0": "60%", "cities_tag_1": "61%",
                                                       "cities_beats_random": "0 of 2"})) == R.NOT_REPRODUCED


def test_slug_matches_myst():
    assert R.slug("The teaser: three sentences, three sinks?") == "the-teaser-three-sentences-three-sinks"
    assert R.slug("The construction (Theorem 7.1)") == "the-construction-theorem-71"


@pytest.mark.parametrize("chapter", sorted(R.glue_names()))
def test_every_name_is_glued_by_its_chapter(chapter):
    """A chapter that renames a glued value must update catchtag.reproduction.CLAIMS."""
    md = BOOK / f"{chapter}.md"
    if not md.exists():
        pytest.skip(f"book/{chapter}.md not written yet")
    pats = R.glued_in_source(md.read_text())
    missing = [n for n in R.glue_names()[chapter]
               if not n.startswith("claim_") and not any(p.fullmatch(n) for p in pats)]
    assert not missing, f"book/{chapter}.md does not glue {missing}"


@pytest.mark.parametrize("claim", R.CLAIMS, ids=lambda c: c.key)
def test_headings_exist(claim):
    md = BOOK / f"{claim.chapter}.md"
    if not md.exists() or not claim.heading:
        pytest.skip("chapter not written yet, or the row links to the whole chapter")
    headings = [line.lstrip("#").strip() for line in md.read_text().splitlines() if line.startswith("#")]
    assert claim.heading in headings, f"book/{claim.chapter}.md has no section {claim.heading!r}"
