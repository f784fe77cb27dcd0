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
                  progress: bool = True) -> list[dict]:
    """Per prompt: {'q': (L, H, T), 'k': (L, H, T)} norms of the q_proj and k_proj outputs per head,
    i.e. before QK-norm and RoPE (kv heads repeated to the query heads, as in `capture`)."""
    import nnsight
    from .progress import progress as _bar

    kwargs = trace_kwargs(remote)
    H, dh, Hkv = model.n_heads, model.head_dim, model.n_kv_heads
    out = []
    for text in _bar(list(prompts), desc=f"pre-norm q, k {model.name}", enabled=progress and len(prompts) > 1):
        ids = tokenize(model, text)
        T = len(ids)
        with torch.no_grad(), model.lm.trace(ids[None, :], **kwargs):
            qs = nnsight.save([])
            ks = nnsight.save([])
            for layer in range(model.n_layers):
                attn = model.lm.model.layers[layer].self_attn
                qs.append(attn.q_proj.output[0].reshape(T, H, dh).norm(dim=-1))
                ks.append(attn.k_proj.output[0].reshape(T, Hkv, dh).norm(dim=-1))
        q = torch.stack([x.float().T for x in qs])  # (L, H, T)
        k = torch.stack([x.float().T for x in ks]).repeat_interleave(H // Hkv, dim=1)
        out.append(dict(q=q, k=k))
    return out


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
        kinds = [token_kind(t, i) for i, t in enumerate(cap.tokens)]
        sinks = st.sinks(eps)
        for li, layer in enumerate(st.layers):
            ai = cap.attn_inputs[layer]
            q, k = ai.q.double(), ai.k.double()  # (H, T, dh)
            H, T, _ = q.shape
            qn, kn = q.norm(dim=-1), k.norm(dim=-1)  # (H, T)
            cosm = (q / qn[..., None].clamp_min(1e-12)) @ (k / kn[..., None].clamp_min(1e-12)).transpose(1, 2)
            causal = torch.tril(torch.ones(T, T, dtype=torch.bool))  # [i, j]: i >= j
            if ai.sliding_window:
                causal &= (torch.arange(T)[:, None] - torch.arange(T)[None, :]) < ai.sliding_window
            n_seen = causal.sum(0).clamp_min(1)  # queries that see j
            cos = (cosm * causal).sum(1) / n_seen  # (H, T): mean over i of cos(q_i, k_j)
            logit = ((q @ k.transpose(1, 2)) * ai.scaling * causal).sum(1) / n_seen
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
            df.insert(4, "kind", [kinds[j] for j in df["position"]])
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
    that has at least one sink and one non-sink and averaged."""
    aucs = []
    for _, g in table.groupby(["prompt", "layer", "head"]):
        s = g.loc[g["sink"], column].to_numpy()
        n = g.loc[~g["sink"], column].to_numpy()
        if len(s) == 0 or len(n) == 0:
            continue
        gt = (s[:, None] > n[None, :]).mean() + 0.5 * (s[:, None] == n[None, :]).mean()
        aucs.append(gt)
    return float(np.mean(aucs)) if aucs else float("nan")


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
