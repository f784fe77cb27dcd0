"""Release: do later layers retrieve the tokens a prompt-dependent sink caught, by their tag?

The test (ours; the paper states the mechanism and shows it by construction in §7). Take prompts
where a statement-final "." (or a line break) is a sink that catches the tokens after it in one or
more heads ("catching heads", `dot_sinks`). Rerun the prompt with, at once in every catching head
(l, h) and at every token i the head catches, the sink's contribution to the head's output changed:

- "removed": A_is W_O^h v_s is taken out (the tag this head gave token i);
- "swap first": v_s replaced by the first token's value v_0 of the same head;
- "swap other": v_s replaced by the value of another prompt's "." sink in the same head;
- "random": an edit of the same norm as "removed", ||A_is W_O^h v_s|| u_h, along one random unit
  direction u_h inside the head's W_O column space (so it is a vector the head could write).

Edits are made where the head's write reaches the residual stream: on the output of `o_proj`, or,
for a model with a post-attention norm (Gemma), on the norm's output, mapped there with the clean
run's rms (`catchtag.capture.to_residual`), so the edit never changes the rms the other heads are
divided by. Deltas are computed from the clean run; an edit in an early layer also changes what
later catching heads compute, which the later edits do not follow (stated in the chapter).

Outcomes, against the clean run: for every head of the layers after the first edited layer, the
*segment contrast* of the queries after the sink, c = mean_i (sum_{j in after, j <= i} A_ij - sum_{j
in before} A_ij), "after" the tokens following the sink, "before" the tokens between the first
token and the sink (both excluding the first token and the sink); the change of c per head
(`dcontrast`) and its mean absolute size over heads (`shift`); the next-token loss over the
positions after the sink (`dloss`). Intervals: bootstrap over prompts (`bootstrap_ci`).

The edited runs go through `capture_edited`, which is `catchtag.capture`'s trace with an edit hook:
the same attention-op inputs (`attention_op_name`, `trace_kwargs`), the same AttnInputs fields
(learned sink logits and softcap included); a test checks that a zero edit gives capture()'s
AttnInputs and logits.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from .capture import (AttnInputs, Capture, attention_op_name, attention_probs, attention_rms, mask_2d,
                      o_proj_weight, post_attention_norm, repeat_kv, to_residual)
from .errors import CatchtagError
from .models import Model
from .remote import trace_kwargs
from .sinks import DEFAULT_EPS, SinkStats, check_eps, token_kind

CONDITIONS = ("removed", "swap first", "swap other", "random")
REPRODUCED, PARTLY, NOT_REPRODUCED, OFFLINE = "reproduced", "partly", "not reproduced", "not testable offline"


# --------------------------------------------------------------------------------------------------
# Capture with an edit hook (one capture path for plain and edited runs)


def _attn_inputs(saved, H: int, T: int, b: int) -> AttnInputs:
    """Batch element b of one layer's saved attention-op inputs, as capture() builds them."""
    q, k, v, mask, scaling, window, sinks, softcap = saved
    if scaling is None:
        scaling = 1.0 / math.sqrt(q.shape[-1])
    return AttnInputs(
        q=q[b].float(), k=repeat_kv(k[b].float(), H), v=repeat_kv(v[b].float(), H),
        mask=mask_2d(mask[b : b + 1] if mask is not None and mask.dim() == 4 else mask, T),
        scaling=float(scaling), sliding_window=int(window) if window else None,
        sink_logits=None if sinks is None else sinks.detach().float().reshape(-1),
        softcap=float(softcap) if softcap else None,
    )


def edit_site(model: Model, layer: int):
    """The module whose output is the attention block's write to the residual stream: Gemma's
    post-attention norm where the model has one, else `o_proj`."""
    block = model.lm.model.layers[layer]
    return block.post_attention_layernorm if post_attention_norm(model, layer) is not None else block.self_attn.o_proj


