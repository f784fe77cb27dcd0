"""The reproduction table: reading results files, verdict rules (data), and the names it relies on."""

import math
import re
from pathlib import Path

import pytest

from catchtag.book import reproduction as R
from catchtag.book.report import Results, read_results

BOOK = Path(__file__).resolve().parents[1] / "book"


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CATCHTAG_RESULTS", str(tmp_path))
    monkeypatch.setattr("catchtag.book.report.glue_text", lambda *a, **k: None)
    return tmp_path


def write_sinks(first=(0.9, 0.99), boundary=(0.6, 0.7), separating=(1, 0), compare="gemma3-270m"):
    res = Results("sinks", {"eps": 0.2}, ["smollm2-135m", compare])
    for model, f, b, s in zip(["smollm2-135m", compare], first, boundary, separating):
        if model:
            res.put(model, "first_share", f)
            res.put(model, "boundary_share", b)
            res.put(model, "separating", s)
            res.put(model, "n_heads", 270)
    return res.done()


def test_results_round_trip(results_dir):
    paths = write_sinks()
    assert sorted(p.name for p in paths) == ["sinks-gemma3-270m.json", "sinks-smollm2-135m.json", "sinks.json"]
    v = read_results("sinks")
    assert v["m1_first_share"] == 0.9 and v["m2_first_share"] == 0.99
    assert v["m1_model"] == "SmolLM2-135M-Instruct" and v["params"] == {"eps": 0.2}


def test_results_are_byte_identical(results_dir):
    one = [p.read_bytes() for p in write_sinks()]
    two = [p.read_bytes() for p in write_sinks()]
    assert one == two


def test_verdicts_from_rules(results_dir):
    write_sinks()
    rows = {r.claim.key: r for r in R.evaluate(results_dir)}
    assert rows["first_sink"].verdict == R.REPRODUCED
    assert rows["sink_kinds"].verdict == R.REPRODUCED
    assert rows["teaser"].verdict == R.PARTLY  # one model of two has a separating head
    assert "90%" in rows["first_sink"].ours and "99%" in rows["first_sink"].ours
    assert rows["catch_runs"].verdict == R.PENDING  # the catch chapter wrote nothing


def test_absent_second_model_is_skipped(results_dir):
    write_sinks(first=(0.9, None), compare="")
    rows = {r.claim.key: r for r in R.evaluate(results_dir)}
    assert rows["first_sink"].verdict == R.REPRODUCED
    assert "n/a" in rows["first_sink"].ours or "?" not in rows["first_sink"].ours


def test_missing_number_is_pending(results_dir):
    res = Results("sinks", {}, ["smollm2-135m", ""])
    res.put("smollm2-135m", "first_share", 0.9)
    res.done()
    rows = {r.claim.key: r for r in R.evaluate(results_dir)}
    assert rows["sink_kinds"].verdict == R.PENDING and "boundary_share" in rows["sink_kinds"].note


@pytest.mark.parametrize("rule,values,verdict", [
    (R.Rule("at_least", ("a", "b"), 0.5), {"a": 0.6, "b": 0.7}, R.REPRODUCED),
    (R.Rule("at_least", ("a", "b"), 0.5), {"a": 0.6, "b": 0.1}, R.PARTLY),
    (R.Rule("at_least", ("a", "b"), 0.5), {"a": 0.1, "b": 0.1}, R.NOT_REPRODUCED),
    (R.Rule("within", ("a",), 0.2, 0.4), {"a": 0.3}, R.REPRODUCED),
    (R.Rule("within", ("a",), 0.2, 0.4), {"a": 0.5}, R.NOT_REPRODUCED),
    (R.Rule("at_least", ("a", "b"), 0.5), {"a": None, "b": math.nan}, R.PENDING),
    (R.Rule("verdict", ("v",)), {"v": "partly"}, R.PARTLY),
    (R.Rule("verdict", ("v",)), {"v": "made up"}, R.PENDING),
    (R.Rule("qualitative"), {}, R.PENDING),
])
def test_rule(rule, values, verdict):
    assert rule.decide(R.Values(values)) == verdict


def test_slug_matches_myst():
    assert R.slug("The teaser: three sentences, three sinks?") == "the-teaser-three-sentences-three-sinks"
    assert R.slug("The construction (Theorem 7.1)") == "the-construction-theorem-71"


def _put_names(md_text: str, chapter: str) -> list[re.Pattern]:
    """Patterns for the quantities a chapter's source puts (res.put(model, "name", ...)); names
    built with f-strings become wildcards."""
    pats = []
    for m in re.finditer(r"\.put(?:_all)?\(\s*[^,]+,\s*(f?)([\"'])(.+?)\2", md_text):
        name = m.group(3)
        parts = re.split(r"\{[^}]*\}", name) if m.group(1) else [name]
        pats.append(re.compile(".+?".join(re.escape(p) for p in parts)))
    return pats


@pytest.mark.parametrize("claim", R.CLAIMS, ids=lambda c: c.key)
def test_headings_exist(claim):
    md = BOOK / f"{claim.chapter}.md"
    if not md.exists() or not claim.heading:
        pytest.skip("chapter not written yet, or the row links to the whole chapter")
    headings = [line.lstrip("#").strip() for line in md.read_text().splitlines() if line.startswith("#")]
    assert claim.heading in headings, f"book/{claim.chapter}.md has no section {claim.heading!r}"


def test_glued_text_that_names_a_folder_is_kept_as_text(tmp_path):
    """A model given as a local folder: its name is glued as text, not read as a file."""
    from catchtag.book.report import markdown

    assert markdown(str(tmp_path)).data == str(tmp_path)


def test_start_checks_params_and_opens_results(results_dir):
    from catchtag.book.report import start
    from catchtag.errors import CatchtagError

    params, res = start("probing", model="smollm2-135m", compare="", eps=0.2, remote=False,
                        max_heads="6", _types={"max_heads": int})
    assert params["max_heads"] == 6 and res.models == ["smollm2-135m"] and res.chapter == "probing"
    with pytest.raises(CatchtagError, match="local models only"):
        start("probing", model="smollm2-135m", remote="local", local_only=True)
    with pytest.raises(CatchtagError, match="eps"):
        start("probing", model="smollm2-135m", eps=1.5)
    _, res = start("minimal", seed=0, models=["two-layer-attention"])
    assert res.models == ["two-layer-attention"]


def test_public_params_drops_secrets_not_lengths(monkeypatch):
    from catchtag.book.report import public_params

    monkeypatch.setenv("NDIF_API_KEY", "sk-abcdef")
    kept = public_params({"chunk_tokens": 512, "api_key": "x", "hf_token": "y", "apikey": "z",
                          "password": "p", "model": "sk-abcdef", "eps": 0.2})
    assert kept == {"chunk_tokens": 512, "eps": 0.2}


def test_page_tables_and_counts(results_dir):
    write_sinks()
    tables, counts = R.page(None)
    assert set(tables) == {"repro_table", "repro_rules", "repro_names"}
    assert counts["n_claims"] == sum(v for k, v in counts.items() if k != "n_claims")
    assert all(t.startswith("|") for t in tables.values())


def test_a_quantity_put_twice_is_refused(results_dir):
    res = Results("sinks", {"eps": 0.2}, ["smollm2-135m", ""])
    res.put("smollm2-135m", "n_other", 3)
    with pytest.raises(ValueError, match="sinks_m1_n_other is put twice"):
        res.put("smollm2-135m", "n_other", 3)
    res.put(None, "n_other", 3)  # another slot: another glue name
