"""Attention sinks: received attention, sinks at a threshold, caught segments, and their census.

Definitions (the book's, following `book/definitions.md`; (paper) marks the
paper's own choices):

- Visible queries of key k, n_k: the queries i >= k whose mask lets them attend to k, k itself
  included. Under a plain causal mask n_k = T - k; in a sliding-window layer of window W,
  n_k = min(T - k, W); with an explicit mask, the number of rows whose mask entry for k is finite.
- Received attention of key k in a head with attention matrix A (T x T):
  alpha_k = (1 / n_k) * sum_i A_ik, the mean over the queries that can see k (Gu et al., ICLR 2025,
  who write 1 / (T - k) for full causal attention). The key's own query is part of the mean, as in
  that definition; its term A_kk is kept apart (`self_attn`), so alpha without it is
  (n_k * alpha_k - A_kk) / (n_k - 1).
- Census rule (ours): a key is scored (can be a sink) only when at least `min_queries` *later*
  queries see it, n_k - 1 >= min_queries; default `MIN_QUERIES` = 10. So the last `min_queries`
  positions of a prompt are never sinks, nor is any key of a layer whose window W <= min_queries:
  alpha there is a mean over a handful of rows and says more about the last tokens' own attention
  than about a sink. The cut-off is applied when the census is
  read (`SinkStats.sinks(eps, min_queries)`, `census(stats, eps, min_queries)`, ...), never baked
  into the stored sums, so it can be swept.
- Sink: a scored key k with alpha_k > eps. Default eps = 0.2 (paper, §K.2, which calls it not
  principled).
- Caught (ours): query i is caught by sink s when s is the largest entry of row i excluding i
  itself, and A_is >= eps. A sink's segment is the set of queries it catches.
- Token kinds: "first" (position 0, whatever the token), "newline" (the token contains a line
  break), "punctuation" (non-empty and all punctuation or symbol characters once whitespace is
  stripped), "other".

Rows that sum to less than 1 (models with learned sink logits, such as gpt-oss) are kept as they
are: alpha is computed from the probabilities the model used, and `row_sum` reports the mass.

Everything is computed one layer at a time and, for long inputs, one chunk of queries at a time,
so the L x H x T x T stack of attention maps is never held (`sink_stats`). `stats_from_probs`
computes the same numbers from a full (H, T, T) matrix, for tests and hand-made examples.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import unicodedata
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from .capture import AttnInputs, Capture, attention_probs, grouped_matmul
from .errors import CatchtagError

DEFAULT_EPS = 0.2  # (paper) §K.2
MIN_QUERIES = 10  # (ours) a key needs at least this many later queries that see it to be scored
KINDS = ("first", "punctuation", "newline", "other")


def check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise CatchtagError(f"eps={eps!r} is not valid: the sink threshold must be a number in (0, 1)")
    return float(eps)


def token_kind(token: str, position: int) -> str:
    """'first', 'newline', 'punctuation' or 'other' (see the module docstring)."""
    if position == 0:
        return "first"
    if "\n" in token or "\r" in token:
        return "newline"
    stripped = token.strip()
    if stripped and all(unicodedata.category(c)[0] in "PS" for c in stripped):
        return "punctuation"
    return "other"


def check_min_queries(min_queries) -> int:
    if isinstance(min_queries, bool) or not isinstance(min_queries, int) or min_queries < 0:
        raise CatchtagError(
            f"min_queries={min_queries!r} is not valid: use a whole number >= 0 (later queries that "
            f"must see a key for it to be scored; default {MIN_QUERIES})"
        )
    return min_queries


def scored_mask(n_queries: torch.Tensor, min_queries: int) -> torch.Tensor:
    """Bool, same shape as `n_queries`: the key is scored (n_k - 1 >= min_queries later queries)."""
    return n_queries - 1 >= check_min_queries(min_queries)


def visible_queries(T: int, window: int | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(T,) float64: n_k, the number of queries that can see key k, k itself included.

    `mask`: a (T, T) additive mask (finite = may attend) or bool mask (True = may attend); it wins
    over `window`. Without one: T - k under a causal mask, min(T - k, window) with a window."""
    if mask is not None:
        m = torch.as_tensor(mask)
        seen = m if m.dtype == torch.bool else torch.isfinite(m)
        if seen.shape != (T, T):
            raise CatchtagError(f"the mask must be ({T}, {T}), got shape {tuple(seen.shape)}")
        return seen.sum(dim=0).to(torch.float64)
    n = torch.arange(T, 0, -1, dtype=torch.float64)
    if window:
        if isinstance(window, bool) or int(window) < 1:
            raise CatchtagError(f"window={window!r} is not valid: use a whole number >= 1 or None")
        n = n.clamp_max(float(window))
    return n


