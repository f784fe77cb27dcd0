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
    assert e == dict(median_from_end=9.5, near_end_share=0.5)
    assert len(V.sink_rows([st], 0.2, 2).query("kind != 'first'")) == V.census_at([st], 0.2, 2)["n_other"] == 2


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


# --------------------------------------------------------------------------------------------------
# The sinks and catch chapters' library functions


def punct_planted():
    return planted(tokens=[f"w{i}" for i in range(12)] + ["."] + [f"w{i}" for i in range(13, 30)])


def test_census_quantities_panels_and_rows():
    st = punct_planted()
    q = V.census_quantities([st], 0.2, 10)
    assert set(q) == set(V.CENSUS_QUANTITIES) | {"min_tokens", "max_tokens"}
    assert q["n_other"] == 1 and q["min_tokens"] == q["max_tokens"] == 30
    assert V.census_at([st], 0.2, 2)["n_other"] == 2  # key 27 counts once the cut-off lets it in
    rows = V.sink_rows([st], 0.2, 10)
    pan = V.example_panels([st], rows, first_tokens=40, before=8, after=32)
    assert pan["first"] == dict(prompt=0, layer=0, head=0, position=0, received=pytest.approx(float(st.received[0, 0, 0])),
                                lo=0, hi=30)
    assert (pan["other"]["position"], pan["other"]["lo"], pan["other"]["hi"]) == (12, 4, 30)
    assert V.viewer_panel(pan) == "other" and V.viewer_panel(dict(first=pan["first"], other=None)) == "first"
    row = V.caught_row([st], pan["other"], 0.2, 10)
    assert row[13] == 12 and row[5] == 0 and not (row == 27).any()
    d = V.depth_profile([st], 0.2, 10, n_layers=3)
    assert d.to_dict("records") == [dict(layer=0, depth=0.0, first_sink=1.0, n_other=1.0)]
    k = V.kind_counts(rows)
    assert k.to_dict() == {"punctuation": 1, "newline": 0, "other": 0}
    assert V.top_token_quantities(V.top_tokens(rows)) == dict(top_token="'.'", top_token_share=1.0)
    assert V.top_token_quantities(V.top_tokens(rows.iloc[:0])) == dict(top_token=None, top_token_share=None)


def test_sweep_quantities():
    st = punct_planted()
    sw = V.cutoff_sweep([st], 0.2, (5, 10, 40))
    assert V.cutoff_quantities(sw) == dict(other_at_5=1, other_at_40=0, near_end_at_5=0.0)
    with pytest.raises(CatchtagError):
        V.cutoff_quantities(sw[sw.min_queries != 40])
    assert list(V.cutoff_table({"m": sw}).columns) == V.SWEEP_COLUMNS
    from catchtag.sinks import eps_sweep

    es = eps_sweep(V.cut([st], 10), V.EPS_VALUES)
    assert V.EPS_VALUES[0] == 0.05 and V.EPS_VALUES[-1] == 0.5 and len(V.EPS_VALUES) == 10
    assert V.eps_quantities(es) == dict(sph_005=2.0, sph_05=1.0)  # at 0.5 only the first token: the "." has alpha < 0.5


def test_teaser_on_planted_sentences():
    # sentence 1: tokens 0-11 (caught by 0), sentence 2: tokens 12-29 (caught by the "." at 12)
    st = punct_planted()
    text = " ".join(st.tokens)
    cut_at = text.index(" .")
    t = V.teaser(st, text, [(0, cut_at), (cut_at, len(text))], 0.2, min_queries=10)
    assert t["n_heads"] == 1 and t["separating"] == 1 and t["separating_no_cutoff"] == 1
    assert (t["layer"], t["head"], t["separates"]) == (0, 0, True) and t["label"] == "separates the sentences"
    assert t["caught"][13] == 12 and len(t["caught"]) == 30
    assert set(V.TEASER_QUANTITIES) <= set(t)


def test_catch_tables_and_map():
    st = punct_planted()
    run = V.catch_tables([st], 0.2, 10)
    assert run["min_tokens"] == 30 and set(run) == {"stats", "seg", "depth", "min_tokens"}
    assert run["seg"]["position"].tolist() == [0, 12]  # key 27 is cut by the rule
    assert V.map_choice(run) == (0, [0])
    data = V.segment_map_data(run["stats"][0], [0], 0.2, window=20)
    assert data["codes"].shape == (1, 20) and data["other_sinks"] == [12] and data["rows"] == [(0, 0)]
    assert data["codes"][0, 5] == 1 and data["codes"][0, 13] == 2 and data["codes"][0, 0] == 0
    assert data["sinks"] == [[0, 12]] and len(data["tokens"]) == 20
    parts = V.segments_by_kind(run["seg"])
    assert set(parts) == {"first", "other"} and parts["other"]["position"].tolist() == [12]
    no_other = run["seg"][run["seg"].kind == "first"]
    assert V.map_choice(dict(seg=no_other, stats=run["stats"])) == (0, [0])


def test_catch_token_and_depth_quantities_by_hand():
    seg = seg_fixture()
    seg["token"] = ["w", ".", "w", " the", "\n"]
    by = V.catch_by_token(seg)
    assert by.to_dict() == {"the": 5, ".": 3, "\\n": 0}
    q = V.catch_token_quantities(seg)
    assert q["top_token"] == "'the'" and q["boundary_share"] == pytest.approx(3 / 8)
    assert q["the_share"] == pytest.approx(5 / 8) and q["the_position"] == 7
    assert V.catch_token_quantities(seg.iloc[[0, 2]])["top_token"] == "none"
    assert V.catch_token_quantities(seg.iloc[[0, 1]])["the_position"] is None
    depth = pd.DataFrame(dict(layer=range(12), caught_first=[0.5] * 12, caught_other=[0.0] * 11 + [0.2],
                              not_caught=[0.9, 0.7] + [0.1] * 10))
    d = V.depth_quantities(depth)
    assert d == dict(early=pytest.approx(0.2), later=pytest.approx(0.9), peak_other_layer=11, peak_other=0.2)
    with pytest.raises(CatchtagError):
        V.depth_quantities(depth.iloc[:0])
