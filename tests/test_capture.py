"""Capture on the real offline models: recomputed attention equals the model's eager attention."""

import pytest
import torch

from catchtag.capture import attention_probs, capture, eager_attention, head_outputs, tokenize
from catchtag.errors import CatchtagError
from catchtag.sinks import sink_stats, sink_stats_naive

TEXT = "The capital of France is Paris. The capital of Germany is Berlin.\nThe capital of Italy is"


def test_recomputed_attention_equals_eager(any_model):
    cap = capture(any_model, TEXT, progress=False)[0]
    eager = eager_attention(any_model, TEXT)
    assert len(eager) == any_model.n_layers
    for layer in range(any_model.n_layers):
        recomputed = attention_probs(cap.attn_inputs[layer])
        assert recomputed.shape == eager[layer].shape
        assert torch.allclose(recomputed, eager[layer], atol=1e-5), layer


def test_grouped_query_heads_are_expanded(any_model):
    cap = capture(any_model, TEXT, layers=[0], resid=False, progress=False)[0]
    ai = cap.attn_inputs[0]
    H, T = any_model.n_heads, cap.n_tokens
    assert ai.q.shape == ai.k.shape == ai.v.shape == (H, T, any_model.head_dim)
    group = H // any_model.n_kv_heads
    assert any_model.n_kv_heads < H  # both offline models use grouped-query attention
    # Query heads of one group read the same key head.
    assert torch.equal(ai.k[0], ai.k[group - 1])


def test_head_outputs_sum_to_attention_output(smollm):
    """Sum over heads of W_O^h z_h equals the layer's o_proj output (no bias in Llama)."""
    ids = tokenize(smollm, TEXT)
    import nnsight

    with torch.no_grad(), smollm.lm.trace(ids[None]):
        out = nnsight.save(smollm.lm.model.layers[3].self_attn.o_proj.output)
    cap = capture(smollm, TEXT, layers=[3], resid=False, progress=False)[0]
    per_head = head_outputs(smollm, cap, 3)
    assert torch.allclose(per_head.sum(0), out[0], atol=1e-4)


def test_tokens_and_residuals(smollm, gemma):
    cap = capture(smollm, TEXT, progress=False)[0]
    assert "".join(cap.tokens) == TEXT  # SmolLM2 adds no BOS
    assert cap.resid_post.shape == (smollm.n_layers, cap.n_tokens, smollm.d_model)
    capg = capture(gemma, TEXT, progress=False)[0]
    assert capg.tokens[0] == "<bos>"


def test_streaming_sink_stats_equal_naive(any_model):
    cap = capture(any_model, TEXT, resid=False, progress=False)[0]
    a, b = sink_stats(cap, chunk=7), sink_stats_naive(cap)
    assert torch.allclose(torch.nan_to_num(a.received), torch.nan_to_num(b.received), atol=1e-6)
    assert torch.equal(a.top_key, b.top_key)


def test_first_token_is_the_dominant_sink(smollm):
    """The paper's first observation on a real model: most heads past the first layers have a
    first-token sink."""
    st = sink_stats(capture(smollm, TEXT, resid=False, progress=False)[0])
    share = st.sinks(0.2)[3:, :, 0].float().mean()
    assert share > 0.5


def test_bad_capture_input(smollm):
    with pytest.raises(CatchtagError, match="empty"):
        capture(smollm, "   ")
    with pytest.raises(CatchtagError, match="no prompts"):
        capture(smollm, [])
    with pytest.raises(CatchtagError, match="layer 99 is out of range"):
        capture(smollm, TEXT, layers=[99])
    with pytest.raises(CatchtagError, match="context"):
        capture(smollm, "word " * 9000)


VOILA = "Voilà 猫. The dog ran."


def test_split_character_alignment_on_smollm(smollm):
    """Issue 12 item 5: '猫' is three byte tokens on SmolLM2; the second sentence keeps its tokens."""
    from catchtag.sinks import groups_from_spans, token_spans

    cap = capture(smollm, VOILA, layers=[0], resid=False, progress=False)[0]
    assert cap.tokens == ["V", "oil", "à", " <0xE7>", "<0x8C>", "<0xAB>", ".", " The", " dog", " ran", "."]
    assert cap.offsets == [(0, 1), (1, 4), (4, 5), (5, 7), (6, 7), (6, 7), (7, 8), (8, 12), (12, 16), (16, 20), (20, 21)]
    expected = [[0, 1, 2, 3, 4, 5, 6], [7, 8, 9, 10]]
    spans = [(0, 8), (9, 21)]
    assert groups_from_spans(cap, VOILA, spans) == expected  # by the tokenizer's offsets
    assert groups_from_spans(cap.tokens, VOILA, spans) == expected  # by matching the strings
    assert groups_from_spans(cap.tokens, VOILA, [(0, 8), (8, 21)]) == expected  # span with the space
    # The one-at-a-time decoded strings the issue saw (' \ufffd', '\ufffd', '\ufffd') align too.
    decoded = [smollm.tokenizer.decode([int(i)]) for i in cap.input_ids]
    assert decoded[3:6] == [" \ufffd", "\ufffd", "\ufffd"]
    assert groups_from_spans(decoded, VOILA, spans) == expected
    assert token_spans(decoded, VOILA)[3:7] == [(5, 7), (5, 7), (5, 7), (7, 8)]
    # The sink statistics carry the offsets along.
    from catchtag.sinks import sink_stats

    assert sink_stats(cap).offsets == cap.offsets


