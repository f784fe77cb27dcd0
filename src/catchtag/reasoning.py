"""Reasoning models (paper §5): do reasoning-trained models use catch, tag, release in more heads?

The paper (§5, Fig. 5; paper, via note) compares two base models with their DeepSeek-R1-distilled
versions on 170 prompts truncated to 150 tokens, counting sinks per head averaged over layers,
heads and prompts: Qwen2.5-14B 1.125 -> DeepSeek-R1-Distill-Qwen-14B 2.196, and Llama-3.1-8B
1.993 -> DeepSeek-R1-Distill-Llama-8B 2.025 (`PAPER_PAIRS`, `PAPER_SINKS_PER_HEAD`). A token
taxonomy (on 200 prompts of 1,024 tokens) finds the base models' sinks on function words and
punctuation, the distilled models' on salient words. More heads of the distilled model have a high
variance explained by tags. The paper calls this correlational (§K.3). Those models are 8B and 14B
parameters: they run on NDIF (`remote=True`, checked with `check_hosted`) or on a large GPU.
Definitions of every quantity: the book's definitions page (book/definitions.md).

Offline, this module runs a small *controlled* proxy (ours), on the paper's protocol (prompts of
150 tokens, `paper_prompts`; sinks per head from `catchtag.sinks.census`):

- `make_problems` writes multi-step arithmetic problems with explicit intermediate steps
  ("Start with 7. Add 5, then multiply by 3 ..."), generated here from a seed (no dataset).
- `render` writes a problem either as a reasoning trace (every intermediate result spelled out,
  then the answer) or, for the control, as the final answer only.
- `finetune` fine-tunes a deep copy of a model's transformers module on a stream of rendered
  problems packed into fixed-length blocks. Both styles see exactly the same number of training
  tokens (steps x batch x block length) drawn from the same problems: the answer-only stream just
  cycles through them more often. The loss is the next-token loss on every token of a block.
  By default only the attention projections (q, k, v, o) of every layer are trained, in eval mode
  (no dropout), so a run is deterministic for a seed.
- `compare` measures the sink census and per-head explained variance on the same prompts for any
  set of models (base, reasoning-tuned, control; or a hub pair such as the paper's).
- `sink_taxonomy` and `top_sink_tokens`: which tokens become sinks (token classes, most common
  tokens), per model.
- `verdict` and `summary`: the reproduction row's verdict and one-line summary.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from .errors import CatchtagError
from .models import Model, _wrap
from .sinks import DEFAULT_EPS, census, check_eps, head_table, sink_stats, sink_table

# (paper, via note) §5: the two pairs, base -> R1-distilled, and their sinks per head
PAPER_PAIRS = {
    "qwen": ("Qwen/Qwen2.5-14B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B"),
    "llama": ("meta-llama/Llama-3.1-8B", "deepseek-ai/DeepSeek-R1-Distill-Llama-8B"),
}
PAPER_SINKS_PER_HEAD = {"qwen": (1.125, 2.196), "llama": (1.993, 2.025)}
PAPER_PAIR = PAPER_PAIRS["qwen"]  # the pair of the 1.125 -> 2.196 headline
PAPER_N_PROMPTS = 170   # (paper, via note)
PAPER_MAX_TOKENS = 150  # (paper, via note) prompts truncated to this many tokens
STYLES = ("reasoning", "answer")

_OPS = (
    ("add", "+", lambda a, b: a + b),
    ("subtract", "-", lambda a, b: a - b),
    ("multiply by", "*", lambda a, b: a * b),
)


# --------------------------------------------------------------------------------------------------
# Problems


@dataclasses.dataclass(frozen=True)
class Problem:
    """A chain of operations on a start value: ((start op1 b1) op2 b2) ..."""

    start: int
    ops: tuple[tuple[str, int], ...]  # (symbol, operand)

    def values(self) -> list[int]:
        """The intermediate results, the last one being the answer."""
        fns = {sym: fn for _, sym, fn in _OPS}
        out, x = [], self.start
        for sym, b in self.ops:
            x = fns[sym](x, b)
            out.append(x)
        return out

    @property
    def answer(self) -> int:
        return self.values()[-1]

    def question(self) -> str:
        words = {sym: word for word, sym, _ in _OPS}
        steps = ", then ".join(f"{words[s]} {b}" for s, b in self.ops)
        return f"Start with {self.start}. {steps[0].upper()}{steps[1:]}. What is the result?"


def make_problems(n: int, seed: int = 0, min_steps: int = 2, max_steps: int = 4) -> list[Problem]:
    """`n` distinct-looking random problems with `min_steps`..`max_steps` operations each.

    Operands are small (2..9 for products, 1..20 otherwise) so every intermediate value stays a
    short number. Deterministic for a seed.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise CatchtagError(f"n={n!r} is not valid: the number of problems must be a whole number >= 1")
    if not 1 <= min_steps <= max_steps:
        raise CatchtagError(f"steps {min_steps}..{max_steps} are not valid: need 1 <= min_steps <= max_steps")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(min_steps, max_steps + 1))
        start = int(rng.integers(2, 30))
        ops, x = [], start
        for _ in range(k):
            sym = ["+", "-", "*"][int(rng.integers(0, 3))]
            if sym == "*":
                b = int(rng.integers(2, 10)) if abs(x) < 100 else 2
            else:
                b = int(rng.integers(1, 21))
            ops.append((sym, b))
            x = {"+": x + b, "-": x - b, "*": x * b}[sym]
        out.append(Problem(start, tuple(ops)))
    return out


