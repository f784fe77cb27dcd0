"""Linear probes on tags: the paper's protocol (Table 1), a faithful test of its claim, and controls.

Two protocols, kept apart because they measure different things.

**The paper's protocol (paper, via note; see the book's definitions page,
book/definitions.md).** The statement is fed alone and its last token (the final ".") is probed. Per layer l
and head h, with A the head's attention (T x T), V its values (T x d_head) and
alpha_k = (1 / (T - k)) sum_{q >= k} A_qk (0-based k: the mean over every query that sees k, k
itself included, no cut-off) the received attention:

    z_tag    = sum_k 1[alpha_k >  eps] A_tk V_k      (every sink counts, the first token included)
    z_no tag = sum_k 1[alpha_k <= eps] A_tk V_k      so z = z_tag + z_no tag (value space, before W_O)

Probes: the Geometry of Truth mass-mean probe exactly (Marks and Tegmark 2023: direction
theta = mean(x | true) - mean(x | false), prediction 1[x . theta > 0], no bias), the same direction
with a threshold fitted on the training rows (the midpoint of the two class means' projections), L2
logistic regression on standardised features, and the AUROC of the mass-mean score (threshold
free). Each on every (layer, head), and per layer with the heads concatenated. The location shown
in the table is chosen on the training rows only (grouped cross-validation of the thresholded
mass-mean probe).

**A faithful test (ours).** The paper's idea is a prompt-dependent sink (the statement's ".")
whose value has read the statement and is stamped onto the tokens after it. The statement is
followed by a neutral continuation, and a later token p (the continuation's last) is probed. Heads
in which "." catches p (`catchtag.sinks.caught_by`) on at least `min_rate` of the training prompts
are chosen on the training rows. The tag of such a head is what it writes for the "." into the
residual stream: `to_residual(model, l, W_O^h v_dot)` (Gemma: times its post-attention norm's gain).
theta_tag sees P x, x the residual after layer l at p and P the projector on the span of that
prompt's chosen heads' tags at layer l (layers concatenated). Controls: the same projection onto
a random subspace of the same rank drawn in those heads' output spaces (W_O^h r, r Gaussian in
value space, fixed per head), onto the first token's tags, onto the "." tags of another prompt,
onto the same heads' writes for a non-sink token of the statement (its last word piece), the tag
probe on shuffled training labels, x with the tag span removed, and the residual at the "." itself
(the ceiling of what the model holds about the statement there). Five group splits, mean and a
95% t-interval over them.

Shortcut controls (ours): a probe that sees only the stated country (one-hot), and for sentiment
a length probe and a bag-of-words probe.

One forward pass serves both protocols on cities (`statement_features`): under causal attention
the statement's rows inside statement + continuation are those of the statement fed alone, so the
paper's features are read at the statement's last token from its prefix (`paper_at`). The
paper-protocol accuracies carry a 95% Wilson interval on the test rows (`accuracy_interval`).
The chapter's quantities are built here by name (`table1_quantities`, `faithful_quantities`,
`sentiment_study`; format specs in `SPECS`), so the chapter only glues them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from .errors import CatchtagError

Z95 = 1.959963984540054
T95_4 = 2.7764451051977987  # Student t, 4 degrees of freedom (five splits), two-sided 95%
DEFAULT_C = 0.1


# --------------------------------------------------------------------------------------------------
# Statistics and splits


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes out of n (95% by default)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high): the mean of five (or any number of) split scores, NaN scores dropped,
    with a 95% Student-t interval (`intervals.t_interval`: n - 1 degrees of freedom, n = 5 uses
    2.776; NaN bounds for a single score)."""
    from .intervals import t_interval

    v = np.asarray(values, dtype=float)
    return t_interval(v[~np.isnan(v)])


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


def group_splits(groups: Sequence, n_splits: int = 5, test_size: float = 1 / 3, seed: int = 0):
    """`n_splits` grouped (train, test) splits drawn with seeds seed, seed + 1, ..."""
    return [group_split(groups, test_size, seed + i) for i in range(n_splits)]


def group_folds(groups: Sequence, k: int = 5, seed: int = 0) -> list[np.ndarray]:
    """k disjoint folds of row indices, every group wholly inside one fold."""
    groups = np.asarray(groups)
    uniq = np.unique(groups)
    if len(uniq) < k:
        raise CatchtagError(f"{len(uniq)} groups cannot fill {k} folds: pass fewer folds or more rows")
    rng = np.random.default_rng(seed)
    rng.shuffle(uniq)
    return [np.flatnonzero(np.isin(groups, part)) for part in np.array_split(uniq, k)]


def auroc(score: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Area under the ROC curve of `score` (n, ...) for binary labels y (n,), over the first axis
    (ties count half; the Mann-Whitney statistic)."""
    from scipy.stats import rankdata

    y = np.asarray(y).astype(bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        raise CatchtagError("AUROC needs both classes among the rows")
    r = rankdata(score, axis=0)
    return (r[y].sum(0) - n1 * (n1 + 1) / 2) / (n1 * n0)


# --------------------------------------------------------------------------------------------------
# Probes


def _check_xy(X, y):
    X, y = np.asarray(X, dtype=np.float64), np.asarray(y)
    if X.shape[0] != len(y):
        raise CatchtagError(f"X has {X.shape[0]} rows but y has {len(y)} labels: pass one label per row")
    if len(np.unique(y)) < 2:
        raise CatchtagError("the training rows hold a single class: a probe needs both")
    return X, y


def mass_mean(Xtr, ytr, Xte, yte, with_auroc: bool = True) -> dict[str, np.ndarray]:
    """Mass-mean probes (Marks and Tegmark 2023), vectorised over any middle axes.

    X (n, ..., d). Returns, each of shape (...): `mm` accuracy of the Geometry of Truth probe
    (theta = mean(true) - mean(false), predict 1[x . theta > 0], no bias); `mm_thr` accuracy with
    the threshold theta . (mu_true + mu_false) / 2 fitted on the training rows; `auroc` of x . theta
    (left out with `with_auroc=False`: a small cross-validation fold may hold one class only).
    """
    Xtr, ytr = _check_xy(Xtr, ytr)
    Xte, yte = np.asarray(Xte, dtype=np.float64), np.asarray(yte).astype(bool)
    mu1, mu0 = Xtr[ytr == 1].mean(0), Xtr[ytr == 0].mean(0)
    theta = mu1 - mu0
    s = np.einsum("n...d,...d->n...", Xte, theta)
    b = np.einsum("...d,...d->...", (mu1 + mu0) / 2, theta)
    yb = yte.reshape((-1,) + (1,) * (s.ndim - 1))
    out = {"mm": ((s > 0) == yb).mean(0), "mm_thr": ((s > b) == yb).mean(0)}
    if with_auroc:
        out["auroc"] = auroc(s, yte)
    return out


def mm_cv(X, y, groups, k: int = 5, seed: int = 0) -> np.ndarray:
    """Grouped k-fold cross-validated accuracy of the thresholded mass-mean probe, vectorised over
    the middle axes of X (n, ..., d): for choosing a (layer, head) on training rows only."""
    X, y = np.asarray(X, dtype=np.float64), np.asarray(y)
    accs = []
    for fold in group_folds(groups, k, seed):
        tr = np.setdiff1d(np.arange(len(y)), fold)
        accs.append(mass_mean(X[tr], y[tr], X[fold], y[fold], with_auroc=False)["mm_thr"])
    return np.mean(accs, axis=0)


def make_probe(C: float = DEFAULT_C, seed: int = 0):
    """Standardised features -> L2 logistic regression (scikit-learn)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=3000, random_state=seed))


