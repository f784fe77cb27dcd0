"""The probing chapter's library side: one forward for both protocols (`paper_at` on a prefix),
intervals, quantities by name and the tables the chapter displays, on synthetic inputs."""

import numpy as np
import pandas as pd
import pytest
import torch

from catchtag import probes


def _causal_attention(B=3, H=2, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, H, T, T, generator=g, dtype=torch.float64) * 2
    logits[:, :, :, 0] += 3.0  # a first-token sink
    logits = logits.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    return logits.softmax(-1), torch.randn(B, H, T, 4, generator=g, dtype=torch.float64)


def test_paper_at_on_a_prefix_equals_the_prefix_fed_alone():
    """Causal attention: the statement's rows inside statement + continuation are those of the
    statement alone, so paper_at at position p of the long prompt equals paper_at at the last token
    of the prefix; the received attention counts only the prefix's queries."""
    A, V = _causal_attention()
    pos = torch.tensor([3, 5, 6])
    long = probes.paper_at(A, V, pos, eps=0.2)
    for b, p in enumerate(pos.tolist()):
        # the prefix's own attention: rows 0..p renormalised over keys 0..p are already normalised
        short = probes.paper_at(A[b:b + 1, :, :p + 1, :p + 1], V[b:b + 1, :, :p + 1], torch.tensor([p]), eps=0.2)
        for k in long:
            assert torch.allclose(long[k][b].double(), short[k][0].double(), atol=1e-12), k


def test_paper_at_by_hand():
    """One head, T = 3, probed token 2: alpha = (1.0+0.5+0.6)/3, (0.5+0.2)/2, 0.2/1 -> keys 0 and 1
    are sinks at eps = 0.3, key 2 (alpha 0.2) is not."""
    A = torch.tensor([[[[1.0, 0, 0], [0.5, 0.5, 0], [0.6, 0.2, 0.2]]]])
    V = torch.tensor([[[[1.0, 0], [0, 1.0], [5.0, 5.0]]]])
    out = probes.paper_at(A, V, torch.tensor([2]), eps=0.3)
    assert torch.allclose(out["tag"][0, 0], torch.tensor([0.6, 0.2]))
    assert torch.allclose(out["notag"][0, 0], torch.tensor([1.0, 1.0]))
    assert torch.allclose(out["full"][0, 0], out["tag"][0, 0] + out["notag"][0, 0])
    assert out["first_weight"][0, 0] == pytest.approx(0.75) and out["self_weight"][0, 0] == 0
    assert not out["self_sink"][0, 0]


def test_accuracy_interval_is_wilson_on_the_count():
    assert probes.accuracy_interval(0.5, 100) == pytest.approx(probes.wilson_interval(50, 100))
    lo, hi = probes.accuracy_interval(0.985, 200)  # 197 of 200
    assert lo == pytest.approx(probes.wilson_interval(197, 200)[0]) and hi < 1
    assert np.isnan(probes.accuracy_interval(float("nan"), 200)[0])
    assert probes.ci_text(0.5, 0.4, 0.6) == "50.0% [40.0%, 60.0%]"
    assert probes.accuracy_ci_text(0.5, 100) == "50.0% [40.4%, 59.6%]"
    assert probes.pct(0.1234) == "12.3%"


def _table(mm=0.9, thr=0.8, lg=0.7, au=0.95):
    rows = []
    for f in probes.FEAT_LABELS:
        for where in ("head", "layer"):
            rows.append(dict(feature=f, where=where, layer=2, head=1 if where == "head" else -1,
                             mm=mm, mm_thr=thr, logistic=lg, auroc=au, cv=0.8))
    return pd.DataFrame(rows)


def _study(applies=True):
    L, H, n = 3, 2, 4
    fw = np.zeros((n, L, H), np.float32)
    fw[:, 2, 1] = 0.5
    faithful = {"applies": applies, "heads": [[(2, 1), (0, 0)]] if applies else [[]],
                "rate": np.array([[0.1, 0.2], [0.0, 0.3], [0.4, 0.6]]),
                "table": pd.DataFrame([dict(probe=p, mean=0.7, low=0.6, high=0.8) for p in probes.FAITHFUL_PROBES])
                if applies else pd.DataFrame()}
    if applies:
        faithful["table"].loc[0, ["mean", "low", "high"]] = [0.95, 0.9, 1.0]  # tag above the rest
    return {"paper": {"table": _table(), "maps": {(f, "mm_thr"): np.full((L, H), 0.6) for f in probes.FEAT_LABELS},
                      "first_weight": fw, "self_weight": fw / 5, "self_sink": np.ones((n, L, H), bool)},
            "faithful": faithful, "n_test": 200}


def test_table1_quantities_names_and_values():
    q = probes.table1_quantities(_study())
    assert q["cities_tag"] == 0.9 and q["cities_notag_mm_thr"] == 0.8 and q["cities_L_full_auroc"] == 0.95
    assert q["cities_tag_ci"] == probes.accuracy_ci_text(0.9, 200)
    assert q["cities_tag_logistic_ci"] == probes.accuracy_ci_text(0.7, 200)
    assert q["cities_tag_where"] == "layer 2, head 1" and q["cities_L_tag_where"] == "layer 2"
    assert q["notag_reading"] == "not near chance"
    assert q["first_weight"] == pytest.approx(0.5) and q["self_weight"] == pytest.approx(0.1)
    assert q["first_weight_all"] == pytest.approx(0.5 / 6) and q["self_sink"] == 1.0
    assert all(k in probes.SPECS or isinstance(v, str) for k, v in q.items())


