"""The census attention function (one forward, statistics in the attention pass) against the
capture path: synthetic attention inputs (GQA, windows, softcap, sink logits, padding) and the two
offline models."""

import types

import pytest
import torch

from catchtag.capture import AttnInputs, attention_probs, capture, repeat_kv
from catchtag.census_attention import (
    census_attention_forward, census_forward, census_forward_batch, recording,
)
from catchtag.errors import CatchtagError
from catchtag.sinks import sink_stats, stats_streaming


def _case(seed, B, H, Hkv, T, dh=8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, dh, generator=g) * 2
    k = torch.randn(B, Hkv, T, dh, generator=g) * 2
    v = torch.randn(B, Hkv, T, dh, generator=g)
    k[:, :, 0] *= 4  # a strong first key, so that sinks and catches occur
    return q, k, v


CASES = [
    dict(),
    dict(window=7),
    dict(window=20),
    dict(softcap=3.0),
    dict(sinks=True),
    dict(window=9, softcap=2.0, sinks=True),
]


@pytest.mark.parametrize("chunk", [4, 16, 64])
@pytest.mark.parametrize("opts", CASES)
def test_census_attention_equals_streaming_stats_on_synthetic_inputs(opts, chunk):
    B, H, Hkv, T = 3, 6, 2, 41
    lengths = [41, 30, 5]  # right padding after each row's real tokens
    q, k, v = _case(1, B, H, Hkv, T)
    sink_logits = torch.linspace(-1.0, 2.0, H) if opts.get("sinks") else None
    module = types.SimpleNamespace(layer_idx=3)
    with recording({3}, lengths, chunk) as rec:
        out, weights = census_attention_forward(
            module, q, k, v, None, scaling=0.3, sliding_window=opts.get("window"),
            softcap=opts.get("softcap"), s_aux=sink_logits,
        )
    assert weights is None and out.shape == (B, T, H, 8)
    lc = rec.out[3]
    for b, n in enumerate(lengths):
        ai = AttnInputs(
            q=q[b, :, :n], k=repeat_kv(k[b, :, :n], H), v=repeat_kv(v[b, :, :n], H), mask=None,
            scaling=0.3, sliding_window=opts.get("window"), sink_logits=sink_logits,
            softcap=opts.get("softcap"),
        )
        want_out = attention_probs(ai) @ ai.v  # (H, n, dh)
        assert torch.allclose(out[b, :n].transpose(0, 1), want_out, atol=1e-6)
        ref = stats_streaming(ai, min_queries=0)
        visible = torch.arange(n, 0, -1)
        if opts.get("window"):
            visible = visible.clamp_max(opts["window"])
        assert torch.equal(lc.n_visible[b, :n], visible) and not lc.n_visible[b, n:].any()
        # alpha = column sum over the queries that can see the key (window-aware), as in sinks
        assert torch.allclose(lc.col_sum[b, :, :n] / visible, ref.alpha, atol=1e-6)
        assert torch.allclose(lc.row_sum[b, :, :n], ref.row_sum, atol=1e-6)
        assert torch.equal(lc.top_key[b, :, :n], ref.top_key)
        assert torch.allclose(lc.top_value[b, :, :n], ref.top_value, atol=1e-6)
        if sink_logits is not None:
            assert lc.row_sum[b, :, :n].min() < 0.9  # the sink logits take mass


def test_census_attention_without_recording_is_plain_attention():
    q, k, v = _case(2, 1, 4, 1, 23)  # multi-query: one kv head
    module = types.SimpleNamespace(layer_idx=0)
    out, _ = census_attention_forward(module, q, k, v, None, scaling=0.5, sliding_window=5)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, repeat_kv(k[0], 4)[None], repeat_kv(v[0], 4)[None],
        attn_mask=(torch.arange(23)[None] <= torch.arange(23)[:, None])
        & (torch.arange(23)[:, None] - torch.arange(23)[None] < 5), scale=0.5,
    )
    assert torch.allclose(out, ref.transpose(1, 2), atol=1e-6)


def test_census_attention_refuses_cache_and_masks():
    q, k, v = _case(3, 1, 2, 2, 6)
    module = types.SimpleNamespace(layer_idx=0)
    with pytest.raises(CatchtagError, match="whole prompts"):
        census_attention_forward(module, q[:, :, -1:], k, v, None)
    with pytest.raises(CatchtagError, match="pad on the right"):
        census_attention_forward(module, q, k, v, torch.zeros(1, 1, 6, 6))


def test_recording_is_not_reentrant():
    with recording(None, [4]):
        with pytest.raises(CatchtagError, match="already running"):
            with recording(None, [4]):
                pass


