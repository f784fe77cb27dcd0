"""Catch and tag: which queries a sink catches, what it writes into them, and how much of a head's
output its tags explain. Definitions: the book's [Definitions](definitions.md) page; (paper),
(paper, via note) and (ours) mark where each comes from.

- Caught (ours, from `catchtag.sinks`): query i is caught by sink s in head (l, h) when s is the
  largest entry of row i (i itself excluded) and A_is >= eps. A sink's *segment* is the set of
  queries it catches.
- Tag (paper, §1 and Fig. 1b): the sink's value vector v_s, per head, before W_O (paper, via note);
  t_s = W_O^h v_s is the same tag as it enters the head's output (`tag_vectors`). A caught token
  attends mostly to s, so its head output is close to A_is t_s.
- Tag subspace of a head: the span of its sinks' tags (all sinks of the head in that prompt).
- Explained variance, three ways (`value_space_ev`, `head_explained_variance`):
  * VE (paper, via note): ||A V U U^T||_F / ||A V||_F over the head's whole output (all T rows),
    in value space, U an orthonormal basis of the span of the head's sinks' value vectors; a ratio
    of norms, not centred;
  * VE^2: the same as a ratio of squared norms (a share of the output's energy);
  * EV (ours): ||P H||_F^2 / ||H||_F^2 with H the head outputs of the caught non-sink tokens,
    centred over them, P the projector on the W_O-space tag subspace. Centring removes the part
    shared by all caught tokens, so for a one-sink head it measures how the weight on the sink
    varies, not the tag itself.
  Baselines on the same rows and measure: the mean value direction, random non-sink tokens' values
  (as many as there are tags) and a random subspace of the value space of the same rank.
- Tag geometry (paper App. D, via note: tags are nearly orthogonal to each other and to token
  representations): `tag_geometry`.

Sinks and tags are prompt-specific (v_s depends on the sink token and its context), so every
measure is computed per prompt and pooled over prompts as a ratio of sums.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch

from .capture import Capture, per_head_project
from .errors import CatchtagError
from .models import Model
from .sinks import DEFAULT_EPS, SinkStats, check_eps, sink_stats, token_kind

# --------------------------------------------------------------------------------------------------
# Prompts: the corpus lives in `catchtag.prompts` (one module for every prompt the book uses);
# `prompts` and `PROMPTS` stay importable from here (tests/test_tags.py uses them).

from .prompts import STORIES as PROMPTS  # noqa: E402,F401
from .prompts import story_prompts as prompts  # noqa: E402,F401


# --------------------------------------------------------------------------------------------------
# Core linear algebra (other chapters rely on these names and signatures)


def tag_vectors(model: Model, cap: Capture, layer: int, positions=None) -> torch.Tensor:
    """(H, P, d_model): t = W_O^h v_p for every head h and each position p (default: all)."""
    v = cap.attn_inputs[layer].v  # (H, T, dh)
    if positions is not None:
        v = v[:, list(positions)]
    return per_head_project(model, layer, v)


def orthonormal_basis(vectors: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """(d, r) orthonormal basis of the span of the rows of `vectors` (n, d); r <= n."""
    vectors = torch.as_tensor(vectors, dtype=torch.float64)
    if vectors.numel() == 0:
        return torch.zeros(vectors.shape[-1], 0, dtype=torch.float64)
    u, s, _ = torch.linalg.svd(vectors.T, full_matrices=False)
    keep = s > rtol * s.max().clamp_min(1e-30)
    return u[:, keep]


def project(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Component of x (..., d) in the span of the orthonormal basis (d, r)."""
    b = basis.to(x.dtype)
    return (x @ b) @ b.T


