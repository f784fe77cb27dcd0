"""Catch and tag: which queries a sink catches, and what it writes into them.

Definitions (the book's, following ../shared/PAPER.md; (paper) marks the paper's own choices):

- Caught (ours, from `catchtag.sinks`): query i is caught by sink s in head (l, h) when s is the
  largest entry of row i (i itself excluded) and A_is >= eps. A sink's *segment* is the set of
  queries it catches.
- Tag (paper, §1 and Fig. 1b): t_s = W_O^h v_s, the sink's value vector passed through the head's
  slice of the output projection. A caught token attends mostly to s, so its head output
  o_i = W_O^h sum_j A_ij v_j is close to A_is t_s: caught tokens share the direction t_s.
- Tag subspace of a head: the span of its sinks' tags (all sinks of the head in that prompt).
- Explained variance (ours; the paper's §3.2 statistic without its exact recipe):
  EV = ||P H||_F^2 / ||H||_F^2, with H the head outputs o_i of the caught non-sink tokens of one
  prompt, centred over those tokens, and P the orthogonal projector on the tag subspace.

Sinks and tags are prompt-specific (v_s depends on the sink token and its context), so EV is
computed per prompt and pooled over prompts as a ratio of sums (`head_explained_variance`).

The prompts in `PROMPTS` were written by the catchtag authors for these chapters; none comes from a
dataset or a hub.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch

from .capture import Capture, head_outputs, per_head_project
from .errors import CatchtagError
from .models import Model
from .sinks import DEFAULT_EPS, SinkStats, check_eps, sink_stats, token_kind

# --------------------------------------------------------------------------------------------------
# Prompts (written by the catchtag authors; several sentences each, some with line breaks)

PROMPTS: list[str] = [
    "The storm rolled in over the hills. Farmers hurried to bring the cattle inside. By nightfall, "
    "the rain had flooded the lower fields.",
    "She opened the letter with shaking hands. It was from her brother, who had been gone for ten "
    "years. He wrote that he was coming home.",
    "Preheat the oven to two hundred degrees. Mix the flour, sugar and butter in a large bowl. Pour "
    "the batter into a tin and bake it for forty minutes.",
    "The museum opens at nine in the morning. Tickets are cheaper for students and children. On "
    "Sundays, the top floor is closed for cleaning.",
    "My grandfather kept bees behind his house. Every summer he gave jars of honey to the "
    "neighbours. Nobody ever got stung, except him.",
    "The train was late again this morning. Most passengers waited quietly on the platform. A few "
    "gave up and called a taxi instead.",
    "Water boils at a lower temperature on a mountain. The air pressure there is lower than at sea "
    "level. This is why pasta takes longer to cook at altitude.",
    "Dear Anna,\nThank you for the lovely flowers. They brightened up the whole kitchen. I hope we "
    "can meet again soon.\nBest wishes,\nMaria",
    "Shopping list:\n- two loaves of bread\n- a dozen eggs\n- fresh tomatoes\nRemember to pay the "
    "electricity bill as well.",
    "The meeting started ten minutes late. The manager apologised and went straight to the budget. "
    "Nobody asked any questions until the very end.",
    "Cats sleep for most of the day. They are most active at dawn and at dusk. Many owners find "
    "this pattern hard to get used to.",
    "He missed the last bus, so he walked home. The streets were empty and quiet. When he finally "
    "arrived, the lights were still on.",
    "The river freezes every winter. Children skate on it when the ice is thick enough. In spring, "
    "the melting ice makes a loud cracking noise.",
    "I tried to fix the bicycle myself. First the chain came off, then a tyre went flat. In the end "
    "I took it to the shop on the corner.",
    "The library is moving to a new building. All books must be returned by Friday. The new "
    "reading room will have large windows and more seats.",
    "Question: Why is the sky blue?\nAnswer: Sunlight is scattered by the air. Blue light is "
    "scattered more than red light, so the sky looks blue.",
]


def prompts(n: int | None = None, seed: int = 0) -> list[str]:
    """`n` of the book's prompts (all when n is None), in a fixed order shuffled by `seed`."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise CatchtagError(f"n_prompts={n!r} is not valid: use a whole number >= 1")
    order = np.random.default_rng(seed).permutation(len(PROMPTS)) if seed else np.arange(len(PROMPTS))
    chosen = [PROMPTS[i] for i in order]
    if n is not None and n > len(chosen):
        raise CatchtagError(f"n_prompts={n} is more than the {len(PROMPTS)} prompts in catchtag.tags.PROMPTS")
    return chosen if n is None else chosen[:n]


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


