"""The sink census inside the forward pass: an attention function that computes each layer's output
block by block and, in the same pass, what the census needs.

`census_forward(model, text)` runs the model once with `NAME` ("catchtag_census") as its attention
implementation (registered with transformers' `AttentionInterface`). A recorded layer runs the
queries of each kv head block by block: a block is at most `chunk` queries (default 64) of the rep =
H / Hkv query heads that read that kv head, time-major (`_Work`), and at most `BLOCK_LOGITS` logits
(2^19: 2 MiB, one core's L2 cache here), so long prompts run fewer queries per block. For each
block the function computes the masked logits S (softcap, causal mask, sliding window), the row's
largest logit other than the diagonal and its key, the row maximum m, E = exp(S - m) in place (or
exp(S), with m kept as 0, when every row maximum of the block lies in [SHIFT_MIN, SHIFT_MAX] =
[-10, 60]: the same softmax up to float rounding, without the pass S - m) and the softmax
normaliser den = sum E (learned sink logits `s_aux` add exp(sink - m) to den and are dropped, so
rows sum to less than 1, as in `catchtag.capture.attention_probs`); the output is (E @ v) / den,
and the probabilities A = E / den enter the sums below without being formed:

- `col_sum` (H, T): sum over the queries that can see key k of A_ik (float32 within a block,
  float64 across blocks, as `sinks.stats_streaming`);
- `n_visible` (T,): how many queries see key k: min(T - k, window) (window-aware);
- `row_sum` (H, T): the row's mass: with sink logits the sum of the row's probabilities (less
  than 1); without them exactly 1 (the softmax's rows sum to 1 up to float rounding, ~1e-7, which
  the capture path reports and this path does not);
- `top_key`, `top_value` (H, T): the row's largest entry other than the diagonal, and its key
  (-1 and 0 for the first query), with `sinks.stats_streaming`'s tie rules (the first key among
  equal logits; key 0 when no entry but the diagonal is positive). The key is the argmax of the
  logits (exp is monotonic); two logits within float rounding of each other may give equal float32
  probabilities, where the capture path takes the first of them: such near-ties are the only
  possible difference (tests/test_census_attention.py counts them, < 1e-4 of rows).

Nothing else is kept: no T x T map, and q, k, v only as the layer's working copies (float32, rows
in the block order), reused by every layer of the forward with the block's logits (`_Work`).

Cost (CPU time, SmolLM2-135M, one thread; README's performance section has the figures): the two
matrix products per block (Q K^T and E V, as in sdpa's fused kernel) are most of a recorded layer
(~0.84 and ~0.97 ns per logit at 63 rows x 8192 keys, measured alone); the census adds an argmax
pass (NumPy's: ~10x torch's max-with-indices; ~0.09 ns per logit), exp (~0.22) and the row sum
(~0.16) as separate passes over the block, and a (rep, rows) @ (rows, keys) product for the column
sums (~0.11). This round (1.36x the sdpa decoder forward at T = 8192 in the previous bench run, one
layer 1.28x sdpa's fused kernel): the keys are stored transposed, (dh, T) per kv head, so a block's
Q K^T reads a column slice of a row-major matrix, which MKL packs faster than the transposed view of
k it read before (0.84 against 1.09-1.18 ns per logit at 63 rows x 8192 keys); and blocks whose row
maxima lie in [-10, 60] skip S - m (~0.17 ns per logit; at 2048 and 8192 every block of the five
SmolLM2 layers checked, 0, 3, 10, 20 and 29, whose row maxima lie in [-2.5, 24]). One layer at 8192
is now ~1.14x sdpa's kernel (1.28x before). Earlier rounds: masks added as 0/-inf tables before the
argmax, and the masked entries of S - m raised to 0 before exp and zeroed after it (torch's CPU exp
costs ~6-9 ns on -inf and ~20-60 ns on finite arguments below about -87, against ~0.2 ns); blocks
per kv head whose working memory and views are built once per forward (no allocation and no slicing
per block: fresh pages for every block cost page faults); 64 queries a block rather than 256 (less
wasted upper triangle); the results of all layers in one allocation (peak memory).

Layers whose census is not wanted run PyTorch's sdpa kernel where it applies. Grouped-query and
multi-query attention run on the kv heads directly (query head h reads kv head h // (H / Hkv), as
`repeat_kv` does), without repeating keys or values. The nnsight capture path (`capture` +
`sinks.sink_stats`) computes the same statistics from the saved attention inputs; it is what runs on
NDIF and the cross-check (tests/test_census_attention.py, tests/test_architectures.py: the two agree
to 1e-6 in alpha, on both offline models and tiny Gemma-2, gpt-oss and Mistral models).

Only prefill without a cache is supported (the census is one forward over whole prompts). Because the
registered name has no mask function in transformers' mask registry, the model passes no mask and
this function applies the causal mask and the layer's `sliding_window` itself; batches are padded on
the right, so no real token ever sees a padding token; padding queries are not computed (their
output is 0) and are in no sum.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Sequence

import numpy as np
import torch

from .errors import CatchtagError

NAME = "catchtag_census"
DEFAULT_CHUNK = 64
# At most this many logits (queries x keys, over the query heads of one kv head) per block (2 MiB of
# float32: one core's L2 cache here), and at least MIN_BLOCK_ROWS queries: long prompts run fewer
# than `chunk` queries per block. Measured at T = 8192 (SmolLM2, one layer, CPU time): 2^19 ~5%
# faster than 2^20 and 2^21, ~7% faster than 2^18 (too few rows per matrix product).
BLOCK_LOGITS = 1 << 19
MIN_BLOCK_ROWS = 8
# A block whose row maxima m all lie in [SHIFT_MIN, SHIFT_MAX] computes E = exp(S) rather than
# exp(S - m) (the same softmax up to float rounding, one pass over the block less; m is then kept
# as 0). The largest E is at most e^60 and a row's sum at most T e^60 (float32 holds 3.4e38: any T
# below 10^12). torch's CPU exp costs ~20-60 ns on arguments below about -87 (results subnormal or
# 0), against ~0.2 ns: exp(S) meets them only for entries below e^-77 of the row's largest (which
# weigh nothing), exp(S - m) for entries below e^-87. SmolLM2's row maxima lie in [-2.5, 24] (T = 2048, 8192).
SHIFT_MIN, SHIFT_MAX = -10.0, 60.0


@dataclasses.dataclass
class LayerCensus:
    """Raw census sums of one layer for a batch: tensors (B, H, T), `n_visible` (B, T). Padding
    queries (after a row's length) have no column sums, top_key -1, top_value 0 and row_sum 0."""

    col_sum: torch.Tensor  # float64
    n_visible: torch.Tensor  # long: queries (real, not padding) that can see key k
    row_sum: torch.Tensor  # float64
    top_key: torch.Tensor  # long
    top_value: torch.Tensor  # float64


class _Recorder:
    def __init__(self, layers: set[int] | None, lengths: Sequence[int], chunk: int, n_layers: int | None = None):
        self.layers = layers
        self.lengths = list(lengths)
        self.chunk = chunk
        self.out: dict[int, LayerCensus] = {}
        self.work: dict[tuple, _Work] = {}  # working memory of each layer geometry, for the forward
        self.shared: dict[tuple, dict] = {}  # q, k, v, outputs, row statistics: one set per shape
        # the recorded layers, when known in advance: their results share one allocation (`result`)
        self.slots = sorted(layers) if layers is not None else (list(range(n_layers)) if n_layers else None)
        self._results: LayerCensus | None = None

    def wants(self, layer) -> bool:
        return layer is not None and (self.layers is None or layer in self.layers)

    def result(self, layer: int, B: int, H: int, T: int, device) -> LayerCensus:
        """Where the layer's LayerCensus is written: (B, H, T) views of (L, B, H, T) tensors
        allocated once, at the first recorded layer, when the recorded layers are known (the
        forward's many layers then leave no small long-lived blocks between the C allocator's
        transient ones: a fragmented heap holds its freed memory, and the peak resident memory
        grows); otherwise tensors of its own."""
        f64 = torch.float64
        if self.slots is None or layer not in self.slots:
            return LayerCensus(
                torch.zeros(B, H, T, dtype=f64, device=device), torch.zeros(B, T, dtype=torch.long),
                torch.empty(B, H, T, dtype=f64, device=device), torch.empty(B, H, T, dtype=torch.long, device=device),
                torch.empty(B, H, T, dtype=f64, device=device),
            )
        if self._results is None:
            L = len(self.slots)
            self._results = LayerCensus(
                torch.zeros(L, B, H, T, dtype=f64, device=device), torch.zeros(L, B, T, dtype=torch.long),
                torch.empty(L, B, H, T, dtype=f64, device=device),
                torch.empty(L, B, H, T, dtype=torch.long, device=device),
                torch.empty(L, B, H, T, dtype=f64, device=device),
            )
        i = self.slots.index(layer)
        return LayerCensus(*(getattr(self._results, f.name)[i] for f in dataclasses.fields(LayerCensus)))


_ACTIVE: _Recorder | None = None


@functools.lru_cache(maxsize=2)
def _mask_tables(n: int) -> dict[str, torch.Tensor]:
    """Masks of a block of at most n queries, as tables to slice: for its diagonal square (query i,
    key j of the last R keys) and, under a sliding window, its first R keys (a query sees key j
    when i - j < c, for the block's c: `win` table column j + c - 1). `*_neg`: 0 or -inf, added
    to the logits before the row maximum (`causal_diag_neg` masks the query itself too);
    `*_floor`: -inf or 0, raising the masked entries of S - m to 0 (torch's exp of -inf is ~20x
    slower than of a finite number, on the CPU); `*_keep`: 1 or 0, zeroing them again after exp."""
    i = torch.arange(n)[:, None]
    tables = {}
    for name, masked in (
        ("causal", torch.arange(n)[None, :] > i),
        ("causal_diag", torch.arange(n)[None, :] >= i),
        ("win", torch.arange(2 * n)[None, :] < i),
    ):
        tables[name + "_neg"] = torch.zeros(masked.shape).masked_fill_(masked, float("-inf"))
        if name != "causal_diag":
            tables[name + "_floor"] = torch.full(masked.shape, float("-inf")).masked_fill_(masked, 0.0)
            tables[name + "_keep"] = (~masked).float()
    return tables


def _blocks(T: int, chunk: int, window: int | None, heads: int, budget: int | None = None,
            min_rows: int | None = None):
    """(start, stop, lo): query blocks [start, stop) covering 0..T-1 and the first key lo that a
    query of the block can see (keys lo..stop-1 are computed). At most `chunk` queries a block,
    fewer where the block's logits (`heads` rows per query: the query heads of one kv head, x
    queries x keys) would pass `budget` (default BLOCK_LOGITS), but at least `min_rows` (default
    MIN_BLOCK_ROWS)."""
    budget = BLOCK_LOGITS if budget is None else budget
    min_rows = MIN_BLOCK_ROWS if min_rows is None else min_rows
    start = 0
    while start < T:
        lo = max(0, start - window + 1) if window else 0
        rows = budget // (heads * (start + chunk - lo))
        stop = min(start + min(chunk, max(min_rows, rows)), T)
        yield start, stop, lo
        start = stop


def _plan(T: int, chunk: int, window: int | None, rep: int):
    """The blocks of `_blocks` as a tuple, and (T * rep,) long: each row's block's first key."""
    return _plan_cached(T, chunk, window, rep, BLOCK_LOGITS, MIN_BLOCK_ROWS)


@functools.lru_cache(maxsize=64)
def _plan_cached(T, chunk, window, rep, budget, min_rows):
    plan = tuple(_blocks(T, chunk, window, rep, budget, min_rows))
    lo_rows = torch.cat([torch.full(((stop - start) * rep,), lo, dtype=torch.long) for start, stop, lo in plan])
    return plan, lo_rows


class _Work:
    """Working memory of one layer geometry, and every block's views over it, built once: the
    blocks of all the layers of that geometry in one forward reuse both, so a block allocates
    nothing (fresh pages for every block of a changing size cost page faults and zeroing) and
    makes no view or slicing call, only its ~17 operations.

    Rows are time-major within a kv head g: row t * rep + r is query t of head g * rep + r (the
    rep = H / Hkv query heads that read kv head g), so a block of R queries of one kv head is one
    contiguous (R * rep, dh) matrix, and its outputs and row statistics contiguous slices too."""

    def __init__(self, B, Hkv, rep, T, dh, lengths, chunk, window, record, dev, shared: dict | None = None):
        f32 = torch.float32
        N = T * rep
        shared = {} if shared is None else shared  # tensors shared with the other geometries of the shape

        def tensor(name, shape, dtype=f32):
            if name not in shared:
                shared[name] = torch.empty(shape, dtype=dtype, device=dev)
            return shared[name]

        self.q = tensor("q", (B, Hkv, T, rep, dh))
        self.kt = tensor("kt", (B, Hkv, dh, T))  # keys transposed: each block reads a column slice
        self.v = tensor("v", (B, Hkv, T, dh))
        self.o = tensor("o", (B, Hkv, N, dh))  # E @ v, divided by den at the end
        self.m = tensor("m", (B, Hkv, N))  # the row maximum m
        self.inv = tensor("inv", (B, Hkv, N))  # 1 / den (den: E's row sum [+ sink])
        self.mass = tensor("mass", (B, Hkv, N))  # E's row sum (sink logits only)
        self.plans = [_plan(n, chunk, window, rep) for n in lengths]
        geometry = [(stop - start, stop - lo) for plan, _ in self.plans for start, stop, lo in plan]
        rmax = max(R for R, _ in geometry)
        self.s_buf = torch.empty(max(rep * R * K for R, K in geometry), dtype=f32, device=dev)
        masks = {k: t.to(dev) for k, t in _mask_tables(rmax).items()}
        if record:
            self.top = tensor("top", (B, Hkv, N))  # the largest non-diagonal logit
            self.idx = tensor("idx", (B, Hkv, N), torch.long)  # its key, from the block's lo
            self.col_sum = tensor("col_sum", (B, Hkv * rep, T), torch.float64)  # zeroed per layer
            # 1 / den of head r's rows of a block in row r, zeros elsewhere: column sums w @ E
            self.w = torch.zeros(rep, rep * rmax, dtype=f32, device=dev)
            self.val = tensor("val", (B, Hkv, N))  # A at the top key
            self.key = tensor("key", (B, Hkv, N), torch.long)
            self.lo_rows = torch.zeros(B, 1, N, dtype=torch.long, device=dev)  # each row's block's lo
            self.n_visible = torch.zeros(B, T, dtype=torch.long)
            for b, (n, (_, lo_rows)) in enumerate(zip(lengths, self.plans)):
                self.lo_rows[b, 0, : len(lo_rows)] = lo_rows
                counts = torch.arange(n, 0, -1)
                self.n_visible[b, :n] = counts.clamp_max(window) if window else counts
        on_cpu = dev.type == "cpu"
        qrows = self.q.view(B, Hkv, N, dh)
        self.blocks = []  # per (b, g): the blocks' views
        for b, (plan, _) in enumerate(self.plans):
            for g in range(Hkv):
                views = []
                idx_np = self.idx[b, g].numpy() if record and on_cpu else None
                for start, stop, lo in plan:
                    R, K = stop - start, stop - lo
                    r0, r1 = start * rep, stop * rep
                    s = self.s_buf[: rep * R * K].view(rep * R, K)
                    s3 = s.view(R, rep, K)
                    m = self.m[b, g, r0:r1]
                    den = self.inv[b, g, r0:r1]
                    # only the block's last R keys (the diagonal square) and, under a window, its
                    # first R keys can be masked for some query of the block
                    sq = s3[:, :, K - R:]
                    square = (sq, masks["causal_diag_neg" if record else "causal_neg"][:R, None, :R],
                              masks["causal_floor"][:R, None, :R], masks["causal_keep"][:R, None, :R])
                    c = window - (start - lo) if window else R
                    win = None
                    if c < R:  # query i of the block sees key lo + j (j < R) when i - j < c
                        cols = slice(c - 1, c - 1 + R)
                        win = (s3[:, :, :R], masks["win_neg"][:R, None, cols],
                               masks["win_floor"][:R, None, cols], masks["win_keep"][:R, None, cols])
                    rec_views = None
                    if record:
                        t, x = self.top[b, g, r0:r1], self.idx[b, g, r0:r1]
                        rec_views = (
                            s.as_strided((R, rep), (rep * K + 1, K), s.storage_offset() + K - R),  # diagonal
                            s.numpy() if on_cpu else None, x, idx_np[r0:r1] if on_cpu else None,
                            t, t[:, None], x[:, None],
                            self.w.as_strided((R, rep), (rep, self.w.shape[1] + 1)), self.w[:, : rep * R],
                            self.col_sum[b, g * rep:(g + 1) * rep, lo:stop],
                        )
                    views.append((
                        qrows[b, g, r0:r1], self.kt[b, g, :, lo:stop], self.v[b, g, lo:stop],
                        self.o[b, g, r0:r1], s, square, win, m, m.view(R, rep), m[:, None], den,
                        den.view(R, rep), self.mass[b, g, r0:r1], rec_views,
                    ))
                self.blocks.append(views)


def _work(rec, B, Hkv, rep, T, dh, lengths, chunk, window, record, dev) -> _Work:
    if rec is None:
        return _Work(B, Hkv, rep, T, dh, lengths, chunk, window, record, dev)
    shape = (B, Hkv, rep, T, dh, str(dev))
    key = shape + (chunk, window, record)
    if key not in rec.work:
        rec.work[key] = _Work(B, Hkv, rep, T, dh, lengths, chunk, window, record, dev,
                              rec.shared.setdefault(shape, {}))
    return rec.work[key]


def census_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: query (B, H, T, dh), key/value (B, Hkv, T, dh) ->
    (output (B, T, H, dh), None). Records the layer's census sums when `census_forward` is running.

    A layer whose census is not wanted runs PyTorch's fused sdpa kernel where it applies (no
    softcap, no sink logits, no window shorter than the prompt). Otherwise the queries of each kv
    head run block by block (the rep = H / Hkv query heads that read it together, see `_Work`), in
    one pass over each block's logits S (queries of the block x the keys they can see): with the
    diagonal masked, the row's largest logit other than the diagonal and its key (NumPy's argmax;
    ties to the first key), the row maximum m (that logit or the diagonal's), E = exp(S - m) in
    place, the normaliser den = sum E (+ exp(sink - m)), the unnormalised output E @ v and the
    column sums (1 / den) @ E per head: the probabilities A = E / den are never formed. The
    outputs are divided by den, and the top keys' probabilities exp(top - m) / den formed, once
    per layer."""
    B, H, T, dh = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    if S != T:
        raise CatchtagError(
            f"the census attention runs whole prompts only ({T} queries, {S} keys): call the model "
            "without a cache (use_cache=False), as census_forward does"
        )
    if attention_mask is not None:
        raise CatchtagError(
            "the census attention got an attention mask: pad on the right and pass no mask "
            "(census_forward does), or use catchtag.capture for custom masks"
        )
    rep = H // Hkv
    scale = float(scaling) if scaling is not None else dh ** -0.5
    window = int(sliding_window) if sliding_window and sliding_window < T else None
    rec = _ACTIVE
    layer = getattr(module, "layer_idx", None)
    record = rec is not None and rec.wants(layer)
    chunk = rec.chunk if rec is not None else DEFAULT_CHUNK
    dtype = query.dtype
    if not record and not softcap and s_aux is None and window is None:
        with torch.no_grad():
            out = torch.nn.functional.scaled_dot_product_attention(
                query, key, value, is_causal=True, scale=scale, enable_gqa=rep > 1,
            )
        return out.transpose(1, 2).contiguous(), None
    lengths = [T] * B
    if rec is not None:
        if len(rec.lengths) != B or max(rec.lengths) > T:
            raise CatchtagError(
                f"the census recorder has lengths {rec.lengths} for a batch of {B} rows of {T} tokens"
            )
        lengths = rec.lengths
    dev = query.device
    f32 = torch.float32
    with torch.no_grad():
        w = _work(rec, B, Hkv, rep, T, dh, tuple(lengths), chunk, window, record, dev)
        # the scale folded into q once (bit-exact when it is a power of two, as for head_dim 64)
        q_src = query.unflatten(1, (Hkv, rep)).transpose(2, 3)
        if query.dtype == f32:
            torch.mul(q_src, scale, out=w.q)
        else:
            w.q.copy_(q_src).mul_(scale)
        w.kt.copy_(key.transpose(2, 3))  # one copy, not one per block
        w.v.copy_(value)
        sink = None if s_aux is None else s_aux.detach().to(f32).reshape(Hkv, rep)
        if record:
            w.col_sum.zero_()
        for b, n in enumerate(lengths):
            if n < T:  # padding queries (after the real tokens): output 0, in no sum
                w.o[b, :, n * rep:].zero_()
                w.inv[b, :, n * rep:].zero_()
        for bg, views in enumerate(w.blocks):
            sg = None if sink is None else sink[bg % Hkv]
            for qv, kt, vv, ov, s, square, win, m, m2, mcol, den, den2, mass, rv in views:
                torch.mm(qv, kt, out=s)
                if softcap:
                    s.div_(softcap).tanh_().mul_(softcap)
                sq, neg, floor, keep = square
                if record:
                    diag, s_np, x, x_np, t, tcol, xcol, wdiag, wv, cs = rv
                    m2.copy_(diag)  # the diagonal (query t, key t), kept in m while it is masked
                sq.add_(neg)
                if win is not None:
                    win[0].add_(win[1])
                if record:
                    if s_np is not None:  # NumPy's argmax: ~10x torch's max-with-indices, ties to the first
                        np.argmax(s_np, axis=1, out=x_np)
                    else:
                        torch.argmax(s, dim=1, out=x)
                    torch.gather(s, 1, xcol, out=tcol)
                    diag.copy_(m2)
                    torch.maximum(t, m, out=m)  # the row maximum (the diagonal is always visible)
                else:
                    torch.amax(s, dim=1, out=m)
                if sg is not None:
                    torch.maximum(m2, sg, out=m2)
                # E = exp(S - m), or exp(S) where every row maximum of the block lies in
                # [SHIFT_MIN, SHIFT_MAX] (m then set to 0): no overflow, and one pass less
                lo_m, hi_m = torch.aminmax(m)
                if SHIFT_MIN <= lo_m.item() and hi_m.item() <= SHIFT_MAX:
                    m.zero_()
                else:
                    s.sub_(mcol)
                torch.maximum(sq, floor, out=sq)
                if win is not None:
                    torch.maximum(win[0], win[2], out=win[0])
                s.exp_()  # E = exp(S - m), in place; then the masked entries set to 0
                sq.mul_(keep)
                if win is not None:
                    win[0].mul_(win[3])
                torch.sum(s, dim=1, out=den)
                if sg is not None:
                    mass.copy_(den)
                    den2.add_(torch.exp(sg - m2))
                den.reciprocal_()
                torch.mm(s, vv, out=ov)
                if record:  # column sums of A = E / den per head
                    wdiag.copy_(den2)
                    cs.add_(torch.mm(wv, s))
        # the outputs E @ v / den, in the model's (B, T, H, dh) layout
        out = torch.empty(B, T, H, dh, dtype=f32, device=dev)
        torch.mul(
            w.o.view(B, Hkv, T, rep, dh).transpose(1, 2), w.inv.view(B, Hkv, T, rep, 1).transpose(1, 2),
            out=out.view(B, T, Hkv, rep, dh),
        )
        if record:
            res = rec.result(layer, B, H, T, dev)
            rec.out[layer] = _finish_layer(w, res, B, T, rep, lengths, sink is not None)
    return out.to(dtype), None


def _finish_layer(w: _Work, res: LayerCensus, B, T, rep, lengths, sinks: bool) -> LayerCensus:
    """Write the layer's census into `res` ((B, H, T) tensors) from the per-row block results
    (B, Hkv, T * rep, time-major rows)."""
    torch.sub(w.top, w.m, out=w.val).exp_().mul_(w.inv)  # A at the top key
    torch.add(w.idx, w.lo_rows, out=w.key)
    w.key.masked_fill_(w.val <= 0, 0)  # nothing positive but the diagonal: the first maximum (0) is key 0

    def heads(dst, src):  # (B, Hkv, T * rep) -> (B, H, T)
        dst.view(B, -1, rep, T).copy_(src.view(B, -1, T, rep).transpose(2, 3))

    heads(res.top_key, w.key)
    heads(res.top_value, w.val)
    res.top_key[:, :, 0] = -1
    res.top_value[:, :, 0] = 0.0
    if sinks:
        heads(res.row_sum, w.mass.mul_(w.inv))
    else:  # without sink logits every row sums to 1
        res.row_sum.fill_(1.0)
    res.col_sum.copy_(w.col_sum)
    res.n_visible.copy_(w.n_visible)
    for b, n in enumerate(lengths):
        if n < T:
            res.top_key[b, :, n:] = -1
            res.top_value[b, :, n:] = 0.0
            res.row_sum[b, :, n:] = 0.0
    return res


@contextlib.contextmanager
def recording(layers: set[int] | None, lengths: Sequence[int], chunk: int = DEFAULT_CHUNK,
              n_layers: int | None = None):
    """While active, `census_attention_forward` records the census sums of the layers in `layers`
    (None: all `n_layers`, when given) into the yielded recorder's `out` {layer: LayerCensus};
    `lengths`: each batch row's real length (right padding after it)."""
    global _ACTIVE
    if _ACTIVE is not None:
        raise CatchtagError("a census forward is already running (it is not re-entrant)")
    _ACTIVE = _Recorder(layers, lengths, _check_chunk(chunk), n_layers)
    try:
        yield _ACTIVE
    finally:
        _ACTIVE = None


def register() -> str:
    """Register the census attention with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, census_attention_forward)
    return NAME


def _check_chunk(chunk) -> int:
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise CatchtagError(f"chunk={chunk!r} is not valid: use a whole number of queries >= 1")
    return chunk


def census_raw(
    model, ids_list: Sequence[torch.Tensor], layers: Sequence[int] | None = None, chunk: int = DEFAULT_CHUNK
) -> dict[int, LayerCensus]:
    """One forward over a batch of token-id tensors (right-padded), returning each wanted layer's
    raw census sums (`LayerCensus`, batch in the first dimension). Runs the decoder only (no
    logits) and stops nothing early; `layers` default: all."""
    chunk = _check_chunk(chunk)
    if getattr(model, "remote", False) is True:
        raise CatchtagError(
            f"model {model.name!r} runs on NDIF, whose server runs its own attention: use "
            "capture(...) then sinks.sink_stats there; census_forward runs local models only"
        )
    register()
    hf = model.hf
    lengths = [int(len(x)) for x in ids_list]
    if not lengths or min(lengths) < 1:
        raise CatchtagError("no tokens to run: pass at least one prompt of at least one token")
    T = max(lengths)
    pad = 0
    batch = torch.full((len(lengths), T), pad, dtype=torch.long)
    for b, x in enumerate(ids_list):
        batch[b, : len(x)] = x
    wanted = None if layers is None else set(int(l) for l in layers)
    previous = hf.config._attn_implementation
    with recording(wanted, lengths, chunk, getattr(model, "n_layers", None)) as rec:
        try:
            hf.set_attn_implementation(NAME)
            with torch.no_grad():
                # positions 0..T-1 for every row: right padding leaves each prompt's positions as alone
                hf.model(input_ids=batch, use_cache=False)
        finally:
            hf.set_attn_implementation(previous)
    return rec.out


def census_forward(
    model, text_or_ids, layers: Sequence[int] | None = None, min_queries: int | None = None,
    chunk: int = DEFAULT_CHUNK,
):
    """Sink statistics (`sinks.SinkStats`) of one prompt from one forward pass with the census
    attention: the same numbers as `sink_stats(capture(model, text)[0])`, without storing q, k, v.
    `text_or_ids`: a string (tokenised as `capture` does) or a 1-D tensor of token ids."""
    return census_forward_batch(model, [text_or_ids], layers, min_queries, chunk, batch_size=1)[0]


def census_forward_batch(
    model, prompts: Sequence, layers: Sequence[int] | None = None, min_queries: int | None = None,
    chunk: int = DEFAULT_CHUNK, batch_size: int = 8,
):
    """`census_forward` for many prompts, `batch_size` per forward (right-padded): one SinkStats each."""
    from .capture import tokenize
    from .sinks import MIN_QUERIES

    if isinstance(prompts, (str, torch.Tensor)):
        prompts = [prompts]
    if len(prompts) == 0:
        raise CatchtagError("no prompts given: pass at least one prompt")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise CatchtagError(f"batch_size={batch_size!r} is not valid: use a whole number >= 1")
    min_queries = MIN_QUERIES if min_queries is None else min_queries
    layers = list(range(model.n_layers)) if layers is None else sorted(set(int(l) for l in layers))
    for layer in layers:
        model.check_layer_head(layer)
    items = []
    for p in prompts:
        if isinstance(p, torch.Tensor):
            ids = p.reshape(-1).long()
            items.append(("", ids))
        else:
            items.append((p, tokenize(model, p)))
    results = []
    for first in range(0, len(items), batch_size):
        group = items[first : first + batch_size]
        raw = census_raw(model, [ids for _, ids in group], layers, chunk)
        for b, (text, ids) in enumerate(group):
            results.append(_sink_stats(model, text, ids, layers, raw, b, min_queries))
    return results


def _sink_stats(model, text, ids, layers, raw: dict[int, LayerCensus], b: int, min_queries: int):
    """SinkStats of batch row b, through the same constructor path as `sinks.sink_stats`
    (`sinks._finish` per layer with the window-aware visible-query counts, then
    `SinkStats.from_heads`), so the census cut-off can be applied and swept at census time."""
    from .sinks import MIN_QUERIES, SinkStats, _finish

    n = len(ids)
    mq = MIN_QUERIES if min_queries is None else min_queries
    per = []
    for layer in layers:
        lc = raw[layer]
        # n_visible: the real queries that can see each key (window-aware): alpha's denominator
        per.append(
            _finish(
                lc.col_sum[b, :, :n].clone(), lc.row_sum[b, :, :n].clone(),
                lc.top_key[b, :, :n].clone(), lc.top_value[b, :, :n].clone(), mq,
                n_queries=lc.n_visible[b, :n].clone(),
            )
        )
    return SinkStats.from_heads(model.name, text, model.token_strings(ids), layers, per, mq)