def capture_edited(
    model: Model,
    input_ids: torch.Tensor,
    edits: Sequence[dict[int, torch.Tensor]],
    layers: Sequence[int] = (),
    remote: bool | str = False,
) -> tuple[torch.Tensor, dict[int, list[AttnInputs]]]:
    """Run the prompt once per element of `edits` (one batch, one nnsight trace), adding each
    edits[b][layer] (T, d_model) to the attention block's write at `layer` (`edit_site`). Returns
    the logits (B, T, vocab) and, for each layer in `layers`, one AttnInputs per batch element
    (the inputs of that layer's attention call, as `catchtag.capture.capture` keeps them). An empty
    dict is the clean run. The model is unchanged afterwards."""
    import nnsight

    kwargs = trace_kwargs(remote)
    T = int(input_ids.shape[-1])
    B = len(edits)
    if B == 0:
        raise CatchtagError("no runs given: pass at least one edit dict ({} is the clean run)")
    edit_layers = sorted({int(l) for e in edits for l in e})
    for l in edit_layers:
        model.check_layer_head(l)
    wanted = sorted({int(l) for l in layers})
    for l in wanted:
        model.check_layer_head(l)
    D = {}
    for l in edit_layers:
        parts = []
        for e in edits:
            d = torch.as_tensor(e[l], dtype=torch.float32) if l in e else torch.zeros(T, model.d_model)
            if tuple(d.shape) != (T, model.d_model):
                raise CatchtagError(f"an edit must be (T, d_model) = ({T}, {model.d_model}), got {tuple(d.shape)}")
            parts.append(d)
        D[l] = torch.stack(parts)
    ids = input_ids.reshape(1, T).repeat(B, 1)
    op = attention_op_name(model)
    lm = model.lm
    last = max(edit_layers + wanted) if (edit_layers or wanted) else -1
    with torch.no_grad(), lm.trace(ids, **kwargs):
        saved = nnsight.save([])
        for l in range(last + 1):
            block = lm.model.layers[l]
            if l in wanted:
                args, kw = getattr(block.self_attn.source, op).inputs
                saved.append((args[1], args[2], args[3], args[4] if len(args) > 4 else kw.get("attention_mask"),
                              kw.get("scaling"), kw.get("sliding_window"), kw.get("s_aux"), kw.get("softcap")))
            if l in D:
                site = edit_site(model, l)
                site.output = site.output + D[l].to(site.output.dtype)
        logits = nnsight.save(lm.lm_head.output)
    H = model.n_heads
    out = {l: [_attn_inputs(s, H, T, b) for b in range(B)] for l, s in zip(wanted, list(saved))}
    return logits.float(), out


# --------------------------------------------------------------------------------------------------
# Which "." sinks catch, and where


def dot_sinks(caps: Sequence[Capture], stats: Sequence[SinkStats], eps: float = DEFAULT_EPS,
              min_caught: int = 2, min_after: int = 3) -> pd.DataFrame:
    """One row per (prompt, position, layer, head) where a statement-final "." or a line break
    (token kind punctuation with "." in it, or newline; not the first token; at least `min_after`
    tokens after it) is a sink that catches at least `min_caught` of the tokens after it.
    Columns: prompt, position, token, layer, head, n_caught, n_after."""
    eps = check_eps(eps)
    rows = []
    for p, (cap, st) in enumerate(zip(caps, stats)):
        S, C = st.sinks(eps), st.caught(eps)
        T = len(cap.tokens)
        for s, tok in enumerate(cap.tokens):
            kind = token_kind(tok, s)
            if s == 0 or T - 1 - s < min_after or not (kind == "newline" or (kind == "punctuation" and "." in tok)):
                continue
            n = (C[:, :, s + 1:] == s).sum(-1) * S[:, :, s]  # (L, H)
            for li, h in torch.nonzero(n >= min_caught).tolist():
                rows.append(dict(prompt=p, position=s, token=tok, layer=st.layers[li], head=h,
                                 n_caught=int(n[li, h]), n_after=T - 1 - s))
    return pd.DataFrame(rows, columns=["prompt", "position", "token", "layer", "head", "n_caught", "n_after"])


def choose_dot_sinks(table: pd.DataFrame, min_heads: int = 1) -> pd.DataFrame:
    """Per prompt, the "." sink that catches in the most heads (at least `min_heads`; ties: the
    earlier one). Columns: prompt, position, token, n_heads, heads (list of (layer, head))."""
    rows = []
    for p, g in table.groupby("prompt"):
        best = None
        for s, gs in g.groupby("position"):
            if len(gs) >= min_heads and (best is None or len(gs) > best[1]):
                best = (int(s), len(gs), gs.token.iloc[0], list(zip(gs.layer.astype(int), gs["head"].astype(int))))
        if best:
            rows.append(dict(prompt=int(p), position=best[0], token=best[2], n_heads=best[1], heads=best[3]))
    return pd.DataFrame(rows, columns=["prompt", "position", "token", "n_heads", "heads"])


