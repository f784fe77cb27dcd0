"""Sink definitions on hand-made attention matrices, answers worked out by hand."""

import math

import pytest
import torch

from catchtag.capture import AttnInputs, attention_probs
from catchtag.errors import CatchtagError
from catchtag.sinks import (
    SinkStats,
    average_sinks_per_head,
    caught_by,
    check_eps,
    head_table,
    sink_table,
    sinks_mask,
    stats_from_probs,
    stats_streaming,
    token_kind,
)

# Six tokens, one head. Row i is query i; rows sum to 1.
A = torch.tensor(
    [
        [1.0, 0, 0, 0, 0, 0],
        [0.9, 0.1, 0, 0, 0, 0],
        [0.5, 0.1, 0.4, 0, 0, 0],
        [0.3, 0.6, 0.05, 0.05, 0, 0],
        [0.2, 0.5, 0.1, 0.1, 0.1, 0],
        [0.1, 0.1, 0.1, 0.1, 0.1, 0.5],
    ],
    dtype=torch.float64,
)


def test_received_attention_by_hand_without_cutoff():
    st = stats_from_probs(A, min_queries=1)
    # alpha_k = sum_{i>=k} A_ik / (T - k)
    expected = [3.0 / 6, 1.4 / 5, 0.65 / 4, 0.25 / 3, 0.2 / 2, 0.5 / 1]
    assert torch.allclose(st.received[0], torch.tensor(expected, dtype=torch.float64))


def test_cutoff_excludes_keys_seen_by_few_queries():
    st = stats_from_probs(A)  # MIN_QUERIES = 5: only keys 0 and 1 are seen by >= 5 queries
    assert torch.isnan(st.received[0, 2:]).all()
    assert sinks_mask(st, 0.2)[0].tolist() == [True, True, False, False, False, False]
    # Without the cut-off the last key (alpha 0.5 from its own row) would pass as a sink.
    assert sinks_mask(stats_from_probs(A, min_queries=1), 0.2)[0].tolist() == [True, True, False, False, False, True]


def test_threshold_moves_the_count():
    st = stats_from_probs(A)
    assert sinks_mask(st, 0.28 - 1e-9)[0, 1]
    assert not sinks_mask(st, 0.28 + 1e-9)[0, 1]  # alpha_1 = 0.28
    assert sinks_mask(st, 0.3)[0].tolist() == [True, False, False, False, False, False]


def test_caught_segments_by_hand():
    st = stats_from_probs(A)
    caught = caught_by(st, 0.2)[0].tolist()
    # q0 sees only itself; q1, q2 -> key 0 (0.9, 0.5); q3, q4 -> key 1 (0.6, 0.5);
    # q5's largest other entry is 0.1 < eps: not caught.
    assert caught == [-1, 0, 0, 1, 1, -1]
    # Key 1 is no sink at eps 0.3, so q3 and q4 are caught by nothing (their top key is 1).
    assert caught_by(st, 0.3)[0].tolist() == [-1, 0, 0, -1, -1, -1]


def test_self_attention_does_not_count_as_being_caught():
    # q2 puts 0.7 on itself and 0.3 on key 0: its largest entry excluding itself is key 0.
    B = A.clone()
    B[2] = torch.tensor([0.3, 0.0, 0.7, 0, 0, 0])
    assert caught_by(stats_from_probs(B), 0.2)[0, 2] == 0


def test_rows_summing_below_one_are_reported_not_renormalised():
    # A model with learned sink logits leaves 20% of every row to its sink: rows sum to 0.8.
    scaled = 0.8 * A
    st = stats_from_probs(scaled)
    assert torch.allclose(st.row_sum, torch.full((1, 6), 0.8, dtype=torch.float64))
    assert math.isclose(float(st.received[0, 1]), 0.8 * 0.28, rel_tol=1e-12)
    # 0.224 < 0.25 < 0.28: renormalising the rows would wrongly make key 1 a sink at eps 0.25.
    assert sinks_mask(st, 0.25)[0].tolist() == [True, False, False, False, False, False]
    stats = SinkStats("toy", "", list("abcdef"), [0], st.received[None], st.row_sum[None], st.top_key[None], st.top_value[None])
    assert head_table([stats], 0.25)["min_row_sum"].iloc[0] == pytest.approx(0.8)


