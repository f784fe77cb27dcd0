"""catchtag.kvcache: kept sets per policy, causal sink scores, mask semantics, mask path = cache path."""

import math

import numpy as np
import pytest
import torch

from catchtag import kvcache as kv
from catchtag.errors import CatchtagError

# --------------------------------------------------------------------------------------------------
# Kept sets (exact, planted)


def _kept(rows, i):
    return torch.nonzero(rows[i])[:, 0].tolist()


def test_window_keeps_the_last_b_keys():
    k = kv.policy_rows("window", 12, 4)
    assert _kept(k.rows, 2) == [0, 1, 2]             # cache not full yet
    assert _kept(k.rows, 3) == [0, 1, 2, 3]
    assert _kept(k.rows, 9) == [6, 7, 8, 9]
    assert (k.rows.sum(1)[4:] == 4).all()
    assert not torch.triu(k.rows, 1).any()


def test_streaming_keeps_first_four_and_window():
    k = kv.policy_rows("streaming", 20, 8)
    assert _kept(k.rows, 15) == [0, 1, 2, 3, 12, 13, 14, 15]
    assert k.n_protected[-1] == 4


def _planted_scores(T, sinks, value=0.9):
    """Scores that are 0.05 everywhere defined, `value` for the planted sink columns."""
    s = torch.full((T, T), 0.05)
    for k in sinks:
        s[:, k] = value
    i = torch.arange(T).view(T, 1)
    k = torch.arange(T).view(1, T)
    return torch.where(i - k >= 5, s, torch.full_like(s, float("nan")))


def test_sinks_policy_keeps_planted_sinks_and_first_token():
    T, B = 40, 16
    scores = _planted_scores(T, [0, 5, 9])
    k = kv.policy_rows("sinks", T, B, scores, eps=0.2, kinds=["other"] * T)
    last = _kept(k.rows, T - 1)
    assert len(last) == B
    assert {0, 5, 9} <= set(last)
    assert last[3:] == list(range(T - 13, T))        # the rest is the window
    assert k.n_protected[-1] == 3


def test_sinks_cap_is_a_share_of_the_budget():
    T, B = 60, 16                                    # cap = 4 protected, first token included
    scores = _planted_scores(T, list(range(1, 40, 2)))
    k = kv.policy_rows("sinks", T, B, scores, eps=0.2, kinds=["other"] * T)
    assert max(k.n_protected) == 4
    assert (k.rows.sum(1)[B:] == B).all()


def test_evicted_key_never_returns():
    T, B = 60, 12
    scores = _planted_scores(T, [3, 20])
    kinds = ["other"] * T
    for p, k in kv.all_policies(T, B, scores, 0.2, kinds, seed=1).items():
        for i in range(1, T):
            back = k.rows[i, :i] & ~k.rows[i - 1, :i]
            assert not back.any(), p


def test_random_matches_sink_count_and_is_seeded():
    T, B = 80, 16
    scores = _planted_scores(T, [7, 11, 30])
    kinds = ["other"] * T
    a = kv.all_policies(T, B, scores, 0.2, kinds, seed=3)
    b = kv.all_policies(T, B, scores, 0.2, kinds, seed=3)
    assert a["random"].n_protected == a["sinks"].n_protected
    assert torch.equal(a["random"].rows, b["random"].rows)
    assert not torch.equal(a["random"].rows, a["sinks"].rows)


def test_punct_random_swaps_boundary_sinks_for_other_punctuation():
    T, B = 80, 16
    kinds = ["other"] * T
    for p in (6, 14, 22, 40, 50):
        kinds[p] = "punctuation"
    scores = _planted_scores(T, [6, 9])               # 6: a punctuation sink, 9: a word sink
    a = kv.all_policies(T, B, scores, 0.2, kinds, seed=0)
    assert a["sinks"].n_boundary[-1] == 1
    last = set(_kept(a["punct_random"].rows, T - 1))
    assert 9 in last and 6 not in last                # word sink kept, punctuation sink swapped
    swapped = last - set(range(T - B, T)) - {0, 9}
    assert len(swapped) == 1 and kinds[swapped.pop()] == "punctuation"


