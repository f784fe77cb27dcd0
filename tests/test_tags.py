"""Tags, segments and explained variance on a tiny model with planted sinks (answers known), plus
a fast sanity run on SmolLM2."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from catchtag.capture import capture, head_outputs
from catchtag.errors import CatchtagError
from catchtag.sinks import sink_stats
from _planted import F_TAG_BOS, F_TAG_DOT, PLANTED_TEXT, planted_model
from catchtag.tags import (
    PROMPTS,
    catch_by_layer,
    ev_bands,
    ev_grid,
    explained_variance,
    head_explained_variance,
    head_tags,
    orthonormal_basis,
    pca_by_sink,
    project,
    prompts,
    remove,
    segment_table,
    tag_cosines,
    tag_vectors,
    token_catch_summary,
    cosine_summary,
    ev_summary,
    geometry_summary,
    random_abs_cos,
    tag_geometry,
    tag_plane,
    two_sink_head,
    value_space_ev,
    verdict_tag_direction,
)

DOT = 6  # position of "." in PLANTED_TEXT


@pytest.fixture(scope="module")
def planted():
    m = planted_model()
    cap = capture(m, PLANTED_TEXT, progress=False)[0]
    return m, cap, sink_stats(cap)


def _unit(x):
    return x / x.norm()


def test_planted_sinks_and_segments(planted):
    m, cap, st = planted
    assert cap.tokens[0] == "<s>" and cap.tokens[DOT] == "."
    assert torch.nonzero(st.sinks(0.2)[0, 0]).flatten().tolist() == [0, DOT]
    assert not st.sinks(0.2)[0, 1].any()  # the uniform head has no sink
    caught = st.caught(0.2)[0, 0].tolist()
    assert caught[1:DOT] == [0] * (DOT - 1)
    assert caught[DOT + 1 :] == [DOT] * (len(caught) - DOT - 1)
    seg = segment_table(st, 0.2)
    seg0 = seg[(seg.layer == 0) & (seg["head"] == 0)]
    assert seg0.position.tolist() == [0, DOT]
    bos, dot = seg0.iloc[0], seg0.iloc[1]
    assert bos.n_caught == DOT - 1 and dot.n_caught == len(caught) - DOT - 1
    assert dot.n_runs == 1 and dot.longest_run == len(caught) - DOT - 1
    assert bos.share == pytest.approx((DOT - 1) / (len(caught) - 2))  # "." is a sink, not visible
    assert dot.kind == "punctuation" and bos.kind == "first"


def test_catch_summaries(planted):
    m, cap, st = planted
    by = catch_by_layer([st], 0.2)
    row = by[by.layer == 0].iloc[0]
    assert row.caught_first + row.caught_other + row.not_caught == pytest.approx(1.0)
    T = len(cap.tokens)
    # layer 0: head 0 catches T-2 of the T-1 queries (the "." query is a sink), head 1 none
    assert row.caught_first == pytest.approx((DOT - 1) / (2 * (T - 1)))
    assert row.caught_other == pytest.approx((T - DOT - 1) / (2 * (T - 1)))
    summ = token_catch_summary(st, 0.2, layers=[0])
    modal = summ.modal_other_sink.tolist()
    assert modal[DOT + 3] == DOT and modal[2] == -1


def test_planted_tags_are_the_chosen_directions(planted):
    m, cap, st = planted
    t = tag_vectors(m, cap, 0, positions=[0, DOT])[0]  # head 0
    e_bos = torch.zeros(16); e_bos[F_TAG_BOS] = 1
    e_dot = torch.zeros(16); e_dot[F_TAG_DOT] = 1
    assert float(_unit(t[0]) @ e_bos) == pytest.approx(1.0, abs=1e-6)
    assert float(_unit(t[1]) @ e_dot) == pytest.approx(1.0, abs=1e-6)
    ht = head_tags(m, cap, st, 0)[0]
    assert ht["sinks"] == [0, DOT] and torch.allclose(ht["tags"], t)
    # every caught token's head output is a mix of the two tags: EV = 1 (and 1 uncentred)
    ev = head_explained_variance(m, cap, progress=False)
    r = ev[(ev.layer == 0) & (ev["head"] == 0)].iloc[0]
    assert r.ev == pytest.approx(1.0, abs=1e-9) and r.ev_raw == pytest.approx(1.0, abs=1e-9)
    assert r.n_tags == 2 and r.n_caught == len(cap.tokens) - 2
    assert ev[(ev.layer == 0) & (ev["head"] == 1)].ev.isna().all()  # no sink, no EV


def test_tag_cosines_separate_caught_tokens(planted):
    m, cap, st = planted
    tc = tag_cosines(m, cap, st, 0, heads=[0])
    dot = tc[tc.sink == DOT]
    assert dot[dot.caught].cos.min() > 0.99
    bos = tc[tc.sink == 0]
    assert bos[bos.caught].cos.min() > 0.99
    assert bos[~bos.caught].cos.max() < 0.2  # tokens after "." point along the "." tag instead


def test_head_ev_matches_a_direct_computation():
    """Perturb the planted head so its outputs leave the tag plane; compare with a hand computation."""
    m = planted_model(sink_strength=0.2)  # weaker sinks: more of each output comes from other tokens
    with torch.no_grad():  # head 0 also reads noise dimension 8 and writes it on residual dim 6
        m.hf.model.layers[0].self_attn.v_proj.weight[2, 8] = 4.0
        m.hf.model.layers[0].self_attn.o_proj.weight[6, 2] = 5.0
    texts = [PLANTED_TEXT, "<s> b c a d . e f a b c d e f a b c d e f a b"]
    caps = capture(m, texts, progress=False)
    sts = [sink_stats(c) for c in caps]
    table = head_explained_variance(m, caps, stats=sts, per_prompt=True, progress=False)
    pooled = head_explained_variance(m, caps, stats=sts, progress=False)
    nums, dens = [], []
    for p, (cap, st) in enumerate(zip(caps, sts)):
        o = head_outputs(m, cap, 0)[0].double()
        sinks = torch.nonzero(st.sinks(0.2)[0, 0]).flatten()
        caught = st.caught(0.2)[0, 0]
        members = [i for i in range(len(cap.tokens)) if caught[i] >= 0 and i not in sinks.tolist()]
        H = o[members] - o[members].mean(0)
        Q, _ = torch.linalg.qr(tag_vectors(m, cap, 0, sinks.tolist())[0].double().T)
        num, den = float(((H @ Q) ** 2).sum()), float((H**2).sum())
        got = table[(table.prompt == p) & (table.layer == 0) & (table["head"] == 0)].ev.item()
        assert got == pytest.approx(num / den, rel=1e-9)
        assert 0.05 < got < 0.95
        nums.append(num); dens.append(den)
    r = pooled[(pooled.layer == 0) & (pooled["head"] == 0)].iloc[0]
    assert r.ev == pytest.approx(sum(nums) / sum(dens), rel=1e-9)
    assert r.n_prompts == 2 and r.ev <= r.ev_pca + 1e-12


def test_explained_variance_basics():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4000, 20, generator=g, dtype=torch.float64)
    B = orthonormal_basis(torch.randn(3, 20, generator=g))
    assert B.shape == (20, 3)
    assert explained_variance(X, B) == pytest.approx(3 / 20, abs=0.02)  # isotropic: r / d
    assert explained_variance(X, orthonormal_basis(torch.eye(20))) == pytest.approx(1.0)
    assert math.isnan(explained_variance(X[:1], B))
    x = torch.randn(5, 20, generator=g, dtype=torch.float64)
    assert torch.allclose(project(x, B) + remove(x, B), x)
    assert orthonormal_basis(torch.stack([X[0], 2 * X[0]])).shape[1] == 1  # rank, not count


def test_ev_bands_and_grid_by_hand():
    t = pd.DataFrame(dict(layer=[0, 0, 1, 1], head=[0, 1, 0, 1], ev=[0.1, 0.3, 0.75, np.nan]))
    b = ev_bands(t)
    assert b["n_heads"] == 3 and b["below_20"] == pytest.approx(1 / 3)
    assert b["from_20_to_40"] == pytest.approx(1 / 3) and b["above_70"] == pytest.approx(1 / 3)
    g = ev_grid(t)
    assert g.shape == (2, 2) and np.isnan(g[1, 1]) and g[0, 1] == 0.3


def test_pca_by_sink_shapes(planted):
    m, cap, st = planted
    p = pca_by_sink(m, cap, st, 0, 0)
    n = len(cap.tokens) - 2
    assert p["xy"].shape == (n, 2) and len(p["label"]) == n and p["tag_xy"].shape == (2, 2)
    assert p["explained"] == pytest.approx(1.0, abs=1e-9)


def test_prompts():
    assert len(prompts()) == len(PROMPTS) >= 12
    assert prompts(3) == PROMPTS[:3]
    assert prompts(4, seed=1) == prompts(4, seed=1) and set(prompts(len(PROMPTS), seed=2)) == set(PROMPTS)
    assert all(sum(p.count(c) for c in ".?!\n") >= 2 for p in PROMPTS)
    with pytest.raises(CatchtagError):
        prompts(0)
    with pytest.raises(CatchtagError):
        prompts(len(PROMPTS) + 1)


@pytest.mark.slow
def test_smollm_tags_and_ev_are_sane(smollm):
    caps = capture(smollm, prompts(2), layers=[0, 3, 10, 20], resid=False, progress=False)
    sts = [sink_stats(c) for c in caps]
    ev = head_explained_variance(smollm, caps, stats=sts, progress=False)
    assert len(ev) == 4 * smollm.n_heads
    ok = ev.dropna(subset=["ev"])
    assert len(ok) > 10  # most heads have a sink
    assert ((ok.ev >= 0) & (ok.ev <= 1 + 1e-9)).all()
    assert (ok.ev <= ok.ev_pca + 1e-9).all()  # no k-dim subspace beats the top-k PCs
    # far above what random n_tags-dim subspaces explain (n_tags / d_model, well under 1%)
    assert ok.ev.median() > 10 * (ok.n_tags / smollm.d_model).median()
    tc = tag_cosines(smollm, caps[0], sts[0], 10)
    assert tc[tc.caught].cos.mean() > tc[~tc.caught].cos.mean()


def _perturbed():
    """The planted model with head 0 also reading noise dimension 8 (value dim 2 -> residual dim 6),
    so its outputs leave the tag plane; weaker sinks."""
    m = planted_model(sink_strength=0.2)
    with torch.no_grad():
        m.hf.model.layers[0].self_attn.v_proj.weight[2, 8] = 4.0
        m.hf.model.layers[0].self_attn.o_proj.weight[6, 2] = 5.0
    return m


def test_value_space_ev_planted_is_one(planted):
    m, cap, st = planted
    t = value_space_ev(m, cap, progress=False)
    r = t[(t.layer == 0) & (t["head"] == 0)].iloc[0]
    # head 0's values are non-zero only at "<s>" and ".", its two sinks: A V lies in their span
    assert r.ve_tags == pytest.approx(1.0, abs=1e-9) and r.ve2_tags == pytest.approx(1.0, abs=1e-9)
    assert r.ve_mean_value < 0.99  # one direction cannot hold two orthogonal tags
    assert r.n_tags == 2 and r.n_prompts == 1
    assert t[(t.layer == 0) & (t["head"] == 1)].ve_tags.isna().all()  # no sink


def test_value_space_ev_matches_a_direct_computation():
    from catchtag.capture import attention_probs

    m = _perturbed()
    texts = [PLANTED_TEXT, "<s> b c a d . e f a b c d e f a b c d e f a b"]
    caps = capture(m, texts, progress=False)
    sts = [sink_stats(c) for c in caps]
    t = value_space_ev(m, caps, stats=sts, seed=3, progress=False)
    nums, dens, mnums = [], [], []
    for cap, st in zip(caps, sts):
        ai = cap.attn_inputs[0]
        X = attention_probs(ai)[0].double() @ ai.v[0].double()
        sinks = torch.nonzero(st.sinks(0.2)[0, 0]).flatten().tolist()
        Q, _ = torch.linalg.qr(ai.v[0, sinks].double().T)
        mu = ai.v[0].double().mean(0)
        nums.append(float(((X @ Q) ** 2).sum()))
        mnums.append(float(((X @ (mu / mu.norm())) ** 2).sum()))
        dens.append(float((X**2).sum()))
    r = t[(t.layer == 0) & (t["head"] == 0)].iloc[0]
    assert r.ve2_tags == pytest.approx(sum(nums) / sum(dens), rel=1e-9)
    assert r.ve_tags == pytest.approx(math.sqrt(sum(nums) / sum(dens)), rel=1e-9)
    assert r.ve2_mean_value == pytest.approx(sum(mnums) / sum(dens), rel=1e-9)
    assert 0.05 < r.ve2_tags < 0.999
    again = value_space_ev(m, caps, stats=sts, seed=3, progress=False)
    pd.testing.assert_frame_equal(t, again)  # same seed, same numbers
    other = value_space_ev(m, caps, stats=sts, seed=4, progress=False)
    assert not np.allclose(t.ve_random_subspace.dropna(), other.ve_random_subspace.dropna())
    s = ev_summary(t)
    assert s["n_ve_heads"] == int(t.ve_tags.notna().sum()) and s["ve_tags_median"] == pytest.approx(t.ve_tags.median())


def test_tag_geometry_planted():
    m = _perturbed()
    with torch.no_grad():  # the "<s>" value almost vanishes: a no-op sink; "." still broadcasts
        m.hf.model.layers[0].self_attn.v_proj.weight[0, 0] = 0.01
        m.hf.model.layers[0].self_attn.k_proj.weight[3, 0] = 0.6
        m.hf.model.layers[0].self_attn.v_proj.weight[1, 2] = 20.0  # a large "." tag
    cap = capture(m, PLANTED_TEXT, progress=False)[0]
    st = sink_stats(cap)
    assert st.sinks(0.2)[0, 0, 0] and st.sinks(0.2)[0, 0, DOT]
    pairs, sinks = tag_geometry(m, cap, stats=[st], progress=False)
    same = pairs[pairs.kind == "same head"]
    assert len(same) >= 1
    # the two tags of head 0 are e_4 (scaled) and e_3: orthogonal, in value and in residual space
    assert same.cos.abs().max() < 1e-6 and same.cos_value.abs().max() < 1e-6
    assert np.allclose(pairs.cos, pairs.cos_wo)  # no post-attention norm: the same space
    h0 = sinks[(sinks.layer == 0) & (sinks["head"] == 0)].set_index("position")
    assert bool(h0.loc[0, "noop"]) and not bool(h0.loc[DOT, "noop"])
    assert h0.loc[0, "kind"] == "first" and h0.loc[DOT, "kind"] == "punctuation"
    assert np.isnan(h0.loc[0, "cos_tokens"])  # layer 0: no representation before it
    g = geometry_summary(pairs, sinks)
    assert g["cos_same_head"] == pytest.approx(0.0, abs=1e-6)
    assert 0.0 <= g["noop_first"] <= 1.0


def test_random_abs_cos_scale():
    assert random_abs_cos(100) == pytest.approx(0.6745 / 10, rel=0.05)


def test_two_sink_head_and_tag_plane(planted):
    m, cap, st = planted
    best = two_sink_head(segment_table(st, 0.2))
    assert best == (0, 0, 0, [DOT, 0]) or best == (0, 0, 0, [0, DOT])
    ht = head_tags(m, cap, st, 0)[0]
    xy, txy = tag_plane(ht["tags"], ht["outputs"])
    assert xy.shape == (len(cap.tokens), 2) and txy[0, 1] == pytest.approx(0.0, abs=1e-9)
    assert txy[0, 0] > 0 and txy[1, 1] > 0


def test_cosine_summary_and_verdict_by_hand():
    cos = pd.DataFrame(dict(sink=[0, 0, 5, 5], caught=[True, False, True, False], cos=[0.9, 0.1, 0.7, 0.3]))
    s = cosine_summary(cos)
    assert s["cos_caught"] == pytest.approx(0.8) and s["cos_not"] == pytest.approx(0.2)
    assert s["cos_caught_other"] == 0.7 and s["cos_not_other"] == 0.3
    assert verdict_tag_direction({"a": (0.8, 0.2), "b": (0.7, 0.1)}) == "reproduced"
    assert verdict_tag_direction({"a": (0.8, 0.2), "b": (0.4, 0.1)}) == "partly"
    assert verdict_tag_direction({"a": (0.6, 0.5)}) == "not reproduced"
    with pytest.raises(CatchtagError):
        verdict_tag_direction({})


# --------------------------------------------------------------------------------------------------
# The tag chapter's library: the cosine baseline, intervals, the one-pass measures, quantities


def test_tag_cosine_baseline_is_another_tokens_value():
    from catchtag.tags import cosine_intervals, tag_cosine_table

    m = _perturbed()  # non-sink tokens now have values of their own (noise dimension 8)
    texts = [PLANTED_TEXT, "<s> b c a d . e f a b c d e f a b c d e f a b"]
    caps = capture(m, texts, progress=False)
    sts = [sink_stats(c) for c in caps]
    tc = tag_cosine_table(m, caps, stats=sts, progress=False, seed=1)
    assert list(tc.columns) == ["prompt", "layer", "head", "sink", "query", "caught", "cos", "cos_other"]
    assert tc.caught.dtype == bool
    # the baseline on one row, by hand: cos(o_i, W_O v_j) for some non-sink j >= 1, j != i
    o = head_outputs(m, caps[0], 0)[0].double()
    t = tag_vectors(m, caps[0], 0)[0].double()
    sinks = torch.nonzero(sts[0].sinks(0.2)[0, 0]).flatten().tolist()
    cands = [j for j in range(1, len(caps[0].tokens)) if j not in sinks]
    for r in tc[(tc.prompt == 0) & (tc.layer == 0) & (tc["head"] == 0)].head(20).itertuples():
        got = [j for j in cands if j != r.query and abs(float(o[r.query] @ t[j] / (o[r.query].norm() * t[j].norm())) - r.cos_other) < 1e-9]
        assert got, f"no other token's value gives cos_other on row {r}"
        assert r.cos == pytest.approx(float(o[r.query] @ t[r.sink] / (o[r.query].norm() * t[r.sink].norm())), abs=1e-9)
    again = tag_cosine_table(m, caps, stats=sts, progress=False, seed=1)
    other = tag_cosine_table(m, caps, stats=sts, progress=False, seed=2)
    assert again.equals(tc) and not np.allclose(other.cos_other, tc.cos_other, equal_nan=True)
    assert np.allclose(other.cos, tc.cos)  # the seed moves the baseline only
    s = cosine_summary(tc)
    assert s["cos_other_value"] == pytest.approx(tc.cos_other[tc.caught].median())
    iv = cosine_intervals(tc, n_boot=200)
    assert iv["cos_caught_lo"] <= s["cos_caught"] + 1e-3 and s["cos_caught"] - 1e-3 <= iv["cos_caught_hi"]
    assert iv["cos_minus_other"] == pytest.approx((tc.cos - tc.cos_other)[tc.caught].median())


def test_cluster_median_interval_by_hand():
    from catchtag.tags import cluster_median_interval

    # two prompts, each constant: resamples are (a, a), (a, b) or (b, b): medians 0.2, ~0.2-0.8, 0.8
    v = [0.2] * 3 + [0.8] * 3
    g = [0] * 3 + [1] * 3
    m, lo, hi = cluster_median_interval(v, g, n_boot=400, seed=0)
    assert m == pytest.approx(0.5)
    assert lo == pytest.approx(0.2, abs=1e-3) and hi == pytest.approx(0.8, abs=1e-3)
    assert cluster_median_interval(v, g, n_boot=400, seed=0) == (m, lo, hi)  # seeded
    m, lo, hi = cluster_median_interval([0.1, 0.3, float("nan")], [0, 0, 1])
    assert m == pytest.approx(0.2) and math.isnan(lo) and math.isnan(hi)  # one prompt left: no interval
    assert all(math.isnan(x) for x in cluster_median_interval([], []))
    # identical prompts: the interval collapses on the median (to the bin width)
    m, lo, hi = cluster_median_interval([0.1, 0.5, 0.9] * 4, [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    assert lo == pytest.approx(0.5, abs=1e-3) and hi == pytest.approx(0.5, abs=1e-3)


def test_tag_measures_equal_the_separate_functions():
    from catchtag.tags import tag_cosine_table, tag_measures

    m = _perturbed()
    texts = [PLANTED_TEXT, "<s> b c a d . e f a b c d e f a b c d e f a b"]
    caps = capture(m, texts, progress=False)
    sts = [sink_stats(c) for c in caps]
    run = tag_measures(m, caps, 0.2, seed=3)
    pd.testing.assert_frame_equal(run["cos"], tag_cosine_table(m, caps, stats=sts, progress=False, seed=3))
    pd.testing.assert_frame_equal(run["ve"], value_space_ev(m, caps, stats=sts, seed=3, progress=False))
    ev = head_explained_variance(m, caps, stats=sts, progress=False)
    assert run["ev"]["ev_pca"].isna().all()  # the chapter does not compute the PCA bound
    pd.testing.assert_frame_equal(run["ev"].drop(columns="ev_pca"), ev.drop(columns="ev_pca"))
    pairs, sinks = tag_geometry(m, caps, stats=sts, progress=False)
    pd.testing.assert_frame_equal(run["geometry"][1], sinks)
    pd.testing.assert_frame_equal(run["seg"], segment_table(sts, 0.2))


def test_tag_quantities_formats_and_figure(planted):
    from catchtag.tags import tag_formats, tag_measures, tag_quantities, two_sink_figure, ve_medians_table

    m, cap, st = planted
    run = tag_measures(m, [cap], 0.2)
    q = tag_quantities(run, m)
    assert q["n_query_heads"] == 2 and q["min_tokens"] == q["max_tokens"] == len(cap.tokens)
    assert q["ve_paper_median"] == q["ve_tags_median"]
    assert q["ve_tags_minus_mean"] == pytest.approx(q["ve_tags_median"] - q["ve_mean_value_median"])
    assert math.isnan(q["cos_caught_lo"])  # one prompt: no interval
    f = tag_formats(q)
    assert f["cos_caught"] == ".2f" and f["cos_random"] == ".3f" and f["ve_tags_median"] == ".0%"
    # chance in one head's output space (head_dim) is larger than in the residual stream (d_model)
    assert f["cos_random_head"] == ".3f" and q["cos_random_head"] > q["cos_random"]
    assert q["cos_random_head"] == pytest.approx(0.674 / math.sqrt(m.head_dim), rel=0.3)
    assert f["ve_tags_minus_mean"] == "+.0%" and f["n_tags"] == ".1f" and f["noop_first"] == ".0%" and f["n_ve_heads"] == ""
    d = two_sink_figure(m, [cap], run, 0.2)
    assert (d["prompt"], d["layer"], d["head"]) == (0, 0, 0) and sorted(d["sinks"]) == [0, DOT]
    assert d["fig_head"] == "layer 0, head 0" and d["fig_sinks"] in ("'.' and '<s>'", "'<s>' and '.'")
    assert d["plane_xy"].shape == (len(cap.tokens) - 2, 2) and len(d["plane_label"]) == len(cap.tokens) - 2
    t = ve_medians_table({"a": q})
    assert t.loc["VE, sinks' values (tags)", "a"] == f"{q['ve_tags_median']:.0%}" and len(t) == 8