def test_gemma_offsets_and_bos(gemma):
    cap = capture(gemma, VOILA, layers=[0], resid=False, progress=False)[0]
    assert cap.tokens[:3] == ["<bos>", "Voilà", " 猫"]
    assert cap.offsets[0] == (0, 0)  # the added <bos> is not in the text
    from catchtag.sinks import groups_from_spans

    assert groups_from_spans(cap, VOILA, [(0, 8), (9, 21)]) == [[1, 2, 3], [4, 5, 6, 7]]


def test_bos_in_the_text_is_kept_once(gemma, smollm):
    """Issue 12 item 4, library side: a text that starts with the BOS string gets no second BOS."""
    ids = tokenize(gemma, "<bos>The cat sat. The dog ran.")
    assert ids.tolist() == tokenize(gemma, "The cat sat. The dog ran.").tolist()
    assert (ids == gemma.tokenizer.bos_token_id).sum() == 1
    # Two BOS strings written by the user are the user's: one is dropped (the added one), one kept.
    assert (tokenize(gemma, "<bos><bos>Hi") == gemma.tokenizer.bos_token_id).sum() == 2
    # SmolLM2 adds no BOS: its BOS string in the text is left alone.
    bos = smollm.tokenizer.bos_token
    assert tokenize(smollm, bos + "Hi").tolist()[0] == smollm.tokenizer.bos_token_id
    assert len(tokenize(smollm, bos + "Hi")) == 1 + len(tokenize(smollm, "Hi"))


def test_no_sink_from_fewer_later_queries_than_the_rule_on_a_long_prompt(smollm):
    """Issue 13 item 1: on a prompt of about 150 tokens (the paper's length) every reported sink is
    seen by at least MIN_QUERIES = 10 later queries; without the rule the end of the prompt would
    report sinks from a handful of rows."""
    from catchtag.prompts import natural_prompts
    from catchtag.sinks import MIN_QUERIES, census, sink_stats, sink_table

    text = " ".join(natural_prompts(8, seed=0))
    cap = capture(smollm, text, resid=False, progress=False)[0]
    assert cap.n_tokens >= 150
    st = sink_stats(cap)
    table = sink_table([st], 0.2)
    assert len(table) > 0
    assert (table["n_queries"] - 1 >= MIN_QUERIES).all()
    assert (table["from_end"] >= MIN_QUERIES).all()
    loose = sink_table([st], 0.2, min_queries=0)
    assert (loose["from_end"] < MIN_QUERIES).any()  # what the rule removes is there to remove
    assert census([st], 0.2)["other_per_head"] <= census([st], 0.2, min_queries=0)["other_per_head"]


def test_grouped_matmul_and_repeated_kv_are_made_once():
    # no model: a (H=6, Hkv=2) layer; the grouped product equals the product with repeated heads
    from catchtag.capture import AttnInputs, attention_probs, grouped_matmul, repeat_kv

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(6, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    assert torch.allclose(grouped_matmul(q, k.transpose(-1, -2)), q @ repeat_kv(k, 6).transpose(-1, -2))
    assert grouped_matmul(q, torch.randn(6, 4, 3)).shape == (6, 5, 3)
    ai = AttnInputs(q=q, k=k, v=v, scaling=0.5)
    assert ai.n_kv_heads == 2 and ai.k is ai.k and ai.v is ai.v  # repeated once, then kept
    assert torch.equal(ai.k, repeat_kv(k, 6)) and torch.equal(ai.v[5], v[1])
    ai.k_kv = k * 2  # a new stored tensor: the repeated one follows it
    assert torch.equal(ai.k, repeat_kv(k * 2, 6))
    ref = torch.softmax((q @ repeat_kv(k * 2, 6).transpose(-1, -2) * 0.5).masked_fill(
        torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf")), dim=-1)
    assert torch.allclose(attention_probs(ai), ref, atol=1e-6)
    full = AttnInputs(q=q, k=repeat_kv(k, 6), v=repeat_kv(v, 6), scaling=0.5)
    assert full.k is full.k_kv  # nothing to repeat when every query head has its own kv head


def test_capture_without_logits_stops_early_with_the_same_numbers(any_model):
    """Without logits the pass stops after the last needed layer (no final norm, no LM head:
    issue 18); residuals and attention inputs equal those of a capture that runs to the logits,
    locally and through the remote code path (remote='local')."""
    full = capture(any_model, TEXT, resid=True, logits=True, progress=False)[0]
    assert full.logits is not None and full.logits.shape[0] == full.n_tokens
    for remote in (False, "local"):
        cap = capture(any_model, TEXT, resid=True, remote=remote, progress=False)[0]
        assert cap.logits is None
        assert torch.equal(cap.resid_post, full.resid_post)
        for layer in (0, any_model.n_layers - 1):
            assert torch.equal(cap.attn_inputs[layer].q, full.attn_inputs[layer].q)
            assert torch.equal(cap.attn_inputs[layer].v_kv, full.attn_inputs[layer].v_kv)
    few = capture(any_model, TEXT, layers=[1], resid=False, remote="local", progress=False)[0]
    assert torch.equal(few.attn_inputs[1].k_kv, full.attn_inputs[1].k_kv)