# --------------------------------------------------------------------------------------------------
# The edits


def _wo(model: Model, layer: int, head: int, x: torch.Tensor) -> torch.Tensor:
    """W_O^h x (d_model,) for a value-space vector x (head_dim,)."""
    dh = model.head_dim
    return o_proj_weight(model, layer).double()[:, head * dh:(head + 1) * dh] @ x.double()


def _col_space_direction(model: Model, layer: int, head: int, gen: torch.Generator) -> torch.Tensor:
    """A random unit vector in the column space of W_O^h (d_model,)."""
    w = o_proj_weight(model, layer).double()
    dh = model.head_dim
    r = torch.randn(dh, generator=gen, dtype=torch.float64)
    u = w[:, head * dh:(head + 1) * dh] @ r
    return u / u.norm().clamp_min(1e-12)


def release_edits(
    model: Model,
    cap: Capture,
    st: SinkStats,
    position: int,
    heads: Sequence[tuple[int, int]],
    eps: float = DEFAULT_EPS,
    other_value: dict[tuple[int, int], torch.Tensor] | None = None,
    seed: int = 0,
) -> dict[str, dict[int, torch.Tensor]]:
    """The edits of `CONDITIONS` for one prompt: {condition: {layer: (T, d_model) residual write}}.

    For each catching head (layer, head) in `heads` and each token i > position the sink catches
    in it: removed = -A_is W_O^h v_s; swap first = A_is W_O^h (v_0 - v_s); swap other = A_is W_O^h
    (v' - v_s) with v' = other_value[(layer, head)] (the condition is left out when `other_value`
    is None); random = ||A_is W_O^h v_s|| u_h, u_h a unit vector in W_O^h's column space drawn from
    `seed`. All are mapped to the residual write with the clean run's post-attention rms
    (`to_residual`; the identity for models without that norm)."""
    eps = check_eps(eps)
    T = len(cap.tokens)
    caught = st.caught(eps)
    out: dict[str, dict[int, torch.Tensor]] = {c: {} for c in CONDITIONS if c != "swap other" or other_value}
    gen = torch.Generator().manual_seed(int(seed))
    by_layer: dict[int, list[int]] = {}
    for l, h in heads:
        model.check_layer_head(l, h)
        by_layer.setdefault(int(l), []).append(int(h))
    for l, hs in sorted(by_layer.items()):
        ai = cap.attn_inputs[l]
        A = attention_probs(ai).double()  # (H, T, T)
        rms = attention_rms(model, cap, l)
        acc = {c: torch.zeros(T, model.d_model, dtype=torch.float64) for c in out}
        for h in hs:
            rows = [i for i in range(position + 1, T) if int(caught[st.layers.index(l), h, i]) == position]
            if not rows:
                continue
            a = A[h, rows, position][:, None]  # (n, 1)
            v = ai.v.double()
            new = {"removed": torch.zeros_like(v[h, position]), "swap first": v[h, 0]}
            if other_value:
                new["swap other"] = torch.as_tensor(other_value[(l, h)], dtype=torch.float64)
            for c, vn in new.items():
                acc[c][rows] += a * _wo(model, l, h, vn - v[h, position])
            t = _wo(model, l, h, v[h, position])
            u = _col_space_direction(model, l, h, gen)
            acc["random"][rows] += (a * t.norm()) * u
        for c in out:
            out[c][l] = acc[c] if rms is None else to_residual(model, l, acc[c], rms.double())
    return out


# --------------------------------------------------------------------------------------------------
# Outcomes


def segment_contrast(A: torch.Tensor, position: int) -> torch.Tensor:
    """(H,) mean over queries i > position of (attention on the tokens after `position`, up to i,
    minus attention on the tokens 1..position-1), for attention maps A (H, T, T)."""
    T = A.shape[-1]
    q = torch.arange(position + 1, T)
    after = A[:, q][:, :, position + 1:].sum(-1)
    before = A[:, q][:, :, 1:position].sum(-1)
    return (after - before).mean(-1)


