"""The vectorised census tables (`sink_table`, `head_table`, `caught_by`, `SinkStats.sinks/caught`,
`census`) equal a straightforward per-layer, per-head, per-sink reference on random inputs:
same rows, same order, same dtypes (issue 18: the census loops were ~10 s of the sinks chapter)."""

import pandas as pd
import pytest
import torch

from catchtag import sinks as S


def _ref_scored(st: S.HeadStats, mq):
    if mq is None or st.alpha is None or st.n_queries is None:
        return st.received
    out = st.alpha.clone()
    out[..., ~S.scored_mask(st.n_queries, mq)] = float("nan")
    return out


def _ref_caught(st: S.HeadStats, eps, mq):
    sinks = torch.nan_to_num(_ref_scored(st, mq), nan=0.0) > eps
    key = st.top_key
    is_sink = torch.zeros_like(key, dtype=torch.bool)
    valid = key >= 0
    is_sink[valid] = sinks.gather(1, key.clamp_min(0))[valid]
    return sinks, torch.where(is_sink & (st.top_value >= eps), key, torch.full_like(key, -1))


def _ref_masks(st: S.SinkStats, eps, mq):
    pairs = [_ref_caught(st.layer(l), eps, mq) for l in st.layers]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def ref_sink_table(stats, eps, mq=None):
    rows = []
    for p, st in enumerate(stats):
        kinds = st.kinds
        sinks, caught = _ref_masks(st, eps, mq)
        alpha = st.received if st.alpha is None else st.alpha
        T = len(st.tokens)
        for li, layer in enumerate(st.layers):
            for h, k in torch.nonzero(sinks[li]).tolist():
                nq = int(st.n_queries[li, k]) if st.n_queries is not None else T - k
                rows.append(dict(prompt=p, layer=layer, head=h, position=k, token=st.tokens[k],
                                 kind=kinds[k], received=float(alpha[li, h, k]),
                                 n_caught=int((caught[li, h] == k).sum()), n_queries=nq,
                                 from_end=T - 1 - k))
    return pd.DataFrame(rows, columns=S.SINK_TABLE_COLUMNS)


def ref_head_table(stats, eps, mq=None):
    rows = []
    for p, st in enumerate(stats):
        sinks, caught = _ref_masks(st, eps, mq)
        for li, layer in enumerate(st.layers):
            for h in range(sinks.shape[1]):
                n = int(sinks[li, h].sum())
                first = bool(sinks[li, h, 0])
                rows.append(dict(
                    prompt=p, layer=layer, head=h, n_sinks=n, first_sink=first, n_other=n - int(first),
                    caught_share=float((caught[li, h, 1:] >= 0).double().mean()) if st.received.shape[-1] > 1 else 0.0,
                    min_row_sum=float(st.row_sum[li, h].min())))
    return pd.DataFrame(rows)


TOKENS = ["<bos>", " The", ".", "\n", " cat", ",", " sat", "!", " on", " mat"]


def random_stats(seed, T, layers=(0, 2, 5), H=3, window=None):
    g = torch.Generator().manual_seed(seed)
    per = []
    for _ in layers:
        A = torch.rand(H, T, T, generator=g, dtype=torch.float64) ** 6  # peaked rows: sinks appear
        A[:, :, 0] += torch.rand(H, 1, generator=g, dtype=torch.float64) * 3 * (torch.rand(H, 1, generator=g) > 0.3)
        keep = torch.ones(T, T, dtype=torch.bool).tril()
        if window:
            keep &= ~torch.ones(T, T, dtype=torch.bool).tril(-window)
        A = A.masked_fill(~keep, 0.0)
        A = A / A.sum(-1, keepdim=True) * (0.9 + 0.1 * torch.rand(H, T, 1, generator=g, dtype=torch.float64))
        mask = torch.zeros(T, T).masked_fill(~keep, float("-inf"))
        per.append(S.stats_from_probs(A, min_queries=2, mask=mask))
    tokens = [TOKENS[i % len(TOKENS)] for i in range(T)]
    return S.SinkStats.from_heads("m", "text", tokens, list(layers), per, min_queries=2)


@pytest.mark.parametrize("window", [None, 4])
def test_tables_equal_reference(window):
    stats = [random_stats(s, T, window=window) for s, T in [(0, 12), (1, 7), (2, 1), (3, 20), (4, 3)]]
    for eps in (0.05, 0.1, 0.2, 0.5, 0.95):
        for mq in (None, 0, 2, 5, 30):
            got, want = S.sink_table(stats, eps, mq), ref_sink_table(stats, eps, mq)
            pd.testing.assert_frame_equal(got, want, check_exact=True)
            got, want = S.head_table(stats, eps, mq), ref_head_table(stats, eps, mq)
            pd.testing.assert_frame_equal(got, want, check_exact=True)
            for st in stats:
                s_ref, c_ref = _ref_masks(st, eps, mq)
                assert torch.equal(st.sinks(eps, mq), s_ref)
                assert torch.equal(st.caught(eps, mq), c_ref)
                assert torch.equal(S.caught_by(st.layer(st.layers[0]), eps, mq), c_ref[0])
                if mq is not None:
                    ref_alpha = torch.stack([_ref_scored(st.layer(l), mq) for l in st.layers])
                    assert torch.equal(st.alpha_at(mq).isnan(), ref_alpha.isnan())
                    assert torch.equal(st.alpha_at(mq).nan_to_num(-1), ref_alpha.nan_to_num(-1))


def test_tables_some_sinks_found():
    stats = [random_stats(s, 15) for s in range(3)]
    assert len(S.sink_table(stats, 0.2)) > 0 and (S.sink_table(stats, 0.2).kind != "first").any()


def test_empty_and_hand_made():
    stats = [random_stats(0, 10)]
    pd.testing.assert_frame_equal(S.sink_table(stats, 0.999), ref_sink_table(stats, 0.999))
    pd.testing.assert_frame_equal(S.sink_table([], 0.2), ref_sink_table([], 0.2))
    pd.testing.assert_frame_equal(S.head_table([], 0.2), ref_head_table([], 0.2))
    st = stats[0]
    hand = S.SinkStats(model="m", text="t", tokens=st.tokens, layers=st.layers, received=st.received.float(),
                       row_sum=st.row_sum.float(), top_key=st.top_key, top_value=st.top_value)
    for eps in (0.1, 0.3):
        pd.testing.assert_frame_equal(S.sink_table([hand, st], eps), ref_sink_table([hand, st], eps), check_exact=True)
        pd.testing.assert_frame_equal(S.head_table([hand, st], eps), ref_head_table([hand, st], eps), check_exact=True)
    assert S.census([hand, st], 0.1) == pytest.approx(S.census([hand, st], 0.1), nan_ok=True)
