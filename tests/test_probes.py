"""Probe utilities: intervals, grouped splits, and probes on planted features."""

import numpy as np
import pytest
import torch

from catchtag import probes
from catchtag.errors import CatchtagError
from catchtag.tags import orthonormal_basis, project, remove


def test_wilson_interval():
    lo, hi = probes.wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    lo, hi = probes.wilson_interval(100, 100)
    assert hi == 1.0 and lo == pytest.approx(0.963, abs=1e-3)
    assert np.isnan(probes.wilson_interval(0, 0)[0])


def test_group_split_disjoint_groups():
    groups = np.repeat(np.arange(50), 3)
    train, test = probes.group_split(groups, 0.2, seed=1)
    assert set(groups[train]).isdisjoint(groups[test])
    assert len(np.unique(groups[test])) == 10
    again = probes.group_split(groups, 0.2, seed=1)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])
    with pytest.raises(CatchtagError):
        probes.group_split([1, 1, 1], 0.5)


def _planted(n=600, d=256, r=3, seed=0):
    """Labels planted along one direction inside an r-dimensional subspace; noise elsewhere."""
    rng = np.random.default_rng(seed)
    basis = orthonormal_basis(torch.tensor(rng.standard_normal((r, d)))).numpy()
    y = np.tile([0, 1], n // 2)  # each group (a pair of rows) holds one of each, like twins
    X = rng.standard_normal((n, d))
    X += np.outer(4.0 * (2 * y - 1), basis[:, 0])  # the signal lives in the subspace only
    groups = np.repeat(np.arange(n // 2), 2)
    return X, y, groups, basis


def test_planted_direction_in_subspace():
    X, y, groups, basis = _planted()
    train, test = probes.group_split(groups, 0.3, seed=0)
    B = torch.tensor(basis)
    tag = project(torch.tensor(X), B).numpy()
    notag = remove(torch.tensor(X), B).numpy()
    acc_tag = probes.fit_evaluate(tag, y, train, test).accuracy
    acc_notag = probes.fit_evaluate(notag, y, train, test).accuracy
    acc_full = probes.fit_evaluate(X, y, train, test).accuracy
    assert acc_tag > 0.97
    assert acc_full > 0.95
    assert abs(acc_notag - 0.5) < 0.12
    # a random subspace of the same rank mostly misses the planted direction
    R = probes.random_basis(X.shape[1], basis.shape[1], seed=5)
    assert probes.fit_evaluate((X @ R) @ R.T, y, train, test).accuracy < 0.75
    # shuffled labels: near chance
    res = probes.fit_evaluate(X, y, train, test, shuffle=True)
    assert abs(res.accuracy - 0.5) < 0.12 and res.chance == 0.5
    assert res.low <= res.accuracy <= res.high


def test_choose_C_and_cv():
    X, y, groups, _ = _planted(n=300)
    C = probes.choose_C(X, y, groups, grid=(0.01, 1.0))
    assert C in (0.01, 1.0)
    assert probes.cv_accuracy(X, y, groups, C) > 0.9
    train, test = probes.group_split(groups, 0.3)
    assert probes.fit_evaluate(X, y, train, test, C=None, groups=groups).C in probes.C_GRID


def test_random_basis_orthonormal():
    B = probes.random_basis(20, 4, seed=0)
    assert B.shape == (20, 4)
    assert np.allclose(B.T @ B, np.eye(4), atol=1e-10)


def _fake_feats(X, tag, layer=3):
    n = len(X)
    return probes.TagFeatures([layer], {layer: X}, {layer: tag}, {layer: np.full(n, 3)},
                              {layer: np.full(n, 4)}, {layer: np.full(n, 4)}, 4)


def test_probe_table_and_sweep_on_planted_features():
    X, y, groups, basis = _planted()
    tag = (X @ basis) @ basis.T
    feats = _fake_feats(X, tag)
    table = probes.probe_table(feats, y, groups, 3, choose_c=False).set_index("probe")
    assert list(table.index) == list(probes.PROBES)
    assert table.loc["tag", "accuracy"] > 0.97
    assert abs(table.loc["no tag", "accuracy"] - 0.5) < 0.12
    assert abs(table.loc["shuffled", "accuracy"] - 0.5) < 0.12
    sweep = probes.layer_sweep(feats, y, groups)
    assert probes.best_layer(sweep) == 3
    assert sweep["cv_tag"].iloc[0] > 0.95


def test_tag_features_on_a_real_model(smollm):
    prompts = ["The city of Paris is in France.", "The city of Lagos is in Japan."]
    feats = probes.collect_tag_features(smollm, prompts, layers=[3, 10], progress=False)
    for layer in (3, 10):
        x, tag = feats.x[layer], feats.tag[layer]
        assert x.shape == (2, smollm.d_model) and tag.shape == x.shape
        assert np.all(feats.rank[layer] <= feats.heads[layer])
        assert np.all(feats.heads[layer] <= smollm.n_heads)
        # the tag component is a projection: orthogonal to the rest, no longer than x
        assert np.allclose((tag * feats.notag(layer)).sum(1), 0, atol=1e-6 * (x**2).sum(1).max())
        assert np.all(np.linalg.norm(tag, axis=1) <= np.linalg.norm(x, axis=1) + 1e-9)
    # in the middle of the model the final "." is caught, mostly by the first token
    assert feats.heads[10].min() >= 1 and feats.first[10].max() >= 1


def test_probe_task_end_to_end(smollm):
    from catchtag import data

    df = data.cities(16, seed=0)
    res = probes.probe_task(smollm, df, "cities", layers=[8, 16], progress=False)
    assert res.layer in (8, 16)
    assert set(res.table["probe"]) == set(probes.PROBES)
    assert res.table["accuracy"].between(0, 1).all()
    assert set(res.sweep["layer"]) == {8, 16}
    assert probes.default_layers(30) == [1, 7, 12, 18, 23, 29]