def _token_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, T-1) next-token cross-entropy."""
    lp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    return -lp.gather(-1, ids[1:].reshape(1, -1, 1).expand(lp.shape[0], -1, 1))[..., 0]


def release_test(
    model: Model,
    caps: Sequence[Capture],
    stats: Sequence[SinkStats],
    chosen: pd.DataFrame,
    eps: float = DEFAULT_EPS,
    seed: int = 0,
    remote: bool | str = False,
    progress: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run every prompt of `chosen` (`choose_dot_sinks`) clean and under each condition.

    The "swap other" value of a head comes from the next chosen prompt (cyclically), at its "."
    sink, in the same head. Returns (effects, per_head): effects has one row per (prompt,
    condition) with `dloss` (edited minus clean mean CE over the positions after the sink),
    `shift` (mean over later heads of |dcontrast|), `dcontrast` (mean signed change), `edit_norm`
    (mean norm of the edit over edited tokens), `clean_loss`, `n_heads`; per_head has one row per
    (prompt, condition, layer, head) with `contrast_clean` and `dcontrast`. Later heads: every
    head of the layers after the first edited layer."""
    from .progress import progress as progress_bar

    if len(chosen) == 0:
        raise CatchtagError("no prompt has a catching '.' sink: nothing to edit (see dot_sinks)")
    rows, parts = [], []
    plist = chosen.to_dict("records")
    for n, rec in enumerate(progress_bar(plist, f"release {model.name}", enabled=progress)):
        p, s, heads = rec["prompt"], rec["position"], rec["heads"]
        cap, st = caps[p], stats[p]
        other = plist[(n + 1) % len(plist)] if len(plist) > 1 else None
        ov = None
        if other is not None:
            oc = caps[other["prompt"]]
            ov = {(l, h): oc.attn_inputs[l].v[h, other["position"]] for l, h in heads}
        edits = release_edits(model, cap, st, s, heads, eps, ov, seed=seed * 1_000_003 + p)
        conds = [c for c in CONDITIONS if c in edits]
        first = min(l for l, _ in heads)
        later = list(range(first + 1, model.n_layers))
        logits, attn = capture_edited(model, cap.input_ids, [{}] + [edits[c] for c in conds], later, remote)
        ce = _token_ce(logits, cap.input_ids)[:, s:].mean(-1)  # predicting tokens after the sink
        c0 = {l: segment_contrast(attention_probs(attn[l][0]).double(), s) for l in later}
        for ci, c in enumerate(conds, start=1):
            d_all = []
            for l in later:
                d = segment_contrast(attention_probs(attn[l][ci]).double(), s) - c0[l]
                d_all.append(d)
                for h in range(model.n_heads):
                    parts.append(dict(prompt=p, condition=c, layer=l, head=h, contrast_clean=float(c0[l][h]),
                                      dcontrast=float(d[h])))
            d_all = torch.cat(d_all) if d_all else torch.zeros(0)
            norms = torch.cat([e.norm(dim=-1)[e.norm(dim=-1) > 0] for e in edits[c].values()])
            rows.append(dict(prompt=p, condition=c, dloss=float(ce[ci] - ce[0]),
                             shift=float(d_all.abs().mean()) if d_all.numel() else float("nan"),
                             dcontrast=float(d_all.mean()) if d_all.numel() else float("nan"),
                             edit_norm=float(norms.mean()) if norms.numel() else float("nan"),
                             clean_loss=float(ce[0]), n_heads=len(heads)))
    return pd.DataFrame(rows), pd.DataFrame(parts)


# --------------------------------------------------------------------------------------------------
# Statistics and verdict


