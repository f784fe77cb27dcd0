"""Query-key normalization (paper §6): how sinks form when query and key norms are bounded.

The paper reports that with QK-norm "the total number of sinks remains similar" and that non-first
sinks become more common. Our offline pair is Gemma-3-270M (QK-norm: an RMSNorm with a learned
scale on every query and key head vector, before RoPE) and SmolLM2-135M (no QK-norm). They differ in
much more than QK-norm (size, data, tokenizer, a <bos> token, sliding-window layers), so the
comparison is an observation on two models, not a controlled experiment.

The mechanism side (ours): for every head and key position j we measure

- `k_norm`: |k_j| after RoPE and QK-norm (what the attention call sees; RoPE is a rotation, so it
  does not change norms), and `k_pre`: |k_j| before QK-norm (the k_proj output of that head);
  likewise `q_norm` and `q_pre` for position j as a query;
- `cos`: the mean over the queries i >= j that see j of cos(q_i, k_j), the alignment of the key
  with the queries;
- `logit`: the mean over the same queries of scaling * q_i . k_j = scaling |q_i| |k_j| cos;
- `k_rel`: k_norm divided by the median k_norm over the prompt's positions in that head.

Every quantity is defined on the book's definitions page (`book/definitions.md`). A key is a sink
when its received attention alpha_j exceeds eps and at least 10 later queries see it (the census
rule; `catchtag.sinks.census`, `catchtag.census_views`). With QK-norm the
post-norm key norm is bounded by sqrt(head_dim) * max_i |1 + gamma_i| (Gemma's RMSNorm scales by
1 + gamma), so a sink cannot win by a large key norm alone: it has to win by direction (`cos`).

The §6 comparison (`compare_census`) reads two `sinks.census` dicts and returns the verdicts with
their rules (ours): the totals are "similar" when the ratio of sinks per head (QK-norm over none)
is within [0.8, 1.25]; non-first sinks are "more common" when their share of all sinks is larger
with QK-norm.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from .capture import Capture, tokenize
from .errors import CatchtagError
from .models import Model
from .remote import trace_kwargs
from .sinks import DEFAULT_EPS, SinkStats, check_eps, token_kind


def prenorm_norms(model: Model, prompts: Sequence[str], remote: bool | str = False,
                  progress: bool = True, batch_size: int = 1) -> list[dict]:
    """Per prompt: {'q': (L, H, T), 'k': (L, H, T)} norms of the q_proj and k_proj outputs per head,
    i.e. before QK-norm and RoPE (kv heads repeated to the query heads, as in `capture`).

    `batch_size` prompts per forward, right-padded with no attention mask, as `capture` does: under
    causal attention a real token never sees the padding after it, so each prompt's norms are its
    own (equal to one prompt at a time up to float rounding)."""
    import nnsight
    from .progress import progress as _bar

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise CatchtagError(f"batch_size={batch_size!r} is not valid: use a whole number of prompts >= 1")
    kwargs = trace_kwargs(remote)
    H, dh, Hkv = model.n_heads, model.head_dim, model.n_kv_heads
    prompts = list(prompts)
    groups = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    out = []
    for group in _bar(groups, desc=f"pre-norm q, k {model.name}", enabled=progress and len(groups) > 1):
        ids = [tokenize(model, text) for text in group]
        lengths = [len(x) for x in ids]
        T = max(lengths)
        batch = torch.zeros(len(ids), T, dtype=torch.long)  # right padding: never seen by a real token
        for b, x in enumerate(ids):
            batch[b, :len(x)] = x
        if kwargs:  # NDIF (or its local dry run): through nnsight
            with torch.no_grad(), model.lm.trace(batch, **kwargs):
                qs = nnsight.save([])
                ks = nnsight.save([])
                for layer in range(model.n_layers):
                    attn = model.lm.model.layers[layer].self_attn
                    qs.append(attn.q_proj.output.reshape(len(ids), T, H, dh).norm(dim=-1))
                    ks.append(attn.k_proj.output.reshape(len(ids), T, Hkv, dh).norm(dim=-1))
        else:
            qs, ks = _projection_norms(model, batch)
        out += _per_prompt(qs, ks, lengths, H // Hkv)
    return out


def _per_prompt(qs: list, ks: list, lengths: list[int], rep: int) -> list[dict]:
    """One batch's per-layer norms, (B, T, H) for q and (B, T, Hkv) for k, as one dict per prompt:
    q (L, H, n) and k (L, H, n) (kv heads repeated `rep` times to the query heads), n its length."""
    return [dict(q=torch.stack([x[b, :n].float().T for x in qs]),
                 k=torch.stack([x[b, :n].float().T for x in ks]).repeat_interleave(rep, dim=1))
            for b, n in enumerate(lengths)]


class _Stop(Exception):
    pass


def _projection_norms(model: Model, batch: torch.Tensor) -> tuple[list, list]:
    """Locally, without nnsight: per layer, the (B, T, H) norms of each head's q_proj and (B, T,
    Hkv) of k_proj outputs, read by forward hooks on the model's own modules; the forward stops
    after the last layer's k_proj (nothing later is needed)."""
    B, T = batch.shape
    H, dh, Hkv, L = model.n_heads, model.head_dim, model.n_kv_heads, model.n_layers
    qs, ks, hooks = [None] * L, [None] * L, []

    def hook(store, layer, heads, last):
        def fn(module, args, output):
            store[layer] = output.detach().reshape(B, T, heads, dh).norm(dim=-1)
            if last:
                raise _Stop
        return fn

    layers = model.hf.model.layers
    for layer in range(L):
        attn = layers[layer].self_attn
        hooks.append(attn.q_proj.register_forward_hook(hook(qs, layer, H, False)))
        hooks.append(attn.k_proj.register_forward_hook(hook(ks, layer, Hkv, layer == L - 1)))
    try:
        with torch.no_grad():
            model.hf.model(input_ids=batch, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in hooks:
            h.remove()
    if any(x is None for x in qs + ks):
        raise CatchtagError(f"model {model.name!r}: not every layer's q_proj and k_proj ran; cannot read pre-norm norms")
    return qs, ks


def _capture_with_prenorm(model: Model, prompts: list[str], batch_size: int = 1) -> tuple[list, list[dict]]:
    """Locally: (`capture(model, prompts, resid=False, batch_size=batch_size)`, `prenorm_norms`'s
    list for the same prompts), the norms read by forward hooks on each layer's q_proj and k_proj
    during the capture's forward passes (the same right-padded batches `prenorm_norms` runs, so the
    same numbers, without its extra forward)."""
    from .capture import capture

    H, dh, Hkv, L = model.n_heads, model.head_dim, model.n_kv_heads, model.n_layers
    passes: list[dict] = []  # one per forward pass: {"q": [L], "k": [L]}

    def hook(kind, layer, heads):
        def fn(module, args, output):
            if output.device.type == "meta":
                return
            if kind == "q" and layer == 0:
                passes.append(dict(q=[None] * L, k=[None] * L))
            passes[-1][kind][layer] = output.detach().reshape(*output.shape[:2], heads, dh).norm(dim=-1)
        return fn

    hooks = []
    for layer in range(L):
        attn = model.hf.model.layers[layer].self_attn
        hooks.append(attn.q_proj.register_forward_hook(hook("q", layer, H)))
        hooks.append(attn.k_proj.register_forward_hook(hook("k", layer, Hkv)))
    try:
        caps = capture(model, prompts, resid=False, batch_size=batch_size)
    finally:
        for h in hooks:
            h.remove()
    groups = [caps[i:i + batch_size] for i in range(0, len(caps), batch_size)]
    if len(passes) != len(groups) or any(x is None for f in passes for x in f["q"] + f["k"]):
        raise CatchtagError(f"model {model.name!r}: not every layer's q_proj and k_proj ran; cannot read pre-norm norms")
    pre = []
    for f, group in zip(passes, groups):
        pre += _per_prompt(f["q"], f["k"], [cap.n_tokens for cap in group], H // Hkv)
    return caps, pre


def norm_bounds(model: Model) -> pd.DataFrame:
    """Per layer, for models with QK-norm: the largest post-norm query and key norms the norm
    allows, sqrt(dh) * max|scale|, and the norm of a vector spread evenly, sqrt(sum scale^2).
    The scale is 1 + weight for Gemma's RMSNorm, the weight itself otherwise. Empty without QK-norm."""
    rows = []
    hf = model.hf
    for layer in range(model.n_layers):
        attn = hf.model.layers[layer].self_attn
        if not hasattr(attn, "k_norm"):
            return pd.DataFrame(columns=["layer", "q_max", "k_max", "q_even", "k_even", "scaling"])
        row = dict(layer=layer)
        for name in ("q", "k"):
            norm = getattr(attn, f"{name}_norm")
            w = norm.weight.detach().double()
            scale = 1 + w if "Gemma" in type(norm).__name__ else w
            row[f"{name}_max"] = float(np.sqrt(model.head_dim) * scale.abs().max())
            row[f"{name}_even"] = float(scale.norm())
        row["scaling"] = float(getattr(attn, "scaling", model.head_dim**-0.5))
        rows.append(row)
    return pd.DataFrame(rows)


def _window_sums(x: torch.Tensor, window: int) -> torch.Tensor:
    """(H, T, d) -> (H, T, d): row j is the sum of rows j .. min(j + window, T) - 1 of x."""
    suffix = torch.flip(torch.cumsum(torch.flip(x, [1]), 1), [1])  # row j: sum of rows j .. T - 1
    if window >= x.shape[1]:
        return suffix
    out = suffix.clone()
    out[:, :-window] -= suffix[:, window:]
    return out


def qk_table(caps: Sequence[Capture], stats: Sequence[SinkStats], eps: float = DEFAULT_EPS,
             pre: Sequence[dict] | None = None, min_queries: int | None = None) -> pd.DataFrame:
    """One row per (prompt, layer, head, key position j) with alpha defined (enough queries see j).

    Columns: prompt, layer, head, position, kind ('first', 'punctuation', 'newline', 'other'),
    received, sink (alpha > eps), k_norm, q_norm, k_rel, cos, logit and, when `pre` (from
    `prenorm_norms`) is given, k_pre and q_pre.
    """
    eps = check_eps(eps)
    if len(caps) != len(stats):
        raise CatchtagError(f"{len(stats)} SinkStats for {len(caps)} captures: pass one per capture")
    parts = []
    for p, (cap, st) in enumerate(zip(caps, stats)):
        kinds = np.array([token_kind(t, i) for i, t in enumerate(cap.tokens)], dtype=object)
        sinks = st.sinks(eps)
        for li, layer in enumerate(st.layers):
            ai = cap.attn_inputs[layer]
            q, k = ai.q.double(), ai.k.double()  # (H, T, dh)
            H, T, _ = q.shape
            qn, kn = q.norm(dim=-1), k.norm(dim=-1)  # (H, T)
            # the queries i that see key j are i = j .. j + W - 1 (W: the sliding window, else all
            # later ones), so a sum over them of q_i . k_j is (sum of those q_i) . k_j: suffix sums
            # of the queries, without the T x T matrices
            W = min(ai.sliding_window or T, T)
            n_seen = torch.clamp(T - torch.arange(T), max=W)  # queries that see j
            q_hat = q / qn[..., None].clamp_min(1e-12)
            cos = (_window_sums(q_hat, W) * (k / kn[..., None].clamp_min(1e-12))).sum(-1) / n_seen  # (H, T): mean over i of cos(q_i, k_j)
            logit = (_window_sums(q, W) * k).sum(-1) * ai.scaling / n_seen
            rec = st.received[li]
            valid = ~torch.isnan(rec[0])
            pos = torch.nonzero(valid).flatten()
            med = kn.median(dim=1).values[:, None]
            df = pd.DataFrame(dict(
                prompt=p, layer=layer,
                head=np.repeat(np.arange(H), len(pos)),
                position=np.tile(pos.numpy(), H),
                received=rec[:, pos].reshape(-1).numpy(),
                sink=sinks[li][:, pos].reshape(-1).numpy(),
                k_norm=kn[:, pos].reshape(-1).numpy(),
                q_norm=qn[:, pos].reshape(-1).numpy(),
                k_rel=(kn / med)[:, pos].reshape(-1).numpy(),
                cos=cos[:, pos].reshape(-1).numpy(),
                logit=logit[:, pos].reshape(-1).numpy(),
            ))
            if pre is not None:
                df["k_pre"] = pre[p]["k"][layer][:, pos].reshape(-1).numpy()
                df["q_pre"] = pre[p]["q"][layer][:, pos].reshape(-1).numpy()
            df.insert(4, "kind", kinds[df["position"].to_numpy()])
            parts.append(df)
    return pd.concat(parts, ignore_index=True)


def sink_groups(table: pd.DataFrame) -> pd.Series:
    """'first-token sink', 'other sink' or 'not a sink' for each row of a `qk_table`."""
    g = np.where(table["sink"], np.where(table["position"] == 0, "first-token sink", "other sink"), "not a sink")
    return pd.Series(g, index=table.index, name="group")


def mechanism_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Medians of the q/k statistics for first-token sinks, other sinks and non-sinks."""
    cols = [c for c in ("k_norm", "k_pre", "k_rel", "cos", "logit", "q_norm", "q_pre") if c in table]
    t = table.assign(group=sink_groups(table))
    out = t.groupby("group")[cols].median()
    out["n"] = t.groupby("group").size()
    return out.reindex(["first-token sink", "other sink", "not a sink"])


def separation(table: pd.DataFrame, column: str) -> float:
    """How well `column` alone tells sinks from non-sinks: the area under the ROC curve (0.5 =
    no better than chance, 1 = sinks always higher), computed within each (prompt, layer, head)
    that has at least one sink and one non-sink and averaged.

    Within a head, AUC = P(sink > non-sink) + P(tie) / 2 over all (sink, non-sink) pairs, computed
    from average ranks (the Mann-Whitney U statistic): (sum of the sinks' ranks - n_s (n_s + 1) / 2)
    / (n_s n_n), all heads at once."""
    keys = ["prompt", "layer", "head"]
    t = table[keys + ["sink", column]]
    g = t.groupby(keys, sort=False)
    n_s = g["sink"].transform("sum").to_numpy(dtype=float)
    n = g["sink"].transform("size").to_numpy(dtype=float)
    ranks = g[column].rank(method="average").to_numpy(dtype=float)
    is_sink = t["sink"].to_numpy(dtype=bool)
    per = pd.DataFrame({"grp": g.ngroup().to_numpy(), "r": np.where(is_sink, ranks, 0.0), "n_s": n_s, "n": n})
    agg = per.groupby("grp").agg(r=("r", "sum"), n_s=("n_s", "first"), n=("n", "first"))
    agg = agg[(agg.n_s > 0) & (agg.n > agg.n_s)]
    if not len(agg):
        return float("nan")
    auc = (agg.r - agg.n_s * (agg.n_s + 1) / 2) / (agg.n_s * (agg.n - agg.n_s))
    return float(auc.mean())


REPRODUCED, PARTLY, NOT_REPRODUCED = "reproduced", "partly", "not reproduced"  # the book's verdicts
SIMILAR = (0.8, 1.25)  # (ours) total sinks "remain similar": ratio QK-norm / none within this range
NEARLY = (2 / 3, 1.5)  # (ours) partly: within this wider range


def other_share(c: dict) -> float:
    """Share of all sinks that are not the first token, from a `sinks.census` dict:
    other_per_head / sinks_per_head (NaN when there is no sink)."""
    total = c["sinks_per_head"]
    return float(c["other_per_head"] / total) if total > 0 else float("nan")


def compare_census(no_qk: dict, qk: dict, no_name: str = "without QK-norm", qk_name: str = "with QK-norm") -> dict:
    """The §6 verdicts from the census (`sinks.census`) of a model without and one with QK-norm.

    Returns `sph_ratio` (sinks per head, QK-norm over none), `other_share_no`, `other_share_qk`,
    `verdict_total` ("reproduced" when the ratio is within `SIMILAR`, "partly" within `NEARLY`,
    else "not reproduced"), `verdict_other` ("reproduced" when the non-first share is larger with
    QK-norm, else "not reproduced") and one-line summaries `total_summary`, `other_summary`.
    Raises CatchtagError when a census lacks a key or has no sinks at all."""
    for c, who in ((no_qk, no_name), (qk, qk_name)):
        missing = [k for k in ("sinks_per_head", "other_per_head") if k not in c]
        if missing:
            raise CatchtagError(f"the census of {who} lacks {', '.join(missing)}: pass a sinks.census(...) dict")
        if not c["sinks_per_head"] > 0:
            raise CatchtagError(f"{who} has no sinks at all: lower eps or use longer prompts")
    ratio = qk["sinks_per_head"] / no_qk["sinks_per_head"]
    a, b = other_share(no_qk), other_share(qk)
    if SIMILAR[0] <= ratio <= SIMILAR[1]:
        total = REPRODUCED
    elif NEARLY[0] <= ratio <= NEARLY[1]:
        total = PARTLY
    else:
        total = NOT_REPRODUCED
    other = REPRODUCED if b > a else NOT_REPRODUCED
    word = "similar" if total == REPRODUCED else ("higher" if ratio > 1 else "lower") + " with QK-norm"
    return dict(
        sph_ratio=float(ratio), other_share_no=a, other_share_qk=b,
        verdict_total=total, verdict_other=other,
        total_summary=(f"{word}: {no_qk['sinks_per_head']:.2f} sinks per head {no_name}, "
                       f"{qk['sinks_per_head']:.2f} {qk_name} (ratio {ratio:.2f})"),
        other_summary=(f"{'more' if b > a else 'less'} common with QK-norm: {a:.0%} of sinks are not the "
                       f"first token {no_name}, {b:.0%} {qk_name}"),
    )


# --------------------------------------------------------------------------------------------------
# The chapter's runs and tables


@dataclass
class QKRun:
    """Everything the chapter shows of one model: the loaded `model`, its SinkStats with the census
    rule applied (`stats`), the per-key `table` (`qk_table`), per-head explained variance `ev`
    (`reasoning.head_ev`), the census dict (`census_views.census_at`) and the QK-norm `bounds`
    (`norm_bounds`)."""

    model: Model
    stats: list
    table: pd.DataFrame
    ev: pd.DataFrame
    census: dict
    bounds: pd.DataFrame

    @property
    def label(self) -> str:
        """'<name> (QK-norm)' or '<name> (no QK-norm)'."""
        return f"{self.model.name} ({'QK-norm' if self.model.qk_norm else 'no QK-norm'})"

    @property
    def n_heads(self) -> int:
        """Heads of the model, all layers: n_layers x n_heads."""
        return self.model.n_layers * self.model.n_heads

    @cached_property
    def auc(self) -> dict:
        """{column: `separation`} for each of `AUC_COLUMNS` the table has (computed once)."""
        return {c: separation(self.table, c) for c in AUC_COLUMNS if c in self.table}


def measure(model: Model, prompts: Sequence[str], eps: float = DEFAULT_EPS, min_queries: int = 10,
            prenorm: bool = True, remote: bool | str = False, batch_size: int = 1) -> QKRun:
    """One model's run of the chapter: capture every layer's attention inputs on `prompts`
    (`batch_size` prompts per forward), score every key and apply the census rule (keys seen by
    fewer than `min_queries` later queries are not scored; `census_views.cut`), then `qk_table`
    (with the pre-norm norms when `prenorm`), `head_ev`, the census at `eps` and `norm_bounds`.
    Pre-norm norms: `prenorm_norms`'s numbers for a model with QK-norm (locally read by hooks in
    the capture's own forward passes, the same batches: no second forward; on NDIF or its dry run
    one more forward, `prenorm_norms`); without
    QK-norm the k_proj output is the key before RoPE, a rotation, so k_pre and q_pre are the
    post-RoPE norms (equal within float rounding: tests/test_qknorm.py). The captures are dropped
    before returning."""
    from . import census_views as V
    from .capture import capture
    from .reasoning import head_ev

    V.check_cutoff(min_queries)
    if prenorm and model.qk_norm and remote is False:  # read in the capture's own forward passes
        caps, pre = _capture_with_prenorm(model, list(prompts), batch_size)
    else:
        caps = capture(model, list(prompts), resid=False, remote=remote, batch_size=batch_size)
        pre = prenorm_norms(model, prompts, remote=remote, batch_size=batch_size) if prenorm and model.qk_norm else None
    stats = V.cut([V.score_stats(c) for c in caps], min_queries)
    table = qk_table(caps, stats, eps, pre=pre)
    if prenorm and not model.qk_norm:  # no QK-norm: k_proj's output is the key before RoPE, a rotation
        table["k_pre"], table["q_pre"] = table["k_norm"], table["q_norm"]
    run = QKRun(model=model, stats=stats, table=table, ev=head_ev(model, caps, stats, eps),
                census=V.census_at(stats, eps, min_queries), bounds=norm_bounds(model))
    del caps
    return run


def _ev_stats(ev: pd.DataFrame, ev_high: float) -> tuple[float, float]:
    e = ev["ev"].dropna()
    return (float(e.median()), float((e >= ev_high).mean())) if len(e) else (float("nan"), float("nan"))


CENSUS_SPECS = dict(sinks_per_head=".2f", first_share=".2f", other_per_head=".2f", other_share=".0%",
                    ev_median=".0%", ev_high=".0%")


def model_quantities(run: QKRun, ev_high: float = 0.5) -> dict:
    """One model's census numbers for the chapter: sinks_per_head, first_share, other_per_head (the
    census), other_share (`other_share`), ev_median (median EV by tags over heads with a sink, ours)
    and ev_high (share of those heads with EV >= ev_high), None where no head has an EV; and
    min_tokens (the shortest prompt, in tokens). Specs: `CENSUS_SPECS`."""
    med, high = _ev_stats(run.ev, ev_high)
    c = run.census
    return dict(sinks_per_head=c["sinks_per_head"], first_share=c["first_share"], other_per_head=c["other_per_head"],
                other_share=other_share(c), ev_median=None if np.isnan(med) else med,
                ev_high=None if np.isnan(high) else high, min_tokens=min(len(s.tokens) for s in run.stats))


def census_rows(runs: dict, ev_high: float = 0.5) -> pd.DataFrame:
    """The chapter's census table: one column per model (its `QKRun.label`), rows QK-norm, heads,
    the census per head, the share of heads with another sink, the share of sinks not first, the
    median EV by tags and the share of heads with EV >= ev_high."""
    rows = {}
    for r in runs.values():
        med, high = _ev_stats(r.ev, ev_high)
        c = r.census
        rows[r.label] = {
            "QK-norm": r.model.qk_norm, "heads": r.n_heads, "sinks per head": c["sinks_per_head"],
            "first-token sinks per head": c["first_share"], "other sinks per head": c["other_per_head"],
            "heads with another sink": c["heads_with_other"], "share of sinks not first": other_share(c),
            "median EV by tags": med, f"heads with EV >= {ev_high}": high,
        }
    return pd.DataFrame(rows)


PAIR_KEYS = ("sph_ratio", "verdict_total", "verdict_other", "total_summary", "other_summary", "heads_ratio")
PAIR_SPECS = dict(sph_ratio=".2f", heads_ratio=".2f")


def pair_quantities(runs: dict) -> dict:
    """The §6 comparison of a two-model run (`compare_census` on the model without and the one with
    QK-norm): sph_ratio (sinks per head, QK-norm over none), verdict_total, verdict_other,
    total_summary, other_summary; and heads_ratio (heads of the first model over the second's).
    With one model (or two on the same side of QK-norm) every key of `PAIR_KEYS` is None: the
    reproduction page shows those rows as pending."""
    rs = list(runs.values())
    if len(rs) != 2 or rs[0].model.qk_norm == rs[1].model.qk_norm:
        return dict.fromkeys(PAIR_KEYS)
    no, qk = rs if rs[1].model.qk_norm else rs[::-1]
    v = compare_census(no.census, qk.census, f"in {no.model.name}", f"in {qk.model.name}")
    out = {k: v[k] for k in PAIR_KEYS[:-1]}
    out["heads_ratio"] = rs[0].n_heads / rs[1].n_heads
    return out


def depth_profile(run: QKRun, eps: float = DEFAULT_EPS) -> pd.DataFrame:
    """Per layer: `depth` (layer / last layer, 0 to 1), `first_sink` (share of (prompt, head) with
    a first-token sink) and `n_other` (other sinks per head), from `sinks.head_table`."""
    from .sinks import head_table

    by = head_table(run.stats, eps).groupby("layer")[["first_sink", "n_other"]].mean()
    return by.assign(depth=by.index.to_numpy() / max(run.model.n_layers - 1, 1))


AUC_COLUMNS = ("k_norm", "k_pre", "cos", "logit")


def auc_table(runs: dict) -> pd.DataFrame:
    """`separation` (AUC of sinks vs non-sinks in the same head) of each of `AUC_COLUMNS` that the
    tables have, one column per model label."""
    out = pd.DataFrame({r.label: r.auc for r in runs.values()})
    out.index.name = "AUC: sinks vs non-sinks in the same head"
    return out


MECHANISM_SPECS = dict(krel_first=".2f", cos_first=".2f", cos_other=".2f", cos_none=".2f", logit_first=".1f",
                       logit_none=".1f", knorm_none=".0f", qnorm_none=".0f", auc_norm=".2f", auc_cos=".2f",
                       kpre_ratio=".2f", kpost_ratio=".2f")
_MEDIANS = {"krel_first": ("first-token sink", "k_rel"), "cos_first": ("first-token sink", "cos"),
            "cos_other": ("other sink", "cos"), "cos_none": ("not a sink", "cos"),
            "logit_first": ("first-token sink", "logit"), "logit_none": ("not a sink", "logit"),
            "knorm_none": ("not a sink", "k_norm"), "qnorm_none": ("not a sink", "q_norm")}


def mechanism_quantities(run: QKRun) -> dict:
    """One model's mechanism numbers from its `qk_table` (medians of `mechanism_summary`, ours):
    krel_first (a first-token sink's key norm over the median key norm of its head and prompt),
    cos_first / cos_other / cos_none (mean cos(query, key) of first-token sinks, other sinks,
    non-sinks), logit_first / logit_none, knorm_none / qnorm_none (post-norm norms of non-sinks),
    auc_norm / auc_cos (`separation` of k_norm and cos, `QKRun.auc`), and two ratios of medians, first-token
    sink over non-sink key norm: kpre_ratio before QK-norm (None without the pre-norm columns) and
    kpost_ratio after it. Specs: `MECHANISM_SPECS`."""
    ms = mechanism_summary(run.table)
    out = {k: float(ms.loc[g, c]) for k, (g, c) in _MEDIANS.items()}
    out["auc_norm"] = run.auc["k_norm"]
    out["auc_cos"] = run.auc["cos"]
    out["kpre_ratio"] = (float(ms.loc["first-token sink", "k_pre"] / ms.loc["not a sink", "k_pre"])
                         if "k_pre" in ms else None)
    out["kpost_ratio"] = float(ms.loc["first-token sink", "k_norm"] / ms.loc["not a sink", "k_norm"])
    return out


GROUPS = ("not a sink", "other sink", "first-token sink")
GROUP_COLORS = {"not a sink": "0.7", "other sink": "tab:orange", "first-token sink": "tab:blue"}


def scatter_points(table: pd.DataFrame, max_none: int = 4000, seed: int = 0) -> dict:
    """{group: (rows to draw, rows in the group)} for the scatter of every key: all sinks, and at
    most `max_none` non-sinks drawn at random (`seed`), in `GROUPS` order."""
    rng = np.random.default_rng(seed)
    t = table.assign(group=sink_groups(table))
    out = {}
    for g in GROUPS:
        part = t[t["group"] == g]
        n = len(part)
        if g == "not a sink" and n > max_none:
            part = part.iloc[rng.choice(n, max_none, replace=False)]
        out[g] = (part, n)
    return out


def norm_boxes(table: pd.DataFrame) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(group, key norms before QK-norm, after) for first-token sinks, other sinks and non-sinks."""
    t = table.assign(group=sink_groups(table))
    return [(g, t.loc[t["group"] == g, "k_pre"].to_numpy(), t.loc[t["group"] == g, "k_norm"].to_numpy())
            for g in GROUPS[::-1]]
