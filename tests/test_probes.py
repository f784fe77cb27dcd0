"""Probes: statistics, the paper's mass-mean probes, planted tags and shortcuts, and the real models'
fast forward pass and tags (checked against catchtag.capture)."""

import numpy as np
import pandas as pd
import pytest
import torch

from catchtag import probes
from catchtag.errors import CatchtagError


def test_wilson_and_t_intervals():
    lo, hi = probes.wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert np.isnan(probes.wilson_interval(0, 0)[0])
    m, lo, hi = probes.mean_interval([0.6, 0.7, 0.8, 0.7, 0.7])
    assert m == pytest.approx(0.7) and hi - m == pytest.approx(2.776 * np.std([.6, .7, .8, .7, .7], ddof=1) / 5 ** .5, rel=1e-3)
    # one score (after dropping NaN) has no interval: NaN bounds, as kvcache's intervals over chunks
    m, lo, hi = probes.mean_interval([0.6, float("nan")])
    assert m == 0.6 and np.isnan(lo) and np.isnan(hi)


def test_group_split_and_paper_split():
    groups = np.repeat(np.arange(300), 2)
    train, test = probes.group_split(groups, 0.2, seed=1)
    assert set(groups[train]).isdisjoint(groups[test])
    tr, te = probes.paper_split(groups, 400, seed=0)
    assert len(tr) == 400 and len(te) == 200 and set(groups[tr]).isdisjoint(groups[te])
    folds = probes.group_folds(groups, 5, 0)
    assert sum(len(f) for f in folds) == 600
    with pytest.raises(CatchtagError):
        probes.group_split([1, 1, 1], 0.5)


def test_auroc_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = rng.standard_normal(200) + y
    assert probes.auroc(s, y) == pytest.approx(roc_auc_score(y, s))


def test_mass_mean_without_bias_scores_chance_on_uncentred_data():
    """The Geometry of Truth probe has no bias: shift the data far from the origin along a direction
    that has a component along theta and it predicts one class (50% on a balanced split), while the
    same direction with a fitted threshold, logistic regression and AUROC still see the signal."""
    rng = np.random.default_rng(0)
    n, d = 400, 16
    y = np.tile([0, 1], n // 2)
    X = rng.standard_normal((n, d)) * 0.5
    X[:, 0] += 2 * (2 * y - 1)
    tr, te = np.arange(300), np.arange(300, 400)
    centred = probes.mass_mean(X[tr], y[tr], X[te], y[te])
    assert centred["mm"] > 0.95 and centred["mm_thr"] > 0.95
    Xs = X + 50.0  # every coordinate shifted: theta . x is dominated by the offset
    shifted = probes.mass_mean(Xs[tr], y[tr], Xs[te], y[te])
    assert shifted["mm"] == pytest.approx(0.5)
    assert shifted["mm_thr"] > 0.95 and shifted["auroc"] > 0.99
    assert probes.logistic_accuracy(Xs, y, tr, te) > 0.95


def test_project_rows():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 8))
    V = rng.standard_normal((5, 2, 8))
    P = probes.project_rows(x, V)
    for i in range(5):
        B = np.linalg.qr(V[i].T)[0]
        assert np.allclose(P[i], B @ (B.T @ x[i]))
    V[:, 1] = 2 * V[:, 0]  # rank one
    P = probes.project_rows(x, V)
    u = V[:, 0] / np.linalg.norm(V[:, 0], axis=1, keepdims=True)
    assert np.allclose(P, u * (u * x).sum(1, keepdims=True))


