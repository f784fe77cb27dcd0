"""Batched capture (right padding, no mask) equals one prompt at a time; AttnInputs stores k and v
per kv head and repeats them on demand."""

import pytest
import torch

from catchtag.capture import AttnInputs, attention_probs, capture, repeat_kv
from catchtag.errors import CatchtagError
from catchtag.sinks import sink_stats

PROMPTS = [
    "The cat sat on the mat.\nIt slept all day.",
    "One, two, three: four five six seven eight nine ten eleven twelve.",
    "Hi there",
    "Paris is the capital of France; Rome is the capital of Italy.",
]


def test_attn_inputs_store_kv_heads_and_repeat_on_demand():
    q, k, v = torch.randn(6, 5, 4), torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    ai = AttnInputs(q=q, k=k, v=v, mask=None, scaling=0.5)
    assert ai.n_kv_heads == 2 and ai.k_kv is k and ai.v_kv is v
    assert torch.equal(ai.k, repeat_kv(k, 6)) and torch.equal(ai.v[5], v[1]) and torch.equal(ai.k[2], k[0])
    # already repeated keys are accepted as they are (one kv head per query head)
    full = AttnInputs(q, repeat_kv(k, 6), repeat_kv(v, 6), None, 0.5)
    assert full.n_kv_heads == 6 and torch.equal(attention_probs(full), attention_probs(ai))
    assert torch.equal(AttnInputs(q, k_kv=k, v_kv=v, mask=None, scaling=0.5).k, ai.k)
    with pytest.raises(CatchtagError, match="Hkv dividing"):
        AttnInputs(q, torch.randn(4, 5, 4), v, None, 0.5)


@pytest.mark.slow
@pytest.mark.parametrize("resid", [True, False])
def test_batched_capture_equals_one_at_a_time(any_model, resid):
    alone = capture(any_model, PROMPTS, resid=resid, logits=resid, progress=False)
    batched = capture(any_model, PROMPTS, resid=resid, logits=resid, progress=False, batch_size=3)
    assert len(batched) == len(PROMPTS)
    lengths = {a.n_tokens for a in alone}
    assert len(lengths) == len(PROMPTS)  # different lengths: padding really happens
    for a, b in zip(alone, batched):
        assert a.tokens == b.tokens and torch.equal(a.input_ids, b.input_ids) and a.layers == b.layers
        for layer in a.layers:
            x, y = a.attn_inputs[layer], b.attn_inputs[layer]
            assert y.n_kv_heads == any_model.hf.config.num_key_value_heads
            assert y.q.shape == x.q.shape and y.k_kv.shape == x.k_kv.shape
            for name in ("q", "k_kv", "v_kv"):  # float32 rounding of batched matmuls: relative 1e-5
                t, u = getattr(x, name), getattr(y, name)
                assert (t - u).abs().max() <= 1e-5 * t.abs().max().clamp_min(1), (layer, name)
            assert (x.mask is None) == (y.mask is None)
            if x.mask is not None:
                assert torch.equal(x.mask, y.mask)
            assert x.sliding_window == y.sliding_window and x.scaling == y.scaling
        if resid:
            assert (a.resid_post - b.resid_post).abs().max() <= 1e-5 * a.resid_post.abs().max().clamp_min(1)
            # logits of ~20: float32 rounding of the batched forward reaches ~1e-4 (relative 1e-5)
            assert (a.logits - b.logits).abs().max() <= 1e-5 * a.logits.abs().max().clamp_min(1)
        sa, sb = sink_stats(a), sink_stats(b)
        assert (sa.received.nan_to_num() - sb.received.nan_to_num()).abs().max() <= 1e-5


def test_capture_batch_size_bad_input(smollm):
    with pytest.raises(CatchtagError, match="batch_size"):
        capture(smollm, PROMPTS, batch_size=0, progress=False)
