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
