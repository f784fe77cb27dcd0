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
from .sinks import DEFAULT_EPS, KINDS, SinkStats, census, check_eps, head_table, sink_stats, sink_table

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
# The census at a cut-off


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
    stats = list(stats)
    c = census(cut(stats, min_queries), eps)
    c["boundary_share"] = c["punct_share"] + c["newline_share"]
    n_heads = sum(st.received.shape[0] * st.received.shape[1] for st in stats)  # (prompt, layer, head)
    c["n_other"] = int(round(c["other_per_head"] * n_heads))  # other_per_head is their mean
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
    `median_from_end` (tokens before the prompt's last one) and `near_end_share` (share within
    `near` tokens of the cut-off: from_end < min_queries + near). How many there are is
    `census_at`'s `n_other`."""
    other = rows[rows["kind"] != "first"]
    if not len(other):
        return dict(median_from_end=float("nan"), near_end_share=float("nan"))
    return dict(median_from_end=float(other["from_end"].median()),
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


# --------------------------------------------------------------------------------------------------
# The sinks chapter: statistics, quantities and example heads


def chapter_stats(model, prompts: Sequence[str], remote: bool | str = False, batch_size: int = 4) -> list[SinkStats]:
    """Sink statistics of `prompts` with every key scored (min_queries=0; `cut` applies the rule).

    Locally: the census inside the forward pass (`census_attention.census_forward_batch`,
    `batch_size` prompts per forward, right-padded: a real token never sees the padding after it),
    which gives the same `SinkStats` as `score_stats(capture(...))` without storing q, k, v.
    With `remote` (True: NDIF; "local": nnsight's remote code path, run here), the server runs its
    own attention, so the attention inputs are captured and the statistics computed from them
    (`capture` then `score_stats`), one prompt per forward."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if remote:
        from .capture import capture

        return [score_stats(c) for c in capture(model, list(prompts), resid=False, remote=remote, progress=False)]
    from .census_attention import census_forward_batch

    return census_forward_batch(model, list(prompts), min_queries=0, batch_size=batch_size)


CENSUS_QUANTITIES = ("sinks_per_head", "first_share", "other_per_head", "heads_with_other", "punct_share",
                     "newline_share", "word_share", "boundary_share", "n_other", "min_row_sum")
FORMATS = dict(sinks_per_head=".2f", other_per_head=".2f", first_share=".0%", heads_with_other=".0%",
               punct_share=".0%", newline_share=".0%", word_share=".0%", boundary_share=".0%",
               min_row_sum=".4f", near_end_at_5=".0%", median_from_end=".0f", near_end_share=".0%",
               top_token_share=".0%", sph_005=".2f", sph_05=".2f")


def census_quantities(stats: Sequence[SinkStats], eps: float = DEFAULT_EPS, min_queries: int = CUTOFF) -> dict:
    """What the sinks chapter reports of one model's census: the `census_at` keys in
    `CENSUS_QUANTITIES` at (eps, min_queries), and `min_tokens` / `max_tokens`, the shortest and
    longest prompt in tokens. Formats for the glue: `FORMATS`."""
    c = census_at(stats, eps, min_queries)
    out = {k: c[k] for k in CENSUS_QUANTITIES}
    lengths = [len(st.tokens) for st in stats]
    out.update(min_tokens=min(lengths), max_tokens=max(lengths))
    return out


def example_panels(stats: Sequence[SinkStats], rows: pd.DataFrame, first_tokens: int = 40,
                   before: int = 8, after: int = 32) -> dict:
    """The two example heads of the sinks chapter's first figure, as dicts with `prompt`, `layer`,
    `head`, `position` (the sink), `received` (its alpha), `lo`, `hi` (the token window to draw):

    - "first": `strongest_first_sink` on prompt 0, tokens [0, first_tokens);
    - "other": the punctuation or line-break sink with the largest alpha in `rows` (a `sink_rows`
      table, the rule applied), tokens [position - before, position + after) clipped to the
      prompt; None when there is none."""
    layer, head = strongest_first_sink(stats)
    st = stats[0]
    first = dict(prompt=0, layer=layer, head=head, position=0,
                 received=float(st.received[st.layers.index(layer), head, 0]),
                 lo=0, hi=min(first_tokens, len(st.tokens)))
    best = strongest_sink(rows)
    other = None
    if best is not None:
        p, pos = int(best["prompt"]), int(best["position"])
        other = dict(prompt=p, layer=int(best["layer"]), head=int(best["head"]), position=pos,
                     received=float(best["received"]), lo=max(0, pos - before),
                     hi=min(len(stats[p].tokens), pos + after))
    return dict(first=first, other=other)


def viewer_panel(panels: dict) -> str:
    """Which of `example_panels` the attention viewer shows: "other" when there is one, else "first"."""
    return "other" if panels.get("other") else "first"


def head_attention(model, prompt: str, layer: int, head: int, remote: bool | str = False) -> tuple[list[str], np.ndarray]:
    """(tokens, A) of one head on one prompt: A (T, T) the attention probabilities recomputed from
    the captured queries and keys of `layer` (`capture.attention_probs`); one forward that stops
    after that layer."""
    from .capture import attention_probs, capture

    cap = capture(model, prompt, layers=[layer], resid=False, remote=remote, progress=False)[0]
    return cap.tokens, attention_probs(cap.attn_inputs[layer])[head].numpy()


def panel_attention(model, prompts: Sequence[str], panels: dict, remote: bool | str = False) -> dict:
    """`head_attention` for each panel of `example_panels` that exists: {name: (tokens, A)}."""
    return {k: head_attention(model, prompts[p["prompt"]], p["layer"], p["head"], remote)
            for k, p in panels.items() if p}


def caught_row(stats: Sequence[SinkStats], panel: dict, eps: float = DEFAULT_EPS,
               min_queries: int = CUTOFF) -> torch.Tensor:
    """(T,) the sink catching each query of the panel's head and prompt under the rule, or -1."""
    st = cut([stats[panel["prompt"]]], min_queries)[0]
    return st.caught(eps)[st.layers.index(panel["layer"]), panel["head"]]


def depth_profile(stats: Sequence[SinkStats], eps: float = DEFAULT_EPS, min_queries: int = CUTOFF,
                  n_layers: int | None = None) -> pd.DataFrame:
    """Per layer, means over heads and prompts under the rule: `first_sink` (share of heads with a
    first-token sink) and `n_other` (other sinks per head); `depth` = layer / (n_layers - 1), the
    relative depth (n_layers default: one more than the last layer)."""
    by_layer = head_rows(stats, eps, min_queries).groupby("layer")[["first_sink", "n_other"]].mean()
    n_layers = n_layers or int(by_layer.index.max()) + 1
    out = by_layer.reset_index()
    out.insert(1, "depth", out["layer"] / max(n_layers - 1, 1))
    return out


def cutoff_quantities(sweep: pd.DataFrame) -> dict:
    """From a `cutoff_sweep` that includes cut-offs 5 and 40: `other_at_5`, `other_at_40` (non-first
    sinks) and `near_end_at_5` (share of them within `NEAR_END` tokens of the cut-off at 5)."""
    s = sweep.set_index("min_queries")
    missing = {5, 40} - set(s.index)
    if missing:
        raise CatchtagError(f"the sweep lacks cut-offs {sorted(missing)}: include 5 and 40")
    return dict(other_at_5=int(s.loc[5, "n_other"]), other_at_40=int(s.loc[40, "n_other"]),
                near_end_at_5=float(s.loc[5, "near_end_share"]))


SWEEP_COLUMNS = ["sinks_per_head", "other_per_head", "n_other", "boundary_share", "near_end_share"]


def cutoff_table(sweeps: dict) -> pd.DataFrame:
    """{model: `cutoff_sweep`} as one table indexed by (model, min_queries), `SWEEP_COLUMNS`, rounded to 3."""
    return pd.concat({n: s.set_index("min_queries")[SWEEP_COLUMNS] for n, s in sweeps.items()}).round(3)


def kind_counts(rows: pd.DataFrame) -> pd.Series:
    """Non-first sinks of a `sink_rows` table by kind (punctuation, newline, other; zeros kept)."""
    other = rows[rows["kind"] != "first"]
    return other["kind"].value_counts().reindex([k for k in KINDS if k != "first"], fill_value=0)


def top_token_quantities(top: pd.DataFrame) -> dict:
    """From `top_tokens`: `top_token` (the most common non-first sink token, repr) and
    `top_token_share` (its share of the non-first sinks); None for both when there is none."""
    if not len(top):
        return dict(top_token=None, top_token_share=None)
    return dict(top_token=top["token"].iloc[0], top_token_share=float(top["share"].iloc[0]))


EPS_VALUES = tuple(np.round(np.arange(0.05, 0.501, 0.05), 2).tolist())  # the sinks chapter's eps sweep


def eps_quantities(sweep: pd.DataFrame) -> dict:
    """From a `sinks.eps_sweep` over `EPS_VALUES`: sinks per head at eps 0.05 (`sph_005`) and 0.5
    (`sph_05`)."""
    s = sweep.set_index("eps")
    return dict(sph_005=float(s.loc[0.05, "sinks_per_head"]), sph_05=float(s.loc[0.5, "sinks_per_head"]))


def teaser(st: SinkStats, text: str, spans, eps: float = DEFAULT_EPS, min_queries: int = CUTOFF) -> dict:
    """The paper's teaser (Fig. 1) on one prompt's statistics (`st`, every key scored): the
    sentences are the token groups of the character `spans` (`sinks.groups_from_spans`), each head
    is tested with `sinks.segment_heads` under the rule and with every key scored.

    Returns `table` (segment_heads under the rule), the `TEASER_QUANTITIES` (`separating`: heads
    that separate the sentences under the rule, `n_heads`, `separating_no_cutoff`), and the head to
    draw: `layer`, `head`, `separates` (`teaser_head`), `caught` (T,) its catching sinks under the
    rule, and `label`, a caption saying whether it separates the sentences."""
    from .sinks import groups_from_spans, segment_heads

    groups = groups_from_spans(st.tokens, text, spans)
    ruled = cut([st], min_queries)[0]
    table = segment_heads(ruled, groups, eps)
    layer, head, ok = teaser_head(table)
    return dict(table=table, separating=int(table["separates"].sum()), n_heads=int(len(table)),
                separating_no_cutoff=int(segment_heads(st, groups, eps)["separates"].sum()),
                layer=layer, head=head, separates=ok,
                caught=ruled.caught(eps)[ruled.layers.index(layer), head].tolist(),
                label=("separates the sentences" if ok
                       else "no head separates the sentences; the closest one"))


TEASER_QUANTITIES = ("separating", "n_heads", "separating_no_cutoff")


# --------------------------------------------------------------------------------------------------
# The catch chapter: tables, the segment map, and the quantities it reports


def catch_tables(stats: Sequence[SinkStats], eps: float = DEFAULT_EPS, min_queries: int = CUTOFF) -> dict:
    """One model's catch tables from its statistics (every key scored, as from `chapter_stats`):
    `stats` (the rule applied, `cut`), `seg` (`tags.segment_table`), `depth` (`tags.catch_by_layer`)
    and `min_tokens` (the shortest prompt, in tokens)."""
    from .tags import catch_by_layer, segment_table

    ruled = cut(stats, min_queries)
    return dict(stats=ruled, seg=segment_table(ruled, eps), depth=catch_by_layer(ruled, eps),
                min_tokens=min(len(st.tokens) for st in ruled))


def map_choice(run: dict, n_layers: int = 3) -> tuple[int, list[int]]:
    """(prompt, layers) of a `catch_tables` run's segment map: `busiest_prompt_layers`, or prompt 0
    and the last layer when no non-first sink catches anything."""
    p, layers = busiest_prompt_layers(run["seg"], n_layers)
    return p, layers or [run["stats"][0].layers[-1]]


def segment_map_data(st: SinkStats, layers: Sequence[int], eps: float = DEFAULT_EPS, window: int = 80) -> dict:
    """What the catch chapter's segment map draws for one prompt: one row per (layer, head) of
    `layers`, one column per token of the first `window` tokens.

    Returns `codes` (rows, W) int: 0 not caught, 1 caught by the first token, 2 + j caught by
    `other_sinks[j]`; `other_sinks` (sorted positions of the non-first sinks that catch something in
    these rows), `sinks` (per row, the positions of that head's sinks within the window), `rows`
    ((layer, head) per row) and `tokens` (the first W tokens)."""
    W = min(window, len(st.tokens))
    idx = [st.layers.index(l) for l in layers]
    caught = st.caught(eps)[idx][..., :W]  # (len(layers), H, W)
    sinks = st.sinks(eps)[idx][..., :W]
    other = sorted({int(k) for k in caught.flatten().tolist() if k > 0})
    code = {k: j + 2 for j, k in enumerate(other)}
    flat = caught.reshape(-1, W)
    codes = np.array([[0 if k < 0 else 1 if k == 0 else code[k] for k in row] for row in flat.tolist()], dtype=int)
    H = caught.shape[1]
    return dict(codes=codes.reshape(-1, W), other_sinks=other, tokens=list(st.tokens[:W]),
                rows=[(int(l), h) for l in layers for h in range(H)],
                sinks=[torch.nonzero(r).flatten().tolist() for r in sinks.reshape(-1, W)])


CATCH_FORMATS = dict(caught_share=".0%", caught_first=".0%", caught_other=".1%", first_len=".0f",
                     first_seg_share=".0%", other_len=".0f", other_seg_share=".0%", other_one_run=".0%",
                     other_starts_after=".0%", other_catching=".0%", other_visible=".0f",
                     boundary_share=".0%", the_share=".0%", the_position=".0f",
                     early=".0%", later=".0%", peak_other=".1%")


def segments_by_kind(seg: pd.DataFrame) -> dict:
    """{"first": the first-token segments, "other": the non-first segments that catch something}
    of a `tags.segment_table`, each left out when empty."""
    parts = dict(first=seg[seg["kind"] == "first"], other=seg[(seg["kind"] != "first") & (seg["n_caught"] > 0)])
    return {k: v for k, v in parts.items() if len(v)}


def _token_label(tokens: pd.Series) -> pd.Series:
    """Tokens as labels: line breaks shown as \\n, spaces stripped, a blank token as '␣'."""
    return tokens.str.replace("\n", "\\n").str.strip().replace("", "␣")


def catch_by_token(seg: pd.DataFrame, n: int = 12) -> pd.Series:
    """Tokens caught by non-first sinks, summed by the sink's token (label as `_token_label`), the
    `n` largest, in decreasing order."""
    other = seg[seg["kind"] != "first"]
    return other.groupby(_token_label(other["token"]))["n_caught"].sum().sort_values(ascending=False).head(n)


def catch_token_quantities(seg: pd.DataFrame, word: str = "the") -> dict:
    """Which tokens the non-first sinks are, weighted by what they catch: `top_token` (repr of the
    leading one, "none" when none), `boundary_share` (share of their catch held by punctuation and
    line breaks, `catch_by_kind`), `the_share` (share held by sinks whose token is `word`, spaces
    stripped) and `the_position` (median position of those sinks; None when there is none)."""
    other = seg[seg["kind"] != "first"]
    by_tok = catch_by_token(seg)
    is_word = _token_label(other["token"]) == word
    k = catch_by_kind(seg)
    return dict(top_token=repr(by_tok.index[0]) if len(by_tok) else "none",
                boundary_share=float(k.loc[["punctuation", "newline"], "share_of_caught"].sum()),
                the_share=float(other[is_word]["n_caught"].sum() / max(other["n_caught"].sum(), 1)),
                the_position=float(other[is_word]["position"].median()) if is_word.any() else None)


def depth_quantities(depth: pd.DataFrame) -> dict:
    """From `tags.catch_by_layer`: `early` and `later`, the share of (token, head) pairs caught in the
    first sixth of the layers (at least one layer) and in the rest (mean over layers), and
    `peak_other_layer` / `peak_other`, the layer where non-first sinks catch the most and that share."""
    if depth.empty:
        raise CatchtagError("catch_by_layer gave no layers: capture at least one layer")
    n = len(depth)
    caught = 1 - depth["not_caught"]
    return dict(early=float(caught.iloc[: max(1, n // 6)].mean()), later=float(caught.iloc[n // 6 :].mean()),
                peak_other_layer=int(depth["layer"][depth["caught_other"].idxmax()]),
                peak_other=float(depth["caught_other"].max()))
