"""The sink census inside the forward pass: an attention function that computes each layer's output
block by block and, in the same pass, what the census needs.

`census_forward(model, text)` runs the model once with `NAME` ("catchtag_census") as its attention
implementation (registered with transformers' `AttentionInterface`). For every recorded layer and
every block of at most `chunk` queries (fewer for long prompts, so that a block's logits stay in the
core's cache: `BLOCK_LOGITS`) the function computes the masked logits S (softcap, causal mask,
sliding window), the row's largest logit other than the diagonal and its key, the row maximum m,
E = exp(S - m) in place and the softmax normaliser den = sum E (learned sink logits `s_aux` add
exp(sink - m) to den and are dropped, so rows sum to less than 1, as in
`catchtag.capture.attention_probs`); the block's output is (E @ v) / den, and the probabilities
A = E / den enter the sums below without being formed:

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

Nothing else is kept: no q, k, v, no T x T map (memory at most `BLOCK_LOGITS` or heads x chunk x
keys logits per block). Layers whose census is not wanted run PyTorch's sdpa kernel where it
applies. Grouped-query and
multi-query attention run on the kv heads directly (query head h reads kv head h // (H / Hkv), as
`repeat_kv` does), without repeating keys or values. The nnsight capture path (`capture` +
`sinks.sink_stats`) computes the same statistics from the saved attention inputs; it is what runs on
NDIF and the cross-check (tests/test_census_attention.py: the two agree to 1e-6 in alpha).

Only prefill without a cache is supported (the census is one forward over whole prompts). Because the
registered name has no mask function in transformers' mask registry, the model passes no mask and
this function applies the causal mask and the layer's `sliding_window` itself; batches are padded on
the right, so no real token ever sees a padding token, and padding queries are left out of the sums.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Sequence

import torch

from .errors import CatchtagError

NAME = "catchtag_census"
DEFAULT_CHUNK = 256
# At most this many logits (batch x heads x queries x keys) per block: a block whose logits stay in
# the core's cache is several times faster per logit (matmul output, exp, sums) than one that does
# not, so long prompts run fewer than `chunk` queries per block (at least MIN_BLOCK_ROWS).
BLOCK_LOGITS = 1 << 19
MIN_BLOCK_ROWS = 32


@dataclasses.dataclass
class LayerCensus:
    """Raw census sums of one layer for a batch: tensors (B, H, T), `n_visible` (B, T)."""

    col_sum: torch.Tensor  # float64
    n_visible: torch.Tensor  # long: queries (real, not padding) that can see key k
    row_sum: torch.Tensor  # float64
    top_key: torch.Tensor  # long
    top_value: torch.Tensor  # float64


class _Recorder:
    def __init__(self, layers: set[int] | None, lengths: Sequence[int], chunk: int):
        self.layers = layers
        self.lengths = list(lengths)
        self.chunk = chunk
        self.out: dict[int, LayerCensus] = {}

    def wants(self, layer) -> bool:
        return layer is not None and (self.layers is None or layer in self.layers)


_ACTIVE: _Recorder | None = None


@functools.lru_cache(maxsize=8)
def _triu(size: int) -> torch.Tensor:
    """(size, size) bool, True strictly above the diagonal (keys after the query: masked)."""
    return torch.ones(size, size, dtype=torch.bool).triu(1)


def _allowed(start: int, stop: int, lo: int, hi: int, window: int | None) -> torch.Tensor:
    rows = torch.arange(start, stop)[:, None]
    cols = torch.arange(lo, hi)[None, :]
    ok = cols <= rows
    if window:
        ok &= rows - cols < window
    return ok


def _first_argmax(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(-1) with ties to the first index, as `torch.max` breaks them; on the CPU through
    NumPy, whose vectorised argmax is about ten times faster than torch's max-with-indices kernel
    (the census's costliest reduction otherwise). Same result: NaN (none occur) wins, as in torch."""
    if x.device.type == "cpu" and x.is_contiguous():
        return torch.from_numpy(x.numpy().argmax(axis=-1))
    return x.max(dim=-1).indices


