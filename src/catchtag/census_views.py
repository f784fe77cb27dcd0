"""Views of the sink census for the chapters (sinks, catch, qknorm): long prompts, the census at
a cut-off, the cut-off sweep, where sinks sit relative to the prompt's end, example heads.

Every quantity is defined on the book's definitions page (`book/definitions.md`): received
attention alpha_k, sink (alpha_k > eps), the cut-off, caught, token kinds.

**The census rule (ours).** A key is scored only when at least `CUTOFF` = 10 later queries see it
(queries i > k inside the attention window): "keys seen by fewer than 10 later queries are not
scored". Such a key has no alpha and is never a sink, so the last 10 tokens of a prompt are never
sinks. With fewer later queries, alpha is a mean over a handful of rows and says more about the
last tokens' own attention than about a sink.

**Two versions of the library.** `score_stats` computes statistics with every key scored, and `cut`
applies the rule. When the `SinkStats` carry the visible-query counts (`n_queries`, the library's
window-aware census rule, `SinkStats.alpha_at(min_queries)`), `cut` uses them; otherwise it masks
alpha where fewer than `min_queries` later queries (T - 1 - k) see the key, which is exact for
prompts shorter than Gemma's 512-token sliding window, and refuses longer prompts
(`MAX_UNWINDOWED`) rather than miscount. Either way the same rule: n_k - 1 >= min_queries, n_k the
queries that see k, itself included.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from .capture import Capture
from .errors import CatchtagError
from .prompts import PASSAGES
from .sinks import DEFAULT_EPS, SinkStats, census, check_eps, head_table, sink_stats, sink_table

CUTOFF = 10  # (ours) keys seen by fewer later queries are not scored
CUTOFFS = (5, 10, 20, 40)  # the sweep the sinks chapter shows
MIN_TOKENS = 150  # (paper, via note) the reasoning census truncates prompts to 150 tokens
MIN_CHARS = 800  # characters per long prompt: about 170-200 tokens with either offline tokenizer
MAX_UNWINDOWED = 512  # Gemma-3's sliding window: longer prompts need the window-aware census
NEAR_END = 10  # "near the end": within this many tokens of the prompt's last token
SEPARATOR = "\n\n"


# --------------------------------------------------------------------------------------------------
# Long prompts


def long_prompts(n: int, seed: int = 0, min_chars: int = MIN_CHARS) -> list[str]:
    """`n` prompts of at least `min_chars` characters, each the book's passages
    (`catchtag.prompts.PASSAGES`) in a shuffled order joined by blank lines, no passage twice in
    one prompt. Prompt i is fixed by (seed, i): the same arguments give the same prompts."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise CatchtagError(f"n_prompts={n!r} is not valid: use a whole number >= 1")
    total = len(SEPARATOR.join(PASSAGES))
    if not isinstance(min_chars, int) or not 0 < min_chars <= total:
        raise CatchtagError(f"min_chars={min_chars!r} is not valid: use a whole number from 1 to {total}")
    out = []
    for i in range(n):
        order = list(range(len(PASSAGES)))
        random.Random(f"{seed}-{i}").shuffle(order)
        parts: list[str] = []
        for j in order:
            parts.append(PASSAGES[j])
            if len(SEPARATOR.join(parts)) >= min_chars:
                break
        out.append(SEPARATOR.join(parts))
    return out


# --------------------------------------------------------------------------------------------------
# The census at a cut-off (the bodies switch to the library's census later; see the docstring)


def score_stats(cap: Capture) -> SinkStats:
    """Sink statistics of one prompt with every key scored (the cut-off is applied by `cut`)."""
    return sink_stats(cap, min_queries=0)