def test_policy_errors_are_one_line():
    with pytest.raises(CatchtagError, match="unknown"):
        kv.policy_rows("lru", 10, 4)
    with pytest.raises(CatchtagError, match="scores"):
        kv.policy_rows("sinks", 10, 4)


# --------------------------------------------------------------------------------------------------
# Scores (exact, causal)


def test_prefix_scores_are_past_means():
    T = 8
    a = torch.zeros(2, T, T)
    a[0, :, 0] = 1.0                                  # head 0: every query on the first token
    a[1] = torch.tril(torch.ones(T, T))
    a[1] /= a[1].sum(-1, keepdim=True)                # head 1: uniform
    s = kv.prefix_scores(a, min_queries=2)
    assert s[7, 0] == pytest.approx(1.0)
    # key 3 at query 7: head 1 gives mean(1/4, 1/5, 1/6, 1/7) over queries 3..6
    assert s[7, 3] == pytest.approx(np.mean([1 / 4, 1 / 5, 1 / 6, 1 / 7]))
    assert math.isnan(s[7, 6])                        # one past query only (< min_queries)
    assert math.isnan(s[2, 5])                        # future key


def test_prefix_scores_ignore_the_current_and_later_queries():
    T = 10
    a = torch.tril(torch.rand(3, T, T))
    a /= a.sum(-1, keepdim=True)
    s = kv.prefix_scores(a, min_queries=5)
    b = a.clone()
    b[:, 6:, :] = torch.tril(torch.rand(3, T - 6, T), diagonal=6)   # change queries 6..9 only
    b /= b.sum(-1, keepdim=True)
    s2 = kv.prefix_scores(b, min_queries=5)
    assert torch.allclose(torch.nan_to_num(s[:7]), torch.nan_to_num(s2[:7]), atol=1e-6)
    assert not torch.allclose(torch.nan_to_num(s[8:]), torch.nan_to_num(s2[8:]), atol=1e-6)


def test_sink_share_and_intervals():
    rows = torch.tril(torch.ones(6, 6, dtype=torch.bool))
    scores = torch.full((6, 6), 0.1)
    scores[:, 0] = 0.5
    assert kv.sink_share_of_kept(rows, scores, 0.2, 5) == pytest.approx(1 / 6)
    m, lo, hi = kv.t_interval([1.0, 2.0, 3.0])
    assert m == 2 and lo < 2 < hi and hi - 2 == pytest.approx(2 - lo)
    assert math.isnan(kv.t_interval([1.0])[1])


def test_verdict():
    assert kv.sinks_matter_verdict([(0.1, 0.3), (0.2, 0.5)]) == "reproduced"
    assert kv.sinks_matter_verdict([(0.1, 0.3), (-0.2, 0.5)]) == "partly"
    assert kv.sinks_matter_verdict([(-0.1, 0.3)]) == "not reproduced"
    assert kv.sinks_matter_verdict([(float("nan"), float("nan"))]) == "pending"


def test_parameters():
    assert kv.parse_budgets("128, 64", 512) == [64, 128]
    assert kv.parse_budgets([32.0], 512) == [32]
    for bad in ("64,abc", "", [512], [4], True):
        with pytest.raises(CatchtagError):
            kv.parse_budgets(bad, 512)
    assert kv.check_run(2, 64, "16,32") == [16, 32]
    with pytest.raises(CatchtagError, match="n_chunks"):
        kv.check_run(0, 64, "16")
    with pytest.raises(CatchtagError, match="chunk_tokens"):
        kv.check_run(2, 8, "16")
    assert kv.check_dtype("bfloat16") == "bfloat16" and kv.check_dtype("float32") == "float32"
    for bad in ("float16", "bf16", None, 32):
        with pytest.raises(CatchtagError, match=r"dtype=.* is not valid: use one of float32, bfloat16"):
            kv.check_dtype(bad)
    with pytest.raises(CatchtagError, match="dtype="):
        kv.check_run(2, 64, "16", "half")