def _variance_parts(outputs: torch.Tensor, basis: torch.Tensor, k_pca: int) -> dict:
    """Numerators and denominators of the EV variants for one head of one prompt."""
    X = torch.as_tensor(outputs, dtype=torch.float64)
    Hc = X - X.mean(dim=0, keepdim=True)
    b = basis.to(torch.float64)
    out = dict(
        num=float(((Hc @ b) ** 2).sum()),
        den=float((Hc**2).sum()),
        num_raw=float(((X @ b) ** 2).sum()),
        den_raw=float((X**2).sum()),
    )
    # squared singular values of Hc = eigenvalues of the small Gram matrix (n x n, n = caught tokens);
    # much faster than an SVD of the (n, d_model) matrix when the CPU is shared
    ev = torch.linalg.eigvalsh(Hc @ Hc.T).flip(0).clamp_min(0.0)
    out["num_pca"] = float(ev[:k_pca].sum()) if k_pca > 0 else 0.0
    return out


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
    `outputs` (T, d_model) the head outputs o_i.
    """
    eps = check_eps(eps)
    li = st.layers.index(layer)
    all_sinks, all_caught = _masks if _masks is not None else (st.sinks(eps), st.caught(eps))
    sinks, caught = all_sinks[li], all_caught[li]
    outs = head_outputs(model, cap, layer)
    tags = tag_vectors(model, cap, layer)
    res = []
    for h in range(model.n_heads):
        pos = torch.nonzero(sinks[h]).flatten().tolist()
        members = torch.nonzero((caught[h] >= 0) & ~sinks[h]).flatten().tolist()
        res.append(
            dict(head=h, sinks=pos, tags=tags[h, pos], caught=caught[h], members=members, outputs=outs[h])
        )
    return res


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
    """Variance of each head's output explained by its tag subspace (the book's §3.2 statistic).

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
            for ht in head_tags(model, cap, st, layer, eps, masks):
                n_tags, members = len(ht["sinks"]), ht["members"]
                row = dict(prompt=p, layer=layer, head=ht["head"], n_tags=n_tags, n_caught=len(members))
                if n_tags == 0 or len(members) < max(2, min_caught):
                    row.update(num=np.nan, den=np.nan, num_raw=np.nan, den_raw=np.nan, num_pca=np.nan)
                else:
                    basis = orthonormal_basis(ht["tags"])
                    row.update(_variance_parts(ht["outputs"][members], basis, basis.shape[1]))
                rows.append(row)
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
            ev_pca=g["num_pca"].sum() / g["den"].sum(),
            n_tags=g["n_tags"].mean(),
            n_caught=g["n_caught"].sum(),
            n_prompts=g.size(),
            ev_mean=g["ev"].mean(),
        )
    )
    full = pd.MultiIndex.from_product([layers, range(model.n_heads)], names=["layer", "head"])
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
                heads: Sequence[int] | None = None, _masks=None) -> pd.DataFrame:
    """One row per (head, sink, query): cos(o_i, t_s) for every non-sink query i after sink s,
    and whether s catches i. Columns: layer, head, sink, query, caught, cos, attn (A_is is not
    stored; `caught` is the book's definition)."""
    rows = []
    for ht in head_tags(model, cap, st, layer, eps, _masks):
        if heads is not None and ht["head"] not in heads:
            continue
        sinks = ht["sinks"]
        if not sinks:
            continue
        O = ht["outputs"].double()
        On = O / O.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        for s, t in zip(sinks, ht["tags"].double()):
            tn = t / t.norm().clamp_min(1e-12)
            cos = (On @ tn).tolist()
            for i in range(s + 1, len(cap.tokens)):
                if i in sinks:
                    continue
                rows.append(dict(layer=layer, head=ht["head"], sink=s, query=i,
                                 caught=bool(ht["caught"][i] == s), cos=cos[i]))
    return pd.DataFrame(rows, columns=["layer", "head", "sink", "query", "caught", "cos"])