def later_queries(stats: SinkStats) -> np.ndarray:
    """(T,) number of later queries that see each key: T - 1 - k (no window inside MAX_UNWINDOWED)."""
    T = len(stats.tokens)
    if T > MAX_UNWINDOWED:
        raise CatchtagError(
            f"a prompt of {T} tokens is longer than {MAX_UNWINDOWED}: a sliding window may hide keys; "
            "use shorter prompts or the window-aware census of catchtag.sinks")
    return np.arange(T - 1, -1, -1)


def check_cutoff(min_queries) -> int:
    if isinstance(min_queries, bool) or not isinstance(min_queries, int) or min_queries < 0:
        raise CatchtagError(f"min_queries={min_queries!r} is not valid: use a whole number >= 0 of later queries")
    return min_queries


def cut(stats: Sequence[SinkStats], min_queries: int = CUTOFF) -> list[SinkStats]:
    """Copies of `stats` whose keys seen by fewer than `min_queries` later queries are not scored
    (alpha NaN, never a sink, never catch). The other keys are untouched."""
    min_queries = check_cutoff(min_queries)
    out = []
    for st in stats:
        if getattr(st, "n_queries", None) is not None:  # the library's window-aware census rule
            out.append(dataclasses.replace(st, received=st.alpha_at(min_queries), min_queries=min_queries))
            continue
        few = torch.as_tensor(later_queries(st) < min_queries)
        received = st.received.clone()
        received[..., few] = float("nan")
        out.append(dataclasses.replace(st, received=received, min_queries=min_queries + 1))
    return out


def census_at(stats: Sequence[SinkStats], eps: float = DEFAULT_EPS, min_queries: int = CUTOFF) -> dict:
    """`sinks.census` (keys `CENSUS_KEYS`) with the cut-off `min_queries`, plus `boundary_share`
    (punctuation + line-break share of the non-first sinks) and `n_other` (non-first sinks counted)."""
    c = census(cut(stats, min_queries), eps)
    rows = sink_rows(stats, eps, min_queries)
    c["boundary_share"] = c["punct_share"] + c["newline_share"]
    c["n_other"] = int((rows["kind"] != "first").sum())
    return c


def sink_rows(stats: Sequence[SinkStats], eps: float = DEFAULT_EPS, min_queries: int = CUTOFF) -> pd.DataFrame:
    """`sinks.sink_table` at the cut-off, with `from_end` (T - 1 - position: 0 is the prompt's last
    token) and `n_queries` (the queries that see the key, itself included: from_end + 1 inside
    `MAX_UNWINDOWED`; the library's own column where it has one)."""
    stats = list(stats)
    t = sink_table(cut(stats, min_queries), eps)
    lengths = np.array([len(st.tokens) for st in stats])
    t["from_end"] = (lengths[t["prompt"].to_numpy(dtype=int)] - 1 - t["position"].to_numpy(dtype=int)) if len(t) else []
    if "n_queries" not in t:
        t["n_queries"] = t["from_end"] + 1
    return t


def head_rows(stats: Sequence[SinkStats], eps: float = DEFAULT_EPS, min_queries: int = CUTOFF) -> pd.DataFrame:
    """`sinks.head_table` at the cut-off."""
    return head_table(cut(stats, min_queries), eps)


def cutoff_sweep(stats: Sequence[SinkStats], eps: float = DEFAULT_EPS,
                 cutoffs: Iterable[int] = CUTOFFS, near: int = NEAR_END) -> pd.DataFrame:
    """One row per cut-off: `min_queries`, the `census_at` keys, and `near_end_share` (share of the
    non-first sinks within `near` tokens of the cut-off, i.e. from_end < min_queries + near)."""
    rows = []
    for m in cutoffs:
        c = census_at(stats, eps, m)
        s = sink_rows(stats, eps, m)
        other = s[s["kind"] != "first"]
        c["near_end_share"] = float((other["from_end"] < m + near).mean()) if len(other) else float("nan")
        rows.append(dict(min_queries=int(m), **c))
    return pd.DataFrame(rows)