def test_text_is_utf8_or_refused(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1"))
    with pytest.raises(CatchtagError, match="latin1.txt is not UTF-8"):
        kv.load_text(str(bad))
    assert "Hamlet" in kv.load_text("hamlet")[:200]
    with pytest.raises(CatchtagError, match="unknown"):
        kv.load_text("no-such-text")


# --------------------------------------------------------------------------------------------------
# Mask semantics on a planted model, and mask path = cache path on real models


def test_eviction_mask_rejects_acausal_rows():
    class Cfg:
        layer_types = None

    class Hf:
        config = Cfg()

    rows = torch.ones(4, 4, dtype=torch.bool)
    with pytest.raises(CatchtagError, match="causal"):
        kv.eviction_mask(Hf(), rows)
    m = kv.eviction_mask(Hf(), torch.tril(rows))
    assert m.shape == (1, 1, 4, 4) and m[0, 0, 0, 1] < -1e30 and m[0, 0, 3, 0] == 0


@pytest.mark.slow
def test_full_rows_mask_is_the_model_own_mask(any_model):
    """A mask that evicts nothing gives the logits of the model's own causal (and sliding) masks;
    with Gemma's window shrunk to 8 this also checks the sliding-layer band."""
    ids = any_model.tokenize("To be, or not to be, that is the question: whether 'tis nobler in the mind")[:20]
    hf = any_model.hf
    old = getattr(hf.config, "sliding_window", None)
    try:
        if old is not None:
            hf.config.sliding_window = 8
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0]
        got = kv.masked_logits(any_model, ids, torch.tril(torch.ones(len(ids), len(ids), dtype=torch.bool)))
    finally:
        if old is not None:
            hf.config.sliding_window = old
    assert torch.allclose(got, ref, atol=2e-3)


@pytest.mark.slow
def test_mask_path_equals_cache_path(any_model):
    """Same kept sets, original positions: one masked forward and token-by-token decoding through the
    bounded cache give the same logits (Gemma with its window shrunk to 8, so sliding layers evict)."""
    text = kv.load_text("hamlet")
    ids = kv.chunk_ids(any_model.tokenizer, text, 1, 24)[0]
    hf = any_model.hf
    old = getattr(hf.config, "sliding_window", None)
    logits, scores = kv.full_pass(any_model, ids)
    kinds = kv.token_kinds(any_model, ids)
    kept = kv.all_policies(len(ids), 10, scores, 0.2, kinds, seed=0)
    try:
        if old is not None:
            hf.config.sliding_window = 8
        for policy in ("streaming", "sinks"):
            rows = kept[policy].rows
            a = kv.masked_logits(any_model, ids, rows)
            b = kv.decode_logits(any_model, ids, rows)
            assert torch.allclose(a, b, atol=2e-3), policy
            assert not torch.allclose(a[12:], logits[12:], atol=1e-2)   # eviction changed something
            tail = kv.masked_logits(any_model, ids, rows, 10, kv.prefix_cache(any_model, ids, 10))
            assert torch.allclose(tail, a[10:], atol=2e-3), policy                # prefix reuse
            assert torch.allclose(kv.nll(tail, ids, 10), kv.nll(a, ids, 10), atol=1e-3)
    finally:
        if old is not None:
            hf.config.sliding_window = old


def test_comparison_text_marks_a_vacuous_sink_comparison():
    from catchtag.kvcache import comparison_text

    assert comparison_text("random_sinks", "1.00× [1.00, 1.00]", 0.02).startswith("not testable")
    assert comparison_text("random_sinks", "1.02× [0.98, 1.06]", 3.2) == "1.02× [0.98, 1.06]"
    assert comparison_text("window_streaming", "3.04× [2.67, 3.46]", 0.0) == "3.04× [2.67, 3.46]"


# --------------------------------------------------------------------------------------------------
# Shared forwards (issue 18) on a tiny random Llama: exact up to float rounding


def _tiny_llama(seed=0, init=0.02):
    from types import SimpleNamespace

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      initializer_range=init)
    hf = LlamaForCausalLM(cfg).eval()
    hf.set_attn_implementation("sdpa")
    return SimpleNamespace(hf=hf)


