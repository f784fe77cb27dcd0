"""Count the statements of each chapter code cell that compute (issue 14: a chapter cell is a call,
a plot or a glue; computation lives in the library, where it is tested).

A counted statement is any Python statement (nested ones included: a loop counts itself and its
body) that is not an import, not plotting (it names plt, a figure or axes, `plots`, `sns` or the
viewer), not a glue or display (`res.put`, `res.done`, `glue`, `display`, `markdown`, `print`), and
not the parameters cell. `python tests/_cells.py` prints every cell's count.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

BOOK = Path(__file__).resolve().parents[1] / "book"
CELL = re.compile(r"^```\{code-cell\}[^\n]*\n(.*?)^```\s*$", re.S | re.M)
PLOT_NAMES = {"plt", "fig", "ax", "axes", "axs", "plots", "sns", "viewer", "cax", "cb", "cbar", "twin"}
GLUE_CALLS = {"put", "put_all", "done", "glue", "glue_text", "display", "markdown", "Markdown", "print", "update"}


def cells(path: Path):
    """(index, tags, source) of each code cell of a MyST notebook."""
    out = []
    for i, m in enumerate(CELL.finditer(path.read_text())):
        body = m.group(1)
        tags = []
        lines = body.splitlines()
        while lines and lines[0].startswith(":"):
            t = re.match(r":tags:\s*\[(.*)\]", lines[0])
            if t:
                tags = [x.strip().strip("'\"") for x in t.group(1).split(",")]
            lines = lines[1:]
        out.append((i, tags, "\n".join(lines)))
    return out


def _names(node) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute) and n.attr in PLOT_NAMES
    }


def _is_plot(stmt) -> bool:
    return bool(_names(stmt) & PLOT_NAMES) or any(
        isinstance(n, ast.Attribute) and n.attr.startswith(("set_", "plot", "imshow", "bar", "scatter", "hist",
                                                             "axhline", "axvline", "legend", "annotate", "text",
                                                             "fill_between", "errorbar", "add_patch", "tick"))
        for n in ast.walk(stmt)
    )


def _is_glue(stmt) -> bool:
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
        f = stmt.value.func
        name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
        return name in GLUE_CALLS
    return False


def count(source: str) -> int:
    """Computing statements in one cell's source (IPython magics dropped)."""
    src = "\n".join(l for l in source.splitlines() if not l.lstrip().startswith(("%", "!")))
    tree = ast.parse(src)
    n = 0
    for node in ast.walk(tree):
        if not isinstance(node, ast.stmt):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)) or _is_glue(node):
            continue
        if isinstance(node, (ast.For, ast.If, ast.With, ast.FunctionDef)):
            # a block counts by its header only when its body does more than plot or glue
            body = [s for s in ast.walk(node) if isinstance(s, ast.stmt) and s is not node]
            if body and all(_is_plot(s) or _is_glue(s) or isinstance(s, (ast.For, ast.If, ast.With)) for s in body):
                continue
            n += 1
            continue
        if _is_plot(node):
            continue
        n += 1
    return n


def chapter_counts() -> dict[str, list[tuple[int, list[str], int]]]:
    out = {}
    for path in sorted(BOOK.glob("*.md")):
        cs = cells(path)
        if not cs:
            continue
        out[path.stem] = [(i, tags, count(src)) for i, tags, src in cs if "parameters" not in tags]
    return out


if __name__ == "__main__":
    limit = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    for chapter, rows in chapter_counts().items():
        print(chapter, [c for _, _, c in rows])
        for i, tags, c in rows:
            if c > limit and limit:
                print(f"  cell {i} {tags}: {c}")