def end_summary(rows: pd.DataFrame, min_queries: int = CUTOFF, near: int = NEAR_END) -> dict:
    """Where the non-first sinks of a `sink_rows` table (made at cut-off `min_queries`) sit:
    `n_other` (how many), `median_from_end` (tokens before the prompt's last one) and
    `near_end_share` (share within `near` tokens of the cut-off: from_end < min_queries + near)."""
    other = rows[rows["kind"] != "first"]
    if not len(other):
        return dict(n_other=0, median_from_end=float("nan"), near_end_share=float("nan"))
    return dict(n_other=int(len(other)), median_from_end=float(other["from_end"].median()),
                near_end_share=float((other["from_end"] < min_queries + near).mean()))


# --------------------------------------------------------------------------------------------------
# Example heads and tables for the figures


def strongest_first_sink(stats: Sequence[SinkStats]) -> tuple[int, int]:
    """(layer, head) with the largest mean alpha of the first token over prompts, layer 0 excluded
    when there are other layers."""
    rec = torch.stack([torch.nan_to_num(s.received[:, :, 0], nan=-1.0) for s in stats]).mean(0)
    if rec.shape[0] > 1:
        rec[0] = -np.inf
    layer, head = np.unravel_index(int(rec.argmax()), tuple(rec.shape))
    return int(stats[0].layers[layer]), int(head)


def strongest_sink(rows: pd.DataFrame, kinds: Sequence[str] = ("punctuation", "newline")) -> dict | None:
    """The row (as a dict) of the sink of one of `kinds` with the largest alpha; None when none."""
    p = rows[rows["kind"].isin(list(kinds))]
    if p.empty:
        return None
    best = p.sort_values(["received", "prompt", "layer", "head"], ascending=[False, True, True, True]).iloc[0]
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in best.items()}


def top_tokens(rows: pd.DataFrame, n: int = 8) -> pd.DataFrame:
    """The `n` most common non-first sink tokens: token (repr), sinks, share of the non-first sinks."""
    other = rows[rows["kind"] != "first"]
    counts = other["token"].map(repr).value_counts()
    out = pd.DataFrame({"token": counts.index[:n], "sinks": counts.values[:n]})
    out["share"] = out["sinks"] / max(len(other), 1)
    return out