def _planted_paper(n=600, L=3, H=4, dh=8, seed=0):
    """Paper features where the label lives in z_tag of head (1, 2) only, uncentred."""
    rng = np.random.default_rng(seed)
    y = np.tile([0, 1], n // 2)
    tag = rng.standard_normal((n, L, H, dh)).astype(np.float32) + 3.0
    notag = rng.standard_normal((n, L, H, dh)).astype(np.float32) + 3.0
    tag[:, 1, 2, 0] += 1.5 * (2 * y - 1)
    z = np.zeros((n, L, H), np.float32)
    f = probes.PaperFeatures(list(range(L)), tag, notag, tag + notag, z, z, z.astype(bool))
    return f, y, np.repeat(np.arange(n // 2), 2)


def test_paper_probe_finds_the_planted_head_on_training_rows_only():
    f, y, g = _planted_paper()
    tr, te = probes.paper_split(g, 400, 0)
    out = probes.paper_probe(f, y, g, tr, te)
    t = out["table"].set_index(["feature", "where"])
    assert (t.loc[("tag", "head"), "layer"], t.loc[("tag", "head"), "head"]) == (1, 2)
    assert t.loc[("tag", "head"), "mm_thr"] > 0.85 and t.loc[("tag", "head"), "logistic"] > 0.85
    assert t.loc[("notag", "head"), "logistic"] < 0.65 and t.loc[("notag", "head"), "auroc"] < 0.65
    assert out["maps"][("tag", "mm_thr")].shape == (3, 4)
    assert out["layer_maps"][("tag", "mm_thr")].shape == (3,)
    assert np.argmax(out["layer_maps"][("tag", "mm_thr")]) == 1


def test_planted_tag_span_is_found_and_random_span_is_not():
    """The label rides on a prompt-dependent direction u_i (the tag): projecting x on span(u_i)
    keeps it, projecting on a fixed random direction or another prompt's u does not."""
    rng = np.random.default_rng(1)
    n, d = 600, 64
    y = np.tile([0, 1], n // 2)
    u = rng.standard_normal((n, d))
    u[:, 0] += 4 * (2 * y - 1)  # the tag's own direction encodes the label
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    x = rng.standard_normal((n, d)) + 6 * u  # x holds its tag
    tr, te = probes.group_split(np.repeat(np.arange(n // 2), 2), 1 / 3, 0)
    tag = probes.project_rows(x, u[:, None])
    rnd = probes.project_rows(x, np.broadcast_to(rng.standard_normal(d), (n, 1, d)).copy())
    other = probes.project_rows(x, u[np.roll(np.arange(n), 2)][:, None])
    acc_tag = probes.logistic_accuracy(tag, y, tr, te)
    assert acc_tag > 0.9
    assert probes.logistic_accuracy(rnd, y, tr, te) < acc_tag - 0.15  # x holds the label, weakly, everywhere
    assert probes.logistic_accuracy(tag, y, tr, te, shuffle=True) < 0.65
    assert probes.logistic_accuracy(other, y, tr, te) < acc_tag - 0.15


def test_country_only_control_catches_a_planted_shortcut():
    """False statements name countries drawn from a different pool than true ones (the old
    generated set's flaw): the country-only probe must see it; with one pool it must not."""
    rng = np.random.default_rng(0)
    n = 600
    y = np.tile([1, 0], n // 2)
    common, rare = [f"c{i}" for i in range(10)], [f"r{i}" for i in range(100)]
    stated = np.where(y == 1, rng.choice(common, n), rng.choice(rare, n))
    df = pd.DataFrame({"text": ["x"] * n, "label": y, "group": np.repeat(np.arange(n // 2), 2), "stated": stated})
    splits = probes.group_splits(df["group"], 5, seed=0)
    assert np.mean(probes.shortcut_scores(df, splits)["country only"]) > 0.9
    df["stated"] = rng.choice(common, n)
    assert np.mean(probes.shortcut_scores(df, splits)["country only"]) < 0.62


def test_shortcut_features_for_sentiment():
    df = pd.DataFrame({"text": ["good film here", "bad film", "good good", "bad"], "label": [1, 0, 1, 0]})
    f = probes.shortcut_features(df)
    assert set(f) == {"length", "bag of words"} and f["length"].shape == (4, 2)


def _planted_faithful(n=40, L=2, H=3, rate=0.9):
    catch = np.full((n, L, H), -1)
    bpos = np.full(n, 5)
    catch[: int(rate * n), 1, 2] = 5
    catch[: n // 4, 0, 0] = 5
    z = np.zeros((n, L, H, 4), np.float32)
    return probes.FaithfulFeatures([3, 7], catch, catch == 5, z, z, z, np.zeros((n, L, 8)), np.zeros((n, L, 8)), bpos)


def test_choose_heads_uses_training_rows():
    f = _planted_faithful()
    assert probes.choose_heads(f, np.arange(40), 0.5) == [(7, 2)]
    assert probes.choose_heads(f, np.arange(10), 0.5) == [(3, 0), (7, 2)]  # tie: earlier layer
    assert probes.choose_heads(f, np.arange(36, 40), 0.5) == []


# --------------------------------------------------------------------------------------------------
# Real models


@pytest.mark.slow
def test_forward_batches_matches_capture(any_model):
    from catchtag.capture import attention_probs, capture

    texts = ["The city of Lodz is in Poland.", "The city of Oslo is in Norway.", "The cat sat on the mat today."]
    got = {}

    def on_batch(rows, ids, A, V, R):
        for b, i in enumerate(rows):
            got[i] = ({l: A[l][b] for l in A}, {l: V[l][b] for l in V}, {l: R[l][b] for l in R})

    layers = [0, any_model.n_layers // 2]
    probes.forward_batches(any_model, texts, on_batch, layers, progress=False)
    caps = capture(any_model, texts, layers=layers, progress=False)
    for i, cap in enumerate(caps):
        A, V, R = got[i]
        for l in layers:
            assert torch.allclose(A[l], attention_probs(cap.attn_inputs[l]), atol=1e-4)
            assert torch.allclose(V[l], cap.attn_inputs[l].v, atol=1e-4)
            assert torch.allclose(R[l], cap.resid_post[l], atol=1e-3, rtol=1e-4)


@pytest.mark.slow
def test_head_tags_are_the_heads_actual_writes(gemma):
    """Gemma's tags are taken after its post-attention norm: summed over keys with the head's
    attention weights and divided by the position's rms, they equal what the head writes into the
    residual stream (`head_writes`); before the gain they would not."""
    from catchtag.capture import attention_probs, attention_rms, capture, head_writes

    cap = capture(gemma, ["The city of Lodz is in Poland. It was written down on a quiet afternoon."],
                  layers=[5], progress=False)[0]
    A = attention_probs(cap.attn_inputs[5]).double()
    rms = attention_rms(gemma, cap, 5).double()
    writes = head_writes(gemma, cap, 5).double()
    p = cap.n_tokens - 1
    for h in range(gemma.n_heads):
        tags = torch.as_tensor(probes.head_tags(gemma, 5, h, cap.attn_inputs[5].v[h].double().numpy()))  # (T, d)
        assert torch.allclose((A[h, p] @ tags) / rms[p], writes[h, p], atol=1e-4, rtol=1e-3)
        raw = torch.as_tensor(probes.head_tags(gemma, 5, h, cap.attn_inputs[5].v[h].double().numpy())) / gemma_gain(gemma, 5)
        assert not torch.allclose((A[h, p] @ raw) / rms[p], writes[h, p], atol=1e-3)


def gemma_gain(model, layer):
    from catchtag.capture import post_attention_norm

    return post_attention_norm(model, layer)[0].double()


def test_near_chance_reading():
    assert probes.near_chance_reading(0.50, 0.80, 0.85, 0.9) == "probe artefact"
    assert probes.near_chance_reading(0.50, 0.52, 0.51, 0.53) == "information absent"
    assert probes.near_chance_reading(0.70, 0.75, 0.80, 0.8) == "not near chance"


def test_faithful_verdict():
    def res(tag_low, ctrl_high):
        rows = [dict(probe="tag", mean=tag_low + 0.02, low=tag_low, high=tag_low + 0.04)]
        rows += [dict(probe=c, mean=ctrl_high - 0.02, low=ctrl_high - 0.04, high=ctrl_high)
                 for c in ("random", "first token", "other prompt", "non-sink token", "shuffled")]
        return {"applies": True, "table": pd.DataFrame(rows)}

    assert probes.faithful_verdict([{"applies": False}]) == "not testable offline"
    assert probes.faithful_verdict([res(0.8, 0.6), {"applies": False}]) == "reproduced"
    assert probes.faithful_verdict([res(0.8, 0.6), res(0.6, 0.7)]) == "partly"
    assert probes.faithful_verdict([res(0.5, 0.7)]) == "not reproduced"


def test_verdict_notag_counts_a_probe_artefact_against_the_claim():
    from catchtag.probes import verdict_notag

    assert verdict_notag(["information absent", "information absent"]) == "reproduced"
    assert verdict_notag(["information absent", "probe artefact"]) == "partly"
    assert verdict_notag(["probe artefact", "not near chance"]) == "not reproduced"
    assert verdict_notag([None]) == "pending"


def test_mm_cv_runs_with_single_class_folds():
    """Folds of one row hold one class: the CV scores mm_thr only, so it needs no AUROC there (a
    small n_sentiment failed here before)."""
    rng = np.random.default_rng(0)
    y = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    X = rng.normal(size=(10, 3, 4)) + 3.0 * y[:, None, None]
    cv = probes.mm_cv(X, y, np.arange(10), k=10)
    assert cv.shape == (3,) and np.all(cv == 1.0)
    with pytest.raises(CatchtagError, match="both classes"):
        probes.mass_mean(X[2:], y[2:], X[:1], y[:1])
    assert "auroc" not in probes.mass_mean(X[2:], y[2:], X[:1], y[:1], with_auroc=False)