def render(problem: Problem, style: str = "reasoning") -> str:
    """The problem as training text: the question, then either every step or the answer only."""
    if style not in STYLES:
        raise CatchtagError(f"style={style!r} is not valid: use one of {', '.join(STYLES)}")
    q = f"Question: {problem.question()}\n"
    if style == "answer":
        return q + f"Answer: {problem.answer}.\n\n"
    lines, x = [], problem.start
    for i, ((sym, b), y) in enumerate(zip(problem.ops, problem.values()), start=1):
        lines.append(f"Step {i}: {x} {sym} {b} = {y}.")
        x = y
    return q + "Reasoning: " + " ".join(lines) + f"\nAnswer: {problem.answer}.\n\n"


def token_blocks(tokenizer, problems: Sequence[Problem], style: str, n_blocks: int, block_len: int,
                 seed: int = 0) -> torch.Tensor:
    """(n_blocks, block_len) token ids: rendered problems, concatenated in a seed-shuffled order
    (reshuffled at every pass), cut into consecutive blocks. The same budget for every style."""
    if n_blocks < 1 or block_len < 2:
        raise CatchtagError("need at least one block of at least two tokens")
    if not problems:
        raise CatchtagError("no problems given")
    rng = np.random.default_rng(seed)
    need = n_blocks * block_len
    ids: list[int] = []
    while len(ids) < need:
        for i in rng.permutation(len(problems)):
            ids.extend(tokenizer(render(problems[int(i)], style), add_special_tokens=False).input_ids)
            if len(ids) >= need:
                break
    return torch.tensor(ids[:need], dtype=torch.long).reshape(n_blocks, block_len)


# --------------------------------------------------------------------------------------------------
# Fine-tuning


TRAINABLE = {
    "attention": ("self_attn.",),
    "all": ("",),
}


@dataclasses.dataclass
class FinetuneResult:
    """A fine-tuned copy of a model and its training record."""

    model: Model
    style: str
    losses: list[float]
    steps: int
    tokens: int  # training tokens seen
    n_params: int  # trained parameters
    seconds: float
    seed: int