def logistic_accuracy(X, y, train, test, C: float = DEFAULT_C, shuffle: bool = False, seed: int = 0) -> float:
    """Held-out accuracy of `make_probe` fitted on rows `train` (labels permuted with `seed` when
    `shuffle`: the shuffled-label control), scored on rows `test`."""
    X = np.asarray(X, dtype=np.float64).reshape(len(y), -1)
    y = np.asarray(y)
    ytr = y[train]
    _check_xy(X[train], ytr)
    if shuffle:
        ytr = np.random.default_rng(seed).permutation(ytr)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        probe = make_probe(C, seed).fit(X[train], ytr)
        return float((probe.predict(X[test]) == y[test]).mean())


def random_basis(d: int, r: int, seed: int = 0) -> np.ndarray:
    """(d, r) orthonormal basis of a uniformly random r-dimensional subspace of R^d."""
    if r < 0 or r > d:
        raise CatchtagError(f"a random subspace of rank {r} does not fit in {d} dimensions")
    g = np.random.default_rng(seed).standard_normal((d, max(r, 1)))
    q, _ = np.linalg.qr(g)
    return q[:, :r]


def project_rows(x: np.ndarray, vectors: np.ndarray, tol: float = 1e-8) -> np.ndarray:
    """Per row i, the orthogonal projection of x[i] (d,) on the span of vectors[i] (k, d):
    x (n, d), vectors (n, k, d) -> (n, d). Directions with singular value below tol * largest are
    dropped, so the rank is that of the span."""
    x = np.asarray(x, dtype=np.float64)
    V = np.asarray(vectors, dtype=np.float64)
    if V.ndim != 3 or V.shape[0] != x.shape[0] or V.shape[2] != x.shape[1]:
        raise CatchtagError(f"vectors must be (n, k, d) matching x (n, d); got {V.shape} and {x.shape}")
    U, S, _ = np.linalg.svd(np.swapaxes(V, 1, 2), full_matrices=False)  # U (n, d, k)
    keep = S > tol * np.maximum(S[:, :1], 1e-300)
    U = U * keep[:, None, :]
    coef = np.einsum("ndk,nd->nk", U, x)
    return np.einsum("ndk,nk->nd", U, coef)


# --------------------------------------------------------------------------------------------------
# A fast batched forward pass (eager attention, hooks), for short prompts


@contextlib.contextmanager
def _eager(hf):
    previous = hf.config._attn_implementation
    if previous != "eager":
        hf.set_attn_implementation("eager")
    try:
        yield
    finally:
        if previous != "eager":
            hf.set_attn_implementation(previous)


def forward_batches(model, prompts: Sequence[str], on_batch: Callable, layers: Sequence[int] | None = None,
                    batch_size: int = 64, progress: bool = True) -> None:
    """Run `prompts` through `model.hf` in batches of prompts with the same token count (no padding
    ever enters an attention row), calling `on_batch(rows, ids, A, V, R)` per batch with rows the
    prompts' indices, ids (B, T), and per captured layer l (dicts keyed by layer): A[l] (B, H, T, T)
    the attention probabilities, V[l] (B, H, T, d_head) the values (kv heads repeated to the query
    heads that read them), R[l] (B, T, d_model) the residual stream after layer l.

    The same numbers as `catchtag.capture.capture` (a test checks it), from the model's eager
    attention, without nnsight's per-prompt overhead; the decoder runs without its language-model
    head (no logits are computed). Local models only."""
    from .capture import repeat_kv, tokenize
    from .progress import progress as progress_bar

    if getattr(model, "remote", False) is True:
        raise CatchtagError("forward_batches runs local models only: use remote=False")
    hf = model.hf
    layers = list(range(model.n_layers)) if layers is None else sorted(set(int(l) for l in layers))
    ids = [tokenize(model, p) for p in prompts]
    buckets: dict[int, list[int]] = {}
    for i, t in enumerate(ids):
        buckets.setdefault(len(t), []).append(i)
    batches = [rows[j:j + batch_size] for _, rows in sorted(buckets.items()) for j in range(0, len(rows), batch_size)]
    store: dict = {}
    hooks = []
    blocks = hf.model.layers
    H, dh = model.n_heads, model.head_dim
    for l in layers:
        attn = blocks[l].self_attn
        hooks.append(attn.v_proj.register_forward_hook(
            lambda m, i, o, l=l: store.__setitem__(("v", l), o.detach())))
        hooks.append(attn.register_forward_hook(
            lambda m, i, o, l=l: store.__setitem__(("a", l), o[1].detach())))
        hooks.append(blocks[l].register_forward_hook(
            lambda m, i, o, l=l: store.__setitem__(("r", l), (o[0] if isinstance(o, tuple) else o).detach())))
    try:
        with torch.no_grad(), _eager(hf):
            for rows in progress_bar(batches, f"forward {model.name}", enabled=progress):
                x = torch.stack([ids[i] for i in rows])
                store.clear()
                hf.model(x, use_cache=False)  # the decoder only: no logits are needed
                B, T = x.shape
                A, V, R = {}, {}, {}
                for l in layers:
                    A[l] = store[("a", l)].float()
                    v = store[("v", l)].float().reshape(B, T, -1, dh).transpose(1, 2)  # (B, Hkv, T, dh)
                    V[l] = torch.stack([repeat_kv(v[b], H) for b in range(B)])
                    R[l] = store[("r", l)].float()
                on_batch(rows, x, A, V, R)
    finally:
        for h in hooks:
            h.remove()


def received_paper(A: torch.Tensor) -> torch.Tensor:
    """alpha_k (paper, via note) for A (..., T, T): the mean over the queries q >= k of A[q, k],
    k itself included, no cut-off (so the last token's alpha is A[T-1, T-1])."""
    T = A.shape[-1]
    return A.sum(-2) / torch.arange(T, 0, -1, dtype=A.dtype)