def test_full_pass_cache_is_every_budget_prefix():
    m = _tiny_llama()
    ids = list(np.random.default_rng(0).integers(0, 50, 40))
    logits, scores, cache = kv.full_pass(m, ids, keep_cache=True)
    l2, s2 = kv.full_pass(m, ids)
    assert torch.equal(logits, l2) and torch.equal(torch.nan_to_num(scores), torch.nan_to_num(s2))
    pre = kv.cache_prefix(cache, 12)
    ref = kv.prefix_cache(m, ids, 12)
    for a, b in zip(pre.layers, ref.layers):
        assert a.keys.shape[-2] == 12 and torch.allclose(a.keys, b.keys, atol=1e-5)
        assert torch.allclose(a.values, b.values, atol=1e-5)
    assert cache.layers[0].keys.shape[-2] == 40           # the full cache is not changed
    with pytest.raises(CatchtagError, match="fewer than"):
        kv.cache_prefix(pre, 13)


def test_bfloat16_model_gets_bfloat16_masks_and_close_numbers():
    """The `dtype` parameter: a bfloat16 model gets its masks in bfloat16 (the mask path and the
    cache path; CPU sdpa gave the same numbers with float32 masks, so this is consistency, not a
    fix) and the shared forwards still equal one pass per policy; its numbers differ from float32's
    by bfloat16 rounding only. Weights drawn 10x wider than transformers' default, so that the
    logits span several units and a wrong mask would show (asserted: the window and StreamingLLM masks
    differ by over 1 nat). Tolerances are about twice the gaps observed on this machine when the test
    was written: shared passes vs one pass 0.014 (0.03), bfloat16 vs float32 0.055 (0.15), cache
    path vs mask path 0.029 (0.06)."""
    m = _tiny_llama(init=0.2)
    T, B = 40, 12
    ids = list(np.random.default_rng(2).integers(0, 50, T))
    rows = kv.policy_rows("streaming", T, B).rows
    assert kv.eviction_mask(m, rows).dtype == torch.float32
    _, _, cache32 = kv.full_pass(m, ids, keep_cache=True)
    kept = {"window": kv.policy_rows("window", T, B), "streaming": kv.policy_rows("streaming", T, B)}
    ref32 = kv.policy_nll(m, ids, kept, B, cache32)
    for p in m.hf.parameters():            # as load_model(dtype="bfloat16"): weights only
        p.data = p.data.to(torch.bfloat16)
    mask = kv.eviction_mask(m, rows, B)
    assert mask.dtype == torch.bfloat16 and mask[0, 0, 0, 4] == torch.finfo(torch.bfloat16).min   # query B drops key 4
    logits, scores, cache = kv.full_pass(m, ids, keep_cache=True)
    assert logits.dtype == torch.float32 and scores.dtype == torch.float32
    got = kv.policy_nll(m, ids, kept, B, cache)
    for p, k in kept.items():
        one = kv.nll(kv.masked_logits(m, ids, k.rows, B, kv.prefix_cache(m, ids, B)), ids, B)
        assert torch.allclose(got[p], one, atol=3e-2), p
        assert torch.allclose(got[p], ref32[p], atol=0.15), p          # bfloat16 rounding, no more
        assert not torch.equal(got[p], ref32[p])
    assert (ref32["window"] - ref32["streaming"]).abs().max() > 1.0     # what a wrong mask would move
    seen = []
    hook = m.hf.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["attention_mask"].dtype), with_kwargs=True)
    try:
        decoded = kv.decode_logits(m, ids, rows)
    finally:
        hook.remove()
    assert set(seen) == {torch.bfloat16} and len(seen) == T
    assert torch.allclose(decoded[B:], kv.masked_logits(m, ids, rows)[B:], atol=6e-2)


@pytest.mark.slow
def test_bfloat16_perplexities_stay_close_to_float32(any_model):
    """`-p dtype bfloat16` on a real model: every policy's perplexity on a Hamlet chunk of 160 tokens
    within 2% of float32's (observed when written: 1.04% at most, SmolLM2's policy (c); on the
    chapter's defaults under 0.5%, the window policy's up to 2%: PERFORMANCE.md, round 7)."""
    from catchtag.models import load_model

    low = load_model(any_model.name, dtype="bfloat16")
    assert next(low.hf.parameters()).dtype == torch.bfloat16
    ids = kv.chunk_ids(any_model.tokenizer, kv.load_text("hamlet"), 1, 160)[0]
    a = {r["policy"]: r for r in kv.run_chunk(any_model, ids, [48], 0.2)}
    b = {r["policy"]: r for r in kv.run_chunk(low, ids, [48], 0.2)}
    for p in kv.POLICIES:
        assert abs(b[p]["ppl"] / a[p]["ppl"] - 1) < 0.02, (p, a[p]["ppl"], b[p]["ppl"])
    assert any(b[p]["ppl"] != a[p]["ppl"] for p in kv.POLICIES)       # it did run in bfloat16


