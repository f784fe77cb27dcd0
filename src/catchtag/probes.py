"""Linear probes on the tag component of the residual stream (paper §4, Table 1, Table 7).

Protocol (ours; PAPER.md gives the paper's three probes but not its recipe):

- Position p: the last token of the prompt (the final "." of a cities statement).
- Layer l: the residual stream after layer l, x = resid_post[l, p].
- Tag subspace at (l, p): the span of the tags t_s = W_O^h v_s of the sinks s that catch p in the
  heads h of layer l (`catchtag.sinks.caught_by` at threshold eps), one tag per catching head.
  Its rank r is at most the number of heads.
- Features: the tag component P x (θ_tag), the rest x - P x (θ_no tag), and x itself (full),
  where P projects on the tag subspace of that prompt. All three live in d_model dimensions, so
  they are comparable across prompts even when the catching heads differ.
- Baselines: the projection of x on a fixed random subspace of the same rank r (one draw per
  layer, seeded), a probe trained on shuffled labels, and chance (the majority class of the test
  set).
- Probe: standardised features, L2 logistic regression (scikit-learn); train/test split by group
  (city or movie), so a statement and its twin never straddle; accuracy on the test set with a
  95% Wilson interval.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from .errors import CatchtagError

Z95 = 1.959963984540054


# --------------------------------------------------------------------------------------------------
# Statistics


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes out of n (95% by default)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclasses.dataclass
class ProbeResult:
    """Held-out accuracy of one probe, with its 95% Wilson interval."""

    accuracy: float
    low: float
    high: float
    n_test: int
    chance: float
    C: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def group_split(groups: Sequence, test_size: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test) with every group wholly on one side; about `test_size` of the groups
    (not of the rows) go to the test side, drawn with `seed`."""
    groups = np.asarray(groups)
    if not 0 < test_size < 1:
        raise CatchtagError(f"test_size={test_size!r}: pass a fraction in (0, 1)")
    uniq = np.unique(groups)
    if len(uniq) < 2:
        raise CatchtagError("a split by group needs at least two groups")
    rng = np.random.default_rng(seed)
    n_test = min(len(uniq) - 1, max(1, int(round(test_size * len(uniq)))))
    test_groups = rng.choice(uniq, size=n_test, replace=False)
    is_test = np.isin(groups, test_groups)
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def _group_folds(groups: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    uniq = np.unique(groups)
    rng = np.random.default_rng(seed)
    rng.shuffle(uniq)
    return [np.flatnonzero(np.isin(groups, part)) for part in np.array_split(uniq, k)]


# --------------------------------------------------------------------------------------------------
# Probes

C_GRID = (0.001, 0.01, 0.1, 1.0)
DEFAULT_C = 0.1


def make_probe(C: float = DEFAULT_C, seed: int = 0):
    """Standardised features -> L2 logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000, random_state=seed))


def cv_accuracy(X, y, groups, C: float = DEFAULT_C, k: int = 3, seed: int = 0) -> float:
    """Mean accuracy of a k-fold cross-validation split by group (for choosing C or a layer
    without looking at the test set)."""
    X, y, groups = np.asarray(X), np.asarray(y), np.asarray(groups)
    accs = []
    for fold in _group_folds(groups, k, seed):
        train = np.setdiff1d(np.arange(len(y)), fold)
        if len(np.unique(y[train])) < 2:
            continue
        probe = make_probe(C, seed).fit(X[train], y[train])
        accs.append(float((probe.predict(X[fold]) == y[fold]).mean()))
    return float(np.mean(accs)) if accs else float("nan")


def choose_C(X, y, groups, grid: Sequence[float] = C_GRID, k: int = 3, seed: int = 0) -> float:
    """The C of `grid` with the best grouped cross-validated accuracy (ties: the smallest C)."""
    scores = [cv_accuracy(X, y, groups, C, k, seed) for C in grid]
    return float(grid[int(np.nanargmax(scores))])


def fit_evaluate(
    X, y, train, test, C: float | None = DEFAULT_C, groups=None, shuffle: bool = False, seed: int = 0
) -> ProbeResult:
    """Fit a probe on rows `train`, report accuracy on rows `test` with a 95% Wilson interval.

    C=None chooses C by grouped cross-validation on the training rows (needs `groups`).
    shuffle=True permutes the training labels first (the shuffled-label baseline).
    """
    X, y = np.asarray(X, dtype=np.float64), np.asarray(y)
    if X.ndim != 2 or len(X) != len(y):
        raise CatchtagError(f"X must be (n, features) with one label per row; got {X.shape} and {y.shape}")
    ytr = y[train].copy()
    if len(np.unique(ytr)) < 2:
        raise CatchtagError("the training rows hold a single class: a probe needs both")
    if shuffle:
        ytr = np.random.default_rng(seed).permutation(ytr)
    if C is None:
        if groups is None:
            raise CatchtagError("C=None (choose by cross-validation) needs the groups")
        C = choose_C(X[train], ytr, np.asarray(groups)[train], seed=seed)
    probe = make_probe(C, seed).fit(X[train], ytr)
    correct = int((probe.predict(X[test]) == y[test]).sum())
    n = len(test)
    lo, hi = wilson_interval(correct, n)
    counts = np.bincount(y[test].astype(int))
    return ProbeResult(correct / n, lo, hi, n, float(counts.max() / n), float(C))


def random_basis(d: int, r: int, seed: int = 0) -> np.ndarray:
    """(d, r) orthonormal basis of a uniformly random r-dimensional subspace of R^d."""
    if r < 0 or r > d:
        raise CatchtagError(f"a random subspace of rank {r} does not fit in {d} dimensions")
    g = np.random.default_rng(seed).standard_normal((d, max(r, 1)))
    q, _ = np.linalg.qr(g)
    return q[:, :r]


# --------------------------------------------------------------------------------------------------
# Features from the models


@dataclasses.dataclass
class TagFeatures:
    """Per layer, for n prompts: x (n, d) the residual at the probed position, tag (n, d) its tag
    component, rank (n,) the tag subspace's rank, heads (n,) how many heads catch the position,
    first (n,) how many of them are caught by the first token."""

    layers: list[int]
    x: dict[int, np.ndarray]
    tag: dict[int, np.ndarray]
    rank: dict[int, np.ndarray]
    heads: dict[int, np.ndarray]
    first: dict[int, np.ndarray]
    n_heads: int

    def notag(self, layer: int) -> np.ndarray:
        return self.x[layer] - self.tag[layer]

    def modal_rank(self, layer: int) -> int:
        r = self.rank[layer]
        return int(np.bincount(r).argmax()) if len(r) else 0


def tag_component(model, cap, layer: int, position: int, caught: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """(P x, rank, catching heads, heads caught by the first token) at one layer and position.

    `caught` is the (H, T) output of `caught_by` for that layer. The basis spans the tags
    t = W_O^h v_s of the sink s catching `position` in each head h that catches it.
    """
    from .tags import orthonormal_basis, project, tag_vectors

    x = cap.resid_post[layer, position].double()
    c = caught[:, position]
    heads = torch.nonzero(c >= 0).flatten().tolist()
    if not heads:
        return torch.zeros_like(x), 0, 0, 0
    sinks = sorted({int(c[h]) for h in heads})
    t = tag_vectors(model, cap, layer, positions=sinks)  # (H, S, d)
    tags = torch.stack([t[h, sinks.index(int(c[h]))] for h in heads]).double()
    basis = orthonormal_basis(tags)
    return project(x, basis), int(basis.shape[1]), len(heads), int(sum(int(c[h]) == 0 for h in heads))


def collect_tag_features(
    model, prompts: Sequence[str], layers: Sequence[int], eps: float = 0.2, position: int = -1,
    remote=False, progress: bool = True,
) -> TagFeatures:
    """One forward pass per prompt (`catchtag.capture.capture`, only `layers` kept), then the
    residual x and its tag component at `position` (default: the last token) for each layer."""
    from .progress import progress as progress_bar

    from .capture import capture
    from .sinks import check_eps, sink_stats

    eps = check_eps(eps)
    layers = sorted(set(int(l) for l in layers))
    out = {k: {l: [] for l in layers} for k in ("x", "tag", "rank", "heads", "first")}
    bar = progress_bar(prompts, f"tags {model.name}", enabled=progress)
    for text in bar:
        cap = capture(model, [text], layers=layers, remote=remote, progress=False)[0]
        st = sink_stats(cap)
        caught = st.caught(eps)
        pos = position % cap.n_tokens
        for li, layer in enumerate(layers):
            tag, r, nh, nf = tag_component(model, cap, layer, pos, caught[li])
            out["x"][layer].append(cap.resid_post[layer, pos].double().numpy())
            out["tag"][layer].append(tag.numpy())
            out["rank"][layer].append(r)
            out["heads"][layer].append(nh)
            out["first"][layer].append(nf)
    stack = {k: {l: np.asarray(v[l]) for l in layers} for k, v in out.items()}
    return TagFeatures(layers, stack["x"], stack["tag"], stack["rank"], stack["heads"], stack["first"],
                       model.n_heads)


def feature_sets(feats: TagFeatures, layer: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The probes' inputs at one layer: tag, no tag, full, and the random-subspace baseline (a
    fixed random subspace whose rank is the most common tag rank at that layer)."""
    x = feats.x[layer]
    r = max(1, feats.modal_rank(layer))
    B = random_basis(x.shape[1], r, seed=seed + 1000 * layer + 1)
    return {"tag": feats.tag[layer], "no tag": feats.notag(layer), "full": x, "random": (x @ B) @ B.T}


PROBES = ("tag", "no tag", "full", "random", "shuffled")


def probe_table(
    feats: TagFeatures, y, groups, layer: int, test_size: float = 0.3, seed: int = 0,
    choose_c: bool = True,
) -> pd.DataFrame:
    """One row per probe (tag, no tag, full, random, shuffled) at one layer: accuracy, 95% CI,
    chance, test size and C. 'shuffled' is the full probe trained on permuted labels."""
    y, groups = np.asarray(y), np.asarray(groups)
    train, test = group_split(groups, test_size, seed)
    sets = feature_sets(feats, layer, seed)
    rows = []
    for name in PROBES:
        X = sets["full" if name == "shuffled" else name]
        res = fit_evaluate(X, y, train, test, C=None if choose_c else DEFAULT_C, groups=groups,
                           shuffle=name == "shuffled", seed=seed)
        rows.append(dict(probe=name, layer=layer, **res.as_dict()))
    return pd.DataFrame(rows)


def layer_sweep(
    feats: TagFeatures, y, groups, test_size: float = 0.3, seed: int = 0, C: float = DEFAULT_C,
    probes: Sequence[str] = ("tag", "no tag", "full", "random"),
) -> pd.DataFrame:
    """Test accuracy (fixed C) of each probe at each layer, plus the 3-fold grouped CV accuracy
    of θ_tag on the training rows (`cv_tag`), which `best_layer` uses to pick a layer."""
    y, groups = np.asarray(y), np.asarray(groups)
    train, test = group_split(groups, test_size, seed)
    rows = []
    for layer in feats.layers:
        sets = feature_sets(feats, layer, seed)
        cv = cv_accuracy(sets["tag"][train], y[train], groups[train], C, 3, seed)
        for name in probes:
            res = fit_evaluate(sets[name], y, train, test, C=C, seed=seed)
            rows.append(dict(probe=name, layer=layer, cv_tag=cv, rank=feats.modal_rank(layer),
                             heads=float(feats.heads[layer].mean()),
                             first=float(feats.first[layer].mean()), **res.as_dict()))
    return pd.DataFrame(rows)


def best_layer(sweep: pd.DataFrame) -> int:
    """The layer whose θ_tag has the best cross-validated accuracy on the training rows (the
    test rows play no part in the choice); ties go to the earlier layer."""
    cv = sweep.drop_duplicates("layer").set_index("layer")["cv_tag"]
    return int(cv.idxmax())


# --------------------------------------------------------------------------------------------------
# One task on one model


@dataclasses.dataclass
class TaskResult:
    """Everything the chapter shows for one (model, dataset): features, the layer sweep, the
    chosen layer and the probe table there."""

    model: str
    task: str
    feats: TagFeatures
    sweep: pd.DataFrame
    layer: int
    table: pd.DataFrame
    seconds: float


def default_layers(n_layers: int, k: int = 6) -> list[int]:
    """k layers spread evenly from layer 1 to the last one."""
    return sorted(set(np.linspace(1, n_layers - 1, k).round().astype(int).tolist()))


def probe_task(
    model, df: pd.DataFrame, task: str, layers: Sequence[int] | None = None, eps: float = 0.2,
    seed: int = 0, test_size: float = 0.3, template: str = "{text}", remote=False,
    progress: bool = True,
) -> TaskResult:
    """Collect tag features for the rows of `df` (text, label, group) put through `template`,
    sweep the layers, pick the layer by cross-validated θ_tag on the training rows, and run the
    five probes there (C chosen by grouped cross-validation)."""
    import time

    from threadpoolctl import threadpool_limits

    t0 = time.time()
    layers = default_layers(model.n_layers) if layers is None else list(layers)
    prompts = [template.format(text=t) for t in df["text"]]
    feats = collect_tag_features(model, prompts, layers, eps=eps, remote=remote, progress=progress)
    y, groups = df["label"].to_numpy(), df["group"].to_numpy()
    with threadpool_limits(1):  # small fits: one BLAS thread is faster and leaves a core free
        sweep = layer_sweep(feats, y, groups, test_size=test_size, seed=seed)
        layer = best_layer(sweep)
        table = probe_table(feats, y, groups, layer, test_size=test_size, seed=seed)
    return TaskResult(model.name, task, feats, sweep, layer, table, time.time() - t0)