# --------------------------------------------------------------------------------------------------
# The paper's protocol


@dataclasses.dataclass
class PaperFeatures:
    """At the last token of each prompt, per (layer, head): tag, notag, full (n, L, H, d_head),
    float32, in value space; `first_weight` (n, L, H) the share of z_tag's attention weight on the
    first token, `self_sink` (n, L, H) whether the probed token counts as its own sink
    (alpha = A_TT > eps)."""

    layers: list[int]
    tag: np.ndarray
    notag: np.ndarray
    full: np.ndarray
    first_weight: np.ndarray
    self_weight: np.ndarray
    self_sink: np.ndarray


def _paper_arrays(n: int, L: int, H: int, dh: int) -> dict[str, np.ndarray]:
    return {**{k: np.zeros((n, L, H, dh), np.float32) for k in ("tag", "notag", "full")},
            "first_weight": np.zeros((n, L, H), np.float32), "self_weight": np.zeros((n, L, H), np.float32),
            "self_sink": np.zeros((n, L, H), bool)}


def paper_at(A: torch.Tensor, V: torch.Tensor, pos: torch.Tensor, eps: float) -> dict[str, torch.Tensor]:
    """The paper's decomposition (paper, via note) at token pos[b] of each prompt of a batch, from
    the attention of a longer causal prompt: A (B, H, T, T) probabilities, V (B, H, T, d_head),
    pos (B,) positions. Only the prefix 0..pos[b] counts, so the numbers are those of the prefix
    fed alone (causal attention: its rows, values and the received attention of its keys, averaged
    over the queries q <= pos[b], are the same). Returns tag, notag, full (B, H, d_head) and
    first_weight, self_weight (B, H) shares of z_tag's weight, self_sink (B, H) bool."""
    B, H, T, _ = A.shape
    ar = torch.arange(B)
    k = torch.arange(T)
    pos = torch.as_tensor(pos, dtype=torch.long)
    inside = k[None, :] <= pos[:, None]  # (B, T) the prefix's tokens
    if bool(inside.all()):
        alpha = received_paper(A)  # the whole prompt is the prefix
    else:
        col = (A * inside[:, None, :, None].to(A.dtype)).sum(-2)  # sum over the prefix's queries
        alpha = col / (pos[:, None] + 1 - k[None, :]).clamp_min(1).to(A.dtype)[:, None, :]
    sink = (alpha > eps) & inside[:, None, :]  # (B, H, T)
    w = A[ar, :, pos, :]  # (B, H, T) the probed token's row (zero after pos: causal)
    wt = w * sink
    total = wt.sum(-1).clamp_min(1e-12)
    return {"tag": torch.einsum("bhk,bhkd->bhd", wt, V), "notag": torch.einsum("bhk,bhkd->bhd", w - wt, V),
            "full": torch.einsum("bhk,bhkd->bhd", w, V), "first_weight": wt[..., 0] / total,
            "self_weight": wt[ar, :, pos] / total, "self_sink": sink[ar, :, pos]}


def _paper_fill(arrays, rows, layers, A, V, pos, eps):
    """Fill `_paper_arrays` rows `rows` from one batch of `forward_batches` at positions pos (B,)."""
    for j, l in enumerate(layers):
        for key, val in paper_at(A[l], V[l], pos, eps).items():
            arrays[key][rows, j] = val.numpy()


def _paper_result(layers, arrays) -> "PaperFeatures":
    return PaperFeatures(layers, **arrays)


def paper_features(model, prompts: Sequence[str], eps: float = 0.2, layers: Sequence[int] | None = None,
                   batch_size: int = 64, progress: bool = True) -> PaperFeatures:
    """z_tag, z_no tag and z at each prompt's last token (paper, via note; module docstring)."""
    from .sinks import check_eps

    eps = check_eps(eps)
    layers = list(range(model.n_layers)) if layers is None else sorted(set(int(l) for l in layers))
    arrays = _paper_arrays(len(prompts), len(layers), model.n_heads, model.head_dim)

    def on_batch(rows, ids, A, V, R):
        _paper_fill(arrays, rows, layers, A, V, torch.full((len(rows),), ids.shape[1] - 1), eps)

    forward_batches(model, prompts, on_batch, layers, batch_size, progress)
    return _paper_result(layers, arrays)


PAPER_FEATURES = ("tag", "notag", "full")
PAPER_PROBES = ("mm", "mm_thr", "logistic", "auroc")


def paper_probe(feats: PaperFeatures, y, groups, train, test, C: float = DEFAULT_C, seed: int = 0,
                logistic_maps: bool = True) -> dict:
    """Every probe of the paper's protocol on one split.

    Returns {"maps": {(feature, probe): (L, H) test score per head}, "layer_maps": {(feature, probe):
    (L,) test score with the heads concatenated}, "table": DataFrame with one row per (feature,
    where in {"head", "layer"}) at the location chosen on the training rows (grouped 5-fold CV of
    the thresholded mass-mean probe), columns layer, head, mm, mm_thr, logistic, auroc, cv}.
    `logistic_maps=False` fits logistic regression only at the chosen locations (faster)."""
    y, groups = np.asarray(y), np.asarray(groups)
    maps, layer_maps, rows = {}, {}, []
    for f in PAPER_FEATURES:
        X = getattr(feats, f)  # (n, L, H, dh)
        Xl = X.reshape(X.shape[0], X.shape[1], 1, -1)  # heads concatenated
        for where, Z in (("head", X), ("layer", Xl)):
            mm = mass_mean(Z[train], y[train], Z[test], y[test])
            cv = mm_cv(Z[train], y[train], groups[train], 5, seed)
            target = maps if where == "head" else layer_maps
            for p in ("mm", "mm_thr", "auroc"):
                target[(f, p)] = mm[p] if where == "head" else mm[p][:, 0]
            li, hi = np.unravel_index(int(np.argmax(cv)), cv.shape)
            if logistic_maps and where == "head":
                lg = np.array([[logistic_accuracy(Z[:, a, b], y, train, test, C, seed=seed)
                                for b in range(Z.shape[2])] for a in range(Z.shape[1])])
                maps[(f, "logistic")] = lg
                lacc = lg[li, hi]
            else:
                lacc = logistic_accuracy(Z[:, li, hi], y, train, test, C, seed=seed)
            if where == "layer":
                layer_maps.setdefault((f, "logistic"), np.full(Z.shape[1], np.nan))[li] = lacc
            rows.append(dict(feature=f, where=where, layer=feats.layers[li], head=int(hi) if where == "head" else -1,
                             mm=float(mm["mm"][li, hi]), mm_thr=float(mm["mm_thr"][li, hi]), logistic=float(lacc),
                             auroc=float(mm["auroc"][li, hi]), cv=float(cv[li, hi])))
    return {"maps": maps, "layer_maps": layer_maps, "table": pd.DataFrame(rows)}