def test_nll_is_minus_log_softmax_at_the_next_token():
    # Gemma-3's vocabulary size, a row count that is no multiple of the logsumexp block, logits of
    # both layouts ((T, V) and (T - start, V)); the one-row tail of the last budget has no rows.
    # Within 5e-6 nats of float64 (a float32 log_softmax over 262k words is off by up to 3.6e-5 here)
    g = torch.Generator().manual_seed(0)
    T, V, start = 2 * kv.NLL_ROWS + 5, 262144, 3
    logits = torch.randn(T, V, generator=g) * 4
    ids = torch.randint(0, V, (T,), generator=g).tolist()
    ref = -torch.log_softmax(logits[start:-1].double(), -1).gather(1, torch.tensor(ids[start + 1:]).view(-1, 1))[:, 0]
    for layout in (logits, logits[start:]):
        got = kv.nll(layout, ids, start)
        assert got.shape == (T - start - 1,) and got.dtype == torch.float32
        assert torch.allclose(got.double(), ref, rtol=0, atol=5e-6)
    assert kv.nll(logits[-1:], ids, T - 1).shape == (0,)


def test_first_difference():
    a = torch.tril(torch.ones(6, 6, dtype=torch.bool))
    b = a.clone()
    assert kv.first_difference(a, b) == 6
    b[4, 1] = False
    assert kv.first_difference(a, b) == 4


def test_policy_nll_shares_forwards_and_equals_one_pass_per_policy():
    """Identical policies share their numbers; a policy equal to another up to query d starts there
    from that policy's cache; both give the numbers of one masked pass per policy (1e-5)."""
    m = _tiny_llama()
    T, B = 48, 12
    ids = list(np.random.default_rng(1).integers(0, 50, T))
    _, _, cache = kv.full_pass(m, ids, keep_cache=True)
    window = kv.policy_rows("window", T, B)
    stream = kv.policy_rows("streaming", T, B)
    late = kv.Kept("late", B, window.rows.clone())        # the window until query 30, then keeps key 0
    for i in range(30, T):
        late.rows[i] = False
        late.rows[i, 0] = True
        late.rows[i, i - B + 2: i + 1] = True
    kept = {"window": window, "streaming": stream, "copy": kv.Kept("copy", B, window.rows.clone()), "late": late}
    assert kv.first_difference(window.rows, late.rows) == 30
    got = kv.policy_nll(m, ids, kept, B, cache)
    assert got["copy"] is got["window"]
    prefix = kv.prefix_cache(m, ids, B)
    for p, k in kept.items():
        ref = kv.nll(kv.masked_logits(m, ids, k.rows, B, prefix), ids, B)
        assert got[p].shape == (T - B - 1,)
        assert torch.allclose(got[p], ref, rtol=1e-5, atol=1e-5), p
    assert not torch.allclose(got["late"], got["window"])


def test_budgets_accept_a_list_or_a_comma_string_with_one_clear_error():
    assert kv.parse_budgets([256, 64, 128], 512) == [64, 128, 256]
    assert kv.parse_budgets((64,), 512) == [64]
    assert kv.parse_budgets("[64, 128]", 512) == [64, 128]     # a list given through -p
    assert kv.parse_budgets(64, 512) == [64]                    # -p budgets 64 gives an int
    for bad in ("64,abc", [64, "x"], [64.5], None, {"a": 1}):
        with pytest.raises(CatchtagError, match=r"budgets = \[64, 128\].*-p budgets 64,128"):
            kv.parse_budgets(bad, 512)


# --------------------------------------------------------------------------------------------------
# What the chapter shows, from synthetic records (numbers checked by hand)