def tag_cosine_table(model: Model, caps, eps: float = DEFAULT_EPS, stats=None, layers=None,
                     progress: bool = True) -> pd.DataFrame:
    """`tag_cosines` over prompts and layers, with a `prompt` column."""
    from .progress import progress as progress_bar

    caps = _as_list(caps)
    stats = _stats_for(caps, stats)
    layers = caps[0].layers if layers is None else list(layers)
    parts = []
    for p, (cap, st) in progress_bar(list(enumerate(zip(caps, stats))), "tag cosines", enabled=progress):
        masks = (st.sinks(eps), st.caught(eps))
        for l in layers:
            t = tag_cosines(model, cap, st, l, eps, _masks=masks)
            t.insert(0, "prompt", p)
            parts.append(t)
    return pd.concat(parts, ignore_index=True)


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
        sinks = st.sinks(eps)
        caught = st.caught(eps)
        T = len(st.tokens)
        for li, layer in enumerate(st.layers):
            for h, k in torch.nonzero(sinks[li]).tolist():
                members = torch.nonzero(caught[li, h] == k).flatten().tolist()
                members = [i for i in members if not sinks[li, h, i]]
                visible = sum(1 for i in range(k + 1, T) if not sinks[li, h, i])
                runs = _runs(members)
                rows.append(dict(
                    prompt=p, layer=layer, head=h, position=k, token=st.tokens[k],
                    kind=token_kind(st.tokens[k], k), received=float(st.received[li, h, k]),
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
# A tiny model with planted sinks and known tags (tests and demonstrations)

PLANTED_VOCAB = ["<s>", ".", "a", "b", "c", "d", "e", "f"]
PLANTED_TEXT = "<s> a b c d e . f a b c d e f a b c d e f a b c d"
# residual features of the planted model (d_model = 16)
F_BOS, F_CONST, F_DOT, F_TAG_DOT, F_TAG_BOS = 0, 1, 2, 3, 4


def planted_model(sink_strength: float = 0.6, retrieve: float = 3.0, seed: int = 0) -> Model:
    """A two-layer Llama (d_model 16, two heads of size 8, MLPs off) whose answer is known.

    Layer 0, head 0 is a sink head: every query reads a constant feature, the key of `<s>` and of
    `.` reads their own features (`.` more strongly), so tokens before the first `.` are caught by
    `<s>` and tokens after it by `.`. Its values read only the `<s>` and `.` features, and W_O
    writes them on the residual directions e_4 (the tag of `<s>`) and e_3 (the tag of `.`), so every
    head output lies in the tag subspace: EV = 1. Head 1 attends uniformly (no sink at T >= 20)
    and writes small vectors on the noise dimensions 8..15.
    Layer 1, head 0 retrieves by tag: its keys read e_3, the tag of `.`, so its queries attend to
    the tokens that `.` caught. RoPE is made negligible (theta = 1e12, signals on its slowest
    dimensions). Text goes through a whitespace word-level tokenizer (`PLANTED_VOCAB`).
    """
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from .models import _wrap

    cfg = LlamaConfig(
        vocab_size=len(PLANTED_VOCAB), hidden_size=16, intermediate_size=8, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=8, rope_theta=1e12,
        max_position_embeddings=128, tie_word_embeddings=False, attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() > 1:
                p.zero_()
        emb = hf.model.embed_tokens.weight
        emb[:, F_CONST] = 1.0
        emb[0, F_BOS] = 3.0
        emb[1, F_DOT] = 2.0
        emb[2:, 8:] = torch.randn(len(PLANTED_VOCAB) - 2, 8, generator=g) * 0.5
        L0 = hf.model.layers[0].self_attn
        L0.q_proj.weight[3, F_CONST] = 2.0  # head 0, slow RoPE dimension 3
        L0.k_proj.weight[3, F_BOS] = sink_strength
        L0.k_proj.weight[3, F_DOT] = 2.5 * sink_strength
        L0.v_proj.weight[0, F_BOS] = 1.0
        L0.v_proj.weight[1, F_DOT] = 1.0
        L0.o_proj.weight[F_TAG_BOS, 0] = 1.0
        L0.o_proj.weight[F_TAG_DOT, 1] = 1.0
        for j in range(8):  # head 1: uniform attention (zero q, k), values from the noise dims
            L0.v_proj.weight[8 + j, 8 + j] = 1.0
            L0.o_proj.weight[8 + j, 8 + j] = 0.1
        L1 = hf.model.layers[1].self_attn
        L1.q_proj.weight[3, F_CONST] = 2.0
        L1.k_proj.weight[3, F_TAG_DOT] = retrieve
        L1.v_proj.weight[0, F_DOT] = 1.0
        L1.o_proj.weight[5, 0] = 1.0
        hf.lm_head.weight.copy_(torch.randn(hf.lm_head.weight.shape, generator=g))
    vocab = {t: i for i, t in enumerate(PLANTED_VOCAB)}
    tk = Tokenizer(WordLevel(vocab, unk_token="a"))
    tk.pre_tokenizer = WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="a")
    return _wrap("planted", hf, tok, False, None, source="catchtag.tags.planted_model")