def finetune(
    model: Model,
    problems: Sequence[Problem],
    style: str = "reasoning",
    steps: int = 30,
    batch_size: int = 4,
    block_len: int = 48,
    lr: float = 3e-4,
    seed: int = 0,
    train: str = "attention",
    label: str | None = None,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune a deep copy of `model.hf` on `problems` rendered in `style`; `model` is untouched.

    AdamW (no weight decay), constant learning rate, gradient norm clipped at 1, eval mode (no
    dropout), data order and initial state fixed by `seed`: two runs with the same arguments give
    identical losses and weights on the same machine and thread count. `train` is "attention"
    (q, k, v, o projections of every layer; the default) or "all". Returns the copy re-wrapped for
    capture (`catchtag.models._wrap`) with the losses.
    """
    from .progress import progress as _bar

    if style not in STYLES:
        raise CatchtagError(f"style={style!r} is not valid: use one of {', '.join(STYLES)}")
    if train not in TRAINABLE:
        raise CatchtagError(f"train={train!r} is not valid: use one of {', '.join(TRAINABLE)}")
    for name, val in (("steps", steps), ("batch_size", batch_size), ("block_len", block_len)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise CatchtagError(f"{name}={val!r} is not valid: use a whole number >= 1")
    if not _has_weights(model):
        raise CatchtagError(
            f"model {model.name!r} has no local weights (loaded for NDIF): fine-tuning runs locally; "
            "load it with remote=False"
        )
    data = token_blocks(model.tokenizer, problems, style, steps * batch_size, block_len, seed)
    start = time.time()
    torch.manual_seed(seed)
    hf = copy.deepcopy(model.hf)
    hf.eval()  # no dropout: deterministic
    prefixes = TRAINABLE[train]
    params = []
    for name, p in hf.named_parameters():
        on = any(pref in name for pref in prefixes)
        p.requires_grad_(on)
        if on:
            params.append(p)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    bar = _bar(range(steps), desc=f"fine-tune ({style})", enabled=progress)
    for step in bar:
        x = data[step * batch_size:(step + 1) * batch_size]
        out = hf(input_ids=x, labels=x, use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    for p in hf.parameters():
        p.requires_grad_(False)
    hf.eval()
    name = label or f"{model.name}+{style}"
    wrapped = _wrap(name, hf, model.tokenizer, model.qk_norm, None, source=f"{model.source} fine-tuned ({style})")
    return FinetuneResult(
        model=wrapped, style=style, losses=losses, steps=steps, tokens=int(data.numel()),
        n_params=sum(p.numel() for p in params), seconds=time.time() - start, seed=seed,
    )


@torch.no_grad()
def eval_loss(model: Model, problems: Sequence[Problem], style: str = "reasoning", n_blocks: int = 8,
              block_len: int = 48, seed: int = 1) -> float:
    """Mean next-token loss of `model` on held-out problems rendered in `style` (packed blocks)."""
    data = token_blocks(model.tokenizer, problems, style, n_blocks, block_len, seed)
    return float(model.hf(input_ids=data, labels=data, use_cache=False).loss)


def weights_equal(a: Model, b: Model) -> bool:
    """True when two models' parameters are bit-identical."""
    pa, pb = dict(a.hf.named_parameters()), dict(b.hf.named_parameters())
    return pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


# --------------------------------------------------------------------------------------------------
# Comparison


def eval_prompts(problems: Sequence[Problem], style: str = "reasoning") -> list[str]:
    """The evaluation texts: held-out problems written out in `style`, without the blank line."""
    return [render(p, style).strip() for p in problems]


def paper_prompts(model: Model, problems: Sequence[Problem], n: int, max_tokens: int = PAPER_MAX_TOKENS,
                  style: str = "reasoning") -> list[str]:
    """`n` evaluation prompts on the paper's protocol: each packs consecutive held-out problems
    rendered in `style` until it has at least `max_tokens` tokens, then is cut to `max_tokens`
    tokens (paper, via note: prompts truncated to 150 tokens). The text is the decoded prefix, so
    the model's tokenizer gives at most `max_tokens` tokens for it (`<bos>` included where the
    tokenizer adds one). Problems are used in order and reused cyclically when there are too few.

    Raises CatchtagError when `n` < 1, `max_tokens` < 16 or `problems` is empty.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise CatchtagError(f"n={n!r} is not valid: the number of prompts must be a whole number >= 1")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 16:
        raise CatchtagError(f"max_tokens={max_tokens!r} is not valid: use a whole number >= 16 (the paper: 150)")
    if not problems:
        raise CatchtagError("no problems given: pass at least one held-out problem")
    tok = model.tokenizer
    out, j = [], 0
    for _ in range(n):
        text = ""
        while len(tok(text, add_special_tokens=False).input_ids) < max_tokens:
            text += render(problems[j % len(problems)], style)
            j += 1
        ids = tok(text, add_special_tokens=False).input_ids
        keep = max_tokens - (len(model.tokenize(text)) - len(ids))  # room for <bos> where it is added
        cut = tok.decode(ids[:keep])
        while len(model.tokenize(cut)) > max_tokens:  # decoding can re-tokenise longer: trim
            keep -= 1
            cut = tok.decode(ids[:keep])
        out.append(cut)
    return out


def head_ev(model: Model, caps, stats, eps: float = DEFAULT_EPS, min_caught: int = 2) -> pd.DataFrame:
    """Per-head explained variance by tags, pooled over prompts as a ratio of sums.

    The same definition and columns (layer, head, ev, n_tags, n_caught, n_prompts) as
    `catchtag.tags.head_explained_variance` (a test checks that they agree), computed with one
    pass per layer and without that function's PCA column, which costs a dense SVD per head and
    dominates its run time on CPU.
    """
    from .capture import head_outputs
    from .tags import orthonormal_basis, tag_vectors

    eps = check_eps(eps)
    acc: dict[tuple[int, int], list] = {}
    for cap, st in zip(caps, stats):
        sinks_all, caught_all = st.sinks(eps), st.caught(eps)
        for li, layer in enumerate(st.layers):
            sinks, caught = sinks_all[li], caught_all[li]
            members = (caught >= 0) & ~sinks  # (H, T)
            outs = tags = None
            for h in range(sinks.shape[0]):
                a = acc.setdefault((layer, h), [0.0, 0.0, 0, 0, 0])
                pos = torch.nonzero(sinks[h]).flatten()
                idx = torch.nonzero(members[h]).flatten()
                if len(pos) == 0 or len(idx) < max(2, min_caught):
                    continue
                if outs is None:
                    outs, tags = head_outputs(model, cap, layer), tag_vectors(model, cap, layer)
                X = outs[h, idx].double()
                X = X - X.mean(dim=0, keepdim=True)
                basis = orthonormal_basis(tags[h, pos])
                a[0] += float(((X @ basis) ** 2).sum())
                a[1] += float((X**2).sum())
                a[2] += len(pos)
                a[3] += len(idx)
                a[4] += 1
    rows = []
    for (layer, h), (num, den, n_tags, n_caught, n_prompts) in sorted(acc.items()):
        rows.append(dict(
            layer=layer, head=h, ev=num / den if n_prompts and den > 0 else np.nan,
            n_tags=n_tags / n_prompts if n_prompts else 0.0, n_caught=n_caught, n_prompts=n_prompts,
        ))
    return pd.DataFrame(rows, columns=["layer", "head", "ev", "n_tags", "n_caught", "n_prompts"])


def compare(
    models: dict[str, Model],
    prompts: Sequence[str],
    eps: float = DEFAULT_EPS,
    ev_high: float = 0.5,
    remote: bool | str = False,
    progress: bool = True,
    keep_stats: bool = False,
    batch_size: int = 1,
):
    """Sinks and explained variance of every model on the same prompts (`batch_size` prompts per
    forward of `capture`: equal to one at a time within float rounding).

    Returns (summary, heads), or (summary, heads, stats) with `keep_stats` (stats: label -> list of
    `SinkStats`, for `sink_taxonomy`). `summary` has one row per model: the `catchtag.sinks.census`
    keys (sinks_per_head, the paper's §5 statistic: sinks per head averaged over layers, heads and
    prompts; first_share; other_per_head; ...), heads_high_ev (heads whose tags explain at least
    `ev_high` of their output variance), heads_with_ev (heads with an EV at all), median_ev,
    n_heads, n_tokens (mean prompt length). `heads` has one row per (model, layer, head): n_sinks
    (mean over prompts), n_other, ev, n_tags, n_caught.
    """
    from .capture import capture

    eps = check_eps(eps)
    summary, parts, kept = [], [], {}
    for label, m in models.items():
        caps = capture(m, list(prompts), resid=False, remote=remote, progress=progress, batch_size=batch_size)
        stats = [sink_stats(c) for c in caps]
        ht = head_table(stats, eps)
        per_head = ht.groupby(["layer", "head"])[["n_sinks", "n_other"]].mean().reset_index()
        if _has_weights(m):
            ev = head_ev(m, caps, stats, eps)
        else:  # loaded for NDIF: W_O is not here, so no tags and no explained variance
            ev = pd.DataFrame(dict(layer=per_head["layer"], head=per_head["head"], ev=np.nan, n_tags=np.nan, n_caught=np.nan))
        heads = per_head.merge(ev[["layer", "head", "ev", "n_tags", "n_caught"]], on=["layer", "head"])
        heads.insert(0, "model", label)
        parts.append(heads)
        summary.append(dict(
            model=label,
            **census(stats, eps),
            heads_high_ev=int((heads["ev"] >= ev_high).sum()) if _has_weights(m) else np.nan,
            heads_with_ev=int(heads["ev"].notna().sum()),
            median_ev=float(heads["ev"].median()),
            n_heads=int(len(heads)),
            n_tokens=float(np.mean([len(st.tokens) for st in stats])),
        ))
        if keep_stats:
            kept[label] = stats
        del caps
    out = (pd.DataFrame(summary), pd.concat(parts, ignore_index=True))
    return out + (kept,) if keep_stats else out


# --------------------------------------------------------------------------------------------------
# Which tokens become sinks

FUNCTION_WORDS = frozenset(
    "a an the and or but if then than so of to in on at by for with from as into is are was were be "
    "been it its this that these those what which who whom there here not no do does did has have had "
    "will would can could should may might must".split()
)
TOKEN_CLASSES = ("first", "punctuation", "newline", "space", "number", "function word", "word")


def token_class(token: str, position: int) -> str:
    """The taxonomy of sink tokens (ours, after the paper's "function words and punctuation" vs
    "salient words"): 'first' (position 0), 'newline', 'punctuation' (as `catchtag.sinks`),
    'space' (only spaces or tabs), 'number' (digits once whitespace is stripped), 'function word'
    (`FUNCTION_WORDS`, case ignored), else 'word' (a word or a piece of one)."""
    from .sinks import token_kind

    kind = token_kind(token, position)
    if kind != "other":
        return kind
    t = token.strip().lower()
    if not t:
        return "space"
    if t.isdigit():
        return "number"
    if t in FUNCTION_WORDS:
        return "function word"
    return "word"


def sink_taxonomy(stats_by_model: dict, eps: float = DEFAULT_EPS) -> pd.DataFrame:
    """Share of the non-first sinks of each model in each token class (`token_class`).

    `stats_by_model`: label -> list of SinkStats (from `compare(..., keep_stats=True)`). One row
    per model label, one column per class of `TOKEN_CLASSES` except 'first', plus `n_sinks` (the
    number of (prompt, layer, head, position) non-first sinks counted). Rows of a model with no
    non-first sink are NaN.
    """
    eps = check_eps(eps)
    rows = []
    for label, stats in stats_by_model.items():
        t = sink_table(stats, eps)
        t = t[t.position > 0]
        classes = [token_class(tok, pos) for tok, pos in zip(t.token, t.position)]
        counts = pd.Series(classes, dtype=object).value_counts()
        n = int(counts.sum())
        row = {"model": label, "n_sinks": n}
        for c in TOKEN_CLASSES[1:]:
            row[c] = float(counts.get(c, 0)) / n if n else np.nan
        rows.append(row)
    return pd.DataFrame(rows).set_index("model")


def top_sink_tokens(stats_by_model: dict, eps: float = DEFAULT_EPS, k: int = 5) -> pd.DataFrame:
    """The `k` tokens that are most often non-first sinks in each model: one row per (model, rank)
    with the token (repr, so spaces and line breaks show), its class and its share of that model's
    non-first sinks."""
    eps = check_eps(eps)
    rows = []
    for label, stats in stats_by_model.items():
        t = sink_table(stats, eps)
        t = t[t.position > 0]
        if not len(t):
            continue
        counts = t.token.value_counts()
        for rank, (tok, c) in enumerate(counts.head(k).items(), start=1):
            rows.append(dict(model=label, rank=rank, token=repr(tok), token_class=token_class(tok, 1),
                             share=float(c) / len(t)))
    return pd.DataFrame(rows, columns=["model", "rank", "token", "token_class", "share"])


# --------------------------------------------------------------------------------------------------
# NDIF: are the paper's models hosted?


def ndif_hosted(repo_ids: Sequence[str], status=None) -> dict[str, bool]:
    """{repo id: True when NDIF runs it now}. `status` is nnsight's `nnsight.status()` answer (a
    mapping of deployment name -> dict with 'repo_id' and 'state'); None asks NDIF (nnsight 0.8:
    `nnsight.status()`, which returns an empty status when NDIF cannot be reached)."""
    if status is None:
        import nnsight

        status = nnsight.status()
    running = {d.get("repo_id", name) for name, d in ((n, status[n]) for n in status)
               if d.get("state") == "RUNNING"}
    return {r: r in running for r in repo_ids}


def check_hosted(repo_ids: Sequence[str], status=None) -> None:
    """Raise a one-line CatchtagError naming the models NDIF does not run now (see `ndif_hosted`)."""
    hosted = ndif_hosted(repo_ids, status)
    missing = [r for r, ok in hosted.items() if not ok]
    if missing:
        raise CatchtagError(
            f"NDIF does not run {', '.join(missing)} now, or cannot be reached (nnsight.status()): run with remote=False on "
            "a machine that holds the weights, pick a hosted pair (https://nnsight.net/status/), or "
            "leave base_model and reasoning_model empty for the offline proxy"
        )


# --------------------------------------------------------------------------------------------------
# Verdict and summary (the reproduction page reads them)


def paper_pair_key(base_model: str, reasoning_model: str) -> str | None:
    """'qwen' or 'llama' when (base, reasoning) is one of the paper's pairs (`PAPER_PAIRS`), else None."""
    for key, pair in PAPER_PAIRS.items():
        if (base_model, reasoning_model) == pair:
            return key
    return None


