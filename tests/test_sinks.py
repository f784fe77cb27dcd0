"""Sink definitions on hand-made attention matrices, answers worked out by hand."""

import math

import pytest
import torch

from catchtag.capture import AttnInputs, attention_probs
from catchtag.errors import CatchtagError
from catchtag.sinks import (
    CENSUS_KEYS,
    MIN_QUERIES,
    SinkStats,
    average_sinks_per_head,
    caught_by,
    census,
    eps_sweep,
    groups_from_spans,
    min_queries_sweep,
    check_eps,
    head_table,
    sink_table,
    sinks_mask,
    stats_from_probs,
    stats_streaming,
    token_kind,
    visible_queries,
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


# With six tokens, "at least 4 later queries" scores keys 0 and 1 only (the default rule, 10 later
# queries, scores none of them): the hand-made tests below use MQ.
MQ = 4


def test_received_attention_by_hand_without_cutoff():
    st = stats_from_probs(A, min_queries=0)
    # alpha_k = sum_{i>=k} A_ik / (T - k)
    expected = [3.0 / 6, 1.4 / 5, 0.65 / 4, 0.25 / 3, 0.2 / 2, 0.5 / 1]
    assert torch.allclose(st.received[0], torch.tensor(expected, dtype=torch.float64))
    assert torch.allclose(st.alpha[0], torch.tensor(expected, dtype=torch.float64))
    assert st.n_queries.tolist() == [6, 5, 4, 3, 2, 1]
    # The self term is reported apart: A_kk.
    assert st.self_attn[0].tolist() == pytest.approx([1.0, 0.1, 0.4, 0.05, 0.1, 0.5])


def test_cutoff_counts_later_queries():
    st = stats_from_probs(A, min_queries=MQ)  # keys 0 and 1 have 5 and 4 later queries
    assert torch.isnan(st.received[0, 2:]).all()
    assert not torch.isnan(st.alpha[0]).any()  # the raw alpha is kept for other cut-offs
    assert sinks_mask(st, 0.2)[0].tolist() == [True, True, False, False, False, False]
    # Without the cut-off the last key (alpha 0.5 from its own row) would pass as a sink.
    assert sinks_mask(st, 0.2, min_queries=0)[0].tolist() == [True, True, False, False, False, True]
    assert sinks_mask(stats_from_probs(A, min_queries=0), 0.2)[0].tolist() == [True, True, False, False, False, True]
    # The default rule (MIN_QUERIES = 10 later queries) scores no key of a six-token prompt.
    assert MIN_QUERIES == 10
    assert not sinks_mask(stats_from_probs(A), 0.2).any()


def test_sliding_window_alpha_counts_visible_queries():
    # Window 2: each query sees itself and the previous key, evenly.
    T = 6
    P = torch.zeros(T, T, dtype=torch.float64)
    P[0, 0] = 1.0
    for i in range(1, T):
        P[i, i - 1] = P[i, i] = 0.5
    st = stats_from_probs(P, min_queries=0, window=2)
    # Key 0 is seen by 2 queries (rows 0 and 1): (1 + 0.5) / 2; keys 1..4 by 2: (0.5 + 0.5) / 2;
    # key 5 by itself only: 0.5 / 1. Dividing by T - k would give 1.5 / 6 = 0.25 for key 0.
    assert st.n_queries.tolist() == [2, 2, 2, 2, 2, 1]
    assert st.alpha[0].tolist() == pytest.approx([0.75, 0.5, 0.5, 0.5, 0.5, 0.5])
    # The same from the equivalent explicit mask (additive or bool).
    rows, cols = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = (cols <= rows) & (rows - cols < 2)
    additive = torch.zeros(T, T).masked_fill(~allowed, float("-inf"))
    for mask in (additive, allowed):
        sm = stats_from_probs(P, min_queries=0, mask=mask)
        assert torch.equal(sm.n_queries, st.n_queries) and torch.allclose(sm.alpha, st.alpha)
    # In a window of 2 no key has 10 later queries: the cut-off counts visible queries too.
    assert torch.isnan(stats_from_probs(P, window=2).received).all()
    # A window wider than the prompt changes nothing.
    assert stats_from_probs(P, min_queries=0, window=50).n_queries.tolist() == [6, 5, 4, 3, 2, 1]


def test_visible_queries_with_a_holed_mask():
    # Query 3 is barred from key 0 (a document boundary, say): key 0 is seen by 3 of its 4 queries.
    mask = torch.zeros(4, 4).masked_fill(torch.ones(4, 4, dtype=torch.bool).triu(1), float("-inf"))
    mask[3, 0] = float("-inf")
    assert visible_queries(4, mask=mask).tolist() == [3, 3, 2, 1]
    assert visible_queries(5, window=3).tolist() == [3, 3, 3, 2, 1]
    with pytest.raises(CatchtagError, match="mask"):
        visible_queries(5, mask=mask)


def test_streaming_window_equals_full_path():
    torch.manual_seed(2)
    H, T, d, W = 2, 40, 4, 7
    ai = AttnInputs(q=torch.randn(H, T, d), k=torch.randn(H, T, d), v=torch.randn(H, T, d), mask=None,
                    scaling=1.0, sliding_window=W)
    full = stats_from_probs(attention_probs(ai), min_queries=3, window=W)
    chunked = stats_streaming(ai, min_queries=3, chunk=6)
    assert torch.equal(full.n_queries, chunked.n_queries)
    assert torch.allclose(full.alpha, chunked.alpha, atol=1e-6)
    assert torch.allclose(full.self_attn, chunked.self_attn, atol=1e-6)
    assert torch.equal(torch.isnan(full.received), torch.isnan(chunked.received))
    # Keys 0..T-1-3 are scored (>= 3 later queries within the window of 7).
    assert (~torch.isnan(chunked.received[0])).nonzero().flatten().tolist() == list(range(T - 3))


def test_threshold_moves_the_count():
    st = stats_from_probs(A, min_queries=MQ)
    assert sinks_mask(st, 0.28 - 1e-9)[0, 1]
    assert not sinks_mask(st, 0.28 + 1e-9)[0, 1]  # alpha_1 = 0.28
    assert sinks_mask(st, 0.3)[0].tolist() == [True, False, False, False, False, False]


def test_caught_segments_by_hand():
    st = stats_from_probs(A, min_queries=MQ)
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
    assert caught_by(stats_from_probs(B, min_queries=MQ), 0.2)[0, 2] == 0


def test_rows_summing_below_one_are_reported_not_renormalised():
    # A model with learned sink logits leaves 20% of every row to its sink: rows sum to 0.8.
    scaled = 0.8 * A
    st = stats_from_probs(scaled, min_queries=MQ)
    assert torch.allclose(st.row_sum, torch.full((1, 6), 0.8, dtype=torch.float64))
    assert math.isclose(float(st.received[0, 1]), 0.8 * 0.28, rel_tol=1e-12)
    # 0.224 < 0.25 < 0.28: renormalising the rows would wrongly make key 1 a sink at eps 0.25.
    assert sinks_mask(st, 0.25)[0].tolist() == [True, False, False, False, False, False]
    stats = SinkStats.from_heads("toy", "", list("abcdef"), [0], [st], MQ)
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
    full = stats_from_probs(attention_probs(ai), min_queries=MQ)
    chunked = stats_streaming(ai, min_queries=MQ, chunk=8)
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
    st = stats_from_probs(torch.stack([A, A]), min_queries=MQ)  # two identical heads
    stats = SinkStats.from_heads("toy", "", ["The", " cat", ".", " a", " b", " c"], [0], [st], MQ)
    table = sink_table([stats], 0.2)
    assert table[["head", "position", "kind"]].values.tolist() == [[0, 0, "first"], [0, 1, "other"], [1, 0, "first"], [1, 1, "other"]]
    assert table["n_caught"].tolist() == [2, 2, 2, 2]
    assert table["n_queries"].tolist() == [6, 5, 6, 5] and table["from_end"].tolist() == [5, 4, 5, 4]
    assert average_sinks_per_head([stats], 0.2) == 2.0
    assert average_sinks_per_head([stats], 0.3) == 1.0
    heads = head_table([stats], 0.2)
    assert heads["caught_share"].tolist() == pytest.approx([0.8, 0.8], abs=1e-12)  # 4 of the 5 queries after the first


@pytest.mark.parametrize("eps", [0, 1, -0.1, 1.5, "0.2", True, float("nan")])
def test_bad_eps(eps):
    with pytest.raises(CatchtagError):
        check_eps(eps)


def _long_planted(T=60, last=6):
    """One head over T tokens: every query puts 0.6 on key 0 and 0.4 on itself, except the last
    `last` queries, which put their 0.4 on key T - 1 - last: that key, seen by `last` later queries
    only, gets alpha (0.4 + last * 0.4) / (last + 1) = 0.4 from a handful of rows."""
    P = torch.zeros(T, T, dtype=torch.float64)
    P[0, 0] = 1.0
    for i in range(1, T):
        P[i, 0], P[i, i] = 0.6, 0.4
    for i in range(T - last, T):
        P[i, i], P[i, T - 1 - last] = 0.0, 0.4
    tokens = ["<s>"] + [f" w{i}" for i in range(1, T)]
    return SinkStats.from_heads("toy", "", tokens, [0], [stats_from_probs(P)], MIN_QUERIES)


def test_no_sink_from_fewer_later_queries_than_the_rule():
    st = _long_planted()
    table = sink_table([st], 0.2)
    assert len(table) >= 1 and (table["n_queries"] - 1 >= MIN_QUERIES).all()
    assert (table["from_end"] >= MIN_QUERIES).all()
    assert table["position"].tolist() == [0]
    # The same census read without the rule finds the end-of-prompt artefacts it removes.
    loose = sink_table([st], 0.2, min_queries=0)
    assert loose["position"].tolist() == [0, 53]
    assert loose["from_end"].tolist() == [59, 6] and loose["n_queries"].tolist() == [60, 7]
    assert loose["received"].iloc[1] == pytest.approx(0.4)
    assert census([st], 0.2)["other_per_head"] == 0.0
    assert census([st], 0.2, min_queries=0)["other_per_head"] == 1.0
    sweep = min_queries_sweep([st], [0, 6, 7, 10])
    assert list(sweep.columns) == ["min_queries", *CENSUS_KEYS]
    assert sweep["other_per_head"].tolist() == [1.0, 1.0, 0.0, 0.0]  # 6 later queries: kept at 6
    assert eps_sweep([st], [0.2, 0.5], min_queries=0)["other_per_head"].tolist() == [1.0, 0.0]


def test_cutoff_is_a_census_parameter_not_baked_in():
    st = _long_planted()
    assert torch.equal(st.sinks(0.2, min_queries=0), sink_stats_like(st, 0))
    # The stats' own cut-off is their default; min_queries at census time overrides it.
    assert st.min_queries == MIN_QUERIES
    assert int(st.sinks(0.2).sum()) == 1 and int(st.sinks(0.2, min_queries=6).sum()) == 2
    assert int(st.sinks(0.2, min_queries=7).sum()) == 1
    with pytest.raises(CatchtagError, match="min_queries"):
        st.sinks(0.2, min_queries=-1)


def sink_stats_like(st, m):
    """The sink mask rebuilt from scratch with the cut-off m applied to the raw alpha."""
    scored = st.n_queries[:, None, :] - 1 >= m
    return (st.alpha > 0.2) & scored


def test_hand_built_stats_from_alpha_alone_are_used_as_given():
    # Other modules' tests build SinkStats from `received` alone: no n_queries, no cut-off to move.
    received = torch.tensor([[[0.9, 0.5, float("nan")]]])
    st = SinkStats("m", "", ["a", "b", "c"], [0], received, torch.ones(1, 1, 3),
                   torch.zeros(1, 1, 3, dtype=torch.long), torch.zeros(1, 1, 3))
    assert st.sinks(0.2)[0, 0].tolist() == [True, True, False]
    assert sink_table([st], 0.2)["n_queries"].tolist() == [3, 2]
    with pytest.raises(CatchtagError, match="cut-off cannot be changed"):
        st.sinks(0.2, min_queries=3)


def test_teaser_spans_include_the_separator():
    """Issue 12 item 6: the first token of sentences 2 and 3 (' I') belongs to its sentence."""
    from catchtag.prompts import EMOTION_SENTENCES, emotion_prompt

    text, spans = emotion_prompt()
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # they tile the text
    assert [text[a:b] for a, b in spans] == [EMOTION_SENTENCES[0], " " + EMOTION_SENTENCES[1], " " + EMOTION_SENTENCES[2]]
    # SmolLM2-style tokens (no BOS): ' I' opens sentences 2 and 3.
    tokens = ["I", " am", " so", " happy", " today", ".", " I", " feel", " terribly", " sad", " and", " alone", ".",
              " I", " am", " furious", " about", " what", " they", " did", "."]
    assert "".join(tokens) == text
    groups = groups_from_spans(tokens, text, spans)
    assert groups == [list(range(0, 6)), list(range(6, 13)), list(range(13, 21))]
    # Gemma-style: an added <bos> belongs to no sentence.
    assert groups_from_spans(["<bos>"] + tokens, text, spans)[1][0] == 7