def from_end_counts(rows: pd.DataFrame, max_from_end: int, width: int = 1) -> np.ndarray:
    """Counts of non-first sinks by distance from the end, in bins of `width` tokens
    ([0, width), [width, 2 width), ...) up to `max_from_end`; the last bin also holds everything
    farther. Length max_from_end // width + 1."""
    if not isinstance(width, int) or width < 1 or not isinstance(max_from_end, int) or max_from_end < 0:
        raise CatchtagError(f"width={width!r}, max_from_end={max_from_end!r}: use whole numbers, width >= 1")
    other = rows[rows["kind"] != "first"]
    d = np.minimum(other["from_end"].to_numpy(dtype=int), max_from_end) // width
    return np.bincount(d, minlength=max_from_end // width + 1)


SUMMARY_ROWS = {
    "sinks_per_head": "sinks per head",
    "first_share": "heads with a first-token sink",
    "other_per_head": "other sinks per head",
    "heads_with_other": "heads with another sink",
    "boundary_share": "other sinks: punctuation or line break",
    "word_share": "other sinks: words",
}


def summary_table(censuses: dict) -> pd.DataFrame:
    """Rows `SUMMARY_ROWS`, one column per model, from {model title: census_at(...)}."""
    return pd.DataFrame({m: {label: c.get(k, float("nan")) for k, label in SUMMARY_ROWS.items()}
                         for m, c in censuses.items()})


def teaser_head(table: pd.DataFrame) -> tuple[int, int, bool]:
    """From `sinks.segment_heads`: (layer, head, separates) of the head to show: among the heads that
    separate the groups the one whose weakest group share is largest; when none does, the head
    whose groups' majority sinks are the most distinct (ties: the first such head)."""
    if table.empty:
        raise CatchtagError("no heads in the segment table: capture at least one layer")
    shares = [c for c in table if c.startswith("share_")]
    sinks = [c for c in table if c.startswith("sink_")]
    good = table[table["separates"]]
    if len(good):
        best = good.loc[good[shares].min(axis=1).idxmax()]
        return int(best["layer"]), int(best["head"]), True
    distinct = table[sinks].apply(lambda r: len({int(x) for x in r if x >= 0}), axis=1)
    best = table.loc[distinct.idxmax()]
    return int(best["layer"]), int(best["head"]), False


# --------------------------------------------------------------------------------------------------
# The catch chapter's summaries (tables from catchtag.tags.segment_table and catch_by_layer)


def catch_summary(seg: pd.DataFrame, depth: pd.DataFrame) -> dict:
    """Catching in one model, from `tags.segment_table` (`seg`) and `tags.catch_by_layer` (`depth`):

    - `caught_share`, `caught_first`, `caught_other`: share of (query, head) pairs caught by any
      sink, by the first token, by another sink (mean over layers of the per-layer shares);
    - `first_len`, `first_seg_share`: median segment length of first-token sinks and median share
      of the tokens after the sink that it catches; `other_len`, `other_seg_share` the same for the
      non-first sinks that catch something (NaN when none);
    - `other_one_run`: share of those segments that are one unbroken run; `other_starts_after`:
      share that start right after their sink; `other_catching`: share of non-first sinks that
      catch at least one token; `other_visible`: median number of later non-sink queries of a
      non-first sink."""
    if depth.empty:
        raise CatchtagError("catch_by_layer gave no layers: capture at least one layer")
    first = seg[seg["kind"] == "first"]
    others = seg[seg["kind"] != "first"]
    other = others[others["n_caught"] > 0]
    pairs = depth[["caught_first", "caught_other", "not_caught"]].mean()
    med = lambda x: float(x.median()) if len(x) else float("nan")
    mean = lambda x: float(x.mean()) if len(x) else float("nan")
    return dict(
        caught_share=float(1 - pairs["not_caught"]),
        caught_first=float(pairs["caught_first"]),
        caught_other=float(pairs["caught_other"]),
        first_len=med(first["n_caught"]), first_seg_share=med(first["share"].dropna()),
        other_len=med(other["n_caught"]), other_seg_share=med(other["share"].dropna()),
        other_one_run=mean(other["n_runs"] == 1),
        other_starts_after=mean(other["first_caught"] == other["position"] + 1),
        other_catching=mean(others["n_caught"] > 0),
        other_visible=med(others["n_visible"]),
    )


def catch_by_kind(seg: pd.DataFrame) -> pd.DataFrame:
    """Per kind of non-first sink (punctuation, newline, other): `sinks` (how many), `caught`
    (tokens they catch, summed) and `share_of_caught` (share of everything non-first sinks catch)."""
    other = seg[seg["kind"] != "first"]
    k = other.groupby("kind").agg(sinks=("n_caught", "size"), caught=("n_caught", "sum"))
    k = k.reindex(["punctuation", "newline", "other"], fill_value=0)
    total = k["caught"].sum()
    k["share_of_caught"] = k["caught"] / total if total else float("nan")
    return k


def busiest_prompt_layers(seg: pd.DataFrame, n_layers: int = 3) -> tuple[int, list[int]]:
    """The prompt where non-first sinks catch the most tokens, and its `n_layers` layers where they
    catch the most (sorted); (0, []) when no non-first sink catches anything."""
    other = seg[(seg["kind"] != "first") & (seg["n_caught"] > 0)]
    if other.empty:
        return 0, []
    p = int(other.groupby("prompt")["n_caught"].sum().idxmax())
    by_layer = other[other["prompt"] == p].groupby("layer")["n_caught"].sum().sort_values(ascending=False, kind="stable")
    return p, sorted(int(l) for l in by_layer.index[:n_layers])
