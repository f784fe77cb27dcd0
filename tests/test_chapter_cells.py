"""Issue 14: a chapter cell is a call, a plot or a glue; computation lives in the library.

Every code cell of every chapter, except its `parameters` cell, has at most LIMIT statements that
compute, as `tests/_cells.py` counts them (imports, plotting, glue and display are not counted).
"""

import pytest

from _cells import chapter_counts, count

LIMIT = 3


def test_counter_counts_computation_not_plots_or_glue():
    assert count("import numpy as np\nfig, ax = plt.subplots()\nax.plot([1, 2])\nres.put(m, 'x', 1)") == 0
    assert count("for m in models:\n    res.put(m, 'x', f(m))") == 0
    assert count("t = {}\nfor m in models:\n    t[m] = f(m)\n    t[m] += 1") == 4
    assert count("def pct(x):\n    return f'{x:.1%}'") == 2


@pytest.mark.parametrize("chapter", sorted(chapter_counts()))
def test_chapter_cells_only_call_plot_or_glue(chapter):
    over = [(i, n) for i, _, n in chapter_counts()[chapter] if n > LIMIT]
    assert not over, f"{chapter}: cells {over} compute more than {LIMIT} statements (move it to the library)"
