"""catchtag.book.plots: the chapters' figure helpers draw what they are given (synthetic inputs,
Agg backend): artists, labels and titles, without a model."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from catchtag.book import plots  # noqa: E402


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def test_sink_examples_and_symlog_bars():
    T = 12
    A = np.tril(np.ones((T, T)))
    A /= A.sum(1, keepdims=True)
    toks = [f"t{i}" for i in range(T)]
    pan = dict(first=dict(prompt=0, layer=1, head=2, position=0, received=0.5, lo=0, hi=10),
               other=dict(prompt=0, layer=3, head=0, position=4, received=0.3, lo=1, hi=12))
    fig = plots.sink_examples({"m": pan, "n": dict(first=pan["first"], other=None)},
                              {"m": {"first": (toks, A), "other": (toks, A)}, "n": {"first": (toks, A)}}, 0.2)
    axes = fig.axes
    assert "layer 1, head 2, tokens 0–9" in axes[0].get_title() and "first-token sink (α = 0.50)" in axes[0].get_title()
    assert "sink at 't4' (position 4, α = 0.30)" in axes[1].get_title()
    assert not axes[3].axison  # no second example for "n": a text, no axes
    fig, ax = plt.subplots()
    plots.symlog_bars(ax, np.array([0, 2, 40]), width=5)
    assert len(ax.patches) == 3 and ax.get_yscale() == "symlog"
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1", "3", "10", "30"]


def test_segment_map_catch_bars_and_ccdf():
    data = dict(codes=np.array([[0, 1, 1, 2], [1, 1, 0, 0]]), other_sinks=[2], tokens=["a", "b", ".", "\n"],
                rows=[(3, 0), (3, 1)], sinks=[[0, 2], [0]])
    fig, ax = plt.subplots()
    plots.segment_map(ax, data, "map")
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["first token 'a'", "'.' (position 2)", "not caught"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["L3 H0", "L3 H1"]
    summary = pd.DataFrame(dict(token=["a", "b"], caught_first=[0.5, 0.2], caught_other=[0.1, 0.3],
                                not_caught=[0.4, 0.5], is_sink=[0.0, 0.1]))
    fig, ax = plt.subplots()
    plots.catch_bars(ax, summary, "bars")
    assert len(ax.patches) == 6 and ax.get_ylim() == (0, 1)
    fig, ax = plt.subplots()
    plots.ccdf(ax, [3, 1, 2], color="k")
    x, y = ax.lines[0].get_data()
    assert list(x) == [1, 2, 3] and np.allclose(y, [1, 2 / 3, 1 / 3])
    plots.ccdf(ax, [])  # nothing to draw
    assert len(ax.lines) == 1


def test_tag_figures():
    cos = pd.DataFrame(dict(sink=[0, 0, 5, 5], caught=[True, False, True, False], cos=[0.9, 0.1, 0.7, 0.3],
                            cos_other=[0.2, 0.1, 0.1, 0.0]))
    fig, ax = plt.subplots()
    plots.tag_cosine_hist(ax, cos, "cos")
    assert "caught, another token's value (baseline)" in [t.get_text() for t in ax.get_legend().get_texts()]
    pc = dict(xy=np.array([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]]), label=np.array([0, 5, -1]), sinks=[0, 5],
              tag_xy=np.eye(2), origin_xy=np.zeros(2), explained=0.8)
    d = dict(pca=pc, tokens=["<s>", "a", "b", "c", "d", ".", "e"], sinks=(0, 5), layer=1, head=2, prompt=0,
             plane_xy=pc["xy"], plane_label=pc["label"], plane_tags=np.eye(2))
    fig, (a, b) = plt.subplots(1, 2)
    plots.two_sink_panels(a, b, d, "m")
    assert "head L1 H2, prompt 0" in a.get_title() and "PC1+PC2 = 80%" in a.get_title()
    assert b.get_xlabel() == "along tag of '<s>'"
    fig, (a, b) = plt.subplots(1, 2)
    plots.two_sink_panels(a, b, None, "m")
    assert a.texts[0].get_text() == "no head with two catching sinks"
    ve = pd.DataFrame({f"ve_{k}": [0.3, 0.5, np.nan] for k in plots.VE_STYLES})
    fig, ax = plt.subplots()
    plots.ve_hist(ax, ve, {"tags": "tags", "mean_value": "mean"}, "ve")
    assert [t.get_text() for t in ax.get_legend().get_texts()][-2:] == ["tags", "mean"]
    pairs = pd.DataFrame(dict(kind=["same head", "across layers"], cos=[0.5, -0.1]))
    sinks = pd.DataFrame(dict(cos_tokens=[0.1, np.nan]))
    fig, ax = plt.subplots()
    plots.geometry_hist(ax, pairs, sinks, 0.03, "geo")
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "tag vs tag: sinks of one head" in texts and "two random directions (median)" in texts
    assert "tag vs tag: heads of one layer" not in texts  # no such pair: not drawn