def verdict(base_sph: float, tuned_sph: float, pair: str | None, min_rise: float = 0.0) -> str:
    """The verdict of the claim "reasoning distillation raises the sinks per head".

    Only one of the paper's pairs (`pair` = 'qwen' or 'llama') can reproduce or fail to reproduce
    it; anything else (the offline proxy, another hub pair) is "not testable offline". On the
    paper's pair: "reproduced" when the distilled model has more sinks per head than its base by
    more than `min_rise` (relative), else "not reproduced". NaN counts give "not testable offline".
    """
    if pair not in PAPER_PAIRS or not (np.isfinite(base_sph) and np.isfinite(tuned_sph)):
        return "not testable offline"
    return "reproduced" if tuned_sph > base_sph * (1 + min_rise) else "not reproduced"


def proxy_reading(diff_reasoning: float, diff_control: float, hev_reasoning: float, hev_control: float,
                  sinks_ci: tuple[float, float] | None = None) -> str:
    """How the offline proxy reads: the reasoning fine-tune's change from the base (sinks per head,
    high-EV heads) against the control's, in words. `sinks_ci`: the paired 95% interval over
    prompts of (reasoning-tuned - control) sinks per head (`ReasoningRun.change_interval`); when
    it is given and contains 0, the sinks count is read as not resolved, whatever the point
    estimates say (ours). High-EV heads are whole counts with no interval: compared as numbers."""
    if not all(np.isfinite([diff_reasoning, diff_control, hev_reasoning, hev_control])):
        return "not compared with a control"
    hev_larger = hev_reasoning > hev_control
    if sinks_ci is not None and all(np.isfinite(sinks_ci)) and sinks_ci[0] <= 0 <= sinks_ci[1]:
        return ("not distinguishable from the control's in sinks per head (the paired interval of their "
                f"difference includes 0) and {'larger' if hev_larger else 'no larger'} in high-EV heads: "
                "no clear reasoning-specific effect")
    sinks_larger = (sinks_ci[0] > 0 if sinks_ci is not None and all(np.isfinite(sinks_ci))
                    else diff_reasoning > diff_control)
    if sinks_larger and hev_larger:
        return "larger than the control's on both counts, the direction the paper's hypothesis predicts"
    if not sinks_larger and not hev_larger:
        return ("no larger than the control's on either count: fine-tuning on this text moves sinks "
                "whether or not it spells out the steps")
    return "larger than the control's on one count and not on the other: no clear reasoning-specific effect"


