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
    """(mean, low, high): the mean of five (or any number of) split scores with a 95% Student-t
    interval (t with n - 1 degrees of freedom; n = 5 uses 2.776)."""
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    if len(v) == 0:
        return (float("nan"),) * 3
    m = float(v.mean())
    if len(v) == 1:
        return (m, m, m)
    from scipy import stats

    half = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return (m, m - half, m + half)


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


def mass_mean(Xtr, ytr, Xte, yte) -> dict[str, np.ndarray]:
    """Mass-mean probes (Marks and Tegmark 2023), vectorised over any middle axes.

    X (n, ..., d). Returns, each of shape (...): `mm` accuracy of the Geometry of Truth probe
    (theta = mean(true) - mean(false), predict 1[x . theta > 0], no bias); `mm_thr` accuracy with
    the threshold theta . (mu_true + mu_false) / 2 fitted on the training rows; `auroc` of x . theta.
    """
    Xtr, ytr = _check_xy(Xtr, ytr)
    Xte, yte = np.asarray(Xte, dtype=np.float64), np.asarray(yte).astype(bool)
    mu1, mu0 = Xtr[ytr == 1].mean(0), Xtr[ytr == 0].mean(0)
    theta = mu1 - mu0
    s = np.einsum("n...d,...d->n...", Xte, theta)
    b = np.einsum("...d,...d->...", (mu1 + mu0) / 2, theta)
    yb = yte.reshape((-1,) + (1,) * (s.ndim - 1))
    return {"mm": ((s > 0) == yb).mean(0), "mm_thr": ((s > b) == yb).mean(0), "auroc": auroc(s, yte)}


def mm_cv(X, y, groups, k: int = 5, seed: int = 0) -> np.ndarray:
    """Grouped k-fold cross-validated accuracy of the thresholded mass-mean probe, vectorised over
    the middle axes of X (n, ..., d): for choosing a (layer, head) on training rows only."""
    X, y = np.asarray(X, dtype=np.float64), np.asarray(y)
    accs = []
    for fold in group_folds(groups, k, seed):
        tr = np.setdiff1d(np.arange(len(y)), fold)
        accs.append(mass_mean(X[tr], y[tr], X[fold], y[fold])["mm_thr"])
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
    attention, without nnsight's per-prompt overhead. Local models only."""
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
                hf(x, use_cache=False)
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
    (alpha = A_TT > eps), `resid` (n, L, d_model) the residual after each layer there."""

    layers: list[int]
    tag: np.ndarray
    notag: np.ndarray
    full: np.ndarray
    first_weight: np.ndarray
    self_weight: np.ndarray
    self_sink: np.ndarray
    resid: np.ndarray


def paper_features(model, prompts: Sequence[str], eps: float = 0.2, layers: Sequence[int] | None = None,
                   batch_size: int = 64, progress: bool = True) -> PaperFeatures:
    """z_tag, z_no tag and z at each prompt's last token (paper, via note; module docstring)."""
    from .sinks import check_eps

    eps = check_eps(eps)
    layers = list(range(model.n_layers)) if layers is None else sorted(set(int(l) for l in layers))
    n, L, H, dh = len(prompts), len(layers), model.n_heads, model.head_dim
    out = {k: np.zeros((n, L, H, dh), np.float32) for k in ("tag", "notag", "full")}
    first = np.zeros((n, L, H), np.float32)
    selfw = np.zeros((n, L, H), np.float32)
    selfs = np.zeros((n, L, H), bool)
    resid = np.zeros((n, L, model.d_model), np.float32)

    def on_batch(rows, ids, A, V, R):
        for j, l in enumerate(layers):
            a = A[l]  # (B, H, T, T)
            sink = received_paper(a) > eps  # (B, H, T)
            w = a[:, :, -1, :]  # the probed token's row
            wt = w * sink
            out["tag"][rows, j] = torch.einsum("bhk,bhkd->bhd", wt, V[l]).numpy()
            out["notag"][rows, j] = torch.einsum("bhk,bhkd->bhd", w - wt, V[l]).numpy()
            out["full"][rows, j] = torch.einsum("bhk,bhkd->bhd", w, V[l]).numpy()
            first[rows, j] = (wt[..., 0] / wt.sum(-1).clamp_min(1e-12)).numpy()
            selfw[rows, j] = (wt[..., -1] / wt.sum(-1).clamp_min(1e-12)).numpy()
            selfs[rows, j] = sink[..., -1].numpy()
            resid[rows, j] = R[l][:, -1].numpy()

    forward_batches(model, prompts, on_batch, layers, batch_size, progress)
    return PaperFeatures(layers, out["tag"], out["notag"], out["full"], first, selfw, selfs, resid)


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


def faithful_features(model, statements: Sequence[str], continuation: str, eps: float = 0.2,
                      layers: Sequence[int] | None = None, batch_size: int = 64,
                      progress: bool = True) -> FaithfulFeatures:
    """Feed statement + continuation, probe the last token; see the module docstring."""
    from .sinks import caught_by, check_eps, sinks_mask, stats_from_probs

    eps = check_eps(eps)
    if not continuation.startswith(" "):
        raise CatchtagError("the continuation must start with a space, so the statement's tokens stay as they are")
    prompts = [s + continuation for s in statements]
    bpos = boundary_positions(model, statements, prompts)
    if (bpos < 1).any():
        raise CatchtagError("a statement of one token leaves no non-sink token before its boundary")
    layers = list(range(model.n_layers)) if layers is None else sorted(set(int(l) for l in layers))
    n, L, H, dh, d = len(prompts), len(layers), model.n_heads, model.head_dim, model.d_model
    catch = np.zeros((n, L, H), np.int64)
    dsink = np.zeros((n, L, H), bool)
    vs = {k: np.zeros((n, L, H, dh), np.float32) for k in ("dot", "first", "other")}
    x = np.zeros((n, L, d), np.float32)
    xd = np.zeros((n, L, d), np.float32)

    def on_batch(rows, ids, A, V, R):
        rows = np.asarray(rows)
        p = torch.as_tensor(bpos[rows])
        B, T = ids.shape
        ar = torch.arange(B)
        # every layer, prompt and head at once: stats_from_probs takes any leading count of heads
        st = stats_from_probs(torch.stack([A[l] for l in layers]).reshape(-1, T, T))
        c = caught_by(st, eps)[:, -1].reshape(L, B, H)
        sk = sinks_mask(st, eps).reshape(L, B, H, T)
        catch[rows] = c.permute(1, 0, 2).numpy()
        dsink[rows] = sk.permute(1, 0, 2, 3)[ar, :, :, p].numpy()  # (B, L, H)
        for j, l in enumerate(layers):
            vs["dot"][rows, j] = V[l][ar, :, p].numpy()
            vs["first"][rows, j] = V[l][:, :, 0].numpy()
            vs["other"][rows, j] = V[l][ar, :, p - 1].numpy()
            x[rows, j] = R[l][:, -1].numpy()
            xd[rows, j] = R[l][ar, p].numpy()

    forward_batches(model, prompts, on_batch, layers, batch_size, progress)
    return FaithfulFeatures(layers, catch, dsink, vs["dot"], vs["first"], vs["other"], x, xd, bpos)


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