def _blocks(T: int, chunk: int, window: int | None, heads: int):
    """(start, stop, lo): query blocks [start, stop) covering 0..T-1 and the first key lo that a
    query of the block can see (keys lo..stop-1 are computed). At most `chunk` queries a block,
    fewer where the block's logits (heads x queries x keys) would pass BLOCK_LOGITS."""
    start = 0
    while start < T:
        lo = max(0, start - window + 1) if window else 0
        rows = BLOCK_LOGITS // (heads * (start + chunk - lo))
        stop = min(start + min(chunk, max(MIN_BLOCK_ROWS, rows)), T)
        yield start, stop, lo
        start = stop


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
    softcap, no sink logits, no window shorter than the prompt). A recorded layer runs block by
    block, in one pass over each block's logits S (queries of the block x the keys they can see):
    the row's largest logit other than the diagonal and its key (argmax of the logits is argmax of
    the probabilities, ties to the first key), the row maximum m, E = exp(S - m) in place, the
    normaliser den = sum E (+ exp(sink - m)), then output = (E @ v) / den and column sums
    (1 / den) @ E: the probabilities A = E / den are never formed."""
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
    window = int(sliding_window) if sliding_window else None
    rec = _ACTIVE
    layer = getattr(module, "layer_idx", None)
    record = rec is not None and rec.wants(layer)
    chunk = rec.chunk if rec is not None else DEFAULT_CHUNK
    dtype = query.dtype
    if not record and not softcap and s_aux is None and (window is None or window >= T):
        with torch.no_grad():
            out = torch.nn.functional.scaled_dot_product_attention(
                query, key, value, is_causal=True, scale=scale, enable_gqa=rep > 1,
            )
        return out.transpose(1, 2).contiguous(), None
    dev = query.device
    # the scale folded into q once (bit-exact when it is a power of two, as for head_dim 64)
    q5 = (query.float() * scale).reshape(B, Hkv, rep, T, dh)
    k = key.float().contiguous()  # the model passes transposed views: one copy, not one per block
    v = value.float().contiguous()
    sink = None
    if s_aux is not None:
        sink = s_aux.detach().float().reshape(1, Hkv, rep, 1)
    out = torch.empty(B, Hkv, rep, T, dh, dtype=torch.float32, device=dev)
    if record:
        lengths = torch.tensor(rec.lengths, device=dev)
        shortest = min(rec.lengths)  # rows of the batch padded after their `length` tokens
        col_sum = torch.zeros(B, H, T, dtype=torch.float64, device=dev)
        row_sum = torch.ones(B, H, T, dtype=torch.float64, device=dev)
        top_key = torch.full((B, H, T), -1, dtype=torch.long, device=dev)
        top_value = torch.zeros(B, H, T, dtype=torch.float64, device=dev)
    neg_inf = float("-inf")
    with torch.no_grad():
        for start, stop, lo in _blocks(T, chunk, window, B * H):
            R = stop - start
            hi = stop
            K = hi - lo
            qc = q5[:, :, :, start:stop].reshape(B, Hkv, rep * R, dh)
            scores = torch.matmul(qc, k[:, :, lo:hi].transpose(-1, -2))  # (B, Hkv, rep*R, K)
            s5 = scores.view(B, Hkv, rep, R, K)
            if softcap:
                scores.div_(softcap).tanh_().mul_(softcap)
            if K <= 2 * R:
                s5.masked_fill_(~_allowed(start, stop, lo, hi, window), neg_inf)
            else:
                # only the block's last R keys (the diagonal square) and, under a window, its first
                # R keys can be masked for some query of the block
                s5[..., K - R:].masked_fill_(_triu(R), neg_inf)
                if window and stop - window > lo:  # some key of the first R is out of a row's window
                    s5[..., :R].masked_fill_(~_allowed(start, stop, lo, lo + R, window), neg_inf)
            if record:
                # the row's largest logit other than the diagonal (the query itself), and its key
                diag = s5[..., K - R:].diagonal(dim1=-2, dim2=-1)  # (B, Hkv, rep, R) view
                d = diag.clone()
                diag.fill_(neg_inf)
                idx = _first_argmax(scores).view(B, Hkv, rep, R)
                top = s5.gather(-1, idx[..., None])[..., 0]
                diag.copy_(d)
                m = torch.maximum(top, d)  # the row maximum (the diagonal is always visible)
            else:
                m = s5.amax(dim=-1)
            if sink is not None:
                m = torch.maximum(m, sink)
            e5 = s5.sub_(m[..., None]).exp_()  # E = exp(S - m), in place
            mass = e5.sum(dim=-1)  # (B, Hkv, rep, R): the keys' share of den
            den = mass if sink is None else mass + torch.exp(sink - m)
            inv = den.reciprocal_() if sink is not None else den.reciprocal()
            o = torch.matmul(scores, v[:, :, lo:hi]).view(B, Hkv, rep, R, dh)
            torch.mul(o, inv[..., None], out=out[:, :, :, start:stop])
            if not record:
                continue
            if sink is not None:  # without sink logits every row sums to 1 (row_sum stays 1)
                row_sum[:, :, start:stop] = (mass * inv).reshape(B, H, R)
            w = inv
            if shortest < stop:  # padding queries: left out of every sum
                real = torch.arange(start, stop, device=dev)[None, :] < lengths[:, None]  # (B, R)
                w = inv * real[:, None, None, :]
            # column sums of A = E / den: a (1, R) @ (R, K) product per head
            col_sum[:, :, lo:hi].add_(torch.matmul(w[..., None, :], e5).view(B, H, K))
            val = (top - m).exp_().mul_(inv)  # A at the top key
            idx += lo
            idx.masked_fill_(val <= 0, 0)  # nothing positive but the diagonal: the first maximum (0) is key 0
            if start == 0:
                idx[..., 0] = -1
                val[..., 0] = 0.0
            top_key[:, :, start:stop] = idx.reshape(B, H, R)
            top_value[:, :, start:stop] = val.reshape(B, H, R)
    if record:
        n_visible = torch.zeros(B, T, dtype=torch.long)
        for b, n in enumerate(rec.lengths):
            counts = torch.arange(n, 0, -1)
            n_visible[b, :n] = counts.clamp_max(window) if window else counts
        rec.out[layer] = LayerCensus(col_sum, n_visible, row_sum, top_key, top_value)
    out = out.view(B, H, T, dh).transpose(1, 2).contiguous().to(dtype)
    return out, None


@contextlib.contextmanager
def recording(layers: set[int] | None, lengths: Sequence[int], chunk: int = DEFAULT_CHUNK):
    """While active, `census_attention_forward` records the census sums of the layers in `layers`
    (None: all) into the yielded recorder's `out` {layer: LayerCensus}; `lengths`: each batch row's
    real length (right padding after it)."""
    global _ACTIVE
    if _ACTIVE is not None:
        raise CatchtagError("a census forward is already running (it is not re-entrant)")
    _ACTIVE = _Recorder(layers, lengths, _check_chunk(chunk))
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
    with recording(wanted, lengths, chunk) as rec:
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