def summary(base_label: str, base_sph: float, tuned_label: str, tuned_sph: float,
            control_sph: float | None = None, pair: str | None = None) -> str:
    """One line for the reproduction page: our sinks per head, base -> tuned (and control)."""
    line = f"{base_label} {base_sph:.3f} → {tuned_label} {tuned_sph:.3f} sinks per head"
    if control_sph is not None and np.isfinite(control_sph):
        line += f" (control {control_sph:.3f})"
    if pair is None:
        line += "; offline proxy, the paper's pairs not run"
    return line


def _has_weights(model: Model) -> bool:
    return next(model.hf.parameters()).device.type != "meta"


def load_pair(base_model: str, reasoning_model: str, remote: bool | str = False,
              dtype: str = "float32") -> dict[str, Model]:
    """{'base': ..., 'reasoning': ...} loaded by Hugging Face id (or registry name), both or neither."""
    from .models import load_model

    if bool(base_model) != bool(reasoning_model):
        raise CatchtagError(
            "give both base_model and reasoning_model (the paper's pairs: "
            + "; ".join(f"{b} and {r}" for b, r in PAPER_PAIRS.values())
            + "), or neither for the offline fine-tuning experiment"
        )
    return {"base": load_model(base_model, dtype=dtype, remote=remote),
            "reasoning": load_model(reasoning_model, dtype=dtype, remote=remote)}


def grid(heads: pd.DataFrame, label: str, column: str) -> np.ndarray:
    """(layers, heads) array of a `compare` heads column for one model."""
    t = heads[heads["model"] == label]
    return t.pivot(index="layer", columns="head", values=column).to_numpy(dtype=float)


# --------------------------------------------------------------------------------------------------
# The chapter's two runs, end to end

BASE, TUNED, CONTROL = "base", "reasoning-tuned", "control (answers only)"


