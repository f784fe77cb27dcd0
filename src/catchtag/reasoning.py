"""Reasoning models (paper §5): do reasoning-trained models use catch, tag, release in more heads?

The paper (§5, Fig. 5) compares DeepSeek-R1-Distill-Qwen with its base Qwen model: the average
number of sinks per head rises from 1.125 to 2.196 and more heads have a high share of variance
explained by their tags. The paper calls this correlational (§K.3). Distillation at that scale is
out of reach offline, so this module also runs a small *controlled* version (ours):

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
- `compare` measures sinks per head and per-head explained variance on the same prompts for any
  set of models (base, reasoning-tuned, control; or a hub pair such as the paper's).

Where the paper's reasoning pair is wanted, `PAPER_PAIR` names it; those models are 1.5B
parameters and run through `load_model(hub id)` locally or with `remote=True` on NDIF.
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
from .sinks import DEFAULT_EPS, average_sinks_per_head, check_eps, head_table, sink_stats

PAPER_PAIR = ("Qwen/Qwen2.5-Math-1.5B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B")
PAPER_SINKS_PER_HEAD = (1.125, 2.196)  # (paper) §5: base -> reasoning-distilled
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
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Sinks and explained variance of every model on the same prompts.

    Returns (summary, heads). `summary` has one row per model: sinks_per_head (the paper's §5
    statistic), first_share (heads with a first-token sink), other_per_head (non-first sinks per
    head), heads_high_ev (heads whose tags explain at least `ev_high` of their output variance),
    heads_with_ev (heads with an EV at all), median_ev, n_heads. `heads` has one row per (model,
    layer, head): n_sinks (mean over prompts), n_other, ev, n_tags, n_caught.
    """
    from .capture import capture

    eps = check_eps(eps)
    summary, parts = [], []
    for label, m in models.items():
        caps = capture(m, list(prompts), remote=remote, progress=progress)
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
            sinks_per_head=average_sinks_per_head(stats, eps),
            first_share=float(ht["first_sink"].mean()),
            other_per_head=float(ht["n_other"].mean()),
            heads_high_ev=int((heads["ev"] >= ev_high).sum()) if _has_weights(m) else np.nan,
            heads_with_ev=int(heads["ev"].notna().sum()),
            median_ev=float(heads["ev"].median()),
            n_heads=int(len(heads)),
        ))
        del caps
    return pd.DataFrame(summary), pd.concat(parts, ignore_index=True)


def _has_weights(model: Model) -> bool:
    return next(model.hf.parameters()).device.type != "meta"


def load_pair(base_model: str, reasoning_model: str, remote: bool | str = False,
              dtype: str = "float32") -> dict[str, Model]:
    """{'base': ..., 'reasoning': ...} loaded by Hugging Face id (or registry name), both or neither."""
    from .models import load_model

    if bool(base_model) != bool(reasoning_model):
        raise CatchtagError(
            "give both base_model and reasoning_model (for the paper's pair: "
            f"base_model={PAPER_PAIR[0]!r}, reasoning_model={PAPER_PAIR[1]!r}), or neither for the "
            "offline fine-tuning experiment"
        )
    return {"base": load_model(base_model, dtype=dtype, remote=remote),
            "reasoning": load_model(reasoning_model, dtype=dtype, remote=remote)}


def grid(heads: pd.DataFrame, label: str, column: str) -> np.ndarray:
    """(layers, heads) array of a `compare` heads column for one model."""
    t = heads[heads["model"] == label]
    return t.pivot(index="layer", columns="head", values=column).to_numpy(dtype=float)
