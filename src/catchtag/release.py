"""Release: do later layers retrieve caught tokens by their tag? A causal test and a geometric one.

Causal test (ours; PAPER.md "Release"). For a sink head (l, h) and one prompt, let S be the tokens
the head catches (sinks excluded) and P_h the projector on the head's tag subspace. We rerun the
prompt with the head's output changed at the tokens of S only, by adding a vector delta_i to the
output of layer l's `o_proj` (the attention block's output, before any post-attention norm):

- "tag": delta_i = -P_h o_i^h, the tag component of the head output is removed;
- "random": delta_i = -||P_h o_i^h|| u, with u a random unit direction (one per prompt and head):
  the same amount of change, in a direction that is not the tag;
- "control": the same removal for a control head h' of the same layer without sinks in that prompt
  (or, where every head has one, the head with the weakest largest alpha): its "pseudo tag" is
  W_O^{h'} v_k for the key k it attends to most, removed from o_i^{h'} at the same tokens S.

The four runs (clean and the three ablations) go through the model as one batch of four copies of
the prompt in a single nnsight trace, so they share everything but the edit; nnsight applies the
edit inside that trace only, and the model is unchanged afterwards (a test checks it). We measure,
against the clean run: the next-token loss (mean cross-entropy over the positions from the first
token of S on), and, for every head of every later layer, the attention its queries put on S
(`mass`) and the total-variation distance between clean and ablated attention rows (`tv`).

Geometric test (ours). Retrieval by tag needs later heads whose queries point at the key that the
tag produces. For a later layer l' we map the tag, as it enters the residual stream, through l''s
input norm, k_proj (and k_norm where the model has it) to a key direction kappa per head, and
measure cos(q_i, kappa) over the queries i, pre-RoPE (RoPE is ignored: the cosine is the one of
two tokens at the same position), against the same cosine for random residual directions.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from .capture import AttnInputs, Capture, attention_op_name, mask_2d, repeat_kv, attention_probs
from .errors import CatchtagError
from .models import Model
from .remote import trace_kwargs
from .sinks import DEFAULT_EPS, SinkStats, check_eps, sink_stats
from .tags import head_tags, orthonormal_basis, project, tag_vectors

CONDITIONS = ("tag", "random", "control")


@dataclasses.dataclass
class Ablation:
    """The edits of one ablation experiment (one prompt, one target head)."""

    layer: int
    head: int
    control_head: int
    control_has_sink: bool
    members: list[int]  # the caught non-sink tokens S
    deltas: dict[str, torch.Tensor]  # condition -> (T, d_model) added to layer's o_proj output
    removed_norm: dict[str, float]  # condition -> mean ||delta_i|| over S

    @property
    def n_tokens(self) -> int:
        return next(iter(self.deltas.values())).shape[0]


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm().clamp_min(1e-12)


def choose_control_head(st: SinkStats, layer: int, head: int, eps: float = DEFAULT_EPS) -> tuple[int, bool]:
    """(h', has_sink): a head of `layer` other than `head` without sinks in this prompt, the one with
    the smallest largest alpha; when every other head has a sink, the weakest one and True."""
    li = st.layers.index(layer)
    alpha = torch.nan_to_num(st.received[li], nan=0.0).max(dim=-1).values  # (H,)
    order = [int(h) for h in torch.argsort(alpha) if int(h) != head]
    if not order:
        raise CatchtagError("the model has one head per layer: there is no control head")
    best = order[0]
    return best, bool(alpha[best] > eps)


def ablation_deltas(
    model: Model,
    cap: Capture,
    st: SinkStats,
    layer: int,
    head: int,
    eps: float = DEFAULT_EPS,
    seed: int = 0,
    control_head: int | None = None,
) -> Ablation:
    """The three edits (tag, random, control) for one prompt and one target head; see the module
    docstring. Raises a CatchtagError when the head has no sink or catches nothing in this prompt."""
    eps = check_eps(eps)
    model.check_layer_head(layer, head)
    per_head = head_tags(model, cap, st, layer, eps)
    ht = per_head[head]
    members = ht["members"]
    if not ht["sinks"] or not members:
        raise CatchtagError(f"head ({layer}, {head}) has no sink or catches no token in this prompt")
    T, d = ht["outputs"].shape
    basis = orthonormal_basis(ht["tags"])
    comp = project(ht["outputs"][members].double(), basis)  # (|S|, d)
    deltas = {c: torch.zeros(T, d, dtype=torch.float64) for c in CONDITIONS}
    deltas["tag"][members] = -comp
    gen = torch.Generator().manual_seed(int(seed) * 100_003 + layer * 101 + head)
    u = _unit(torch.randn(d, generator=gen, dtype=torch.float64))
    deltas["random"][members] = -comp.norm(dim=-1, keepdim=True) * u
    if control_head is None:
        control_head, has_sink = choose_control_head(st, layer, head, eps)
    else:
        model.check_layer_head(layer, control_head)
        has_sink = bool(per_head[control_head]["sinks"])
    li = st.layers.index(layer)
    k = int(torch.argmax(torch.nan_to_num(st.received[li, control_head], nan=-1.0)))
    pseudo = tag_vectors(model, cap, layer, [k])[control_head, 0].double()
    b = _unit(pseudo)[:, None]
    oc = per_head[control_head]["outputs"][members].double()
    deltas["control"][members] = -(oc @ b) @ b.T
    norms = {c: float(deltas[c][members].norm(dim=-1).mean()) for c in CONDITIONS}
    return Ablation(layer, head, control_head, has_sink, list(members), {c: v.float() for c, v in deltas.items()}, norms)


def run_edited(
    model: Model,
    input_ids: torch.Tensor,
    layer: int,
    deltas: Sequence[torch.Tensor],
    later_layers: Sequence[int] = (),
    remote: bool | str = False,
) -> tuple[torch.Tensor, dict[int, list[AttnInputs]]]:
    """Run the prompt once per delta (one batch, one nnsight trace), adding delta (T, d_model) to the
    output of `layer`'s o_proj. Returns the logits (B, T, vocab) and, for each later layer, one
    AttnInputs per batch element. A zero delta gives the clean run."""
    import nnsight

    kwargs = trace_kwargs(remote)
    model.check_layer_head(layer)
    later = sorted(set(int(l) for l in later_layers))
    for l in later:
        model.check_layer_head(l)
        if l <= layer:
            raise CatchtagError(f"later layer {l} is not after the edited layer {layer}")
    B = len(deltas)
    T = int(input_ids.shape[-1])
    D = torch.stack([torch.as_tensor(d, dtype=torch.float32) for d in deltas])  # (B, T, d)
    if D.shape[1:] != (T, model.d_model):
        raise CatchtagError(f"each delta must be (T, d_model) = ({T}, {model.d_model}), got {tuple(D.shape[1:])}")
    ids = input_ids.reshape(1, T).repeat(B, 1)
    op = attention_op_name(model)
    lm = model.lm
    with torch.no_grad(), lm.trace(ids, **kwargs):
        o = lm.model.layers[layer].self_attn.o_proj
        o.output = o.output + D.to(o.output.dtype)
        saved = nnsight.save([])
        for l in later:
            args, kw = getattr(lm.model.layers[l].self_attn.source, op).inputs
            saved.append((args[1], args[2], args[3], args[4] if len(args) > 4 else kw.get("attention_mask"),
                          kw.get("scaling"), kw.get("sliding_window"), kw.get("softcap")))
        logits = nnsight.save(lm.lm_head.output)
    H = model.n_heads
    out: dict[int, list[AttnInputs]] = {}
    for l, (q, k, v, mask, scaling, window, softcap) in zip(later, saved):
        if scaling is None:
            scaling = 1.0 / math.sqrt(q.shape[-1])
        m2 = mask_2d(mask, T)
        out[l] = [
            AttnInputs(q=q[b].float(), k=repeat_kv(k[b].float(), H), v=repeat_kv(v[b].float(), H), mask=m2,
                       scaling=float(scaling), sliding_window=int(window) if window else None,
                       softcap=float(softcap) if softcap else None)
            for b in range(B)
        ]
    return logits.float(), out


def _token_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, T-1) next-token cross-entropy."""
    lp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    return -lp.gather(-1, ids[1:].reshape(1, -1, 1).expand(lp.shape[0], -1, 1))[..., 0]


def ablation_effects(
    model: Model,
    cap: Capture,
    ab: Ablation,
    later_layers: Sequence[int] | None = None,
    remote: bool | str = False,
) -> tuple[dict, pd.DataFrame]:
    """Run clean + the three ablations and compare. Returns (summary, per_head):

    summary[c] for c in CONDITIONS: `dloss` (ablated minus clean mean CE over the positions t >=
    min(S), predicting token t+1), `tv` (mean over later heads and queries t > min(S) of the total
    variation between clean and ablated attention rows), `dmass_abs` (mean over later heads of
    |change of the mean attention mass on S|), `removed_norm`.
    per_head: one row per (condition, later layer, head) with `mass_clean`, `dmass`, `tv`.
    """
    if later_layers is None:
        later_layers = range(ab.layer + 1, model.n_layers)
    later_layers = list(later_layers)
    zero = torch.zeros_like(ab.deltas["tag"])
    logits, attn = run_edited(model, cap.input_ids, ab.layer, [zero] + [ab.deltas[c] for c in CONDITIONS],
                              later_layers, remote)
    ids = cap.input_ids
    ce = _token_ce(logits, ids)  # (4, T-1)
    start = min(ab.members)
    T = len(ids)
    S = torch.tensor(ab.members)
    qrows = torch.arange(start + 1, T)
    rows = []
    for l in later_layers:
        A = [attention_probs(a).double() for a in attn[l]]  # each (H, T, T)
        mass0 = A[0][:, qrows][:, :, S].sum(-1).mean(-1)  # (H,)
        for ci, c in enumerate(CONDITIONS, start=1):
            mass = A[ci][:, qrows][:, :, S].sum(-1).mean(-1)
            tv = 0.5 * (A[ci][:, qrows] - A[0][:, qrows]).abs().sum(-1).mean(-1)
            for h in range(model.n_heads):
                rows.append(dict(condition=c, layer=l, head=h, mass_clean=float(mass0[h]),
                                 dmass=float(mass[h] - mass0[h]), tv=float(tv[h])))
    per_head = pd.DataFrame(rows, columns=["condition", "layer", "head", "mass_clean", "dmass", "tv"])
    summary = {}
    for ci, c in enumerate(CONDITIONS, start=1):
        ph = per_head[per_head.condition == c]
        summary[c] = dict(
            dloss=float(ce[ci, start:].mean() - ce[0, start:].mean()),
            tv=float(ph["tv"].mean()) if len(ph) else float("nan"),
            dmass_abs=float(ph["dmass"].abs().mean()) if len(ph) else float("nan"),
            removed_norm=ab.removed_norm[c],
        )
    summary["clean_loss"] = float(ce[0, start:].mean())
    return summary, per_head


def ablation_experiment(
    model: Model,
    caps: Sequence[Capture],
    targets: Sequence[tuple[int, int]],
    eps: float = DEFAULT_EPS,
    stats: Sequence[SinkStats] | None = None,
    seed: int = 0,
    remote: bool | str = False,
    progress: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`ablation_effects` for every prompt and target head (layer, head). Returns (effects,
    per_head): effects has one row per (prompt, layer, head, condition) with dloss, tv, dmass_abs,
    removed_norm, clean_loss, n_members, control_head, control_has_sink; per_head has the later
    heads' rows with prompt, target layer and head added (target_layer, target_head). Prompts where
    a target head catches nothing are skipped."""
    from .progress import progress as progress_bar

    stats = [sink_stats(c) for c in caps] if stats is None else list(stats)
    rows, parts = [], []
    jobs = [(p, l, h) for p in range(len(caps)) for (l, h) in targets]
    for p, l, h in progress_bar(jobs, f"ablations {model.name}", enabled=progress):
        try:
            ab = ablation_deltas(model, caps[p], stats[p], l, h, eps, seed=seed + p)
        except CatchtagError:
            continue
        summary, per_head = ablation_effects(model, caps[p], ab, remote=remote)
        for c in CONDITIONS:
            rows.append(dict(prompt=p, layer=l, head=h, condition=c, **summary[c], clean_loss=summary["clean_loss"],
                             n_members=len(ab.members), control_head=ab.control_head,
                             control_has_sink=ab.control_has_sink))
        per_head = per_head.assign(prompt=p, target_layer=l, target_head=h)
        parts.append(per_head)
    effects = pd.DataFrame(rows)
    per_head = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    return effects, per_head


# --------------------------------------------------------------------------------------------------
# Statistics


def mean_ci(x, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its t-interval over independent units (here: prompts)."""
    from scipy import stats as sst

    x = np.asarray(x, dtype=float)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return (float("nan"),) * 3
    m = float(x.mean())
    if x.size < 2:
        return m, float("nan"), float("nan")
    half = float(sst.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return m, m - half, m + half


def effect_table(effects: pd.DataFrame, measures: Sequence[str] = ("dloss", "tv", "dmass_abs")) -> pd.DataFrame:
    """Per target head and condition: mean and 95% CI over prompts of each measure (a prompt's
    value for one head is one unit), and the paired difference tag - random and tag - control."""
    rows = []
    for (l, h), g in effects.groupby(["layer", "head"]):
        wide = {c: g[g.condition == c].set_index("prompt") for c in CONDITIONS}
        for meas in measures:
            for c in CONDITIONS:
                m, lo, hi = mean_ci(wide[c][meas])
                rows.append(dict(layer=l, head=h, measure=meas, contrast=c, mean=m, low=lo, high=hi, n=len(wide[c])))
            for other in ("random", "control"):
                diff = (wide["tag"][meas] - wide[other][meas]).dropna()
                m, lo, hi = mean_ci(diff)
                rows.append(dict(layer=l, head=h, measure=meas, contrast=f"tag - {other}", mean=m, low=lo, high=hi,
                                 n=len(diff)))
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------
# Geometric test: do later queries point at the tag's key?


def _residual_direction(model: Model, layer: int, head_vec: torch.Tensor) -> torch.Tensor:
    """The direction a head-output vector takes in the residual stream: itself, or through the
    post-attention norm's gain where the model normalises the attention output (Gemma-style)."""
    block = model.hf.model.layers[layer]
    if hasattr(block, "pre_feedforward_layernorm"):  # sandwich norm: post_attention_layernorm acts on attn out
        with torch.no_grad():
            return block.post_attention_layernorm(head_vec.float()[None])[0].double()
    return head_vec.double()


def _pre_rope(model: Model, layer: int, x: torch.Tensor, kind: str) -> torch.Tensor:
    """(n, H, dh) pre-RoPE queries (kind "q") or keys ("k", kv heads repeated) of residual
    vectors x (n, d) at `layer`, through the layer's input norm, projection and QK-norm if any."""
    blk = model.hf.model.layers[layer]
    att = blk.self_attn
    heads = model.n_heads if kind == "q" else model.n_kv_heads
    with torch.no_grad():
        y = getattr(att, f"{kind}_proj")(blk.input_layernorm(x.float())).reshape(x.shape[0], heads, model.head_dim)
        norm = getattr(att, f"{kind}_norm", None)
        if norm is not None:
            y = norm(y)
    return y.repeat_interleave(model.n_heads // heads, dim=1).double()


def _keys_of(model: Model, layer: int, x: torch.Tensor) -> torch.Tensor:
    return _pre_rope(model, layer, x, "k")


def _queries_of(model: Model, layer: int, x: torch.Tensor) -> torch.Tensor:
    return _pre_rope(model, layer, x, "q")


def query_tag_alignment(
    model: Model,
    cap: Capture,
    layer: int,
    tag: torch.Tensor,
    later_layers: Sequence[int] | None = None,
    n_random: int = 16,
    seed: int = 0,
) -> pd.DataFrame:
    """For each head of each later layer: the mean over queries (positions 1..T-1) of
    cos(q_i, kappa), kappa the pre-RoPE key of the tag `tag` (d_model,) written by `layer`, and the
    same for `n_random` random residual directions: `cos_tag`, `cos_random_mean`, `cos_random_sd`,
    and `z` = (cos_tag - mean) / sd. Needs `cap.resid_post`."""
    if cap.resid_post is None:
        raise CatchtagError("query_tag_alignment needs the residual stream: capture with resid=True")
    if later_layers is None:
        later_layers = range(layer + 1, model.n_layers)
    gen = torch.Generator().manual_seed(int(seed))
    r_tag = _residual_direction(model, layer, tag.double())
    rand = torch.randn(n_random, model.d_model, generator=gen, dtype=torch.float64)
    rand = rand / rand.norm(dim=-1, keepdim=True) * r_tag.norm()
    dirs = torch.cat([r_tag[None], rand])  # (1 + n_random, d)
    rows = []
    for l in later_layers:
        x = cap.resid_post[l - 1, 1:]
        q = _queries_of(model, l, x)  # (n, H, dh)
        qn = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        k = _keys_of(model, l, dirs)  # (1 + R, H, dh)
        kn = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        cos = torch.einsum("nhd,rhd->rhn", qn, kn).mean(-1)  # (1 + R, H)
        for h in range(model.n_heads):
            rc = cos[1:, h]
            sd = float(rc.std()) if n_random > 1 else float("nan")
            rows.append(dict(layer=l, head=h, cos_tag=float(cos[0, h]), cos_random_mean=float(rc.mean()),
                             cos_random_sd=sd, z=(float(cos[0, h]) - float(rc.mean())) / sd if sd and sd > 0 else float("nan")))
    return pd.DataFrame(rows)