@dataclasses.dataclass
class ReasoningRun:
    """Everything the chapter shows of one comparison (offline proxy or hub pair).

    labels: model labels in order (base first, then the reasoning model, then the control when
    there is one); prompts: the evaluation prompts; summary: `compare`'s summary indexed by label;
    heads: `compare`'s per-head table; taxonomy / top_tokens: `sink_taxonomy` / `top_sink_tokens`;
    finetunes: style -> FinetuneResult (offline only); held_out: label -> next-token loss on
    held-out reasoning traces (offline only); pair: 'qwen' / 'llama' for the paper's pairs, else None.
    """

    labels: list[str]
    prompts: list[str]
    summary: pd.DataFrame
    heads: pd.DataFrame
    taxonomy: pd.DataFrame
    top_tokens: pd.DataFrame
    finetunes: dict
    held_out: dict
    pair: str | None
    per_prompt: dict = dataclasses.field(default_factory=dict)  # label -> (n_prompts,) sinks per head

    def change_interval(self, label: str, reference: str, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
        """95% percentile bootstrap interval over prompts (paired: the same prompts in both models)
        of the change in sinks per head from `reference` to `label` (`release.bootstrap_ci` of the
        per-prompt differences). (nan, nan) without per-prompt numbers for both."""
        from .release import bootstrap_ci

        if label is None or label not in self.per_prompt or reference not in self.per_prompt:
            return (float("nan"), float("nan"))
        d = np.asarray(self.per_prompt[label], dtype=float) - np.asarray(self.per_prompt[reference], dtype=float)
        _, lo, hi = bootstrap_ci(d, n_boot=n_boot, seed=seed)
        return (lo, hi)

    def quantities(self, ev_high: float = 0.5) -> dict:
        """The numbers the chapter puts: sinks per head (sph_*), first_share_*, other_per_head_*,
        high-EV heads (hev_*), shares of non-first sinks on words, bare spaces and punctuation
        (word_share_*, space_share_*, punctuation_share_*) for base, tuned (the reasoning model) and control (NaN without one),
        the changes in sinks per head from the base (diff_reasoning, diff_control) and between the
        reasoning-tuned copy and the control (diff_tuned_control), each with its paired 95%
        bootstrap interval over prompts (`change_interval`: *_lo, *_hi, and *_ci as text; ours),
        n_heads, n_prompts, n_tokens
        (mean prompt length), the proxy's reading, the layer whose sinks per head moved most in the
        reasoning model (top_layer, top_layer_change), the verdict and the summary line."""
        s = self.summary
        base, tuned = self.labels[0], self.labels[1]
        ctrl = self.labels[2] if len(self.labels) > 2 else None
        get = (lambda label, col: float(s.loc[label, col]) if label is not None else float("nan"))
        q = {}
        for key, label in (("base", base), ("tuned", tuned), ("control", ctrl)):
            q[f"sph_{key}"] = get(label, "sinks_per_head")
            q[f"first_share_{key}"] = get(label, "first_share")
            q[f"other_per_head_{key}"] = get(label, "other_per_head")
            q[f"hev_{key}"] = get(label, "heads_high_ev")
            for c in ("word", "space", "punctuation"):
                q[f"{c}_share_{key}"] = (float(self.taxonomy.loc[label, c])
                                         if label is not None and label in self.taxonomy.index else float("nan"))
        q["sph_ratio"] = q["sph_tuned"] / q["sph_base"] if q["sph_base"] else float("nan")
        q["diff_reasoning"] = q["sph_tuned"] - q["sph_base"]
        q["diff_control"] = q["sph_control"] - q["sph_base"]
        q["diff_tuned_control"] = q["sph_tuned"] - q["sph_control"]
        for key, (label, ref) in (("diff_reasoning", (tuned, base)), ("diff_control", (ctrl, base)),
                                  ("diff_tuned_control", (tuned, ctrl))):
            q[f"{key}_lo"], q[f"{key}_hi"] = self.change_interval(label, ref)
            q[f"{key}_ci"] = _interval_text(q[f"{key}_lo"], q[f"{key}_hi"])
        q["n_heads"] = int(s.loc[base, "n_heads"])
        q["n_prompts"] = len(self.prompts)
        q["n_tokens"] = float(s.loc[base, "n_tokens"])
        q["reading"] = proxy_reading(q["diff_reasoning"], q["diff_control"],
                                     q["hev_tuned"] - q["hev_base"], q["hev_control"] - q["hev_base"],
                                     (q["diff_tuned_control_lo"], q["diff_tuned_control_hi"]))
        h = self.heads
        if grid(h, base, "n_sinks").shape == grid(h, tuned, "n_sinks").shape:
            by_layer = h.groupby(["model", "layer"])["n_sinks"].mean().unstack("model")
            moved = by_layer[tuned] - by_layer[base]
            top = int(moved.abs().idxmax())
            q["top_layer"], q["top_layer_change"] = top, float(moved.loc[top])
        else:
            q["top_layer"], q["top_layer_change"] = None, float("nan")
        q["verdict_reasoning"] = verdict(q["sph_base"], q["sph_tuned"], self.pair)
        q["summary"] = summary(base, q["sph_base"], tuned, q["sph_tuned"], q["sph_control"], self.pair)
        return q


def per_prompt_sinks(stats, eps: float = DEFAULT_EPS) -> np.ndarray:
    """(n_prompts,) sinks per head of each prompt, averaged over layers and heads (the mean over
    prompts is `census(stats)["sinks_per_head"]`)."""
    return head_table(stats, eps).groupby("prompt")["n_sinks"].mean().to_numpy(dtype=float)


def _finish(models: dict, prompts, eps, ev_high, remote, progress, finetunes, held, pair, top_k,
            batch_size: int = 1) -> ReasoningRun:
    s, h, stats = compare(models, prompts, eps=eps, ev_high=ev_high, remote=remote, progress=progress,
                          keep_stats=True, batch_size=batch_size)
    return ReasoningRun(
        labels=list(models), prompts=list(prompts), summary=s.set_index("model"), heads=h,
        taxonomy=sink_taxonomy(stats, eps), top_tokens=top_sink_tokens(stats, eps, top_k),
        finetunes=finetunes, held_out=held, pair=pair,
        per_prompt={label: per_prompt_sinks(st, eps) for label, st in stats.items()},
    )


def _interval_text(lo: float, hi: float) -> str:
    """'95% interval −0.012 to +0.034' (n/a when either end is NaN)."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "no interval"
    return f"95% interval {lo:+.3f} to {hi:+.3f}".replace("-", "−")


def run_proxy(base: Model, train_problems: Sequence[Problem], eval_problems: Sequence[Problem], *,
              n_prompts: int = 8, max_tokens: int = PAPER_MAX_TOKENS, eps: float = DEFAULT_EPS,
              ev_high: float = 0.5, steps: int = 30, batch_size: int = 4, block_len: int = 48,
              lr: float = 3e-4, seed: int = 0, train: str = "attention", top_k: int = 5,
              progress: bool = True, batch_size_eval: int = 1) -> ReasoningRun:
    """The offline proxy (ours): fine-tune `base` on reasoning traces and, as the control, on the
    same problems with answers only (`finetune`, same token budget), then compare base, tuned and
    control on `n_prompts` held-out reasoning traces of `max_tokens` tokens (`paper_prompts`)."""
    tunes = {style: finetune(base, train_problems, style, steps=steps, batch_size=batch_size,
                             block_len=block_len, lr=lr, seed=seed, train=train,
                             label=f"{base.name} ({style})", progress=progress)
             for style in STYLES}
    models = {BASE: base, TUNED: tunes["reasoning"].model, CONTROL: tunes["answer"].model}
    held = {label: eval_loss(m, eval_problems, "reasoning", block_len=block_len) for label, m in models.items()}
    prompts = paper_prompts(base, eval_problems, n_prompts, max_tokens)
    return _finish(models, prompts, eps, ev_high, False, progress, tunes, held, None, top_k, batch_size_eval)


def run_pair(base_model: str, reasoning_model: str, eval_problems: Sequence[Problem], *,
             n_prompts: int = PAPER_N_PROMPTS, max_tokens: int = PAPER_MAX_TOKENS, eps: float = DEFAULT_EPS,
             ev_high: float = 0.5, remote: bool | str = False, top_k: int = 5, status=None,
             progress: bool = True, batch_size_eval: int = 1) -> ReasoningRun:
    """The paper's comparison on a hub pair: with `remote=True`, first `check_hosted` (one line when
    NDIF does not run both models; `status` as in `ndif_hosted`), then load both and compare them on
    `n_prompts` prompts of `max_tokens` tokens (paper, via note: 170 prompts of 150 tokens)."""
    if remote is True:
        check_hosted([base_model, reasoning_model], status)
    pair = load_pair(base_model, reasoning_model, remote=remote)
    models = {BASE: pair["base"], "R1-distilled": pair["reasoning"]}
    prompts = paper_prompts(pair["base"], eval_problems, n_prompts, max_tokens)
    return _finish(models, prompts, eps, ev_high, remote, progress, {}, {},
                   paper_pair_key(base_model, reasoning_model), top_k, batch_size_eval)


# --------------------------------------------------------------------------------------------------
# The chapter, in calls


def chapter_models(model: str, compare: str, base_model: str, reasoning_model: str, remote) -> list[str]:
    """The models the chapter files its results under: the hub pair's base model when
    `base_model` or `reasoning_model` is set, else the offline models `model` (and `compare`).
    Raises a one-line CatchtagError for the offline proxy with `remote=True` (fine-tuning runs here,
    which NDIF cannot do)."""
    hub = bool(base_model or reasoning_model)
    if not hub and remote is True:
        raise CatchtagError(
            "the offline proxy fine-tunes a model here, which NDIF cannot do: set base_model and "
            "reasoning_model to hub ids to compare a pair on NDIF, or use remote=False / 'local'"
        )
    return [base_model] if hub else [m for m in (model, compare) if m]


def chapter_problems(n_train: int, n_eval: int, seed: int = 0) -> tuple[list[Problem], list[Problem]]:
    """(training problems, held-out problems): `make_problems(n_train + 4 * n_eval, seed)` split
    after the first `n_train` (4 held-out problems per evaluation prompt, enough to fill 150 tokens)."""
    problems = make_problems(n_train + 4 * n_eval, seed=seed)
    return problems[:n_train], problems[n_train:]


def paper_ratios() -> dict:
    """The paper's ratios of sinks per head, distilled over base (paper, via note): paper_ratio
    (Qwen pair) and paper_ratio_llama."""
    q, l = PAPER_SINKS_PER_HEAD["qwen"], PAPER_SINKS_PER_HEAD["llama"]
    return dict(paper_ratio=q[1] / q[0], paper_ratio_llama=l[1] / l[0])


PAPER_SPECS = dict(paper_ratio=".2f", paper_ratio_llama=".3f")

QUANTITY_SPECS = dict(
    sph_base=".3f", sph_tuned=".3f", sph_control=".3f", sph_ratio=".2f", diff_reasoning="+.3f",
    diff_control="+.3f", diff_tuned_control="+.3f", diff_reasoning_lo="+.3f", diff_reasoning_hi="+.3f",
    diff_control_lo="+.3f", diff_control_hi="+.3f", diff_tuned_control_lo="+.3f", diff_tuned_control_hi="+.3f",
    first_share_base=".0%", first_share_tuned=".0%", first_share_control=".0%",
    other_per_head_base=".3f", other_per_head_tuned=".3f", other_per_head_control=".3f",
    hev_base=".0f", hev_tuned=".0f", hev_control=".0f", n_tokens=".0f", top_layer_change="+.2f",
    **{f"{c}_share_{k}": ".0%" for c in ("word", "space", "punctuation") for k in ("base", "tuned", "control")})


EVAL_BATCH = 8  # prompts per capture forward in the census (a 14B model on NDIF sends q, k, v of each back)


def run_chapter(names: Sequence[str], train_problems, eval_problems, *, base_model: str = "",
                reasoning_model: str = "", remote=False, n_eval: int = 8, n_tokens: int = PAPER_MAX_TOKENS,
                eps: float = DEFAULT_EPS, ev_high: float = 0.5, train_steps: int = 20, batch_size: int = 4,
                block_len: int = 32, lr: float = 3e-4, seed: int = 0, train: str = "attention",
                progress: bool = True, **_) -> dict[str, ReasoningRun]:
    """{model name: ReasoningRun}: `run_pair` on the hub pair when `base_model` is set, else
    `run_proxy` for each offline model of `names` (loaded here). The chapter passes its parameters
    as keywords (others are ignored). The census captures `EVAL_BATCH` prompts per forward (all of
    the default 8 in one)."""
    from .models import load_model

    kw = dict(n_prompts=n_eval, max_tokens=n_tokens, eps=eps, ev_high=ev_high, progress=progress,
              batch_size_eval=min(n_eval, EVAL_BATCH))
    if base_model or reasoning_model:
        return {base_model: run_pair(base_model, reasoning_model, eval_problems, remote=remote, **kw)}
    return {name: run_proxy(load_model(name), train_problems, eval_problems, steps=train_steps, batch_size=batch_size,
                            block_len=block_len, lr=lr, seed=seed, train=train, **kw)
            for name in names}


def runs_summary(runs: dict, titles: dict, ev_high: float = 0.5) -> str:
    """The reproduction page's line: '<title>: <summary>' for each run, joined by '; '."""
    return "; ".join(f"{titles.get(n, n)}: {r.quantities(ev_high)['summary']}" for n, r in runs.items())