def paper_split(groups, n_train: int = 400, seed: int = 0):
    """The paper's split (paper, via note): `n_train` rows for training, the rest for testing,
    whole groups on each side (groups of two statements: exactly n_train when both are even)."""
    groups = np.asarray(groups)
    uniq, counts = np.unique(groups, return_counts=True)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(uniq))
    take, total = [], 0
    for i in order:
        if total + counts[i] <= n_train:
            take.append(uniq[i])
            total += counts[i]
    is_train = np.isin(groups, take)
    if is_train.all() or not is_train.any():
        raise CatchtagError(f"n_train={n_train} leaves no test rows (or no training rows): lower it")
    return np.flatnonzero(is_train), np.flatnonzero(~is_train)


# --------------------------------------------------------------------------------------------------
# Shortcut controls


def onehot(values: Sequence) -> np.ndarray:
    """(n, k) one-hot encoding of n categorical values (k distinct)."""
    values = np.asarray(values)
    uniq = np.unique(values)
    return (values[:, None] == uniq[None, :]).astype(np.float64)


def shortcut_features(df: pd.DataFrame) -> dict[str, np.ndarray]:
    """The data-only controls of a task: "country only" (one-hot of the stated country) when `df`
    has a `stated` column, else "length" (characters and words) and "bag of words" (word counts,
    lowercased, words seen at least twice)."""
    if "stated" in df:
        return {"country only": onehot(df["stated"])}
    text = df["text"].astype(str)
    length = np.stack([text.str.len(), text.str.split().str.len()], 1).astype(np.float64)
    from sklearn.feature_extraction.text import CountVectorizer

    bow = CountVectorizer(lowercase=True, min_df=2).fit_transform(text).toarray().astype(np.float64)
    return {"length": length, "bag of words": bow}


def shortcut_scores(df: pd.DataFrame, splits, C: float = 1.0, seed: int = 0) -> dict[str, list[float]]:
    """Held-out logistic accuracy of each `shortcut_features` control on each (train, test) split.
    (Fitting the vocabulary on every row is harmless: it only lists words, never labels.)"""
    y = df["label"].to_numpy()
    return {name: [logistic_accuracy(X, y, tr, te, C, seed=seed) for tr, te in splits]
            for name, X in shortcut_features(df).items()}


# --------------------------------------------------------------------------------------------------
# The faithful test (ours)


def boundary_positions(model, statements: Sequence[str], prompts: Sequence[str]) -> np.ndarray:
    """Index of each statement's last token inside its prompt (the prompt starts with the
    statement). Raises when the prompt's tokens do not begin with the statement's tokens."""
    from .capture import tokenize

    out = []
    for s, p in zip(statements, prompts):
        a, b = tokenize(model, s).tolist(), tokenize(model, p).tolist()
        if b[: len(a)] != a:
            raise CatchtagError(f"the prompt does not start with the statement's tokens ({s!r}): "
                                "start the continuation with a space")
        out.append(len(a) - 1)
    return np.asarray(out)


@dataclasses.dataclass
class FaithfulFeatures:
    """Per prompt i and captured layer: `catch` (n, L, H) int, the sink catching the probed token
    (`caught_by`, -1 none); `dot_sink` (n, L, H) whether the boundary token is a sink; value
    vectors (n, L, H, d_head) of the boundary token (`v_dot`), the first token (`v_first`) and
    the token before the boundary (`v_other`); residuals (n, L, d_model) after each layer at the
    probed token (`x`) and at the boundary (`x_dot`); `boundary` (n,) its positions."""

    layers: list[int]
    catch: np.ndarray
    dot_sink: np.ndarray
    v_dot: np.ndarray
    v_first: np.ndarray
    v_other: np.ndarray
    x: np.ndarray
    x_dot: np.ndarray
    boundary: np.ndarray

    def catch_rate(self, rows=None) -> np.ndarray:
        """(L, H) share of the prompts `rows` (default all) whose probed token the boundary catches."""
        rows = slice(None) if rows is None else rows
        return (self.catch[rows] == self.boundary[rows, None, None]).mean(0)


def _faithful_arrays(n: int, L: int, H: int, dh: int, d: int) -> dict[str, np.ndarray]:
    return {"catch": np.zeros((n, L, H), np.int64), "dot_sink": np.zeros((n, L, H), bool),
            **{k: np.zeros((n, L, H, dh), np.float32) for k in ("v_dot", "v_first", "v_other")},
            "x": np.zeros((n, L, d), np.float32), "x_dot": np.zeros((n, L, d), np.float32)}


def _faithful_fill(arrays, rows, layers, A, V, R, p, eps):
    """Fill `_faithful_arrays` rows `rows` from one batch of `forward_batches`; p (B,) boundaries."""
    from .sinks import caught_by, sinks_mask, stats_from_probs

    B, T = A[layers[0]].shape[0], A[layers[0]].shape[-1]
    L, H = len(layers), A[layers[0]].shape[1]
    ar = torch.arange(B)
    # every layer, prompt and head at once: stats_from_probs takes any leading count of heads
    st = stats_from_probs(torch.stack([A[l] for l in layers]).reshape(-1, T, T))
    c = caught_by(st, eps)[:, -1].reshape(L, B, H)
    sk = sinks_mask(st, eps).reshape(L, B, H, T)
    arrays["catch"][rows] = c.permute(1, 0, 2).numpy()
    arrays["dot_sink"][rows] = sk.permute(1, 0, 2, 3)[ar, :, :, p].numpy()  # (B, L, H)
    for j, l in enumerate(layers):
        arrays["v_dot"][rows, j] = V[l][ar, :, p].numpy()
        arrays["v_first"][rows, j] = V[l][:, :, 0].numpy()
        arrays["v_other"][rows, j] = V[l][ar, :, p - 1].numpy()
        arrays["x"][rows, j] = R[l][:, -1].numpy()
        arrays["x_dot"][rows, j] = R[l][ar, p].numpy()


def _faithful_prompts(model, statements, continuation, layers):
    if not continuation.startswith(" "):
        raise CatchtagError("the continuation must start with a space, so the statement's tokens stay as they are")
    prompts = [s + continuation for s in statements]
    bpos = boundary_positions(model, statements, prompts)
    if (bpos < 1).any():
        raise CatchtagError("a statement of one token leaves no non-sink token before its boundary")
    layers = list(range(model.n_layers)) if layers is None else sorted(set(int(l) for l in layers))
    return prompts, bpos, layers