@pytest.mark.slow
def test_census_forward_equals_capture_path_on_offline_models(any_model):
    # Long enough that Gemma-3's 512-token sliding window cuts some rows (both models stay cheap).
    from catchtag.prompts import PASSAGES

    text = ("\n\n".join(PASSAGES) + "\n\n") * 2
    ref = sink_stats(capture(any_model, text, resid=False, progress=False)[0])
    st = census_forward(any_model, text, chunk=96)
    assert st.tokens == ref.tokens and st.layers == ref.layers
    assert len(st.tokens) > 600
    assert torch.equal(torch.isnan(st.received), torch.isnan(ref.received))
    assert (st.received.nan_to_num() - ref.received.nan_to_num()).abs().max() <= 1e-6
    # without sink logits the census reports rows summing to exactly 1; the capture path's float32
    # row sums over ~1,000 keys differ from 1 by rounding (about 1e-6)
    assert (st.row_sum - ref.row_sum).abs().max() <= 1e-5
    # the caught key may flip only on a near-tie between two keys
    flips = st.top_key != ref.top_key
    assert flips.float().mean() < 1e-4
    assert (st.top_value - ref.top_value).abs().max() <= 1e-5


@pytest.mark.slow
def test_census_batch_equals_one_prompt_at_a_time(smollm):
    prompts = ["The cat sat on the mat.\nIt slept.", "One, two, three: four five six seven eight nine.", "Hi there"]
    alone = [census_forward(smollm, p) for p in prompts]
    batched = census_forward_batch(smollm, prompts, batch_size=3)
    for a, b in zip(alone, batched):
        assert a.tokens == b.tokens
        assert torch.equal(torch.isnan(a.received), torch.isnan(b.received))
        assert (a.received.nan_to_num() - b.received.nan_to_num()).abs().max() <= 1e-5
        assert torch.equal(a.top_key, b.top_key)


def test_census_forward_bad_input(smollm):
    with pytest.raises(CatchtagError, match="chunk"):
        census_forward(smollm, "Hello world", chunk=0)
    with pytest.raises(CatchtagError, match="batch_size"):
        census_forward_batch(smollm, ["Hello world"], batch_size=0)
    with pytest.raises(CatchtagError, match="no prompts"):
        census_forward_batch(smollm, [])


def test_blocks_cover_every_query_once_within_chunk_and_budget(monkeypatch):
    from catchtag import census_attention as ca

    monkeypatch.setattr(ca, "BLOCK_LOGITS", 4096)
    monkeypatch.setattr(ca, "MIN_BLOCK_ROWS", 4)
    for T, chunk, window in [(100, 16, None), (100, 16, 7), (37, 64, None), (5, 1, None)]:
        blocks = list(ca._blocks(T, chunk, window, heads=2))
        assert blocks[0][0] == 0 and blocks[-1][1] == T
        assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))  # contiguous, no overlap
        for start, stop, lo in blocks:
            assert 0 < stop - start <= chunk
            assert lo == (max(0, start - window + 1) if window else 0)
            # within the budget, unless the block is down to its minimum number of rows
            assert 2 * (stop - start) * (stop - lo) <= 4096 or stop - start == min(4, chunk) or stop == T


def test_census_ties_go_to_the_first_key_and_unrecorded_layers_run_sdpa():
    # keys 1 and 2 are equal: every later query's largest non-self logit is a tie, broken to key 1
    g = torch.Generator().manual_seed(5)
    u = torch.randn(8, generator=g)
    q = u.expand(1, 2, 12, 8) + 0.01 * torch.randn(1, 2, 12, 8, generator=g)
    k = 0.1 * torch.randn(1, 1, 12, 8, generator=g)
    v = torch.randn(1, 1, 12, 8, generator=g)
    k[:, :, 1] = k[:, :, 2] = u  # the same, strongest key twice for every query
    module = types.SimpleNamespace(layer_idx=0)
    with recording({0}, [12], 4) as rec:
        out, _ = census_attention_forward(module, q, k, v, None, scaling=0.5)
    ai = AttnInputs(q=q[0], k=k[0], v=v[0], scaling=0.5)
    ref = stats_streaming(ai, min_queries=0)
    assert torch.equal(rec.out[0].top_key[0, :, 3:], torch.ones(2, 9, dtype=torch.long))
    assert torch.equal(rec.out[0].top_key[0], ref.top_key)
    assert torch.allclose(rec.out[0].top_value[0], ref.top_value, atol=1e-6)
    plain, _ = census_attention_forward(types.SimpleNamespace(layer_idx=1), q, k, v, None, scaling=0.5)
    assert torch.allclose(plain, out, atol=1e-6)  # layer 1 is not recorded: sdpa, same output


