"""The definitions page names, for each quantity, the library function that computes it and the test
that pins it: every one of those names must exist (a renamed function or test fails here)."""

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = (ROOT / "book" / "definitions.md").read_text()
ROWS = [line for line in PAGE.splitlines() if line.startswith("| ") and line.count("|") >= 6]


def _cells(row):
    return [c.strip() for c in row.strip().strip("|").split("|")]


FUNCTIONS = sorted({name for row in ROWS for name in re.findall(r"`((?:book\.)?[a-z_]+\.[A-Za-z_]\w*)`", _cells(row)[3])})
TESTS = sorted({m for row in ROWS for m in re.findall(r"`(test_\w+\.py(?:::\w+)?)`", _cells(row)[4])})
SHORT = [(row, m) for row in ROWS for m in re.findall(r"`::(\w+)`", _cells(row)[4])]


def test_the_page_has_rows():
    assert len(ROWS) >= 20 and FUNCTIONS and TESTS


@pytest.mark.parametrize("name", FUNCTIONS)
def test_named_function_exists(name):
    module, attr = name.rsplit(".", 1)
    mod = importlib.import_module(f"catchtag.{module}")
    assert hasattr(mod, attr), f"book/definitions.md names catchtag.{name}, which does not exist"


def _test_names(path):
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}


@pytest.mark.parametrize("ref", TESTS)
def test_named_test_exists(ref):
    file, _, test = ref.partition("::")
    path = ROOT / "tests" / file
    assert path.exists(), f"book/definitions.md names tests/{file}, which does not exist"
    if test:
        assert test in _test_names(path), f"tests/{file} has no {test}"


def test_short_test_references_exist_in_the_rows_file():
    """`::name` continues the last `file::test` of the same cell."""
    for row, name in SHORT:
        files = re.findall(r"`(test_\w+\.py)(?:::\w+)?`", _cells(row)[4])
        assert files, f"row {row[:60]!r} has ::{name} without a file"
        assert name in _test_names(ROOT / "tests" / files[-1]), f"tests/{files[-1]} has no {name}"


def test_pages_have_no_control_characters():
    """A Python string written without r"" turns \\rvert and \\approx into control characters."""
    for page in Path(__file__).resolve().parents[1].joinpath("book").glob("*.md"):
        text = page.read_bytes().decode("utf-8")
        bad = [hex(ord(c)) for c in text if ord(c) < 32 and c not in "\n\t"]
        assert not bad, f"{page.name}: control characters {bad[:5]}"
