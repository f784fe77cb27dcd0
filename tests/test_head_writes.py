"""Each head's write into the residual stream, through Gemma's post-attention norm: summed over the
heads it equals the attention block's real contribution, on both offline models."""

import nnsight
import pytest
import torch

from catchtag.capture import capture, head_outputs, head_writes, post_attention_norm, to_residual

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("layer", [0, 3])
def test_head_writes_sum_to_the_block_write(any_model, layer):
    m = any_model
    cap = capture(m, "The city of Paris is in France. It is big.")[0]
    writes = head_writes(m, cap, layer)  # (H, T, d)
    with torch.no_grad(), m.lm.trace(cap.input_ids[None]):
        attn_out = nnsight.save(m.lm.model.layers[layer].self_attn.output[0])
    a = attn_out[0].float()
    block = m.hf.model.layers[layer]
    with torch.no_grad():
        ref = block.post_attention_layernorm(a) if post_attention_norm(m, layer) is not None else a
    assert torch.allclose(writes.sum(0), ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def test_gemma_write_is_not_the_raw_head_output(gemma):
    """Gemma's gain changes directions: the write is not parallel to W_O z (why tags must be post-norm)."""
    cap = capture(gemma, "The city of Paris is in France. It is big.")[0]
    raw, written = head_outputs(gemma, cap, 3), head_writes(gemma, cap, 3)
    cos = torch.nn.functional.cosine_similarity(raw, written, dim=-1)
    assert float(cos.median()) < 0.9
    assert post_attention_norm(gemma, 3) is not None


def test_llama_has_no_post_attention_norm(smollm):
    assert post_attention_norm(smollm, 0) is None
    x = torch.randn(3, 576)
    assert torch.equal(to_residual(smollm, 0, x), x)