def _records():
    """Two chunks, one budget (8); window doubles the perplexity of streaming; sinks = random."""
    rows = []
    for c, base in enumerate((10.0, 20.0)):
        for p, f in (("window", 4.0), ("streaming", 2.0), ("sinks", 1.5), ("random", 1.5), ("punct_random", 1.5)):
            rows.append(dict(budget=8, policy=p, ppl=base * f, ppl_full=base, sink_share=0.1 if p == "sinks" else 0.05,
                             n_protected=3.0 if p != "window" else 0.0, chunk=c))
    return rows


def test_model_quantities_by_hand():
    values, specs = kv.model_quantities(_records())
    assert values["ppl_window_8"] == pytest.approx(math.sqrt(40 * 80)) and specs["ppl_window_8"] == ".1f"
    assert values["ppl_full"] == pytest.approx(math.sqrt(200))
    assert values["window_streaming_8_ratio"] == pytest.approx(2.0)
    assert values["window_streaming_8"].startswith("2.00×")     # zero spread: interval [2.00, 2.00]
    assert values["random_sinks_8_ratio"] == pytest.approx(1.0)
    assert values["n_sinks_kept"] == pytest.approx(2.0)
    assert values["random_sinks_small"].startswith("1.00×")
    assert values["sinks_share_sinks"] == pytest.approx(0.1) and specs["sinks_share_sinks"] == ".0%"
    assert len(values["records"]) == 10 and len(values["summary"]) == 5


def test_verdict_and_tables_by_hand():
    rows = _records()
    rows[0]["ppl"] = 42.0                # window / streaming: 2.1 and 2.0, t interval (df 1) above 1
    assert kv.verdict([rows]) == "reproduced"
    assert kv.verdict([rows, [dict(r, ppl=r["ppl"] / 4) if r["policy"] == "window" else r for r in rows]]) == "partly"
    t = kv.perplexity_table({"M": kv.summarize(rows)})
    assert t.index.names == ["model", "budget", "policy"] and len(t) == 5
    assert t.loc[("M", 8, kv.POLICY_LABELS["streaming"]), "nothing evicted"] == f"{math.sqrt(200):.1f}"
    r = kv.ratio_table({"M": rows})
    assert list(r.columns) == [8] and len(r) == len(kv.COMPARISONS)
    assert r.loc[("M", kv.COMPARISON_LABELS["random_sinks"]), 8].startswith("1.00×")


def test_ratio_curves_offsets_and_errors():
    s = kv.summarize(_records())
    curves = kv.ratio_curves(s, spread=0.1)
    assert list(curves) == list(kv.POLICIES)
    x, ratio, err = curves["window"]
    assert x[0] == pytest.approx(8 * 0.8) and ratio[0] == pytest.approx(4.0)
    assert err.shape == (2, 1) and np.allclose(err, 0)        # no spread over chunks
    assert curves["sinks"][0][0] == pytest.approx(8.0)


@pytest.mark.slow
def test_chapter_runs_in_the_dtype_it_is_given(tmp_path):
    """`-p dtype bfloat16` reaches the models the chapter loads: the page's and the results' dtype
    is read from the records of the models that ran (`run_dtype`), not from the parameter. A tiny
    run: one model, two chunks of 48 tokens, budget 16."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "CATCHTAG_BUILD": str(tmp_path), "CATCHTAG_RESULTS": str(tmp_path / "results"),
           "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "catchtag.book.bookbuild", "--chapter", "kvcache", "--force", "--no-html",
            "--jobs", "1", "-p", "compare", "", "-p", "n_chunks", "2", "-p", "chunk_tokens", "48",
            "-p", "budgets", "16", "-p", "dtype", "bfloat16"]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    shared = json.loads((tmp_path / "results" / "kvcache.json").read_text())["data"]["shared"]
    assert shared["dtype"] == "bfloat16"


def test_run_dtype_reads_the_records():
    assert kv.run_dtype({"a": [{"dtype": "float32"}] * 2, "b": [{"dtype": "float32"}]}) == "float32"
    assert kv.run_dtype({"a": [{"dtype": "bfloat16"}], "b": [{"dtype": "float32"}]}) == "bfloat16 and float32"