def finetune_quantities(runs: dict) -> tuple[dict, dict]:
    """(chapter-level, first model's) fine-tuning numbers: train_tokens and train_params (millions)
    of the first model's reasoning fine-tune, train_seconds (all fine-tunes of all models), and the
    first model's held-out loss on reasoning traces, loss_base, loss_reasoning, loss_control (nats
    per token). All None for a hub pair (no fine-tuning). Specs: `FINETUNE_SPECS`."""
    tuned = [r for r in runs.values() if r.finetunes]
    if not tuned:
        return dict.fromkeys(("train_tokens", "train_params", "train_seconds")), dict.fromkeys(
            ("loss_base", "loss_reasoning", "loss_control"))
    ft, held = tuned[0].finetunes["reasoning"], tuned[0].held_out
    return (dict(train_tokens=ft.tokens, train_params=ft.n_params / 1e6,
                 train_seconds=sum(f.seconds for r in tuned for f in r.finetunes.values())),
            dict(loss_base=held[BASE], loss_reasoning=held[TUNED], loss_control=held[CONTROL]))


FINETUNE_SPECS = dict(train_params=".1f", train_seconds=".0f", loss_base=".2f", loss_reasoning=".2f", loss_control=".2f")


def head_grids(run: ReasoningRun) -> tuple[dict, float]:
    """The layers x heads panels of one run: ({label: dict(sinks=..., change=bool, ev=...)}, lim),
    each a (layers, heads) array. `sinks` is the mean number of
    sinks per head for the base model and for a model whose grid has another shape (a hub pair),
    else its change from the base; `lim` is the largest absolute change (at least 0.5), for a
    symmetric colour scale; `ev` the EV by tags (`grid` of the heads table)."""
    labels = run.labels
    grids = {l: grid(run.heads, l, "n_sinks") for l in labels}
    base = grids[labels[0]]
    same = [l for l in labels[1:] if grids[l].shape == base.shape]
    lim = max([0.5] + [float(np.nanmax(np.abs(grids[l] - base))) for l in same])
    out = {l: dict(sinks=grids[l] - base if l in same else grids[l], change=l in same, ev=grid(run.heads, l, "ev"))
           for l in labels}
    return out, lim


def high_ev_cells(ev: np.ndarray, ev_high: float = 0.5) -> list[tuple[int, int]]:
    """(layer, head) of every cell of an EV grid at or above `ev_high` (NaN is not high)."""
    return [(int(l), int(h)) for l, h in zip(*np.nonzero(np.nan_to_num(ev) >= ev_high))]


def sph_bars(run: ReasoningRun) -> list[tuple[str, float, str]]:
    """(label, sinks per head, colour) of the chapter's bar chart: the paper's four models (paper,
    via note; grey) then ours (the run's models, in order)."""
    bars = [(f"paper: {m.split('/')[1]}", PAPER_SINKS_PER_HEAD[k][i], ["0.75", "0.45"][i])
            for k, pair in PAPER_PAIRS.items() for i, m in enumerate(pair)]
    return bars + [(f"ours: {label}", float(run.summary.loc[label, "sinks_per_head"]), c)
                   for label, c in zip(run.labels, ["tab:blue", "tab:red", "tab:green"])]