def test_ours_table_and_head_map():
    t = probes.ours_table({"a": _study(), "b": _study()}, "head")
    assert list(t.index) == list(probes.FEAT_LABELS.values())
    lo, hi = probes.accuracy_interval(0.9, 200)
    assert t.loc["θ_tag", ("a", probes.PROBE_LABELS["mm"])] == f"90.0% [{100 * lo:.1f}%, {100 * hi:.1f}%]"
    assert t.loc["θ_tag", ("b", "AUROC")] == "0.95" and t.loc["θ_tag", ("a", "where")] == "L2 H1"
    assert probes.ours_table({"a": _study()}, "layer").loc["θ_no tag", ("a", "where")] == "L2"
    M, (layer, head) = probes.head_map(_study(), "tag")
    assert M.shape == (3, 2) and (layer, head) == (2, 1)


def test_faithful_quantities_bars_and_table():
    q = probes.faithful_quantities(_study()["faithful"])
    assert q["faithful_max_rate"] == 0.6 and q["faithful_applies"] == "applies"
    assert q["faithful_heads"] == "L2H1, L0H0"
    assert q["faithful_tag"] == 0.95 and q["faithful_tag_ci"] == "95.0% [90.0%, 100.0%]"
    assert q["faithful_residual_at_dot_ci"] == "70.0% [60.0%, 80.0%]"
    assert q["faithful_tag_vs_random"] == "above"
    none = probes.faithful_quantities(_study(applies=False)["faithful"])
    assert none["faithful_applies"] == "does not apply" and none["faithful_heads"] == "none"
    assert none["faithful_tag"] is None and none["faithful_tag_vs_random"] is None
    studies = {"a": _study(), "b": _study(applies=False)}
    bars = probes.faithful_bars(studies)
    assert list(bars) == ["a"] and list(bars["a"].index) == list(probes.FAITHFUL_PROBES)
    assert probes.faithful_ci_table(studies).loc["tag", "a"] == "95.0% [90.0%, 100.0%]"
    assert probes.compare_ci(bars["a"], "random", "shuffled") == "level with"
    assert probes.compare_ci(bars["a"], "random", "tag") == "below"


def test_sentiment_quantities_and_rows():
    q = probes.sentiment_quantities(_table(), 100)
    assert q["sentiment_tag"] == 0.9 and q["sentiment_notag_logistic"] == 0.7
    assert q["sentiment_tag_ci"] == probes.accuracy_ci_text(0.9, 100)
    assert all(v is None for v in probes.sentiment_quantities(None, 0).values())
    rows = probes.sentiment_rows("m", _table(), 100)
    assert [r["probe"] for r in rows] == list(probes.FEAT_LABELS.values())
    assert rows[0]["where"] == "L2 H1" and rows[0]["AUROC"] == "0.95"
    out, table = probes.sentiment_study(["m1", "m2"], 0)
    assert table is None and set(out) == {None, "m1", "m2"}
    assert all(v is None for v in out[None].values()) and out["m1"]["sentiment_tag_ci"] is None


def test_cities_design_and_quantities():
    from catchtag import data

    cities = data.cities(60, seed=0)
    d = probes.cities_design(cities, 40, 3, seed=0)
    assert len(d.train) == 40 and len(d.test) == 20 and len(d.splits) == 3
    assert set(d.groups[d.train]).isdisjoint(d.groups[d.test])
    q = probes.design_quantities(cities, d)
    assert (q["n_cities"], q["n_train"], q["n_test"], q["n_splits"]) == (60, 40, 20, 3)
    assert 0 <= q["country_only"] <= 1 and q["country_only_splits"].endswith("%]")


def test_paper_table1_reference_values():
    t = probes.paper_table1()
    assert t.loc["θ_tag", "Llama-3.1-8B"] == 92.5 and t.loc["θ_no tag", "Llama-3-8B"] == 56.5


@pytest.mark.slow
def test_statement_features_serve_both_protocols(any_model):
    """One forward over statement + continuation gives the paper's features of the statement fed
    alone (within 1e-5 of their scale) and the faithful test's features of `faithful_features`."""
    texts = ["The city of Lodz is in Poland.", "The city of Oslo is in Norway.", "The city of Lima is in Japan."]
    cont = " It was written down in a small notebook."
    pf, ff = probes.statement_features(any_model, texts, cont, progress=False)
    alone = probes.paper_features(any_model, texts, progress=False)
    for k in ("tag", "notag", "full", "first_weight", "self_weight"):
        a, b = getattr(pf, k), getattr(alone, k)
        assert np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(b).max()), k
    assert (pf.self_sink == alone.self_sink).all()
    ref = probes.faithful_features(any_model, texts, cont, progress=False)
    assert np.array_equal(ff.catch, ref.catch) and np.allclose(ff.x, ref.x) and np.allclose(ff.v_dot, ref.v_dot)