def faithful_features(model, statements: Sequence[str], continuation: str, eps: float = 0.2,
                      layers: Sequence[int] | None = None, batch_size: int = 64,
                      progress: bool = True) -> FaithfulFeatures:
    """Feed statement + continuation, probe the last token; see the module docstring."""
    return statement_features(model, statements, continuation, eps, layers, batch_size, progress)[1]


def statement_features(model, statements: Sequence[str], continuation: str, eps: float = 0.2,
                       layers: Sequence[int] | None = None, batch_size: int = 64,
                       progress: bool = True) -> tuple[PaperFeatures, FaithfulFeatures]:
    """One forward pass over statement + continuation serving both protocols: the paper's features
    at the statement's last token, from the statement's prefix alone (`paper_at`; causal
    attention makes them those of the statement fed alone, up to float rounding: a test checks
    1e-5), and the faithful test's features at the continuation's last token. Returns
    (PaperFeatures, FaithfulFeatures); see `paper_features` and `faithful_features`."""
    from .sinks import check_eps

    eps = check_eps(eps)
    prompts, bpos, layers = _faithful_prompts(model, statements, continuation, layers)
    shape = (len(prompts), len(layers), model.n_heads, model.head_dim, model.d_model)
    paper, faithful = _paper_arrays(*shape[:4]), _faithful_arrays(*shape)

    def on_batch(rows, ids, A, V, R):
        rows = np.asarray(rows)
        p = torch.as_tensor(bpos[rows])
        _paper_fill(paper, rows, layers, A, V, p, eps)
        _faithful_fill(faithful, rows, layers, A, V, R, p, eps)

    forward_batches(model, prompts, on_batch, layers, batch_size, progress)
    return _paper_result(layers, paper), FaithfulFeatures(layers, boundary=bpos, **faithful)


def head_tags(model, layer: int, head: int, v: np.ndarray) -> np.ndarray:
    """What head `head` of `layer` writes into the residual stream for value vectors v (..., d_head),
    up to the position's rms: to_residual(W_O^h v) (Gemma: times its post-attention norm's gain).
    (..., d_model), float64."""
    from .capture import o_proj_weight, to_residual

    w = o_proj_weight(model, layer)  # (d, H * dh)
    dh = model.head_dim
    wh = w[:, head * dh:(head + 1) * dh].double()  # (d, dh)
    out = torch.as_tensor(np.asarray(v), dtype=torch.float64) @ wh.T
    return to_residual(model, layer, out).numpy() if _has_norm(model, layer) else out.numpy()


def _has_norm(model, layer):
    from .capture import post_attention_norm

    return post_attention_norm(model, layer) is not None


def choose_heads(feats: FaithfulFeatures, train, min_rate: float = 0.5, max_heads: int = 6) -> list[tuple[int, int]]:
    """(layer, head) pairs in which the boundary catches the probed token on at least `min_rate` of
    the training prompts, the `max_heads` most frequent (ties: earlier layer, lower head)."""
    rate = feats.catch_rate(train)
    cand = [(rate[a, b], -a, -b) for a in range(rate.shape[0]) for b in range(rate.shape[1]) if rate[a, b] >= min_rate]
    cand.sort(reverse=True)
    return [(feats.layers[-a], -b) for _, a, b in cand[:max_heads]]


FAITHFUL_PROBES = ("tag", "random", "first token", "other prompt", "non-sink token", "shuffled",
                   "no tag", "residual at '.'", "residual at p")


def probe_key(probe: str) -> str:
    """A probe's name as a results quantity: "residual at '.'" -> "residual_at_dot"."""
    import re

    return re.sub(r"\W+", "_", probe.replace("'.'", "dot")).strip("_")


def faithful_sets(model, feats: FaithfulFeatures, heads: Sequence[tuple[int, int]], seed: int = 0) -> dict[str, np.ndarray]:
    """The inputs of every faithful-test probe for the chosen heads (rows: all prompts).

    Per layer holding chosen heads, x at the probed token is projected on the span of those heads'
    writes of: the boundary's value (tag), a fixed Gaussian value vector per head (random), the
    first token's value, the boundary's value in another prompt (a derangement drawn with seed),
    the value of the token before the boundary (non-sink token); the layers are concatenated.
    "no tag" is x minus its tag projection; the residuals are x at the boundary and at p."""
    if not heads:
        raise CatchtagError("no head was chosen: the boundary catches the probed token in no head")
    rng = np.random.default_rng(seed)
    n = feats.x.shape[0]
    perm = rng.permutation(n)
    while n > 1 and (perm == np.arange(n)).any():
        perm = rng.permutation(n)
    by_layer: dict[int, list[int]] = {}
    for l, h in heads:
        by_layer.setdefault(l, []).append(h)
    sets = {k: [] for k in FAITHFUL_PROBES if k != "shuffled"}
    for l, hs in sorted(by_layer.items()):
        j = feats.layers.index(l)
        x = feats.x[:, j].astype(np.float64)
        spans = {"tag": [], "random": [], "first token": [], "other prompt": [], "non-sink token": []}
        for h in hs:
            tag = head_tags(model, l, h, feats.v_dot[:, j, h])
            spans["tag"].append(tag)
            spans["other prompt"].append(tag[perm])
            spans["first token"].append(head_tags(model, l, h, feats.v_first[:, j, h]))
            spans["non-sink token"].append(head_tags(model, l, h, feats.v_other[:, j, h]))
            r = np.random.default_rng(seed + 7919 * (l + 1) + h).standard_normal(model.head_dim)
            spans["random"].append(np.broadcast_to(head_tags(model, l, h, r), tag.shape))
        for k, vecs in spans.items():
            sets[k].append(project_rows(x, np.stack(vecs, 1)))
        sets["no tag"].append(x - sets["tag"][-1])
        sets["residual at '.'"].append(feats.x_dot[:, j].astype(np.float64))
        sets["residual at p"].append(x)
    return {k: np.concatenate(v, 1) for k, v in sets.items()}