def bootstrap_ci(x, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean of x and its percentile bootstrap interval (resampling the
    units, here prompts, with replacement; `seed` fixes the draws). NaNs are dropped; with fewer
    than two values the interval is NaN."""
    x = np.asarray(x, dtype=float)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return (float("nan"),) * 3
    m = float(x.mean())
    if x.size < 2:
        return m, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return m, float(lo), float(hi)


def effect_summary(effects: pd.DataFrame, measures: Sequence[str] = ("shift", "dloss", "dcontrast"),
                   seed: int = 0) -> pd.DataFrame:
    """Per measure and condition: mean and bootstrap 95% CI over prompts; plus the paired
    differences of each condition minus "random" (same prompts). Columns: measure, contrast,
    mean, low, high, n."""
    rows = []
    for meas in measures:
        wide = effects.pivot(index="prompt", columns="condition", values=meas)
        for c in [c for c in CONDITIONS if c in wide]:
            m, lo, hi = bootstrap_ci(wide[c], seed=seed)
            rows.append(dict(measure=meas, contrast=c, mean=m, low=lo, high=hi, n=int(wide[c].notna().sum())))
        if "random" in wide:
            for c in [c for c in CONDITIONS if c in wide and c != "random"]:
                diff = (wide[c] - wide["random"]).dropna()
                m, lo, hi = bootstrap_ci(diff, seed=seed)
                rows.append(dict(measure=meas, contrast=f"{c} - random", mean=m, low=lo, high=hi, n=len(diff)))
    return pd.DataFrame(rows, columns=["measure", "contrast", "mean", "low", "high", "n"])


def model_release_finding(summary: pd.DataFrame | None) -> str:
    """One model's reading of `effect_summary`: "retrieval" when removing the tag shifts later
    heads' segment contrast more than the same-norm random edit (the paired 95% CI of removed -
    random for `shift` is above 0); "none" when it is not; "untested" when the model has no
    catching '.' sink (summary None or empty)."""
    if summary is None or len(summary) == 0:
        return "untested"
    r = summary[(summary.measure == "shift") & (summary.contrast == "removed - random")]
    if not len(r) or np.isnan(r["low"].iloc[0]):
        return "untested"
    return "retrieval" if r["low"].iloc[0] > 0 else "none"


def verdict_release(findings: dict[str, str]) -> str:
    """The verdict on "later layers retrieve tokens by their tag" from each model's
    `model_release_finding`: "reproduced" when every model was tested and shows retrieval beyond
    the random edit, "partly" when some model shows it (and another does not, or could not be
    tested), "not reproduced" when no tested model shows it, "not testable offline" when no model
    could be tested (no catching '.' sink in enough prompts)."""
    if not findings:
        raise CatchtagError("verdict_release needs at least one model's finding")
    values = list(findings.values())
    if all(f == "untested" for f in values):
        return OFFLINE
    if all(f == "retrieval" for f in values):
        return REPRODUCED
    return PARTLY if "retrieval" in values else NOT_REPRODUCED


def release_summary_text(summary: pd.DataFrame | None, n_prompts: int = 0) -> str:
    """One line for the reproduction page from `effect_summary`: the shift of later heads'
    segment contrast under tag removal and under the random edit, with their 95% CIs, and the
    paired difference; or why there is no test."""
    if summary is None or len(summary) == 0:
        return "no catching '.' sink in enough prompts: not tested"
    s = summary.set_index(["measure", "contrast"])

    def ci(meas, c, spec=".3f"):
        r = s.loc[(meas, c)]
        return f"{r['mean']:{spec}} [{r['low']:{spec}}, {r['high']:{spec}}]"

    return (f"{n_prompts} prompts; segment-contrast shift, tag removed {ci('shift', 'removed')} vs random "
            f"{ci('shift', 'random')} (difference {ci('shift', 'removed - random')}); "
            f"Δloss removed − random {ci('dloss', 'removed - random')} nats")


def later_head_table(per_head: pd.DataFrame) -> pd.DataFrame:
    """Mean over prompts of `dcontrast` per (condition, layer, head), and the clean contrast."""
    g = per_head.groupby(["condition", "layer", "head"])
    return g[["dcontrast", "contrast_clean"]].mean().reset_index()


# --------------------------------------------------------------------------------------------------
# The chapter's steps for one model, and what it shows


CAPTURE_BATCH = 16  # prompts per capture forward (batched capture equals one at a time within 1e-5)


def scan(model: Model, texts: Sequence[str], eps: float = DEFAULT_EPS, remote: bool | str = False,
         batch_size: int = CAPTURE_BATCH) -> dict:
    """Capture every passage (all layers, no residual stream; `batch_size` passages per forward),
    its `sink_stats`, the "." sinks that catch (`dot_sinks`) and the one chosen per passage
    (`choose_dot_sinks`). Returns {"model", "caps", "stats", "scan", "chosen"}."""
    from .capture import capture
    from .sinks import sink_stats

    caps = capture(model, list(texts), resid=False, remote=remote, batch_size=batch_size)
    stats = [sink_stats(c) for c in caps]
    table = dot_sinks(caps, stats, eps)
    return dict(model=model, caps=caps, stats=stats, scan=table, chosen=choose_dot_sinks(table))


def catching_grid(chosen: pd.DataFrame, n_layers: int, n_heads: int) -> np.ndarray:
    """(n_layers, n_heads) count of passages whose chosen "." catches in each head."""
    grid = np.zeros((n_layers, n_heads))
    for heads in chosen.heads:
        for l, h in heads:
            grid[l, h] += 1
    return grid


def scan_quantities(chosen: pd.DataFrame, min_prompts: int) -> tuple[dict, dict]:
    """(values, format specs) for `Results.put_all` from `choose_dot_sinks`: "n_with_sink" passages
    with a catching "."; "heads_per_prompt" mean catching heads; "first_edit_layer_median" median
    over passages of the earliest catching layer; "tested": "yes" when n_with_sink >= min_prompts."""
    n = len(chosen)
    values = {
        "n_with_sink": n,
        "heads_per_prompt": float(chosen.n_heads.mean()) if n else float("nan"),
        "first_edit_layer_median": float(np.median([min(l for l, _ in hs) for hs in chosen.heads])) if n else float("nan"),
        "tested": "yes" if n >= min_prompts else "no",
    }
    return values, {"heads_per_prompt": ".1f", "first_edit_layer_median": ".0f"}


def release_run(run: dict, min_prompts: int, eps: float = DEFAULT_EPS, seed: int = 0,
               remote: bool | str = False, progress: bool = True) -> dict:
    """`release_test` and `effect_summary` for one model's `scan`, when at least `min_prompts`
    passages have a catching "." (else None for each). Returns {"effects", "per_head", "summary"}."""
    if len(run["chosen"]) < min_prompts:
        return dict(effects=None, per_head=None, summary=None)
    effects, per_head = release_test(run["model"], run["caps"], run["stats"], run["chosen"], eps, seed, remote,
                                     progress=progress)
    return dict(effects=effects, per_head=per_head, summary=effect_summary(effects, seed=seed))


def contrast_names() -> list[str]:
    """The contrasts `effect_summary` reports: each condition, and each condition minus "random"."""
    return list(CONDITIONS) + [f"{c} - random" for c in CONDITIONS if c != "random"]


def quantity_key(measure: str, contrast: str) -> str:
    """The glue name of one summary cell: "shift_removed", "dloss_removed_minus_random", ..."""
    return f"{measure}_{contrast.replace(' - ', '_minus_').replace(' ', '_')}"


def release_quantities(run: dict, n_chosen: int) -> tuple[dict, dict]:
    """(values, format specs) for `Results.put_all` from one model's `release_run` result: "finding"
    (`model_release_finding`), "release_summary" (`release_summary_text`); per measure (shift,
    dloss, dcontrast) and contrast (`contrast_names`) the mean ("{measure}_{contrast}", None when
    untested) and its interval text ("..._ci", "n/a" when untested); "clean_loss" and
    "edit_norm_removed" (mean norm of the removal edit), None when untested."""
    s, e = run["summary"], run["effects"]
    values: dict = {"finding": model_release_finding(s), "release_summary": release_summary_text(s, n_chosen)}
    specs: dict = {}
    for meas in ("shift", "dloss", "dcontrast"):
        for c in contrast_names():
            key = quantity_key(meas, c)
            row = None if s is None else s[(s.measure == meas) & (s.contrast == c)]
            ok = row is not None and len(row)
            values[key], specs[key] = (float(row["mean"].iloc[0]) if ok else None), ".3f"
            values[key + "_ci"] = f"[{row['low'].iloc[0]:.3f}, {row['high'].iloc[0]:.3f}]" if ok else "n/a"
    values["clean_loss"] = float(e.clean_loss.mean()) if e is not None else None
    values["edit_norm_removed"] = float(e[e.condition == "removed"].edit_norm.mean()) if e is not None else None
    specs.update(clean_loss=".2f", edit_norm_removed=".2f")
    return values, specs


def summary_points(summary: pd.DataFrame, measure: str) -> list[tuple[str, float, float, float]]:
    """The figure's points for one measure: (condition, mean, low, high) per condition of
    `CONDITIONS` present in `effect_summary`'s frame."""
    out = []
    for c in CONDITIONS:
        row = summary[(summary.measure == measure) & (summary.contrast == c)]
        if len(row):
            out.append((c, *map(float, row[["mean", "low", "high"]].iloc[0])))
    return out


def later_head_grids(per_head: pd.DataFrame, conditions: Sequence[str] = ("removed", "random")) -> tuple[dict, float]:
    """The figure of later heads: ({condition: DataFrame head x layer of the mean signed change of
    the segment contrast}, the largest absolute change over them, 1.0 when all are 0)."""
    t = later_head_table(per_head)
    grids = {c: t[t.condition == c].pivot(index="head", columns="layer", values="dcontrast") for c in conditions}
    return grids, float(t.dcontrast.abs().max()) or 1.0