def test_learned_sink_logits_leave_rows_below_one():
    torch.manual_seed(0)
    H, T, d = 2, 7, 4
    ai = AttnInputs(q=torch.randn(H, T, d), k=torch.randn(H, T, d), v=torch.randn(H, T, d), mask=None,
                    scaling=0.5, sink_logits=torch.tensor([1.0, -1.0]))
    P = attention_probs(ai)
    scores = (ai.q @ ai.k.transpose(-1, -2)) * 0.5
    causal = torch.ones(T, T).tril().bool()
    expo = torch.where(causal, scores.exp(), torch.zeros(()))
    expected = expo / (expo.sum(-1, keepdim=True) + ai.sink_logits.exp()[:, None, None])
    assert torch.allclose(P, expected, atol=1e-6)
    assert (P.sum(-1) < 1).all()


def test_streaming_equals_full_matrix_path():
    torch.manual_seed(1)
    H, T, d = 3, 41, 8
    ai = AttnInputs(q=torch.randn(H, T, d), k=torch.randn(H, T, d), v=torch.randn(H, T, d), mask=None, scaling=1.0)
    full = stats_from_probs(attention_probs(ai))
    chunked = stats_streaming(ai, chunk=8)
    for name in ("received", "row_sum", "top_value"):
        a, b = getattr(full, name), getattr(chunked, name)
        assert torch.allclose(torch.nan_to_num(a, nan=-1), torch.nan_to_num(b, nan=-1), atol=1e-6), name
    assert torch.equal(full.top_key, chunked.top_key)


def test_sliding_window_mask_without_explicit_mask():
    H, T, d = 1, 6, 2
    ai = AttnInputs(q=torch.zeros(H, T, d), k=torch.zeros(H, T, d), v=torch.zeros(H, T, d), mask=None,
                    scaling=1.0, sliding_window=2)
    P = attention_probs(ai)[0]
    # Equal logits: each query spreads evenly over itself and the previous token only.
    assert torch.allclose(P[4], torch.tensor([0, 0, 0, 0.5, 0.5, 0]))
    assert torch.allclose(P[0], torch.tensor([1.0, 0, 0, 0, 0, 0]))


def test_token_kinds():
    assert token_kind("The", 0) == "first"
    assert token_kind(".", 0) == "first"
    assert token_kind(".", 3) == "punctuation"
    assert token_kind(" ,", 3) == "punctuation"
    assert token_kind(" —", 3) == "punctuation"
    assert token_kind("\n", 3) == "newline"
    assert token_kind(".\n\n", 3) == "newline"
    assert token_kind(" the", 3) == "other"
    assert token_kind(" ", 3) == "other"


def test_tables_and_average():
    st = stats_from_probs(torch.stack([A, A]))  # two identical heads
    stats = SinkStats("toy", "", ["The", " cat", ".", " a", " b", " c"], [0], st.received[None], st.row_sum[None],
                      st.top_key[None], st.top_value[None])
    table = sink_table([stats], 0.2)
    assert table[["head", "position", "kind"]].values.tolist() == [[0, 0, "first"], [0, 1, "other"], [1, 0, "first"], [1, 1, "other"]]
    assert table["n_caught"].tolist() == [2, 2, 2, 2]
    assert average_sinks_per_head([stats], 0.2) == 2.0
    assert average_sinks_per_head([stats], 0.3) == 1.0
    heads = head_table([stats], 0.2)
    assert heads["caught_share"].tolist() == pytest.approx([0.8, 0.8], abs=1e-12)  # 4 of the 5 queries after the first


@pytest.mark.parametrize("eps", [0, 1, -0.1, 1.5, "0.2", True, float("nan")])
def test_bad_eps(eps):
    with pytest.raises(CatchtagError):
        check_eps(eps)