def faithful_probe(model, feats: FaithfulFeatures, y, splits, min_rate: float = 0.5, max_heads: int = 6,
                   C: float = DEFAULT_C, seed: int = 0) -> dict:
    """The faithful test over group splits: on each split, heads chosen on its training rows
    (`choose_heads`), every `FAITHFUL_PROBES` probe fitted on them and scored on its test rows.

    Returns {"applies": bool, "scores": {probe: [accuracy per split]}, "heads": [chosen heads per
    split], "table": DataFrame (probe, mean, low, high) with 95% t-intervals}. When no head
    qualifies on some split, "applies" is False and the scores are empty: the probe does not apply
    to this model (there is no prompt-dependent sink to read)."""
    y = np.asarray(y)
    scores = {k: [] for k in FAITHFUL_PROBES}
    chosen = []
    for s, (tr, te) in enumerate(splits):
        heads = choose_heads(feats, tr, min_rate, max_heads)
        chosen.append(heads)
        if not heads:
            return {"applies": False, "scores": {}, "heads": chosen, "table": pd.DataFrame()}
        sets = faithful_sets(model, feats, heads, seed + s)
        for k in FAITHFUL_PROBES:
            X = sets["tag" if k == "shuffled" else k]
            scores[k].append(logistic_accuracy(X, y, tr, te, C, shuffle=k == "shuffled", seed=seed + s))
    rows = [dict(probe=k, **dict(zip(("mean", "low", "high"), mean_interval(v)))) for k, v in scores.items()]
    return {"applies": True, "scores": scores, "heads": chosen, "table": pd.DataFrame(rows)}


# --------------------------------------------------------------------------------------------------
# Readings and verdicts (what the chapter and the reproduction page say)

CHANCE_BAND = 0.05  # (ours) "near chance": within 5 points of 50% (AUROC within 0.05 of 0.5)


def near_chance_reading(mm: float, mm_thr: float, logistic: float, auroc: float, band: float = CHANCE_BAND) -> str:
    """Which reading of a "near chance" θ_no tag a row supports (ours):

    - "not near chance": the paper's probe (mm, no bias) is more than `band` from 50%;
    - "information absent": it is near chance and so are the sound probes (fitted threshold,
      logistic regression, AUROC);
    - "probe artefact": it is near chance but a sound probe is not (the bias-free mass-mean probe
      on uncentred activations predicts one class)."""
    if abs(mm - 0.5) > band:
        return "not near chance"
    sound = max(mm_thr, logistic, auroc)
    return "information absent" if sound <= 0.5 + band else "probe artefact"


def verdict_notag(readings: Sequence[str]) -> str:
    """The claim "with the tag removed the probe is near chance", from each model's
    `near_chance_reading` (ours): "reproduced" when every model reads "information absent",
    "partly" when some do, "not reproduced" when none does ("probe artefact" counts against: the
    paper's probe is at chance but the information is there)."""
    readings = [r for r in readings if r]
    if not readings:
        return "pending"
    absent = [r == "information absent" for r in readings]
    return "reproduced" if all(absent) else "partly" if any(absent) else "not reproduced"


def faithful_verdict(results: Sequence[dict]) -> str:
    """The faithful test's verdict over models (ours), from `faithful_probe` outputs: "reproduced"
    when, in every model where the probe applies, θ_tag's interval lies above the interval of every
    control that does not see the model's own "." tag or residual (random, first token, other
    prompt, non-sink token, shuffled); "partly" when in some; "not reproduced" when in none;
    "not testable offline" when it applies to no model (no "." sink in any head)."""
    applied = [r for r in results if r.get("applies")]
    if not applied:
        return "not testable offline"
    wins = []
    for r in applied:
        t = r["table"].set_index("probe")
        controls = ("random", "first token", "other prompt", "non-sink token", "shuffled")
        wins.append(bool(all(t.loc["tag", "low"] > t.loc[c, "high"] for c in controls)))
    return "reproduced" if all(wins) else "partly" if any(wins) else "not reproduced"


# --------------------------------------------------------------------------------------------------
# What the chapter shows: labels, intervals, quantities by name, tables (the chapter only glues)

FEAT_LABELS = {"tag": "θ_tag", "notag": "θ_no tag", "full": "θ_activation"}
PROBE_LABELS = {"mm": "mass-mean, no bias (GoT)", "mm_thr": "mass-mean + threshold", "logistic": "logistic",
                "auroc": "AUROC"}
ACCURACY_PROBES = ("mm", "mm_thr", "logistic")  # the probes scored by accuracy (AUROC is not)


def paper_table1() -> pd.DataFrame:
    """The paper's Table 1 (paper, via note): truth-probe accuracy (%) on cities, rows θ_tag,
    θ_no tag, θ_activation, one column per model. Reference values, not computed here."""
    return pd.DataFrame({"Qwen2.5-3B": [98.0, 50.0, 50.0], "Qwen2.5-7B": [94.5, 50.0, 83.0],
                         "Qwen2.5-14B": [99.5, 50.5, 60.0], "Llama-3-8B": [99.0, 56.5, 97.0],
                         "Llama-3.1-8B": [92.5, 50.0, 86.0]}, index=list(FEAT_LABELS.values()))


def pct(x: float, digits: int = 1) -> str:
    """A fraction as a percentage: pct(0.1234) == '12.3%'."""
    return f"{100 * x:.{digits}f}%"


