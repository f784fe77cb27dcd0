"""catchtag.census_views: the cut-off, the sweep, positions from the end, example heads, long prompts.
Answers worked out by hand on planted attention matrices."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from catchtag import census_views as V
from catchtag.errors import CatchtagError
from catchtag.prompts import PASSAGES
from catchtag.sinks import CENSUS_KEYS, SinkStats, stats_from_probs


def planted(T=30, late=(27,), mid=(12,), weight=0.6, tokens=None):
    """One layer, one head, T tokens. Every query puts `weight` on the latest key of `mid + late`
    at or before it (if any, else on key 0) and the rest on key 0 (query 0: all on itself)."""
    A = torch.zeros(T, T, dtype=torch.float64)
    A[0, 0] = 1.0
    keys = sorted(mid + late)
    for i in range(1, T):
        seen = [k for k in keys if k <= i]
        A[i, 0] = 1.0 - (weight if seen else 0.0)
        if seen:
            A[i, seen[-1]] += weight
    hs = stats_from_probs(A, min_queries=1)
    toks = tokens or [f"w{i}" for i in range(T)]
    return SinkStats("toy", "", toks, [0], hs.received[None], hs.row_sum[None], hs.top_key[None], hs.top_value[None], 1)


def test_cut_removes_keys_seen_by_few_later_queries():
    st = planted()
    # Key 27 of 30 is seen by 2 later queries; key 12 by 17.
    assert V.sink_rows([st], 0.2, min_queries=0)["position"].tolist() == [0, 12, 27]
    assert V.sink_rows([st], 0.2, min_queries=2)["position"].tolist() == [0, 12, 27]
    assert V.sink_rows([st], 0.2, min_queries=3)["position"].tolist() == [0, 12]
    rows = V.sink_rows([st], 0.2, min_queries=10)
    assert rows["position"].tolist() == [0, 12]
    assert rows["from_end"].tolist() == [29, 17]
    assert rows["n_queries"].tolist() == [30, 18]  # itself included
    assert V.sink_rows([st], 0.2, min_queries=18)["position"].tolist() == [0]
    # The cut does not change alpha where it keeps the key, and never catches from a cut key.
    (c,) = V.cut([st], 10)
    assert torch.equal(c.received[0, 0, :20], st.received[0, 0, :20])
    assert torch.isnan(c.received[0, 0, 20:]).all()
    assert not (c.caught(0.2) == 27).any() and (st.caught(0.2) == 27).any()


def test_no_sink_is_reported_from_fewer_later_queries_than_the_rule():
    torch.manual_seed(0)
    T = 160  # a long prompt, as the chapters use
    A = torch.rand(T, T, dtype=torch.float64).tril()
    A = 0.3 * A / A.sum(-1, keepdim=True) + 0.7 * torch.eye(T, dtype=torch.float64)  # a local head
    hs = stats_from_probs(A, min_queries=1)
    st = SinkStats("toy", "", [f"w{i}" for i in range(T)], [0], hs.received[None], hs.row_sum[None],
                   hs.top_key[None], hs.top_value[None], 1)
    assert (V.sink_rows([st], 0.05, 0)["from_end"] < 10).any()  # without the rule, late keys pass
    for m in V.CUTOFFS:
        rows = V.sink_rows([st], 0.05, m)
        assert (rows["n_queries"] - 1 >= m).all()
        caught = V.cut([st], m)[0].caught(0.05)
        assert (caught[caught >= 0] <= T - 1 - m).all()


def test_census_at_and_sweep():
    st = planted(tokens=[f"w{i}" for i in range(12)] + ["."] + [f"w{i}" for i in range(13, 30)])
    c = V.census_at([st], 0.2, 10)
    assert set(CENSUS_KEYS) <= set(c)
    assert c["sinks_per_head"] == 2 and c["first_share"] == 1 and c["other_per_head"] == 1
    assert c["punct_share"] == 1 and c["boundary_share"] == 1 and c["n_other"] == 1
    sw = V.cutoff_sweep([st], 0.2, cutoffs=(2, 10, 20))
    assert sw["min_queries"].tolist() == [2, 10, 20]
    assert sw["other_per_head"].tolist() == [2, 1, 0]
    # cut-off 2: key 27 (from_end 2) is within 10 of the cut-off, key 12 (from_end 17) is not
    assert sw["near_end_share"].iloc[0] == 0.5
    assert math.isnan(sw["boundary_share"].iloc[2])
    e = V.end_summary(V.sink_rows([st], 0.2, 2), 2)
    assert e == dict(n_other=2, median_from_end=9.5, near_end_share=0.5)


def test_from_end_counts_and_top_tokens():
    st = planted(late=(20,), mid=(5,))
    rows = V.sink_rows([st], 0.2, 5)
    assert rows["from_end"].tolist() == [29, 24, 9]
    counts = V.from_end_counts(rows, 10)
    assert counts.sum() == 2 and counts[9] == 1 and counts[10] == 1
    assert V.from_end_counts(rows, 30, width=5).tolist() == [0, 1, 0, 0, 1, 0, 0]  # 9 -> bin 1, 24 -> bin 4
    with pytest.raises(CatchtagError):
        V.from_end_counts(rows, 30, width=0)
    top = V.top_tokens(rows)
    assert set(top["token"]) == {"'w5'", "'w20'"} and top["share"].sum() == 1


def test_examples_and_summary():
    a, b = planted(), planted(weight=0.9)
    assert V.strongest_first_sink([a, b]) == (0, 0)
    rows = V.sink_rows([planted(tokens=[f"w{i}" for i in range(12)] + ["."] + [f"w{i}" for i in range(13, 30)])], 0.2)
    best = V.strongest_sink(rows)
    assert best["position"] == 12 and best["token"] == "."
    assert V.strongest_sink(rows, kinds=("newline",)) is None
    table = V.summary_table({"m": V.census_at([a], 0.2)})
    assert list(table.index) == list(V.SUMMARY_ROWS.values()) and table.loc["sinks per head", "m"] == 2


def test_teaser_head():
    t = pd.DataFrame(dict(layer=[0, 0, 1], head=[0, 1, 0], sink_0=[0, 0, 0], sink_1=[0, 5, 5], sink_2=[0, 9, 9],
                          share_0=[1.0, 0.6, 0.9], share_1=[1.0, 0.7, 0.8], share_2=[1.0, 0.9, 0.6],
                          separates=[False, True, True]))
    assert V.teaser_head(t) == (0, 1, True)  # weakest share 0.6 in both; the first one
    t.loc[2, "share_2"] = 0.95
    assert V.teaser_head(t) == (1, 0, True)  # weakest share 0.8 beats 0.6
    t["separates"] = False
    assert V.teaser_head(t) == (0, 1, False)
    with pytest.raises(CatchtagError):
        V.teaser_head(t.iloc[:0])


def test_long_prompts():
    ps = V.long_prompts(5, seed=3)
    assert len(ps) == 5 and len(set(ps)) == 5
    assert ps == V.long_prompts(5, seed=3) and ps != V.long_prompts(5, seed=4)
    for p in ps:
        parts = p.split(V.SEPARATOR)
        assert len(p) >= V.MIN_CHARS and len(set(parts)) == len(parts) and set(parts) <= set(PASSAGES)
        assert len(V.SEPARATOR.join(parts[:-1])) < V.MIN_CHARS  # no more passages than needed
    for bad in (0, 1.5, True):
        with pytest.raises(CatchtagError):
            V.long_prompts(bad)
    with pytest.raises(CatchtagError):
        V.long_prompts(2, min_chars=10**6)
    with pytest.raises(CatchtagError):
        V.cut([planted()], -1)


@pytest.mark.slow
def test_long_prompts_reach_150_tokens(any_model):
    from catchtag.capture import tokenize

    for p in V.long_prompts(6):
        assert len(tokenize(any_model, p)) >= V.MIN_TOKENS


def seg_fixture():
    return pd.DataFrame(dict(
        prompt=[0, 0, 1, 1, 1], layer=[0, 1, 0, 2, 2], kind=["first", "punctuation", "first", "other", "newline"],
        position=[0, 4, 0, 7, 9], n_caught=[10, 3, 12, 5, 0], n_visible=[20, 10, 20, 8, 6],
        share=[0.5, 0.3, 0.6, 5 / 8, 0.0], n_runs=[2, 1, 1, 2, 0], first_caught=[1, 5, 1, 9, -1]))


def test_catch_summary_by_hand():
    depth = pd.DataFrame(dict(layer=[0, 1], caught_first=[0.5, 0.7], caught_other=[0.1, 0.1], not_caught=[0.4, 0.2]))
    s = V.catch_summary(seg_fixture(), depth)
    assert s["caught_share"] == pytest.approx(0.7) and s["caught_first"] == pytest.approx(0.6)
    assert s["first_len"] == 11 and s["first_seg_share"] == pytest.approx(0.55)
    assert s["other_len"] == 4 and s["other_one_run"] == 0.5 and s["other_starts_after"] == 0.5
    assert s["other_catching"] == pytest.approx(2 / 3) and s["other_visible"] == 8
    k = V.catch_by_kind(seg_fixture())
    assert k.loc["punctuation", "share_of_caught"] == pytest.approx(3 / 8) and k.loc["newline", "sinks"] == 1
    assert V.busiest_prompt_layers(seg_fixture()) == (1, [2])
    assert V.busiest_prompt_layers(seg_fixture().iloc[[0, 2]]) == (0, [])
    with pytest.raises(CatchtagError):
        V.catch_summary(seg_fixture(), depth.iloc[:0])