def remove(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """x with its component in the span of the basis projected out."""
    return x - project(x, basis)


def explained_variance(outputs: torch.Tensor, basis: torch.Tensor) -> float:
    """EV = ||P H||_F^2 / ||H||_F^2 with H the rows of `outputs` (n, d) centred, P the projector
    on the basis. NaN when there are fewer than two rows or H is zero."""
    H = torch.as_tensor(outputs, dtype=torch.float64)
    if H.shape[0] < 2:
        return float("nan")
    H = H - H.mean(dim=0, keepdim=True)
    total = float((H**2).sum())
    if total == 0.0:
        return float("nan")
    return float((project(H, basis.to(H.dtype)) ** 2).sum()) / total


def _variance_sums(outputs: torch.Tensor, basis: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """Numerators and denominators of the EV variants for one head of one prompt (all but the PCA
    bound), and the centred rows Hc (n, d)."""
    X = torch.as_tensor(outputs, dtype=torch.float64)
    Hc = X - X.mean(dim=0, keepdim=True)
    b = basis.to(torch.float64)
    out = dict(
        num=float(((Hc @ b) ** 2).sum()),
        den=float((Hc**2).sum()),
        num_raw=float(((X @ b) ** 2).sum()),
        den_raw=float((X**2).sum()),
    )
    return out, Hc


def _top_eigen_sums(centred: list[torch.Tensor], ks: list[int]) -> list[float]:
    """For each centred matrix Hc (n_i, d): the sum of its k_i largest squared singular values, the
    variance of its top-k_i principal components. They are the eigenvalues of the small Gram
    matrices Hc Hc^T (n_i x n_i), zero-padded to one size and decomposed in one batched call (the
    padding only adds zero eigenvalues)."""
    if not centred:
        return []
    n = max(h.shape[0] for h in centred)
    G = torch.zeros(len(centred), n, n, dtype=torch.float64)
    for i, h in enumerate(centred):
        G[i, : h.shape[0], : h.shape[0]] = h @ h.T
    ev = torch.linalg.eigvalsh(G).flip(-1).clamp_min(0.0)
    return [float(ev[i, :k].sum()) if k > 0 else 0.0 for i, k in enumerate(ks)]


# --------------------------------------------------------------------------------------------------
# Per head, per prompt



def _as_list(caps) -> list[Capture]:
    if isinstance(caps, Capture):
        return [caps]
    caps = list(caps)
    if not caps:
        raise CatchtagError("no captures given: pass at least one Capture")
    return caps


def _stats_for(caps: list[Capture], stats) -> list[SinkStats]:
    if stats is None:
        return [sink_stats(c) for c in caps]
    stats = [stats] if isinstance(stats, SinkStats) else list(stats)
    if len(stats) != len(caps):
        raise CatchtagError(f"{len(stats)} SinkStats for {len(caps)} captures: pass one per capture")
    return stats


def head_tags(model: Model, cap: Capture, st: SinkStats, layer: int, eps: float = DEFAULT_EPS,
              _masks: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[dict]:
    """For each head of `layer` in one prompt: its sinks, their tags and the tokens they catch.

    Returns one dict per head: `head`, `sinks` (list of positions), `tags` (n_sinks, d_model),
    `caught` (T,) long (catching sink or -1), `members` (positions of caught non-sink tokens),
    `outputs` (T, d_model) the head outputs o_i, `token_tags` (T, d_model) W_O^h v_j of every
    token j (the sinks' rows are their tags).
    """
    return _layer_heads(model, cap, st, layer, eps, _masks)[0]


def _layer_heads(model: Model, cap: Capture, st: SinkStats, layer: int, eps: float = DEFAULT_EPS,
                 _masks=None, value_space: bool = False):
    """(`head_tags` list, the layer's tensors): the attention probabilities of the layer are
    computed once. The tensors: `outputs` and `token_tags` (H, T, d_model), `sinks` (H, T) bool,
    `caught` (H, T), and `X` = A V (H, T, dh) in float64 when `value_space` (for
    `value_space_ev`), else None. With `value_space` the float64 copies the tag chapter's
    measures share are made here once: `V` (H, T, dh), `outputs64` and `token_tags64`, and each
    head's dict has `outputs64` (its rows of `outputs64`)."""
    from .capture import attention_probs

    eps = check_eps(eps)
    li = st.layers.index(layer)
    all_sinks, all_caught = _masks if _masks is not None else (st.sinks(eps), st.caught(eps))
    sinks, caught = all_sinks[li], all_caught[li]
    ai = cap.attn_inputs[layer]
    A = attention_probs(ai)
    outs = per_head_project(model, layer, A @ ai.v)  # = capture.head_outputs
    tags = tag_vectors(model, cap, layer)
    layer_tensors = dict(outputs=outs, token_tags=tags, sinks=sinks, caught=caught, X=None)
    if value_space:
        V = ai.v.double()
        layer_tensors.update(X=A.double() @ V, V=V, outputs64=outs.double(), token_tags64=tags.double())
    res = []
    for h in range(model.n_heads):
        pos = torch.nonzero(sinks[h]).flatten().tolist()
        members = torch.nonzero((caught[h] >= 0) & ~sinks[h]).flatten().tolist()
        res.append(dict(head=h, sinks=pos, tags=tags[h, pos], caught=caught[h], members=members,
                        outputs=outs[h], token_tags=tags[h]))
        if value_space:
            res[-1]["outputs64"] = layer_tensors["outputs64"][h]
    return res, layer_tensors


def head_explained_variance(
    model: Model,
    caps: Capture | Sequence[Capture],
    eps: float = DEFAULT_EPS,
    layers: Sequence[int] | None = None,
    stats: Sequence[SinkStats] | None = None,
    min_caught: int = 2,
    per_prompt: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """EV (ours, centred): variance of each head's output explained by its tag subspace, over the
    caught tokens, in W_O space (the paper's own measure is `value_space_ev`).

    For every prompt, layer and head: H = head outputs o_i of the tokens caught by one of the head's
    sinks, sinks themselves excluded, centred over those tokens; P = projector on the span of the
    head's sink tags t_s = W_O^h v_s in that prompt. EV = ||P H||^2 / ||H||^2. A head counts in a
    prompt when it has at least one sink and at least `min_caught` caught non-sink tokens.

    Returns one row per (layer, head), pooled over prompts as a ratio of sums
    (sum_p ||P_p H_p||^2 / sum_p ||H_p||^2), with columns:

    - `ev`: the pooled EV above (NaN where the head never counts);
    - `ev_raw`: the same without centring (how much of the raw output lies along the tags);
    - `ev_pca`: the share of the centred variance of the top-k principal components, k = the number
      of tags (an upper bound for any k-dimensional subspace, for scale);
    - `n_tags`: the mean number of sinks (tags) over the prompts where the head counts;
    - `n_caught`: the total number of caught non-sink tokens over prompts;
    - `n_prompts`: the number of prompts where the head counts;
    - `ev_mean`: the unweighted mean over prompts of the per-prompt EV.

    With `per_prompt=True` the rows are per (prompt, layer, head) instead, with `prompt` added and
    `ev_mean` dropped. `caps` is one Capture or a list; `stats` (one SinkStats per capture) saves
    recomputing the sink statistics. `layers` defaults to every captured layer of the first capture.
    """
    from .progress import progress as progress_bar

    eps = check_eps(eps)
    caps = _as_list(caps)
    stats = _stats_for(caps, stats)
    if layers is None:
        layers = caps[0].layers
    layers = [int(l) for l in layers]
    for l in layers:
        model.check_layer_head(l)
        for c in caps:
            if l not in c.attn_inputs:
                raise CatchtagError(f"layer {l} was not captured: capture it (layers=None captures all)")
    rows = []
    bar = progress_bar(list(enumerate(zip(caps, stats))), "explained variance", enabled=progress)
    for p, (cap, st) in bar:
        masks = (st.sinks(eps), st.caught(eps))
        for layer in layers:
            rows += _ev_rows(head_tags(model, cap, st, layer, eps, masks), p, layer, min_caught)
    return _ev_table(rows, layers, model.n_heads, per_prompt)


def _ev_rows(heads: list[dict], p: int, layer: int, min_caught: int = 2, pca: bool = True) -> list[dict]:
    """`head_explained_variance`'s sums for one prompt and layer, from its `head_tags` (without
    `pca`, the PCA bound's numerator is NaN; a head's `outputs64`, where `_layer_heads` made it,
    stands for its `outputs`: the same numbers in float64)."""
    rows, centred, ks, counted = [], [], [], []
    for ht in heads:
        n_tags, members = len(ht["sinks"]), ht["members"]
        row = dict(prompt=p, layer=layer, head=ht["head"], n_tags=n_tags, n_caught=len(members))
        if n_tags == 0 or len(members) < max(2, min_caught):
            row.update(num=np.nan, den=np.nan, num_raw=np.nan, den_raw=np.nan, num_pca=np.nan)
        else:
            basis = orthonormal_basis(ht["tags"])
            sums, Hc = _variance_sums(ht.get("outputs64", ht["outputs"])[members], basis)
            row.update(sums, num_pca=np.nan)
            if pca:
                centred.append(Hc)
                ks.append(basis.shape[1])
                counted.append(row)
        rows.append(row)
    for row, v in zip(counted, _top_eigen_sums(centred, ks)):
        row["num_pca"] = v
    return rows


def _ev_table(rows: list[dict], layers: Sequence[int], n_heads: int, per_prompt: bool = False) -> pd.DataFrame:
    """`head_explained_variance`'s table from its per-(prompt, layer, head) sums."""
    df = pd.DataFrame(rows)
    with np.errstate(invalid="ignore", divide="ignore"):
        df["ev"] = df["num"] / df["den"]
        df["ev_raw"] = df["num_raw"] / df["den_raw"]
        df["ev_pca"] = df["num_pca"] / df["den"]
    if per_prompt:
        cols = ["prompt", "layer", "head", "ev", "ev_raw", "ev_pca", "n_tags", "n_caught"]
        return df[cols].reset_index(drop=True)
    ok = df[df["num"].notna()]
    g = ok.groupby(["layer", "head"])
    agg = pd.DataFrame(
        dict(
            ev=g["num"].sum() / g["den"].sum(),
            ev_raw=g["num_raw"].sum() / g["den_raw"].sum(),
            ev_pca=g["num_pca"].sum(min_count=1) / g["den"].sum(),
            n_tags=g["n_tags"].mean(),
            n_caught=g["n_caught"].sum(),
            n_prompts=g.size(),
            ev_mean=g["ev"].mean(),
        )
    )
    full = pd.MultiIndex.from_product([layers, range(n_heads)], names=["layer", "head"])
    agg = agg.reindex(full)
    agg["n_caught"] = agg["n_caught"].fillna(0).astype(int)
    agg["n_prompts"] = agg["n_prompts"].fillna(0).astype(int)
    agg["n_tags"] = agg["n_tags"].fillna(0.0)
    return agg.reset_index()[["layer", "head", "ev", "n_tags", "n_caught", "n_prompts", "ev_raw", "ev_pca", "ev_mean"]]


def ev_grid(table: pd.DataFrame, column: str = "ev") -> np.ndarray:
    """(layers, heads) array of a `head_explained_variance` column, for heatmaps (NaN = no sink)."""
    return table.pivot(index="layer", columns="head", values=column).to_numpy(dtype=float)


def ev_bands(table: pd.DataFrame, column: str = "ev") -> dict:
    """Share of the heads with an EV (NaN excluded) below 20%, in [20%, 40%], in (40%, 70%] and
    above 70%, plus their number and the median: the bands of the paper's §3.2 sentence."""
    ev = table[column].dropna().to_numpy()
    if ev.size == 0:
        return dict(n_heads=0, below_20=np.nan, from_20_to_40=np.nan, from_40_to_70=np.nan, above_70=np.nan, median=np.nan)
    return dict(
        n_heads=int(ev.size),
        below_20=float((ev < 0.2).mean()),
        from_20_to_40=float(((ev >= 0.2) & (ev <= 0.4)).mean()),
        from_40_to_70=float(((ev > 0.4) & (ev <= 0.7)).mean()),
        above_70=float((ev > 0.7).mean()),
        median=float(np.median(ev)),
    )


# --------------------------------------------------------------------------------------------------
# Tag cosines and PCA


def tag_cosines(model: Model, cap: Capture, st: SinkStats, layer: int, eps: float = DEFAULT_EPS,
                heads: Sequence[int] | None = None, _masks=None, seed: int = 0, prompt: int = 0,
                _layer: dict | None = None) -> pd.DataFrame:
    """One row per (head, sink, query): cos(o_i, t_s) for every non-sink query i after sink s,
    and whether s catches i. Columns: layer, head, sink, query, caught, cos, cos_other (A_is is
    not stored; `caught` is the book's definition). Rows in the order head, sink, query.

    `cos_other` is the baseline (ours): cos(o_i, t_j), t_j = W_O^h v_j the value of another token
    of the same head, j drawn at random for each row among the head's non-sink tokens j >= 1,
    j != i (NaN when there is no such token). If the head's outputs lean on the sink's value and
    not on what every value of the head shares, cos exceeds cos_other on the caught rows. The
    draws are fixed by (`seed`, `prompt`, `layer`)."""
    L = _layer if _layer is not None else _layer_heads(model, cap, st, layer, eps, _masks)[1]
    S, C = L["sinks"].numpy(), L["caught"].numpy()
    H, T = S.shape
    hp, sp = np.nonzero(S)  # (head, sink) pairs, head-major
    if heads is not None:
        keep = np.isin(hp, list(heads))
        hp, sp = hp[keep], sp[keep]
    if not len(hp):
        return _cosine_frame([])
    O = L["outputs64"] if "outputs64" in L else L["outputs"].double()  # (H, T, d)
    Tt = L["token_tags64"] if "token_tags64" in L else L["token_tags"].double()  # (H, T, d): the tag of every token
    # cosines as dot products over the two norms (floored at 1e-12), so the (H, T, d) tables are
    # not normalised as a whole
    o_norm, t_norm = O.norm(dim=-1).clamp_min(1e-12), Tt.norm(dim=-1).clamp_min(1e-12)  # (H, T)
    # cos(t_s, o_i) for every pair and token: each head's unit sink tags (padded to the most sinks
    # of a head) against that head's outputs, one batched product
    slot = np.arange(len(hp)) - np.searchsorted(hp, hp)  # the pair's index among its head's sinks
    hp_t, sp_t = torch.as_tensor(hp), torch.as_tensor(sp)
    picked = torch.zeros(H, int(slot.max()) + 1, Tt.shape[-1], dtype=torch.float64)
    picked[hp_t, torch.as_tensor(slot)] = Tt[hp_t, sp_t] / t_norm[hp_t, sp_t, None]
    cos_pairs = ((picked @ O.transpose(1, 2))[hp_t, torch.as_tensor(slot)] / o_norm[hp_t]).numpy()  # (pairs, T)
    pi, query = np.nonzero((np.arange(T)[None, :] > sp[:, None]) & ~S[hp])  # later non-sink queries
    head, sink = hp[pi], sp[pi]
    # baseline: another non-sink token j >= 1 of the same head, j != i, uniformly at random
    cand = ~S
    cand[:, 0] = False
    n_cand = cand.sum(axis=1)[head]
    order = np.argsort(~cand, axis=1, kind="stable")  # each head's candidates first, ascending
    rank = np.cumsum(cand, axis=1) - 1  # a candidate's index among its head's candidates
    rng = np.random.default_rng([int(seed), int(prompt), int(layer)])
    r = np.floor(rng.random(len(query)) * np.maximum(n_cand - 1, 1)).astype(int)
    j = order[head, r + (r >= rank[head, query])]  # skip the query itself
    d = O.shape[-1]  # rows gathered from the flattened (H * T, d) tables: index_select is cheaper
    rows_o, rows_t = (torch.as_tensor(head * T + x) for x in (query, j))
    other = ((O.reshape(-1, d).index_select(0, rows_o) * Tt.reshape(-1, d).index_select(0, rows_t)).sum(-1)
             / (o_norm.reshape(-1)[rows_o] * t_norm.reshape(-1)[rows_t])).numpy()
    other[n_cand < 2] = np.nan
    return _cosine_frame([pd.DataFrame(dict(layer=layer, head=head, sink=sink, query=query,
                                            caught=C[head, query] == sink, cos=cos_pairs[pi, query],
                                            cos_other=other))])


_COSINE_COLUMNS = ["layer", "head", "sink", "query", "caught", "cos", "cos_other"]


def _cosine_frame(parts: list[pd.DataFrame], prompt_column: bool = False) -> pd.DataFrame:
    """The non-empty `parts` stacked, `caught` as bool; an empty table with the columns if none."""
    cols = (["prompt"] if prompt_column else []) + _COSINE_COLUMNS
    parts = [x for x in parts if len(x)]
    if not parts:
        out = pd.DataFrame({c: pd.Series(dtype=float) for c in cols})
        out["caught"] = out["caught"].astype(bool)
        return out
    out = pd.concat(parts, ignore_index=True)[cols]
    out["caught"] = out["caught"].astype(bool)
    return out


def tag_cosine_table(model: Model, caps, eps: float = DEFAULT_EPS, stats=None, layers=None,
                     progress: bool = True, seed: int = 0) -> pd.DataFrame:
    """`tag_cosines` over prompts and layers, with a `prompt` column (`seed`: the baseline's draws)."""
    from .progress import progress as progress_bar

    caps = _as_list(caps)
    stats = _stats_for(caps, stats)
    layers = caps[0].layers if layers is None else list(layers)
    parts = []
    for p, (cap, st) in progress_bar(list(enumerate(zip(caps, stats))), "tag cosines", enabled=progress):
        masks = (st.sinks(eps), st.caught(eps))
        for l in layers:
            t = tag_cosines(model, cap, st, l, eps, _masks=masks, seed=seed, prompt=p)
            t.insert(0, "prompt", p)
            parts.append(t)
    return _cosine_frame(parts, prompt_column=True)


def pca_by_sink(model: Model, cap: Capture, st: SinkStats, layer: int, head: int,
                eps: float = DEFAULT_EPS) -> dict:
    """Head outputs of the non-sink tokens (position 0 excluded) of one head in the plane of their
    top two principal components (centred), labelled by the sink that catches each token.

    Returns `xy` (n, 2) token coordinates, `positions`, `tokens`, `label` (catching sink or -1),
    `sinks` (the head's sink positions), `tag_xy` (n_sinks, 2) the tags t_s projected on the two
    components (directions, to draw as arrows), `origin_xy` (2,) where the zero vector lands in
    the plane (the arrows' foot), and `explained` (the share of the variance in the two components).
    """
    ht = head_tags(model, cap, st, layer, eps)[head]
    sinks = ht["sinks"]
    pos = [i for i in range(1, len(cap.tokens)) if i not in sinks]
    X = ht["outputs"][pos].double()
    mu = X.mean(dim=0, keepdim=True)
    _, s, vt = torch.linalg.svd(X - mu, full_matrices=False)
    V = vt[:2].T
    xy = (X - mu) @ V
    tag_dir = ht["tags"].double() @ V  # linear part only: directions in the plane
    return dict(
        xy=xy.numpy(), positions=pos, label=ht["caught"][pos].numpy(), sinks=sinks,
        tag_xy=tag_dir.numpy(), origin_xy=(-mu @ V).numpy()[0],
        explained=float((s[:2] ** 2).sum() / (s**2).sum()), tokens=[cap.tokens[i] for i in pos],
    )


# --------------------------------------------------------------------------------------------------
# Catch: segments


def _runs(positions: list[int]) -> list[int]:
    """Lengths of the runs of consecutive integers in a sorted list."""
    runs, prev = [], None
    for p in positions:
        if prev is not None and p == prev + 1:
            runs[-1] += 1
        else:
            runs.append(1)
        prev = p
    return runs


def segment_table(stats: SinkStats | Sequence[SinkStats], eps: float = DEFAULT_EPS) -> pd.DataFrame:
    """One row per (prompt, layer, head, sink) with the sink's segment (the queries it catches).

    Columns: prompt, layer, head, position, token, kind, received (alpha), n_caught, n_visible
    (the non-sink queries after the sink that could be caught), share (n_caught / n_visible),
    n_runs (runs of consecutive caught queries), longest_run, first_caught, last_caught.
    """
    eps = check_eps(eps)
    stats = [stats] if isinstance(stats, SinkStats) else list(stats)
    rows = []
    for p, st in enumerate(stats):
        sinks = st.sinks(eps).numpy()
        caught = st.caught(eps).numpy()
        received = st.received.numpy()
        nonsink = ~sinks
        # later non-sink queries of each key: sum over i > k of nonsink[..., i]
        after = np.flip(np.cumsum(np.flip(nonsink, -1), -1), -1) - nonsink
        for li, layer in enumerate(st.layers):
            for h, k in zip(*(x.tolist() for x in np.nonzero(sinks[li]))):
                members = np.nonzero((caught[li, h] == k) & nonsink[li, h])[0].tolist()
                visible = int(after[li, h, k])
                runs = _runs(members)
                rows.append(dict(
                    prompt=p, layer=layer, head=h, position=k, token=st.tokens[k],
                    kind=token_kind(st.tokens[k], k), received=float(received[li, h, k]),
                    n_caught=len(members), n_visible=visible,
                    share=len(members) / visible if visible else np.nan,
                    n_runs=len(runs), longest_run=max(runs) if runs else 0,
                    first_caught=members[0] if members else -1, last_caught=members[-1] if members else -1,
                ))
    cols = ["prompt", "layer", "head", "position", "token", "kind", "received", "n_caught", "n_visible",
            "share", "n_runs", "longest_run", "first_caught", "last_caught"]
    return pd.DataFrame(rows, columns=cols)


def catch_by_layer(stats: Sequence[SinkStats], eps: float = DEFAULT_EPS) -> pd.DataFrame:
    """Per layer: the share of (query, head) pairs caught by the first token, caught by another
    sink, or not caught (queries 1..T-1, every head, every prompt), and the mean number of sinks
    of each kind per head."""
    eps = check_eps(eps)
    stats = [stats] if isinstance(stats, SinkStats) else list(stats)
    acc: dict[int, np.ndarray] = {}
    for st in stats:
        c = st.caught(eps)[:, :, 1:]  # (L, H, T-1)
        for li, layer in enumerate(st.layers):
            cl = c[li]
            a = acc.setdefault(layer, np.zeros(3))
            a += [(cl == 0).sum().item(), (cl > 0).sum().item(), (cl < 0).sum().item()]
    rows = []
    for layer, (first, other, none) in sorted(acc.items()):
        n = first + other + none
        rows.append(dict(layer=layer, caught_first=first / n, caught_other=other / n, not_caught=none / n))
    return pd.DataFrame(rows)


def token_catch_summary(st: SinkStats, eps: float = DEFAULT_EPS, layers: Sequence[int] | None = None) -> pd.DataFrame:
    """Per token of one prompt, summarised over the heads of `layers` (default all): the share of
    heads where it is caught by the first token, by another sink, not caught, the share where it
    is itself a sink, and the non-first sink that catches it most often (-1 when none)."""
    eps = check_eps(eps)
    idx = [st.layers.index(l) for l in (layers if layers is not None else st.layers)]
    c = st.caught(eps)[idx].reshape(-1, len(st.tokens))  # (L*H, T)
    s = st.sinks(eps)[idx].reshape(-1, len(st.tokens))
    rows = []
    for i, tok in enumerate(st.tokens):
        col = c[:, i]
        other = col[col > 0]
        modal = int(torch.mode(other).values) if other.numel() else -1
        rows.append(dict(position=i, token=tok, caught_first=float((col == 0).double().mean()),
                         caught_other=float((col > 0).double().mean()), not_caught=float((col < 0).double().mean()),
                         is_sink=float(s[:, i].double().mean()), modal_other_sink=modal))
    return pd.DataFrame(rows)




# --------------------------------------------------------------------------------------------------
# Explained variance in value space: the paper's norm ratio and its baselines

EV_MEASURES = ("tags", "mean_value", "random_token", "random_subspace")


def _norm_parts(X: torch.Tensor, U: torch.Tensor) -> float:
    """||X U U^T||_F^2 for rows X (n, dh) and an orthonormal basis U (dh, r)."""
    return float(((X @ U) ** 2).sum()) if U.shape[1] else 0.0


def value_space_ev(
    model: Model,
    caps: Capture | Sequence[Capture],
    eps: float = DEFAULT_EPS,
    stats: Sequence[SinkStats] | None = None,
    layers: Sequence[int] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """The paper's explained variance (paper, via note) and its baselines, per (layer, head).

    For each prompt, layer and head with at least one sink: X = A V (T, dh), the head's whole
    output in value space (every row, first token included); U_tags = orthonormal basis of the
    span of the sinks' value vectors v_s (rank r). For each basis U the numerator is
    ||X U U^T||_F^2 and the denominator ||X||_F^2. Bases (`EV_MEASURES`):

    - `tags`: the sinks' value vectors (rank r);
    - `mean_value`: the mean value vector of the prompt's tokens in that head (rank 1);
    - `random_token`: the values of r non-sink tokens (positions >= 1) drawn at random;
    - `random_subspace`: r Gaussian directions of the value space R^dh.

    Pooled over prompts as ratios of sums: `ve_<measure>` = sqrt(sum num / sum den) (the paper's
    ratio of norms; equal to the per-prompt ratio with one prompt) and `ve2_<measure>` = sum num /
    sum den (the squared version, a share of the output's energy). Also `n_tags` (mean over the
    prompts where the head has a sink), `n_prompts`. Heads that never have a sink are NaN.
    Random draws come from `seed` (same seed, same numbers). Under grouped-query attention the
    query heads that share a kv head share V (`model.n_kv_heads`), so their value spaces coincide.
    """
    from .progress import progress as progress_bar
    from .capture import attention_probs

    eps = check_eps(eps)
    caps = _as_list(caps)
    stats = _stats_for(caps, stats)
    layers = caps[0].layers if layers is None else [int(l) for l in layers]
    rows = []
    for p, (cap, st) in progress_bar(list(enumerate(zip(caps, stats))), "value-space EV", enabled=progress):
        sinks_all = st.sinks(eps)
        for layer in layers:
            if layer not in cap.attn_inputs:
                raise CatchtagError(f"layer {layer} was not captured: capture it (layers=None captures all)")
            ai = cap.attn_inputs[layer]
            X = attention_probs(ai).double() @ ai.v.double()  # (H, T, dh)
            rows += _ve_rows(ai.v.double(), X, sinks_all[st.layers.index(layer)], seed, p, layer)
    return _ve_table(rows, layers, model.n_heads)


def _ve_rows(V: torch.Tensor, X: torch.Tensor, sk: torch.Tensor, seed: int, p: int, layer: int) -> list[dict]:
    """`value_space_ev`'s sums for one prompt and layer: V (H, T, dh) values, X = A V (H, T, dh),
    sk (H, T) the sink mask."""
    rows = []
    for h in range(X.shape[0]):
        pos = torch.nonzero(sk[h]).flatten().tolist()
        if not pos:
            continue
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + p * 10_007 + layer * 101 + h)
        Ut = orthonormal_basis(V[h, pos])
        r = Ut.shape[1]
        others = [i for i in range(1, V.shape[1]) if i not in pos]
        if len(others) >= r:
            pick = torch.randperm(len(others), generator=gen)[:r].tolist()
            Ur = orthonormal_basis(V[h, [others[i] for i in pick]])
        else:
            Ur = torch.zeros(V.shape[-1], 0, dtype=torch.float64)
        G = torch.randn(V.shape[-1], r, generator=gen, dtype=torch.float64)
        bases = dict(tags=Ut, mean_value=orthonormal_basis(V[h].mean(0, keepdim=True)),
                     random_token=Ur, random_subspace=torch.linalg.qr(G)[0])
        row = dict(prompt=p, layer=layer, head=h, n_tags=len(pos), den=float((X[h] ** 2).sum()))
        row.update({f"num_{k}": _norm_parts(X[h], U) for k, U in bases.items()})
        if not Ur.shape[1]:
            row["num_random_token"] = np.nan
        rows.append(row)
    return rows


def _ve_table(rows: list[dict], layers: Sequence[int], n_heads: int) -> pd.DataFrame:
    """`value_space_ev`'s table from its per-(prompt, layer, head) sums."""
    cols = ["prompt", "layer", "head", "n_tags", "den"] + [f"num_{k}" for k in EV_MEASURES]
    df = pd.DataFrame(rows, columns=cols)
    full = pd.MultiIndex.from_product([layers, range(n_heads)], names=["layer", "head"])
    g = df.groupby(["layer", "head"])
    out = pd.DataFrame(index=full)
    for k in EV_MEASURES:
        out[f"ve2_{k}"] = (g[f"num_{k}"].sum(min_count=1) / g["den"].sum()).reindex(full)
        out[f"ve_{k}"] = np.sqrt(out[f"ve2_{k}"])
    out["n_tags"] = g["n_tags"].mean().reindex(full).fillna(0.0)
    out["n_prompts"] = g.size().reindex(full).fillna(0).astype(int)
    return out.reset_index()


def ev_summary(table: pd.DataFrame) -> dict:
    """Medians of every `ve_*`/`ve2_*` column of `value_space_ev` (and of `ev`, `ev_raw` of
    `head_explained_variance` if present) over the heads that have a value, keyed
    `<column>_median`; `n_ve_heads` counts heads with a VE; `ve_share_20_40` / `ve_share_above_70`: the
    share of those heads whose paper VE lies in the paper's 20%–40% band / above 70%."""
    out = {}
    for c in table.columns:
        if c.startswith(("ve_", "ve2_")) or c in ("ev", "ev_raw"):
            x = table[c].dropna()
            out[f"{c}_median"] = float(x.median()) if len(x) else float("nan")
    ve = table["ve_tags"].dropna() if "ve_tags" in table else pd.Series(dtype=float)
    out["n_ve_heads"] = int(len(ve))
    out["ve_share_20_40"] = float(((ve >= 0.2) & (ve <= 0.4)).mean()) if len(ve) else float("nan")
    out["ve_share_above_70"] = float((ve > 0.7).mean()) if len(ve) else float("nan")
    return out


# --------------------------------------------------------------------------------------------------
# Tag geometry (paper App. D, via note)


def tag_geometry(
    model: Model,
    caps: Capture | Sequence[Capture],
    eps: float = DEFAULT_EPS,
    stats: Sequence[SinkStats] | None = None,
    noop_ratio: float = 0.25,
    progress: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Cosines between tags, and between tags and token representations, and no-op sinks.

    Tags are taken where they enter the residual stream, r_s = `to_residual`(W_O^h v_s) (Gemma:
    times the post-attention norm's gain; the per-position rms does not change a direction), so
    tags of different heads and layers can be compared. Returns (pairs, sinks):

    - `pairs`: one row per pair of sinks of one prompt with columns prompt, kind, cos (residual
      stream), cos_wo (the same before the post-attention norm's gain: W_O^h v_s), where kind
      is "same head" (two sinks of one head; also `cos_value`, the cosine of the value vectors, the
      paper's tags), "same layer" (two heads of one layer that read different kv heads; query heads
      sharing a kv head have identical value spaces and are skipped) or "across layers";
    - `sinks`: one row per (prompt, layer, head, sink) with `position`, `kind` (token kind),
      `value_ratio` = ||W_O^h v_s|| / median_j ||W_O^h v_j|| over the prompt's non-sink tokens
      j >= 1 of that head, `noop` = value_ratio < `noop_ratio` (a sink that writes almost nothing:
      a "no-op"; otherwise it broadcasts its tag), and `cos_tokens` = the median |cos(r_s, x_i)|
      over the representations x_i entering the layer (residual stream after layer l - 1, tokens
      i >= 1; NaN for layer 0 or without `resid_post`).

    Cosines of random directions in d_model dimensions are about 1/sqrt(d_model) in size
    (`random_abs_cos`).
    """
    from .progress import progress as progress_bar

    eps = check_eps(eps)
    caps = _as_list(caps)
    stats = _stats_for(caps, stats)
    pair_rows, sink_rows = [], []
    for p, (cap, st) in progress_bar(list(enumerate(zip(caps, stats))), "tag geometry", enabled=progress):
        sk = st.sinks(eps)
        acc = ([], [], [])
        for li, layer in enumerate(st.layers):
            _geometry_layer(model, cap, sk[li], layer, p, noop_ratio, sink_rows, acc)
        pair_rows += _geometry_pairs(p, *acc)
    return _geometry_frames(pair_rows, sink_rows)


def _geometry_layer(model: Model, cap: Capture, sk: torch.Tensor, layer: int, p: int, noop_ratio: float,
                    sink_rows: list, acc: tuple, wo_all: torch.Tensor | None = None) -> None:
    """`tag_geometry`'s work on one layer of prompt `p` (sk: the layer's (H, T) sink mask):
    appends its sinks' rows to `sink_rows` and their unit tags (residual stream, before the
    norm's gain) and (layer, head, kv head, position, value) to the three lists of `acc`.
    `wo_all` (H, T, d) float64 = W_O^h v_j of every token, when the caller already has it."""
    from .capture import to_residual

    vecs, wos, meta = acc
    group = model.n_heads // model.n_kv_heads
    ai = cap.attn_inputs[layer]
    T = ai.v.shape[1]
    if wo_all is None:
        wo_all = per_head_project(model, layer, ai.v).double()  # (H, T, d): W_O^h v_j
    t_all = to_residual(model, layer, wo_all)  # (H, T, d): as it enters the residual stream
    norms = t_all.norm(dim=-1)  # (H, T)
    x = None
    if cap.resid_post is not None and layer > 0:
        x = cap.resid_post[layer - 1, 1:].double()
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    for h in range(model.n_heads):
        pos = torch.nonzero(sk[h]).flatten().tolist()
        rest = [i for i in range(1, T) if i not in pos]
        ref = float(norms[h, rest].median()) if rest else float("nan")
        for s in pos:
            r = t_all[h, s] / norms[h, s].clamp_min(1e-12)
            ct = float((x @ r).abs().median()) if x is not None else float("nan")
            ratio = float(norms[h, s]) / ref if ref > 0 else float("nan")
            sink_rows.append(dict(prompt=p, layer=layer, head=h, position=s,
                                  kind=token_kind(cap.tokens[s], s), value_ratio=ratio,
                                  noop=bool(ratio < noop_ratio), cos_tokens=ct))
            vecs.append(r)
            wos.append(wo_all[h, s] / wo_all[h, s].norm().clamp_min(1e-12))
            meta.append((layer, h, h // group, s, ai.v[h, s].double()))


def _geometry_pairs(p: int, vecs: list, wos: list, meta: list) -> list[pd.DataFrame]:
    """`tag_geometry`'s pair rows of prompt `p` from the lists `_geometry_layer` filled."""
    pair_rows = []
    if len(vecs) < 2:
        return pair_rows
    R = torch.stack(vecs)
    C = (R @ R.T).numpy()
    W = torch.stack(wos)
    Cw = (W @ W.T).numpy()
    L_, H_, K_ = (np.array([x[i] for x in meta]) for i in range(3))
    iu, ju = np.triu_indices(len(meta), k=1)
    same_layer = L_[iu] == L_[ju]
    same_head = same_layer & (H_[iu] == H_[ju])
    for kind, sel in (("same head", same_head), ("same layer", same_layer & ~same_head & (K_[iu] != K_[ju])),
                      ("across layers", ~same_layer)):
        ia, ib = iu[sel], ju[sel]
        cv = np.full(len(ia), np.nan)
        if kind == "same head" and len(ia):
            va = torch.stack([meta[i][4] for i in ia])
            vb = torch.stack([meta[i][4] for i in ib])
            cv = ((va * vb).sum(-1) / (va.norm(dim=-1) * vb.norm(dim=-1)).clamp_min(1e-12)).numpy()
        pair_rows.append(pd.DataFrame(dict(prompt=p, kind=kind, cos=C[ia, ib], cos_wo=Cw[ia, ib], cos_value=cv)))
    return pair_rows


def _geometry_frames(pair_rows: list, sink_rows: list) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`tag_geometry`'s (pairs, sinks) tables from its rows."""
    cols = ["prompt", "kind", "cos", "cos_wo", "cos_value"]
    pairs = pd.concat(pair_rows, ignore_index=True)[cols] if pair_rows else pd.DataFrame(columns=cols)
    sinks = pd.DataFrame(sink_rows, columns=["prompt", "layer", "head", "position", "kind", "value_ratio",
                                             "noop", "cos_tokens"])
    return pairs, sinks


def random_abs_cos(d: int, n: int = 20000, seed: int = 0) -> float:
    """Median |cos| between pairs of independent Gaussian directions in d dimensions (about
    0.674 / sqrt(d)): the scale against which 'nearly orthogonal' is read."""
    g = torch.Generator().manual_seed(int(seed))
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    b = torch.randn(n, d, generator=g, dtype=torch.float64)
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    return float(cos.abs().median())


def geometry_summary(pairs: pd.DataFrame, sinks: pd.DataFrame) -> dict:
    """Medians of |cos| by pair kind (`cos_same_head`, `cos_value_same_head`, `cos_same_layer`,
    `cos_across_layers`, and `cos_wo_*` before the post-attention norm's gain), `cos_tokens` (median over sinks), and the share of no-op sinks among
    first-token sinks (`noop_first`) and the others (`noop_other`), with their counts."""
    out = {}
    for kind, key in (("same head", "same_head"), ("same layer", "same_layer"), ("across layers", "across_layers")):
        sel = pairs[pairs.kind == kind]
        out[f"cos_{key}"] = float(sel.cos.abs().median()) if len(sel) else float("nan")
        out[f"cos_wo_{key}"] = float(sel.cos_wo.abs().median()) if len(sel) else float("nan")
        out[f"n_{key}"] = int(len(sel))
    sel = pairs[pairs.kind == "same head"]
    out["cos_value_same_head"] = float(sel.cos_value.abs().median()) if len(sel) else float("nan")
    out["cos_tokens"] = float(sinks.cos_tokens.median()) if sinks.cos_tokens.notna().any() else float("nan")
    first = sinks[sinks.kind == "first"]
    other = sinks[sinks.kind != "first"]
    out["noop_first"] = float(first.noop.mean()) if len(first) else float("nan")
    out["noop_other"] = float(other.noop.mean()) if len(other) else float("nan")
    out["n_first_sinks"], out["n_other_sinks"] = int(len(first)), int(len(other))
    return out


# --------------------------------------------------------------------------------------------------
# The chapter's example head and its tag plane


def two_sink_head(seg: pd.DataFrame):
    """From a `segment_table`: the (prompt, layer, head, [s1, s2]) where two sinks of one head catch
    the most tokens (the smaller of the two segments as large as possible), or None."""
    seg = seg[seg.n_caught > 0]
    best = None
    for (p, l, h), g in seg.groupby(["prompt", "layer", "head"]):
        if len(g) < 2:
            continue
        top = g.sort_values("n_caught", ascending=False).head(2)
        score = int(top.n_caught.min())
        if best is None or score > best[0]:
            best = (score, int(p), int(l), int(h), [int(x) for x in top.position])
    return None if best is None else best[1:]


def tag_plane(tags: torch.Tensor, outputs: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates of `outputs` (T, d) and of two `tags` (2, d) in the plane the tags span, with
    axes made orthonormal (QR) and each tag on the positive side of its own axis (paper Fig. 1b)."""
    t = tags.double()
    Q, R = torch.linalg.qr(t.T)
    Q = Q * torch.sign(torch.diagonal(R))
    return (outputs.double() @ Q).numpy(), (t @ Q).numpy()


# --------------------------------------------------------------------------------------------------
# Verdict (the strings of catchtag.book.reproduction.VERDICTS)

REPRODUCED, PARTLY, NOT_REPRODUCED, OFFLINE = "reproduced", "partly", "not reproduced", "not testable offline"


def cosine_summary(cos: pd.DataFrame) -> dict:
    """Medians of cos(o_i, t_s) (`tag_cosine_table`) for caught and not caught tokens, all sinks
    and non-first sinks only: cos_caught, cos_not, cos_caught_other, cos_not_other; with a
    `cos_other` column also `cos_other_value`, the baseline's median over the caught rows
    (cos(o_i, t_j) for another token j of the same head)."""
    first = cos.sink == 0

    def med(sel, column="cos"):
        x = cos[column][sel].dropna()
        return float(x.median()) if len(x) else float("nan")

    out = dict(cos_caught=med(cos.caught), cos_not=med(~cos.caught),
               cos_caught_other=med(cos.caught & ~first), cos_not_other=med(~cos.caught & ~first))
    if "cos_other" in cos:
        out["cos_other_value"] = med(cos.caught, "cos_other")
    return out


def cluster_median_interval(values, groups, n_boot: int = 1000, level: float = 0.95, seed: int = 0,
                            resolution: float = 1e-3) -> tuple[float, float, float]:
    """(median, low, high): the median of `values` pooled over every group, and its percentile
    bootstrap interval resampling whole groups (prompts: the independent units) with replacement.

    Each resample's median is read from a histogram of `resolution`-wide bins (the bin's centre),
    so the bounds are exact to resolution / 2; the median itself is exact. NaN values are dropped;
    with fewer than two groups the bounds are NaN. `seed` fixes the draws."""
    v = np.asarray(values, dtype=float)
    g = np.asarray(groups)
    keep = ~np.isnan(v)
    v, g = v[keep], g[keep]
    nan = float("nan")
    if v.size == 0:
        return nan, nan, nan
    med = float(np.median(v))
    labels, gi = np.unique(g, return_inverse=True)
    if len(labels) < 2:
        return med, nan, nan
    lo_edge = np.floor(v.min() / resolution) * resolution
    n_bins = int(np.ceil((v.max() - lo_edge) / resolution)) + 1
    bins = np.minimum(((v - lo_edge) / resolution).astype(int), n_bins - 1)
    hist = np.zeros((len(labels), n_bins))
    np.add.at(hist, (gi, bins), 1.0)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(labels), size=(n_boot, len(labels)))
    counts = np.zeros((n_boot, len(labels)))
    np.add.at(counts, (np.arange(n_boot)[:, None], draws), 1.0)
    cum = np.cumsum(counts @ hist, axis=1)  # (n_boot, n_bins)
    idx = (cum >= cum[:, -1:] / 2).argmax(axis=1)
    lo, hi = np.quantile(lo_edge + (idx + 0.5) * resolution, [(1 - level) / 2, (1 + level) / 2])
    return med, float(lo), float(hi)


def cosine_intervals(cos: pd.DataFrame, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """95% intervals (`cluster_median_interval`, resampling prompts) of the medians of a
    `tag_cosine_table` with a `prompt` column: `cos_caught_lo/_hi`, `cos_not_lo/_hi`,
    `cos_other_value_lo/_hi` (the baseline on the caught rows), and the paired difference on the
    caught rows, `cos_minus_other` = median of cos - cos_other, with `cos_minus_other_lo/_hi`."""
    caught = cos[cos.caught]
    parts = dict(cos_caught=(caught.cos, caught.prompt), cos_not=(cos.cos[~cos.caught], cos.prompt[~cos.caught]),
                 cos_other_value=(caught.cos_other, caught.prompt),
                 cos_minus_other=(caught.cos - caught.cos_other, caught.prompt))
    out = {}
    for key, (v, g) in parts.items():
        m, lo, hi = cluster_median_interval(v, g, n_boot, level, seed)
        if key == "cos_minus_other":
            out[key] = m
        out[f"{key}_lo"], out[f"{key}_hi"] = lo, hi
    return out


def verdict_tag_direction(per_model: dict, min_cos: float = 0.5, min_gap: float = 0.2) -> str:
    """The verdict on "caught tokens point along their sink's tag" (paper Fig. 1b).

    `per_model`: {model: (median cos caught, median cos not caught)}. A model agrees when the
    caught median is at least `min_cos` and exceeds the not-caught median by at least `min_gap`.
    "reproduced" when every model agrees, "partly" when some do, "not reproduced" when none does.
    """
    if not per_model:
        raise CatchtagError("verdict_tag_direction needs at least one model's cosines")
    ok = [c >= min_cos and c - n >= min_gap for c, n in per_model.values()]
    return REPRODUCED if all(ok) else PARTLY if any(ok) else NOT_REPRODUCED


# --------------------------------------------------------------------------------------------------
# The tag chapter: every measure of one model, the quantities it reports, its figure's head


def tag_measures(model: Model, caps: Sequence[Capture], eps: float = DEFAULT_EPS, seed: int = 0,
                 noop_ratio: float = 0.25, progress: bool = False) -> dict:
    """Every measure of the tag chapter on one model's captures (all layers, with `resid_post`):

    - `stats`: `sinks.sink_stats` of each capture (the census rule at its default cut-off);
    - `cos`: `tag_cosine_table` (cos(head output, tag) per (token, sink), with the baseline);
    - `ve`: `value_space_ev` (the paper's VE and its baselines; `seed` fixes the random ones);
    - `ev`: `head_explained_variance` (ours, centred), without its PCA bound (`ev_pca` NaN: the
      chapter does not show it, and it costs one eigendecomposition per head);
    - `geometry`: `tag_geometry` ((pairs, sinks); `noop_ratio` for no-op sinks);
    - `seg`: `segment_table` (the segments, for the figure's head)."""
    from .progress import progress as progress_bar

    eps = check_eps(eps)
    caps = _as_list(caps)
    stats = [sink_stats(c) for c in caps]
    layers = caps[0].layers
    cos, ev, ve, pair_rows, sink_rows = [], [], [], [], []
    # one pass: each layer's attention, head outputs, tags and their float64 copies are computed
    # once for the four measures (the same numbers as tag_cosine_table, head_explained_variance,
    # value_space_ev and tag_geometry)
    for p, (cap, st) in progress_bar(list(enumerate(zip(caps, stats))), "tag measures", enabled=progress):
        masks = (st.sinks(eps), st.caught(eps))
        acc = ([], [], [])
        for layer in layers:
            heads, L = _layer_heads(model, cap, st, layer, eps, masks, value_space=True)
            t = tag_cosines(model, cap, st, layer, eps, seed=seed, prompt=p, _layer=L)
            t.insert(0, "prompt", p)
            cos.append(t)
            ev += _ev_rows(heads, p, layer, pca=False)
            ve += _ve_rows(L["V"], L["X"], L["sinks"], seed, p, layer)
            _geometry_layer(model, cap, masks[0][st.layers.index(layer)], layer, p, noop_ratio, sink_rows, acc,
                            wo_all=L["token_tags64"])
        pair_rows += _geometry_pairs(p, *acc)
    return dict(
        stats=stats, cos=_cosine_frame(cos, prompt_column=True), ve=_ve_table(ve, layers, model.n_heads),
        ev=_ev_table(ev, layers, model.n_heads), geometry=_geometry_frames(pair_rows, sink_rows),
        seg=segment_table(stats, eps),
    )


def tag_quantities(run: dict, model: Model, seed: int = 0) -> dict:
    """The numbers the tag chapter reports for one model, from `tag_measures`: the heads
    (`n_query_heads`, `n_kv_heads`), the prompts' `min_tokens` and `max_tokens`, `cosine_summary` and `cosine_intervals`, the `ev_summary` of
    the paper's VE with our EV's medians (`ev_median`, `ev_raw_median`), `ve_paper_median` (=
    `ve_tags_median`), `ve_tags_minus_mean` (tags' median VE minus the mean value direction's),
    `ve_max`, `n_tags` (mean tags per head with a VE), `geometry_summary`, `cos_random`
    (`random_abs_cos` in d_model dimensions: the residual stream) and `cos_random_head` (in
    head_dim dimensions: a head's output o_i and the tags t_j = W_O^h v_j all lie in the head_dim-
    dimensional image of W_O^h, so that is the chance scale of the tag cosines). Glue formats:
    `tag_formats`."""
    ve = run["ve"]
    lengths = [len(st.tokens) for st in run["stats"]]
    out = dict(n_query_heads=model.n_heads, n_kv_heads=model.n_kv_heads, min_tokens=min(lengths),
               max_tokens=max(lengths))
    out.update(cosine_summary(run["cos"]))
    out.update(cosine_intervals(run["cos"], seed=seed))
    summ = ev_summary(ve)
    summ.update({k: v for k, v in ev_summary(run["ev"]).items() if k in ("ev_median", "ev_raw_median")})
    out.update(summ)
    out.update(ve_paper_median=summ["ve_tags_median"],
               ve_tags_minus_mean=summ["ve_tags_median"] - summ["ve_mean_value_median"],
               ve_max=float(ve.ve_tags.max()), n_tags=float(ve.loc[ve.ve_tags.notna(), "n_tags"].mean()))
    out.update(geometry_summary(*run["geometry"]))
    out["cos_random"] = random_abs_cos(model.d_model, seed=seed)
    out["cos_random_head"] = random_abs_cos(model.head_dim, seed=seed)
    return out


def tag_formats(values: dict) -> dict:
    """Glue formats of `tag_quantities`: cosines to 2 decimals (`cos_random*` to 3), shares (VE,
    EV, no-op) as percentages (`ve_tags_minus_mean` signed), `n_tags` to 1 decimal, counts plain."""
    def spec(k):
        if k.startswith("cos_random"):
            return ".3f"
        if k == "ve_tags_minus_mean":
            return "+.0%"
        if k == "n_tags":
            return ".1f"
        if k.startswith("cos"):
            return ".2f"
        if k.startswith(("ve", "ev", "noop")):
            return ".0%"
        return ""
    return {k: spec(k) for k in values}


def two_sink_figure(model: Model, caps: Sequence[Capture], run: dict, eps: float = DEFAULT_EPS) -> dict | None:
    """What the tag chapter's figure draws for one model: the head and prompt of `two_sink_head`
    (None when no head has two catching sinks), its outputs in the plane of their top two
    principal components (`pca`, from `pca_by_sink`) and in the plane of the two sinks' tags
    (`tag_plane`): `plane_xy` (n, 2) for the non-sink tokens j >= 1 (`plane_positions`),
    `plane_label` their catching sink (-1: none), `plane_tags` (2, 2) the two tags. Also
    `prompt`, `layer`, `head`, `sinks` (s1, s2), `tokens`, and the glue texts `fig_head`,
    `fig_sinks`."""
    best = two_sink_head(run["seg"])
    if best is None:
        return None
    p, layer, head, (s1, s2) = best
    cap, st = caps[p], run["stats"][p]
    ht = head_tags(model, cap, st, layer, eps)[head]
    xy, txy = tag_plane(ht["tags"][[ht["sinks"].index(s1), ht["sinks"].index(s2)]], ht["outputs"])
    others = [i for i in range(1, len(cap.tokens)) if i not in ht["sinks"]]
    toks = cap.tokens
    return dict(prompt=p, layer=layer, head=head, sinks=(s1, s2), tokens=toks,
                pca=pca_by_sink(model, cap, st, layer, head, eps), plane_xy=xy[others],
                plane_label=ht["caught"].numpy()[others], plane_positions=others, plane_tags=txy,
                fig_head=f"layer {layer}, head {head}", fig_sinks=f"{toks[s1]!r} and {toks[s2]!r}")


VE_LABELS = dict(tags="sinks' values (tags)", mean_value="mean value direction",
                 random_token="random non-sink tokens' values", random_subspace="random subspace")


def ve_medians_table(quantities: dict) -> pd.DataFrame:
    """{model: `tag_quantities`} as a table of medians over heads (as percentages, text): the
    paper's VE of the tags and of each baseline (`VE_LABELS`), VE² of the tags and of the mean
    value direction, and our EV, centred and uncentred; one column per model."""
    rows = {f"ve_{k}_median": f"VE, {VE_LABELS[k]}" for k in EV_MEASURES}
    rows.update({f"ve2_{k}_median": f"VE², {VE_LABELS[k]}" for k in ("tags", "mean_value")})
    rows.update(ev_median="EV (ours, centred)", ev_raw_median="EV (ours, uncentred)")
    return pd.DataFrame({m: {label: f"{q[k]:.0%}" for k, label in rows.items()} for m, q in quantities.items()}
                        ).rename_axis("median over heads")