def accuracy_interval(acc: float, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a held-out accuracy `acc` on n test rows (ours): k = acc * n
    successes (rounded; acc is a share of n rows). It treats the test rows as independent draws and
    the fitted probe as fixed, so it holds the test-sampling error only, not the variation from
    refitting on another training split."""
    if acc is None or not math.isfinite(acc) or n <= 0:
        return (float("nan"), float("nan"))
    return wilson_interval(int(round(acc * n)), n)


def ci_text(mean: float, low: float, high: float) -> str:
    """'m% [low%, high%]', one decimal: the form of every interval the chapter glues."""
    return f"{mean:.1%} [{low:.1%}, {high:.1%}]"


def accuracy_ci_text(acc: float, n: int) -> str:
    """`ci_text` of an accuracy on n test rows with its `accuracy_interval`."""
    return ci_text(acc, *accuracy_interval(acc, n))


def _where_text(row, where: str, short: bool = False) -> str:
    if short:
        return f"L{int(row['layer'])}" + (f" H{int(row['head'])}" if where == "head" else "")
    return f"layer {int(row['layer'])}" + (f", head {int(row['head'])}" if where == "head" else "")


@dataclasses.dataclass
class CitiesDesign:
    """The cities statements' labels and splits: y (n,) 1 = true, groups (n,) city ids, the paper's
    (train, test) split, and `splits`, the group splits of the faithful test and the controls."""

    y: np.ndarray
    groups: np.ndarray
    train: np.ndarray
    test: np.ndarray
    splits: list


def cities_design(cities: pd.DataFrame, n_train: int = 400, n_splits: int = 5, seed: int = 0) -> CitiesDesign:
    """Labels, the paper's split (`paper_split`) and `n_splits` group splits with a third of the
    cities held out (`group_splits`) of a `catchtag.data.cities` frame."""
    y, groups = cities["label"].to_numpy(), cities["group"].to_numpy()
    train, test = paper_split(groups, n_train, seed)
    return CitiesDesign(y, groups, train, test, group_splits(groups, n_splits, test_size=1 / 3, seed=seed))


def design_quantities(cities: pd.DataFrame, design: CitiesDesign) -> dict:
    """The data's numbers (chapter level): n_cities, n_splits, n_train, n_test, and the country-only
    shortcut (ours) on the paper's split (`country_only`) and over the group splits
    (`country_only_splits`, mean and 95% t-interval as text)."""
    short_paper = shortcut_scores(cities, [(design.train, design.test)])["country only"][0]
    short_splits = shortcut_scores(cities, design.splits)["country only"]
    return {"n_cities": len(cities), "n_splits": len(design.splits), "n_train": len(design.train),
            "n_test": len(design.test), "country_only": short_paper,
            "country_only_splits": ci_text(*mean_interval(short_splits))}


def cities_study(model, cities: pd.DataFrame, design: CitiesDesign, continuation: str, eps: float = 0.2,
                 min_rate: float = 0.5, max_heads: int = 6, seed: int = 0, progress: bool = True) -> dict:
    """Both protocols on the cities statements from one forward pass (`statement_features`):
    {"paper": `paper_probe` output (logistic at the chosen locations only) plus first_weight,
    self_weight, self_sink (n, L, H) arrays; "faithful": `faithful_probe` output plus "rate" (L, H)
    the share of prompts whose probed token the boundary catches; "n_test": test rows of the
    paper's split}. The features themselves are not kept."""
    pf, ff = statement_features(model, list(cities["text"]), continuation, eps=eps, progress=progress)
    paper = paper_probe(pf, design.y, design.groups, design.train, design.test, seed=seed, logistic_maps=False)
    paper.update(first_weight=pf.first_weight, self_weight=pf.self_weight, self_sink=pf.self_sink)
    faithful = faithful_probe(model, ff, design.y, design.splits, min_rate=min_rate, max_heads=max_heads, seed=seed)
    faithful["rate"] = ff.catch_rate()
    return {"paper": paper, "faithful": faithful, "n_test": len(design.test)}


def paper_quantities(table: pd.DataFrame, n_test: int, prefix: str = "cities", layers: bool = True) -> dict:
    """The paper-protocol numbers of one model by quantity name, from `paper_probe`'s table:
    `{prefix}_{feature}` the paper's probe (mass-mean, no bias), `{prefix}_{feature}_{probe}` for
    mm_thr, logistic and auroc, `{prefix}_{feature}_where`, and the 95% Wilson intervals of the
    accuracies on the n_test test rows as text (`{prefix}_{feature}_ci`, `..._mm_thr_ci`,
    `..._logistic_ci`; `accuracy_interval`); with `layers`, the same for the heads-concatenated
    rows under `{prefix}_L_...`."""
    t = table.set_index(["feature", "where"])
    out = {}
    for where, pre in (("head", prefix), ("layer", prefix + "_L")) if layers else (("head", prefix),):
        for f in FEAT_LABELS:
            r = t.loc[(f, where)]
            for p in PAPER_PROBES:
                key = f"{pre}_{f}" + ("" if p == "mm" else f"_{p}")
                out[key] = float(r[p])
                if p in ACCURACY_PROBES:
                    out[key + "_ci"] = accuracy_ci_text(float(r[p]), n_test)
            out[f"{pre}_{f}_where"] = _where_text(r, where)
    return out


def table1_quantities(study: dict) -> dict:
    """One model's quantities of the paper's protocol on cities (`cities_study` output):
    `paper_quantities`, the near-chance reading of θ_no tag (`notag_reading`), and where z_tag's
    weight lies: `first_weight` and `self_weight` (mean share on the first token and on the probed
    token itself, at θ_tag's chosen head), `first_weight_all` (over every head), `self_sink` (share
    of (prompt, layer, head) where the probed token is its own sink)."""
    p = study["paper"]
    t = p["table"].set_index(["feature", "where"])
    out = paper_quantities(p["table"], study["n_test"])
    r = t.loc[("notag", "head")]
    out["notag_reading"] = near_chance_reading(r["mm"], r["mm_thr"], r["logistic"], r["auroc"])
    r = t.loc[("tag", "head")]
    li, hi = int(r["layer"]), int(r["head"])  # every layer is captured: layer = index
    out["first_weight"] = float(np.mean(p["first_weight"][:, li, hi]))
    out["self_weight"] = float(np.mean(p["self_weight"][:, li, hi]))
    out["first_weight_all"] = float(np.mean(p["first_weight"]))
    out["self_sink"] = float(p["self_sink"].mean())
    return out


def ours_table(studies: dict, where: str = "head") -> pd.DataFrame:
    """The Table-1 analogue (ours): rows θ_tag, θ_no tag, θ_activation; per model (`cities_study`
    outputs by model name) a column per probe of `PROBE_LABELS`, accuracies in % with their 95%
    Wilson interval on the test rows (`accuracy_ci_text`: "98.5% [95.7%, 99.5%]", as the sentiment
    table and the text), AUROC as a fraction, and the location
    ("L3 H2"; "L3" for where="layer", heads concatenated)."""
    cols = {}
    for name, study in studies.items():
        t = study["paper"]["table"].set_index(["feature", "where"])
        for p, label in PROBE_LABELS.items():
            cells = []
            for f in FEAT_LABELS:
                v = float(t.loc[(f, where), p])
                if p == "auroc":
                    cells.append(f"{v:.2f}")
                else:
                    cells.append(accuracy_ci_text(v, study["n_test"]))
            cols[(name, label)] = cells
        cols[(name, "where")] = [_where_text(t.loc[(f, where)], where, short=True) for f in FEAT_LABELS]
    return pd.DataFrame(cols, index=list(FEAT_LABELS.values()))


def head_map(study: dict, feature: str, probe: str = "mm_thr") -> tuple[np.ndarray, tuple[int, int]]:
    """(L, H) test score of `probe` on `feature` per (layer, head) from a `cities_study`, and the
    (layer, head) chosen on the training rows for that feature."""
    r = study["paper"]["table"].set_index(["feature", "where"]).loc[(feature, "head")]
    return study["paper"]["maps"][(feature, probe)], (int(r["layer"]), int(r["head"]))


def compare_ci(table: pd.DataFrame, a: str, b: str) -> str:
    """'above', 'below' or 'level with': whether probe a's interval clears probe b's (table indexed
    by probe, columns low and high) (ours)."""
    if table.loc[a, "low"] > table.loc[b, "high"]:
        return "above"
    return "below" if table.loc[a, "high"] < table.loc[b, "low"] else "level with"


FAITHFUL_COMPARED = ("random", "non-sink token", "residual at '.'")  # controls θ_tag is compared with in the prose


def faithful_quantities(faithful: dict) -> dict:
    """One model's faithful-test quantities from a `faithful_probe` output with its "rate":
    faithful_max_rate, faithful_applies ("applies" / "does not apply"), faithful_heads (the first
    split's heads, "L3H2, ..." or "none"), faithful_{probe} (mean accuracy) and faithful_{probe}_ci
    (mean and 95% t-interval as text) per `FAITHFUL_PROBES`, and faithful_tag_vs_{control}
    (`compare_ci`) for `FAITHFUL_COMPARED`; None where the probe does not apply."""
    applies = bool(faithful["applies"])
    t = faithful["table"].set_index("probe") if applies else None
    out = {"faithful_max_rate": float(np.max(faithful["rate"])),
           "faithful_applies": "applies" if applies else "does not apply",
           "faithful_heads": ", ".join(f"L{l}H{h}" for l, h in faithful["heads"][0]) or "none"}
    for p in FAITHFUL_PROBES:
        key = "faithful_" + probe_key(p)
        out[key] = float(t.loc[p, "mean"]) if applies else None
        out[key + "_ci"] = ci_text(*t.loc[p, ["mean", "low", "high"]]) if applies else None
    for other in FAITHFUL_COMPARED:
        out["faithful_tag_vs_" + probe_key(other)] = compare_ci(t, "tag", other) if applies else None
    return out


def faithful_bars(studies: dict) -> dict[str, pd.DataFrame]:
    """Per model where the faithful probe applies (`cities_study` outputs by name), its table
    indexed by probe in `FAITHFUL_PROBES` order (columns mean, low, high): a bar chart's data."""
    return {name: s["faithful"]["table"].set_index("probe").loc[list(FAITHFUL_PROBES)]
            for name, s in studies.items() if s["faithful"]["applies"]}


def faithful_ci_table(studies: dict) -> pd.DataFrame:
    """The faithful test's mean and 95% t-interval per probe (rows) and model where it applies."""
    return pd.DataFrame({name: [ci_text(*t.loc[p, ["mean", "low", "high"]]) for p in FAITHFUL_PROBES]
                         for name, t in faithful_bars(studies).items()}, index=list(FAITHFUL_PROBES))


SENTIMENT_SHARED = ("sentiment_source", "sentiment_length", "sentiment_bow", "sentiment_n_test")


def sentiment_quantities(table: pd.DataFrame | None, n_test: int) -> dict:
    """One model's sentiment numbers (paper's protocol, the head rows): sentiment_{feature} (the
    paper's probe), sentiment_{feature}_logistic, and their 95% Wilson intervals on the n_test test
    snippets as text (..._ci); all None when `table` is None (sentiment not run)."""
    out = {}
    for f in FEAT_LABELS:
        for p, suffix in (("mm", ""), ("logistic", "_logistic")):
            key = f"sentiment_{f}{suffix}"
            v = None if table is None else float(table.set_index(["feature", "where"]).loc[(f, "head"), p])
            out[key] = v
            out[key + "_ci"] = None if v is None else accuracy_ci_text(v, n_test)
    return out


def sentiment_rows(name: str, table: pd.DataFrame, n_test: int) -> list[dict]:
    """Rows of the sentiment table for one model: probe, location, each `PROBE_LABELS` score (accuracy
    with its 95% Wilson interval on the n_test test snippets, AUROC as a fraction)."""
    t = table.set_index(["feature", "where"])
    rows = []
    for f, label in FEAT_LABELS.items():
        r = t.loc[(f, "head")]
        cells = {PROBE_LABELS[p]: f"{r[p]:.2f}" if p == "auroc" else accuracy_ci_text(float(r[p]), n_test)
                 for p in PROBE_LABELS}
        rows.append({"model": name, "probe": label, "where": _where_text(r, "head", short=True), **cells})
    return rows


def sentiment_study(models: Sequence[str], n: int, eps: float = 0.2, seed: int = 0, load=None,
                    progress: bool = True) -> tuple[dict, pd.DataFrame | None]:
    """The paper's protocol on n sentiment snippets (`catchtag.data.sentiment`; the snippet alone,
    its last token probed; a third of the movies held out), beside the length and bag-of-words
    baselines. Returns ({None: chapter-level quantities (`SENTIMENT_SHARED`), model name:
    `sentiment_quantities`}, the table of `sentiment_rows` indexed by (model, probe)); with n = 0
    every quantity is None and the table is None. `load` loads a model by name (default
    `catchtag.models.load_model`)."""
    if not n:
        return {None: dict.fromkeys(SENTIMENT_SHARED),
                **{name: sentiment_quantities(None, 0) for name in models}}, None
    from . import data

    if load is None:
        from .models import load_model as load
    sent = data.sentiment(n, seed=seed)
    ys, gs = sent["label"].to_numpy(), sent["group"].to_numpy()
    s_train, s_test = group_split(gs, 1 / 3, seed)
    base = shortcut_scores(sent, [(s_train, s_test)])
    out = {None: {"sentiment_source": sent.attrs["source"], "sentiment_length": base["length"][0],
                  "sentiment_bow": base["bag of words"][0], "sentiment_n_test": len(s_test)}}
    rows = []
    for name in models:
        sf = paper_features(load(name), list(sent["text"]), eps=eps, progress=progress)
        t = paper_probe(sf, ys, gs, s_train, s_test, seed=seed, logistic_maps=False)["table"]
        out[name] = sentiment_quantities(t, len(s_test))
        rows += sentiment_rows(name, t, len(s_test))
        del sf
    return out, pd.DataFrame(rows).set_index(["model", "probe"])


def _specs() -> dict[str, str]:
    specs = {"n_cities": ",", "n_train": ",", "n_test": ",", "sentiment_n_test": ",", "country_only": ".1%",
             "sentiment_length": ".1%", "sentiment_bow": ".1%", "min_rate": ".0%", "faithful_max_rate": ".0%",
             "first_weight": ".1%", "self_weight": ".1%", "first_weight_all": ".1%", "self_sink": ".1%"}
    for pre in ("cities", "cities_L"):
        for f in FEAT_LABELS:
            specs.update({f"{pre}_{f}": ".1%", f"{pre}_{f}_mm_thr": ".1%", f"{pre}_{f}_logistic": ".1%",
                          f"{pre}_{f}_auroc": ".2f"})
    for f in FEAT_LABELS:
        specs.update({f"sentiment_{f}": ".1%", f"sentiment_{f}_logistic": ".1%"})
    specs.update({"faithful_" + probe_key(p): ".1%" for p in FAITHFUL_PROBES})
    return specs


SPECS = _specs()  # format spec of each numeric quantity the chapter glues (text quantities: none)