@dataclasses.dataclass
class HeadStats:
    """Per-head statistics of one layer for one prompt; every tensor is (H, T) unless noted.

    `alpha` is the raw received attention of every key (col_sum / n_queries, no cut-off);
    `received` is alpha with NaN where the key is not scored at `min_queries` (the census rule)."""

    received: torch.Tensor  # alpha_k, NaN where fewer than min_queries later queries see k
    row_sum: torch.Tensor  # sum_j A_ij: 1, or less with learned sink logits
    top_key: torch.Tensor  # argmax_{j != i} A_ij, -1 for the first query (it sees only itself)
    top_value: torch.Tensor  # A_i,top_key (0 for the first query)
    alpha: torch.Tensor | None = None  # raw alpha_k, no cut-off
    n_queries: torch.Tensor | None = None  # (T,) queries that see k, k included
    self_attn: torch.Tensor | None = None  # A_kk, the key's own query's share
    min_queries: int | None = None


def _row_tops(A: torch.Tensor, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest entry of each row excluding the diagonal; rows are queries offset, offset+1, ..."""
    H, R, T = A.shape
    rows = torch.arange(offset, offset + R)
    masked = A.clone()
    masked[:, torch.arange(R), rows] = -1.0  # exclude i itself
    value, key = masked.max(dim=-1)
    first = rows == 0
    key[:, first] = -1
    value[:, first] = 0.0
    return key, value.clamp_min(0.0)


def _finish(col_sum: torch.Tensor, row_sum, top_key, top_value, min_queries: int,
            n_queries: torch.Tensor | None = None, self_attn: torch.Tensor | None = None) -> HeadStats:
    """HeadStats from column sums (H, T) and the visible-query counts n_queries (T,) (default:
    T - k, plain causal attention; pass `visible_queries(T, window, mask)` for any other mask)."""
    T = col_sum.shape[-1]
    if n_queries is None:
        n_queries = visible_queries(T)
    n_queries = n_queries.to(torch.float64)
    alpha = col_sum.to(torch.float64) / n_queries.clamp_min(1.0)
    alpha = torch.where(n_queries > 0, alpha, torch.full_like(alpha, float("nan")))
    received = alpha.clone()
    received[..., ~scored_mask(n_queries, min_queries)] = float("nan")
    return HeadStats(received=received, row_sum=row_sum, top_key=top_key, top_value=top_value,
                     alpha=alpha, n_queries=n_queries, self_attn=self_attn, min_queries=min_queries)


def stats_from_probs(A: torch.Tensor, min_queries: int = MIN_QUERIES, window: int | None = None,
                     mask: torch.Tensor | None = None) -> HeadStats:
    """HeadStats from a full attention tensor A of shape (H, T, T) (or (T, T) for one head).

    The visible queries of each key come from `mask` ((T, T), additive or bool) when given, else
    from `window` (a sliding window of that many keys, the query included), else plain causal:
    pass the mask or window the model used, or alpha in windowed layers is understated."""
    A = torch.as_tensor(A, dtype=torch.float64)
    if A.dim() == 2:
        A = A[None]
    if A.dim() != 3 or A.shape[-1] != A.shape[-2]:
        raise CatchtagError(f"attention must be (heads, T, T) or (T, T), got shape {tuple(A.shape)}")
    check_min_queries(min_queries)
    T = A.shape[-1]
    key, value = _row_tops(A, 0)
    self_attn = A.diagonal(dim1=-2, dim2=-1).clone()
    return _finish(A.sum(dim=1), A.sum(dim=-1), key, value, min_queries,
                   visible_queries(T, window, mask), self_attn)


def _key_range(ai: AttnInputs, start: int, stop: int) -> tuple[int, int]:
    """Keys [lo, hi) that at least one of the queries start..stop-1 can see; the others get 0."""
    T = ai.n_tokens
    if ai.mask is not None:
        seen = torch.isfinite(ai.mask[start:stop]).any(dim=0).nonzero()
        if len(seen) == 0:
            return 0, T
        return int(seen[0]), int(seen[-1]) + 1
    lo = max(0, start - ai.sliding_window + 1) if ai.sliding_window else 0
    return lo, stop


@functools.lru_cache(maxsize=4)
def _upper_mask(size: int) -> torch.Tensor:
    return torch.zeros(size, size).masked_fill_(torch.ones(size, size, dtype=torch.bool).triu(1), float("-inf"))


def _probs_block(ai: AttnInputs, start: int, stop: int, lo: int, hi: int, upper=None) -> torch.Tensor:
    """attention_probs(ai, slice(start, stop))[..., lo:hi], without computing the keys outside
    [lo, hi) (they are masked for every query of the block, so their probability is 0). The same
    operations as `attention_logits`, done in place. `upper`: a (chunk, chunk) strictly upper-triangular bool matrix, so that a
    plain causal mask touches only the block's diagonal square."""
    q = ai.q[:, start:stop]
    kt = ai.k_kv[:, lo:hi].transpose(-1, -2)  # per kv head: grouped_matmul shares it, no repeat
    if math.frexp(ai.scaling)[0] == 0.5:  # a power of two: (s q) k^T has the bits of (q k^T) s
        scores = grouped_matmul(q * ai.scaling, kt)
    else:
        scores = grouped_matmul(q, kt)
        scores.mul_(ai.scaling)
    if ai.softcap:
        scores.div_(ai.softcap).tanh_().mul_(ai.softcap)
    if ai.mask is not None:
        scores.add_(ai.mask[start:stop, lo:hi])
    elif not ai.sliding_window and upper is not None and lo == 0 and hi == stop:
        R = stop - start  # keys before `start` are visible to every query of the block
        scores[:, :, start:stop].add_(upper[:R, :R])  # + 0 or + -inf: what masked_fill gives
    else:
        rows = torch.arange(start, stop)[:, None]
        cols = torch.arange(lo, hi)[None, :]
        allowed = cols <= rows
        if ai.sliding_window:
            allowed &= rows - cols < ai.sliding_window
        scores.masked_fill_(~allowed, float("-inf"))
    if ai.sink_logits is None:
        return torch.softmax(scores, dim=-1)
    sink = ai.sink_logits.reshape(-1, 1, 1).expand(scores.shape[0], scores.shape[1], 1)
    return torch.softmax(torch.cat([scores, sink.to(scores.dtype)], dim=-1), dim=-1)[..., :-1]


def stats_streaming(ai: AttnInputs, min_queries: int = MIN_QUERIES, chunk: int = 128) -> HeadStats:
    """HeadStats of one layer computed `chunk` queries at a time: memory H x chunk x T, not H x T x T.

    For each block of queries only the keys some query of the block can see are computed (under a
    causal mask, keys up to the block's last query): the others have probability exactly 0 and add
    nothing. Probabilities stay float32, as the model computes them; column and row sums are taken
    in float32 within a block (at most `chunk` terms) and accumulated over blocks in float64.
    Alpha divides by the visible queries of each key (`visible_queries(T, ai.sliding_window,
    ai.mask)`), so it is the mean over the queries that can see the key in windowed layers too.
    The key's own entry A_kk is included in alpha and kept in `self_attn`.
    """
    T = ai.n_tokens
    H = ai.q.shape[0]
    col_sum = torch.zeros(H, T, dtype=torch.float64)
    row_sum = torch.empty(H, T, dtype=torch.float64)
    top_key = torch.empty(H, T, dtype=torch.long)
    top_value = torch.empty(H, T, dtype=torch.float64)
    self_attn = torch.empty(H, T, dtype=torch.float64)
    check_min_queries(min_queries)
    upper = _upper_mask(min(chunk, T))
    with torch.no_grad():
        for start in range(0, T, chunk):
            stop = min(start + chunk, T)
            lo, hi = _key_range(ai, start, stop)
            A = _probs_block(ai, start, stop, lo, hi, upper)  # (H, R, hi - lo) float32
            col_sum[:, lo:hi] += A.sum(dim=1)
            row_sum[:, start:stop] = A.sum(dim=-1)
            # Row tops excluding the diagonal, in place (A is not needed after this).
            rows = torch.arange(start, stop)
            inside = (rows >= lo) & (rows < hi)
            self_attn[:, start:stop] = 0.0
            self_attn[:, rows[inside]] = A[:, torch.arange(stop - start)[inside], rows[inside] - lo].double()
            A[:, torch.arange(stop - start)[inside], rows[inside] - lo] = -1.0
            value, key = A.max(dim=-1)
            key += lo
            if lo > 0:  # nothing positive in range: the full row's first maximum (0) is key 0
                key[value <= 0] = 0
            first = rows == 0
            key[:, first] = -1
            value[:, first] = 0.0
            top_key[:, start:stop] = key
            top_value[:, start:stop] = value.clamp_min(0.0)
    return _finish(col_sum, row_sum, top_key, top_value, min_queries,
                   visible_queries(T, ai.sliding_window, ai.mask), self_attn)


def _scored_alpha(stats: HeadStats, min_queries: int | None) -> torch.Tensor:
    """(..., H, T) alpha with NaN where the key is not scored at `min_queries` (None: the stats'
    own). Works on one layer (alpha (H, T), n_queries (T,)) or on stacked layers (alpha (L, H, T),
    n_queries (L, T))."""
    if min_queries is None or stats.alpha is None or stats.n_queries is None:
        if min_queries is not None and stats.alpha is None:
            raise CatchtagError(
                "these statistics were built from alpha alone (no n_queries): the cut-off cannot be "
                "changed; rebuild them with sink_stats or stats_from_probs"
            )
        return stats.received
    unscored = ~scored_mask(stats.n_queries, min_queries)
    if unscored.dim() > 1:  # (L, T) -> (L, 1, T), against alpha (L, H, T)
        unscored = unscored.unsqueeze(-2)
    return stats.alpha.masked_fill(unscored, float("nan"))


def sinks_mask(stats: HeadStats, eps: float = DEFAULT_EPS, min_queries: int | None = None) -> torch.Tensor:
    """(H, T) bool: key k is a sink of head h: scored (at least `min_queries` later queries see it;
    None: the stats' own cut-off) and alpha_k > eps."""
    eps = check_eps(eps)
    return torch.nan_to_num(_scored_alpha(stats, min_queries), nan=0.0) > eps


def caught_by(stats: HeadStats, eps: float = DEFAULT_EPS, min_queries: int | None = None) -> torch.Tensor:
    """(H, T) long: the sink that catches query i in head h, or -1 when no sink catches it."""
    return _caught_from(sinks_mask(stats, eps, min_queries), stats.top_key, stats.top_value, eps)


def _caught_from(sinks: torch.Tensor, key: torch.Tensor, value: torch.Tensor, eps: float) -> torch.Tensor:
    """`caught_by` from the sink mask (..., T), top keys and top values (..., T), any leading dims."""
    is_sink = sinks.gather(-1, key.clamp_min(0)) & (key >= 0)
    return torch.where(is_sink & (value >= eps), key, torch.full_like(key, -1))


# --------------------------------------------------------------------------------------------------
# Per prompt, all layers


@dataclasses.dataclass
class SinkStats:
    """HeadStats for every captured layer of one prompt, stacked to (L, H, T), with the tokens.

    - `received`: alpha with NaN where the key is not scored at `min_queries` (the stats' default
      cut-off, `MIN_QUERIES` from `sink_stats`);
    - `alpha`: raw alpha of every key, no cut-off (L, H, T); `n_queries`: the visible queries of
      each key, itself included (L, T); `self_attn`: A_kk (L, H, T). With these the census can be
      read at any cut-off: `sinks(eps, min_queries)`, `caught(eps, min_queries)`.

    Built by hand from `received` alone (alpha, n_queries None), the values are used as given and
    `min_queries` (then None) cannot be changed at census time."""

    model: str
    text: str
    tokens: list[str]
    layers: list[int]
    received: torch.Tensor
    row_sum: torch.Tensor
    top_key: torch.Tensor
    top_value: torch.Tensor
    min_queries: int | None = None
    alpha: torch.Tensor | None = None
    n_queries: torch.Tensor | None = None
    self_attn: torch.Tensor | None = None
    offsets: list[tuple[int, int]] | None = None  # the tokens' character spans (Capture.offsets)

    @classmethod
    def from_heads(cls, model: str, text: str, tokens: list[str], layers: Sequence[int],
                   per: Sequence[HeadStats], min_queries: int = MIN_QUERIES,
                   offsets: list[tuple[int, int]] | None = None) -> "SinkStats":
        """Stack one HeadStats per layer (from `stats_streaming`, `stats_from_probs`, `_finish`)."""
        full = all(p.alpha is not None and p.n_queries is not None for p in per)
        stack = lambda name: torch.stack([getattr(p, name) for p in per])  # noqa: E731
        out = cls(
            model=model, text=text, tokens=list(tokens), layers=list(layers),
            received=stack("received"), row_sum=stack("row_sum"), top_key=stack("top_key"),
            top_value=stack("top_value"), min_queries=min_queries,
            alpha=stack("alpha") if full else None,
            n_queries=stack("n_queries") if full else None,
            self_attn=stack("self_attn") if all(p.self_attn is not None for p in per) else None,
            offsets=offsets,
        )
        if full:
            out.received = out.alpha_at(min_queries)
        return out

    @property
    def kinds(self) -> list[str]:
        return [token_kind(t, i) for i, t in enumerate(self.tokens)]

    @property
    def from_end(self) -> torch.Tensor:
        """(T,) long: T - 1 - position, how far each key sits from the prompt's last token."""
        T = self.received.shape[-1]
        return torch.arange(T - 1, -1, -1)

    def alpha_at(self, min_queries: int | None = None) -> torch.Tensor:
        """(L, H, T) alpha with NaN where the key is not scored at `min_queries` (None: the stats')."""
        if min_queries is None:
            return self.received
        return _scored_alpha(self._all_layers(), min_queries)

    def _all_layers(self) -> HeadStats:
        """All layers at once as one HeadStats of (L, H, T) tensors (n_queries (L, T))."""
        return HeadStats(self.received, self.row_sum, self.top_key, self.top_value, self.alpha,
                         self.n_queries, self.self_attn, self.min_queries)

    def layer(self, layer: int) -> HeadStats:
        i = self.layers.index(layer)
        pick = lambda x: None if x is None else x[i]  # noqa: E731
        return HeadStats(self.received[i], self.row_sum[i], self.top_key[i], self.top_value[i],
                         pick(self.alpha), pick(self.n_queries), pick(self.self_attn), self.min_queries)

    def sinks(self, eps: float = DEFAULT_EPS, min_queries: int | None = None) -> torch.Tensor:
        """(L, H, T) bool sink mask at threshold eps and cut-off min_queries (None: the stats')."""
        return sinks_mask(self._all_layers(), eps, min_queries)

    def caught(self, eps: float = DEFAULT_EPS, min_queries: int | None = None) -> torch.Tensor:
        """(L, H, T) long: the sink catching each query, or -1."""
        return caught_by(self._all_layers(), eps, min_queries)

    def sinks_and_caught(self, eps: float = DEFAULT_EPS,
                         min_queries: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(`sinks(eps, min_queries)`, `caught(eps, min_queries)`), the sink mask computed once."""
        sinks = sinks_mask(self._all_layers(), eps, min_queries)
        return sinks, _caught_from(sinks, self.top_key, self.top_value, eps)


def sink_stats(cap: Capture, min_queries: int = MIN_QUERIES, chunk: int = 128) -> SinkStats:
    """Streaming sink statistics of every captured layer of one prompt; `min_queries` is the
    stats' default cut-off (`received`, and `sinks`/`caught`/census when they are not given one)."""
    check_min_queries(min_queries)
    per = [stats_streaming(cap.attn_inputs[l], min_queries, chunk) for l in cap.layers]
    return SinkStats.from_heads(cap.model, cap.text, cap.tokens, cap.layers, per, min_queries,
                                getattr(cap, "offsets", None))


def sink_stats_naive(cap: Capture, min_queries: int = MIN_QUERIES) -> SinkStats:
    """Same as `sink_stats`, from each layer's full attention matrix (the reference path)."""
    per = []
    for l in cap.layers:
        ai = cap.attn_inputs[l]
        per.append(stats_from_probs(attention_probs(ai), min_queries, ai.sliding_window, ai.mask))
    return SinkStats.from_heads(cap.model, cap.text, cap.tokens, cap.layers, per, min_queries,
                                getattr(cap, "offsets", None))


# --------------------------------------------------------------------------------------------------
# Census over prompts


SINK_TABLE_COLUMNS = ["prompt", "layer", "head", "position", "token", "kind", "received", "n_caught",
                      "n_queries", "from_end"]


def _sink_rows(p: int, st: SinkStats, sinks: torch.Tensor, caught: torch.Tensor) -> dict | None:
    """`sink_table`'s columns for one prompt (sinks (L, H, T) bool, caught (L, H, T) long), in the
    order (layer, head, position); None when the prompt has no sink."""
    li, h, k = sinks.nonzero(as_tuple=True)  # row-major: layer, then head, then position
    if len(k) == 0:
        return None
    T = len(st.tokens)
    L, H = sinks.shape[:2]
    # n_caught[l, h, k]: queries of head (l, h) caught by k; index T counts the -1s (caught by none)
    counts = torch.zeros(L, H, T + 1, dtype=torch.long)
    counts.scatter_add_(-1, torch.where(caught >= 0, caught, T), torch.ones_like(caught))
    alpha = st.received if st.alpha is None else st.alpha
    layers = np.asarray(st.layers, dtype=np.int64)
    kk = k.numpy()
    tokens = st.tokens
    nq = st.n_queries[li, k].to(torch.int64).numpy() if st.n_queries is not None else T - kk
    return dict(
        prompt=np.full(len(kk), p, dtype=np.int64), layer=layers[li.numpy()], head=h.numpy(), position=kk,
        token=[tokens[i] for i in kk.tolist()], kind=[token_kind(tokens[i], i) for i in kk.tolist()],
        received=alpha[li, h, k].to(torch.float64).numpy(), n_caught=counts[li, h, k].numpy(),
        n_queries=np.asarray(nq, dtype=np.int64), from_end=T - 1 - kk,
    )


def _sink_frame(parts: list[dict]) -> pd.DataFrame:
    if not parts:
        return pd.DataFrame([], columns=SINK_TABLE_COLUMNS)
    cols = {c: [] for c in SINK_TABLE_COLUMNS}
    for part in parts:
        for c in SINK_TABLE_COLUMNS:
            cols[c].append(part[c])
    data = {c: (sum(v, []) if c in ("token", "kind") else np.concatenate(v)) for c, v in cols.items()}
    return pd.DataFrame(data, columns=SINK_TABLE_COLUMNS)


def _head_rows(p: int, st: SinkStats, sinks: torch.Tensor, caught: torch.Tensor) -> dict:
    """`head_table`'s columns for one prompt, in the order (layer, head)."""
    L, H, T = sinks.shape
    n = sinks.sum(-1).reshape(-1).numpy()
    first = sinks[..., 0].reshape(-1).numpy()
    if st.received.shape[-1] > 1:
        share = ((caught[..., 1:] >= 0).sum(-1).to(torch.float64) / (T - 1)).reshape(-1).numpy()
    else:
        share = np.zeros(L * H)
    return dict(
        prompt=np.full(L * H, p, dtype=np.int64),
        layer=np.repeat(np.asarray(st.layers, dtype=np.int64), H),
        head=np.tile(np.arange(H, dtype=np.int64), L),
        n_sinks=n.astype(np.int64), first_sink=first.astype(bool), n_other=(n - first).astype(np.int64),
        caught_share=share.astype(np.float64),
        min_row_sum=st.row_sum.amin(-1).to(torch.float64).reshape(-1).numpy(),
    )


HEAD_TABLE_COLUMNS = ["prompt", "layer", "head", "n_sinks", "first_sink", "n_other", "caught_share", "min_row_sum"]


def _head_frame(parts: list[dict]) -> pd.DataFrame:
    parts = [part for part in parts if len(part["prompt"])]
    if not parts:
        return pd.DataFrame([])
    return pd.DataFrame({c: np.concatenate([part[c] for part in parts]) for c in HEAD_TABLE_COLUMNS})


def _tables(stats: Iterable[SinkStats], eps: float, min_queries: int | None,
            heads: bool = True, sinks: bool = True) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """(head_table, sink_table) from one pass over the prompts (each prompt's masks computed once)."""
    head_parts, sink_parts = [], []
    for p, st in enumerate(stats):
        s, c = st.sinks_and_caught(eps, min_queries)
        if heads:
            head_parts.append(_head_rows(p, st, s, c))
        if sinks:
            part = _sink_rows(p, st, s, c)
            if part is not None:
                sink_parts.append(part)
    return (_head_frame(head_parts) if heads else None, _sink_frame(sink_parts) if sinks else None)


def sink_table(stats: Iterable[SinkStats], eps: float = DEFAULT_EPS, min_queries: int | None = None) -> pd.DataFrame:
    """One row per (prompt, layer, head, sink): position, token, kind, received (alpha), the number
    of queries it catches, `n_queries` (queries that see it, itself included) and `from_end`
    (T - 1 - position). `min_queries`: the census cut-off (None: each stats' own).
    Rows in the order (prompt, layer, head, position)."""
    return _tables(stats, eps, min_queries, heads=False)[1]


def head_table(stats: Sequence[SinkStats], eps: float = DEFAULT_EPS, min_queries: int | None = None) -> pd.DataFrame:
    """One row per (prompt, layer, head): number of sinks, first-token and other sinks, share of
    queries caught, and the smallest row sum (below 1 only with learned sink logits)."""
    return _tables(stats, eps, min_queries, sinks=False)[0]


def average_sinks_per_head(stats: Sequence[SinkStats], eps: float = DEFAULT_EPS,
                           min_queries: int | None = None) -> float:
    """The paper's §5 statistic: sinks per head, averaged over heads, layers and prompts
    (`census(...)["sinks_per_head"]`)."""
    return float(head_table(stats, eps, min_queries)["n_sinks"].mean())


def count_grid(stats: Sequence[SinkStats], eps: float = DEFAULT_EPS, column: str = "n_sinks",
               min_queries: int | None = None) -> np.ndarray:
    """(layers, heads) mean over prompts of a head_table column, for layers x heads heatmaps."""
    table = head_table(stats, eps, min_queries)
    grid = table.groupby(["layer", "head"])[column].mean().unstack("head")
    return grid.to_numpy(dtype=float)


CENSUS_KEYS = (
    "sinks_per_head", "first_share", "other_per_head", "heads_with_other",
    "punct_share", "newline_share", "word_share", "min_row_sum",
)


def census(stats: Sequence[SinkStats], eps: float = DEFAULT_EPS, min_queries: int | None = None) -> dict[str, float]:
    """The sink census of a set of prompts at threshold eps: one dict, the same keys everywhere
    (`CENSUS_KEYS`; the book, `eps_sweep`, qknorm and reasoning all read these names).
    `min_queries`: the census rule's cut-off (a key is scored when at least that many later
    queries see it); None: each stats' own (`MIN_QUERIES` = 10 from `sink_stats`).

    - `sinks_per_head`: sinks per head, averaged over (prompt, layer, head): the paper's §5 statistic;
    - `first_share`: share of (prompt, layer, head) with a first-token sink;
    - `other_per_head`: non-first sinks per head; `heads_with_other`: share of heads with at least one;
    - `punct_share`, `newline_share`, `word_share`: shares of the non-first sinks by token kind
      (NaN when there is none);
    - `min_row_sum`: the smallest attention row sum (below 1 only with learned sink logits).
    """
    t, s = _tables(stats, eps, min_queries)
    other = s[s.kind != "first"]
    kinds = other.kind.value_counts(normalize=True) if len(other) else {}
    share = (lambda k: float(kinds.get(k, 0.0))) if len(other) else (lambda k: float("nan"))
    return dict(
        sinks_per_head=float(t["n_sinks"].mean()),
        first_share=float(t["first_sink"].mean()),
        other_per_head=float(t["n_other"].mean()),
        heads_with_other=float((t["n_other"] > 0).mean()),
        punct_share=share("punctuation"),
        newline_share=share("newline"),
        word_share=share("other"),
        min_row_sum=float(t["min_row_sum"].min()),
    )


def eps_sweep(stats: Sequence[SinkStats], eps_values: Iterable[float], min_queries: int | None = None) -> pd.DataFrame:
    """One row per eps: `eps` and the `census` at that threshold (and cut-off `min_queries`)."""
    return pd.DataFrame([dict(eps=float(eps), **census(stats, eps, min_queries)) for eps in eps_values])


def min_queries_sweep(stats: Sequence[SinkStats], values: Iterable[int], eps: float = DEFAULT_EPS) -> pd.DataFrame:
    """One row per cut-off: `min_queries` and the `census` at (eps, that cut-off): how the counts
    (non-first sinks above all) move with the census rule."""
    return pd.DataFrame([dict(min_queries=int(m), **census(stats, eps, int(m))) for m in values])


# --------------------------------------------------------------------------------------------------
# Which sink catches which sentence (the paper's teaser)


def _tokens_and_offsets(tokens, offsets):
    """(token strings, offsets or None) from a list of strings or a Capture / SinkStats."""
    if hasattr(tokens, "tokens"):
        if offsets is None:
            offsets = getattr(tokens, "offsets", None)
        tokens = tokens.tokens
    return list(tokens), offsets


def token_spans(tokens, text: str, offsets=None) -> list[tuple[int, int]]:
    """Character span (start, stop) of each token in `text`.

    `tokens`: the token strings, or a Capture / SinkStats, whose `tokens` and `offsets` are used.
    With `offsets` (the tokenizer's character offsets, `Capture.offsets`), those are the spans: the
    bytes of a character split over several tokens all span that character, and a token the
    tokenizer added (Gemma's <bos>) has an empty span. Without them the strings are matched against
    the text in order; a token that does not match where the text continues (an added <bos>, a
    byte piece shown as '<0xE7>') waits for the next token that matches a few characters further
    on and is given the characters skipped in between (an empty span if none were)."""
    tokens, offsets = _tokens_and_offsets(tokens, offsets)
    if offsets is not None:
        if len(offsets) != len(tokens):
            raise CatchtagError(f"{len(offsets)} offsets for {len(tokens)} tokens: pass one per token")
        return [(int(a), int(max(a, b))) for a, b in offsets]
    spans: list[tuple[int, int] | None] = []
    pending: list[int] = []
    cursor = 0
    for i, tok in enumerate(tokens):
        at = text.find(tok, cursor) if tok else -1
        if at == cursor or (at > cursor and pending and at - cursor <= 4 * len(pending)):
            for j in pending:
                spans[j] = (cursor, at)
            pending = []
            spans.append((at, at + len(tok)))
            cursor = at + len(tok)
        else:
            spans.append(None)
            pending.append(i)
    for j in pending:
        spans[j] = (cursor, cursor)
    return [sp if sp is not None else (cursor, cursor) for sp in spans]


def groups_from_spans(tokens, text: str, char_spans, offsets=None) -> list[list[int]]:
    """Token positions inside each character span: a token belongs where its first non-blank
    character falls (so ' The' belongs to the sentence 'The ...' starts, whether or not the span
    includes the space before it; a token of blanks only, where its first character falls); tokens
    with an empty span, such as an added <bos>, belong nowhere. `tokens`: strings, or a Capture /
    SinkStats (its offsets are then used, see `token_spans`)."""
    tspans = token_spans(tokens, text, offsets)
    starts = []
    for a, b in tspans:
        piece = text[a:b]
        starts.append(a + len(piece) - len(piece.lstrip()) if piece.strip() else a)
    return [[i for i, ((a, b), c) in enumerate(zip(tspans, starts)) if b > a and lo <= c < hi]
            for lo, hi in char_spans]


def segment_heads(stats: SinkStats, groups: Sequence[Sequence[int]], eps: float = DEFAULT_EPS,
                  min_queries: int | None = None) -> pd.DataFrame:
    """For each head: the sink catching the most tokens of each group, the share it catches, and
    whether the head `separates` the groups (each group's majority sink catches more than half its
    tokens, and the groups' majority sinks are all different). Groups are lists of positions; a
    group's own sink (its first token, when it is a sink) is left out of its count."""
    caught = stats.caught(eps, min_queries)
    rows = []
    for li, layer in enumerate(stats.layers):
        for h in range(caught.shape[1]):
            row = dict(layer=layer, head=h)
            majors = []
            for g, positions in enumerate(groups):
                c = caught[li, h, list(positions)]
                c = c[c != torch.tensor(list(positions))]  # a sink does not catch itself
                values, counts = torch.unique(c[c >= 0], return_counts=True)
                if len(values):
                    best = int(values[counts.argmax()])
                    share = float(counts.max()) / max(len(positions), 1)
                else:
                    best, share = -1, 0.0
                row[f"sink_{g}"], row[f"share_{g}"] = best, share
                majors.append((best, share))
            row["separates"] = all(b >= 0 and s > 0.5 for b, s in majors) and len({b for b, _ in majors}) == len(majors)
            rows.append(row)
    return pd.DataFrame(rows)