@pytest.mark.parametrize("heads", [(6, 2), (4, 1), (3, 3)])
def test_census_blocks_under_the_logit_budget_share_the_working_memory(monkeypatch, heads):
    # Blocks cut by the logit budget (a few queries of the rep heads of one kv head each, fewer as
    # the keys grow) with grouped-query, multi-query and plain attention, a sliding window, sink
    # logits and padding; two layers of different geometry (window, no window) recorded in one
    # forward reuse the same working memory, and each equals the streaming statistics.
    from catchtag import census_attention as ca

    H, Hkv = heads
    monkeypatch.setattr(ca, "BLOCK_LOGITS", 400 * (H // Hkv))  # 16, then 12, 9, ... queries a block
    monkeypatch.setattr(ca, "MIN_BLOCK_ROWS", 2)
    B, T, lengths = 2, 37, [37, 23]
    plan, _ = ca._plan(T, 16, None, H // Hkv)
    assert len({stop - start for start, stop, _ in plan}) > 2  # block sizes change along the prompt
    q, k, v = _case(7, B, H, Hkv, T)
    sink_logits = torch.linspace(-1.0, 1.5, H)
    with recording({0, 1}, lengths, 16) as rec:
        for layer, window, sinks in [(0, 6, sink_logits), (1, None, None), (0, 6, sink_logits)]:
            out, _ = census_attention_forward(
                types.SimpleNamespace(layer_idx=layer), q, k, v, None, scaling=0.4,
                sliding_window=window, s_aux=sinks,
            )
            lc = rec.out[layer]
            for b, n in enumerate(lengths):
                _assert_row_matches_streaming(out, lc, b, n, q, k, v, H, 0.4, window, sinks)
                assert not out[b, n:].any()  # padding queries: output 0
                assert (lc.top_key[b, :, n:] == -1).all() and not lc.col_sum[b, :, n:].any()
        assert len(rec.work) == 2  # one working memory per geometry, reused
        first, second = rec.work.values()
        assert first.q is second.q and first.o is second.o  # the geometries share q, k, v, outputs


def _assert_row_matches_streaming(out, lc, b, n, q, k, v, H, scaling, window, sinks,
                                  out_atol=1e-6, top_value_atol=1e-6):
    """Prompt b (its first n tokens) of a census layer: the output and the census sums equal
    attention_probs @ v and stats_streaming of the same attention inputs."""
    ai = AttnInputs(
        q=q[b, :, :n], k=repeat_kv(k[b, :, :n], H), v=repeat_kv(v[b, :, :n], H), mask=None,
        scaling=scaling, sliding_window=window, sink_logits=sinks,
    )
    assert torch.allclose(out[b, :n].transpose(0, 1), attention_probs(ai) @ ai.v, atol=out_atol)
    ref = stats_streaming(ai, min_queries=0)
    visible = torch.arange(n, 0, -1)
    if window:
        visible = visible.clamp_max(window)
    assert torch.allclose(lc.col_sum[b, :, :n] / visible, ref.alpha, atol=1e-6)
    assert torch.allclose(lc.row_sum[b, :, :n], ref.row_sum, atol=1e-6)
    assert torch.equal(lc.top_key[b, :, :n], ref.top_key)
    assert torch.allclose(lc.top_value[b, :, :n], ref.top_value, atol=top_value_atol)


@pytest.mark.parametrize("always_shift", [False, True])
def test_census_blocks_with_and_without_the_row_maximum_subtracted(monkeypatch, always_shift):
    # A block whose row maxima all lie in [SHIFT_MIN, SHIFT_MAX] takes exp(S), others exp(S - m):
    # queries whose logits are all far below 0 (maxima < SHIFT_MIN), ordinary ones, and ones with
    # maxima above SHIFT_MAX, in one layer (GQA, padding, sink logits, a window, a block size that
    # does not divide T), equal the streaming statistics either way (and with every block shifted).
    from catchtag import census_attention as ca

    lo, hi = ca.SHIFT_MIN, ca.SHIFT_MAX
    if always_shift:
        monkeypatch.setattr(ca, "SHIFT_MAX", float("-inf"))
    B, H, Hkv, T, dh = 2, 6, 2, 45, 8
    lengths = [45, 38]
    g = torch.Generator().manual_seed(11)
    u = torch.zeros(dh)
    u[0] = 3.0
    k = u + 0.3 * torch.randn(B, Hkv, T, dh, generator=g)
    v = torch.randn(B, Hkv, T, dh, generator=g)
    ramp = torch.cat([torch.full((12,), -25.0), torch.linspace(-2.0, 2.0, 18), torch.full((15,), 30.0)])
    q = ramp[:, None] * u / 3.0 + torch.randn(B, H, T, dh, generator=g)
    scaling = 0.9
    logits = (q @ k.repeat_interleave(H // Hkv, dim=1).transpose(-1, -2)) * scaling
    row_max = logits.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).amax(-1)
    assert (row_max[..., :12] < lo).all() and (row_max[..., 30:] > hi).all()
    assert ((row_max[..., 12:30] > lo) & (row_max[..., 12:30] < hi)).all()
    for window, sinks in [(None, None), (10, torch.linspace(-1.0, 1.0, H))]:
        with recording({0}, lengths, 7) as rec:
            out, _ = census_attention_forward(
                types.SimpleNamespace(layer_idx=0), q, k, v, None, scaling=scaling,
                sliding_window=window, s_aux=sinks,
            )
        lc = rec.out[0]
        m = next(iter(rec.work.values())).m[0]  # row maxima kept (exp(S - m)), or 0 (exp(S))
        assert (m != 0).any() and (m == 0).any() != always_shift  # both kinds of block, or all shifted
        for b, n in enumerate(lengths):
            # logits of magnitude ~60-90 carry float32 rounding of ~5e-6, which the two paths
            # round differently (the scale folded into q here): exp passes it on to A
            _assert_row_matches_streaming(out, lc, b, n, q, k, v, H, scaling, window, sinks,
                                          out_atol=1e-5, top_value_atol=2e-5)
