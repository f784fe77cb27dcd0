"""catchtag.qknorm: the chapter's tables and numbers, on planted runs (no real model)."""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from catchtag import qknorm as Q
from catchtag.sinks import SinkStats


def planted_stats(n_layers=2, T=12):
    """Two heads per layer; head 0 has a first-token sink and a sink at 3, head 1 none; layer 1 adds
    a first-token sink to head 1."""
    received = torch.full((n_layers, 2, T), 0.01)
    received[:, 0, 0] = 0.9
    received[:, 0, 3] = 0.5
    received[1, 1, 0] = 0.6
    tokens = ["<s>"] + [f" w{i}" for i in range(1, T)]
    return SinkStats("m", "", tokens, list(range(n_layers)), received, torch.ones(n_layers, 2, T),
                     torch.zeros(n_layers, 2, T, dtype=torch.long), torch.full((n_layers, 2, T), 0.9))


def planted_table():
    # one head, one prompt: a first-token sink, an other sink, two non-sinks
    return pd.DataFrame(dict(
        prompt=0, layer=0, head=0, position=[0, 3, 4, 5], sink=[True, True, False, False],
        k_norm=[2.0, 4.0, 8.0, 8.0], k_pre=[20.0, 4.0, 10.0, 10.0], k_rel=[0.25, 0.5, 1.0, 1.0],
        cos=[0.9, 0.7, 0.1, 0.3], logit=[5.0, 3.0, 0.0, 1.0], q_norm=[3.0, 3.0, 5.0, 7.0], q_pre=1.0))


def planted_run(name="a", qk_norm=False, n_layers=2, sph=1.0, other=0.2, ev=(0.1, 0.6, np.nan)):
    model = SimpleNamespace(name=name, qk_norm=qk_norm, n_layers=n_layers, n_heads=2)
    census = dict(sinks_per_head=sph, first_share=sph - other, other_per_head=other, heads_with_other=0.25)
    return Q.QKRun(model=model, stats=[planted_stats(n_layers)], table=planted_table(),
                   ev=pd.DataFrame(dict(ev=list(ev))), census=census, bounds=pd.DataFrame())


def test_model_quantities_and_census_rows():
    r = planted_run()
    q = Q.model_quantities(r, ev_high=0.5)
    assert q["sinks_per_head"] == 1.0 and q["other_per_head"] == 0.2 and q["other_share"] == pytest.approx(0.2)
    assert q["ev_median"] == pytest.approx(0.35) and q["ev_high"] == 0.5 and q["min_tokens"] == 12
    assert set(Q.CENSUS_SPECS) <= set(q)
    none = Q.model_quantities(planted_run(ev=(np.nan,)))
    assert none["ev_median"] is None and none["ev_high"] is None
    rows = Q.census_rows({"a": r, "b": planted_run("b", qk_norm=True)}, ev_high=0.5)
    assert list(rows.columns) == ["a (no QK-norm)", "b (QK-norm)"]
    assert rows.loc["heads", "a (no QK-norm)"] == 4 and rows.loc["share of sinks not first", "b (QK-norm)"] == pytest.approx(0.2)
    assert rows.loc["heads with EV >= 0.5", "a (no QK-norm)"] == 0.5


def test_pair_quantities():
    no, qk = planted_run("a", False, n_layers=3, sph=1.0, other=0.1), planted_run("b", True, n_layers=2, sph=1.2, other=0.3)
    q = Q.pair_quantities({"a": no, "b": qk})
    assert q["sph_ratio"] == pytest.approx(1.2) and q["verdict_total"] == "reproduced" and q["verdict_other"] == "reproduced"
    assert q["heads_ratio"] == pytest.approx(6 / 4) and "in a" in q["total_summary"]
    # the order of the models does not change the verdicts; heads_ratio is first over second
    r = Q.pair_quantities({"b": qk, "a": no})
    assert r["sph_ratio"] == q["sph_ratio"] and r["heads_ratio"] == pytest.approx(4 / 6)
    assert Q.pair_quantities({"a": no}) == dict.fromkeys(Q.PAIR_KEYS)
    assert Q.pair_quantities({"a": no, "c": planted_run("c", False)}) == dict.fromkeys(Q.PAIR_KEYS)


def test_depth_profile():
    d = Q.depth_profile(planted_run(n_layers=2), eps=0.2)
    assert list(d["depth"]) == [0.0, 1.0]
    assert list(d["first_sink"]) == [0.5, 1.0] and list(d["n_other"]) == [0.5, 0.5]


def test_mechanism_quantities_and_auc():
    r = planted_run()
    q = Q.mechanism_quantities(r)
    assert q["krel_first"] == 0.25 and q["cos_first"] == 0.9 and q["cos_other"] == 0.7 and q["cos_none"] == pytest.approx(0.2)
    assert q["logit_first"] == 5.0 and q["logit_none"] == 0.5 and q["knorm_none"] == 8.0 and q["qnorm_none"] == 6.0
    assert q["kpost_ratio"] == pytest.approx(2 / 8) and q["kpre_ratio"] == pytest.approx(20 / 10)
    assert q["auc_cos"] == 1.0 and q["auc_norm"] == 0.0  # sinks: larger cosines, smaller keys
    assert set(Q.MECHANISM_SPECS) == set(q)
    auc = Q.auc_table({"a": r})
    assert auc.loc["cos", "a (no QK-norm)"] == 1.0 and auc.loc["k_pre", "a (no QK-norm)"] == 0.5
    no_pre = Q.QKRun(r.model, r.stats, r.table.drop(columns=["k_pre"]), r.ev, r.census, r.bounds)
    assert Q.mechanism_quantities(no_pre)["kpre_ratio"] is None


def test_scatter_points_and_boxes():
    t = planted_table()
    big = pd.concat([t] + [t.iloc[2:].assign(position=10 + i) for i in range(6)], ignore_index=True)
    pts = Q.scatter_points(big, max_none=5)
    assert list(pts) == list(Q.GROUPS)
    assert pts["not a sink"][1] == 14 and len(pts["not a sink"][0]) == 5
    assert len(pts["first-token sink"][0]) == pts["first-token sink"][1] == 1
    boxes = Q.norm_boxes(t)
    assert [g for g, _, _ in boxes] == ["first-token sink", "other sink", "not a sink"]
    assert list(boxes[0][1]) == [20.0] and list(boxes[2][2]) == [8.0, 8.0]


def test_separation_equals_the_pairwise_definition():
    rng = np.random.default_rng(1)
    n = 600
    t = pd.DataFrame(dict(prompt=rng.integers(0, 2, n), layer=rng.integers(0, 3, n), head=rng.integers(0, 2, n),
                          sink=rng.random(n) < 0.1, x=rng.normal(size=n).round(1)))  # rounding makes ties
    aucs = []
    for _, g in t.groupby(["prompt", "layer", "head"]):
        s, o = g.loc[g.sink, "x"].to_numpy(), g.loc[~g.sink, "x"].to_numpy()
        if len(s) and len(o):
            aucs.append((s[:, None] > o[None, :]).mean() + 0.5 * (s[:, None] == o[None, :]).mean())
    assert Q.separation(t, "x") == pytest.approx(float(np.mean(aucs)), abs=1e-12)
