"""Architectures beyond the two offline models: tiny random-initialised Gemma-2 (attention softcap,
sliding window, no sdpa), gpt-oss (learned sink logits, sliding window, no sdpa) and Mistral (sliding
window, sdpa) built from configs here, saved with a tiny byte-level BPE tokenizer (trained here,
nothing downloaded), and run through load_model, capture, the sink census and the CLI."""

import json

import pytest
import torch

from catchtag.capture import attention_probs, capture, eager_attention
from catchtag.cli import main
from catchtag.errors import CatchtagError
from catchtag.models import choose_attn_implementation, load_model
from catchtag.sinks import sink_stats, sink_stats_naive, stats_from_probs, visible_queries

WINDOW = 8
TEXT = (
    "The cat sat on the mat. The dog ran to the park, and the bird sang in its cage. "
    "A quiet town had one school, one bakery, and a church with a broken bell."
)


def _tokenizer(folder):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<bos>", "<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 4, trainer)
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    fast.save_pretrained(folder)
    return fast


def _build(kind, folder):
    from transformers import (Gemma2Config, Gemma2ForCausalLM, GptOssConfig, GptOssForCausalLM,
                              MistralConfig, MistralForCausalLM)

    tok = _tokenizer(folder)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    if kind == "gemma2":
        cfg = Gemma2Config(**common, attn_logit_softcapping=2.0, sliding_window=WINDOW,
                           final_logit_softcapping=30.0, query_pre_attn_scalar=16,
                           layer_types=["sliding_attention", "full_attention"])
        model = Gemma2ForCausalLM(cfg)
        # Large query/key weights, so the softcap (tanh at 2.0) is actually reached.
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.data.mul_(20)
    elif kind == "gptoss":
        cfg = GptOssConfig(**common, sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2,
                           layer_types=["sliding_attention", "full_attention"])
        model = GptOssForCausalLM(cfg)
        for layer in model.model.layers:
            layer.self_attn.sinks.data = torch.tensor([1.5, -0.5, 0.5, 2.0])  # non-zero sink logits
    else:
        cfg = MistralConfig(**common, sliding_window=WINDOW)
        model = MistralForCausalLM(cfg)
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module", params=["gemma2", "gptoss", "mistral"])
def tiny(request, tmp_path_factory):
    folder = _build(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, folder, load_model(folder)


def test_loads_with_an_attention_implementation_it_supports(tiny):
    kind, _, model = tiny
    expected = {"gemma2": "eager", "gptoss": "eager", "mistral": "sdpa"}[kind]
    assert model.hf.config._attn_implementation == expected
    assert (model.n_layers, model.n_heads, model.n_kv_heads, model.d_model) == (2, 4, 2, 64)


def test_recomputed_attention_equals_eager_and_alpha_follows_the_window(tiny):
    kind, _, model = tiny
    cap = capture(model, TEXT, resid=False, progress=False)[0]
    T = cap.n_tokens
    assert T > 3 * WINDOW and cap.tokens[0] == "<bos>"
    eager = eager_attention(model, TEXT)
    stats = sink_stats(cap, min_queries=0, chunk=7)
    naive = sink_stats_naive(cap, min_queries=0)
    for li, layer in enumerate(cap.layers):
        ai = cap.attn_inputs[layer]
        assert torch.allclose(attention_probs(ai), eager[layer], atol=1e-5), (kind, layer)
        # alpha by the definition, from the model's own eager maps: column sum over the queries
        # that can see the key (at most WINDOW of them in the sliding layer).
        sliding = layer == 0 or kind == "mistral"  # Mistral: every layer is windowed
        n = torch.arange(T, 0, -1).double()
        if sliding:
            n = n.clamp_max(WINDOW)
        assert stats.n_queries[li].tolist() == n.tolist(), (kind, layer)
        expected = eager[layer].double().sum(dim=1) / n
        assert torch.allclose(stats.alpha[li], expected, atol=1e-5), (kind, layer)
        assert torch.allclose(naive.alpha[li], expected, atol=1e-5), (kind, layer)
        ref = stats_from_probs(eager[layer], min_queries=0, window=WINDOW if sliding else None)
        assert torch.allclose(ref.alpha, expected, atol=1e-9)
    if kind == "gemma2":
        assert cap.attn_inputs[0].softcap == 2.0
        logits = (cap.attn_inputs[0].q @ cap.attn_inputs[0].k.transpose(-1, -2)) * cap.attn_inputs[0].scaling
        assert logits.abs().max() > 2.0  # the softcap changes these scores
    # No key of the window-8 layer has 10 later queries: the default census scores none of them.
    assert torch.isnan(sink_stats(cap).received[0]).all()


def test_learned_sink_logits_leave_rows_below_one(tiny):
    kind, _, model = tiny
    cap = capture(model, TEXT, resid=False, progress=False)[0]
    st = sink_stats(cap)
    if kind == "gptoss":
        assert cap.attn_inputs[0].sink_logits is not None
        assert float(st.row_sum.max()) < 1 - 1e-3
        # Row 0 sees only itself: its mass is 1 / (1 + exp(s_h - q0.k0 * scale)) for head h.
        ai = cap.attn_inputs[0]
        s00 = (ai.q[:, 0] * ai.k[:, 0]).sum(-1) * ai.scaling
        expected = 1 / (1 + torch.exp(ai.sink_logits - s00))
        assert torch.allclose(st.row_sum[0, :, 0].float(), expected, atol=1e-5)
    else:
        assert torch.allclose(st.row_sum, torch.ones_like(st.row_sum), atol=1e-5)


def test_cli_runs_on_the_folder(tiny, capsys):
    kind, folder, _ = tiny
    assert main(["sinks", "--model", folder, "--text", TEXT, "--min-queries", "3", "--eps", "0.05"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["heads"]) == 2 * 4 and result["min_queries"] == 3
    for head in result["heads"]:
        for sink in head["sinks"]:
            assert sink["n_queries"] - 1 >= 3 and sink["received"] > 0.05
            if head["layer"] == 0:
                assert sink["n_queries"] <= WINDOW
    if kind == "gptoss":
        assert result["min_row_sum"] < 0.999
        assert all(h["min_row_sum"] < 0.999 for h in result["heads"])
        assert main(["sinks", "--model", folder, "--text", TEXT, "--format", "table"]) == 0
        assert "rows sum to as little as" in capsys.readouterr().out
    else:
        assert result["min_row_sum"] == pytest.approx(1.0, abs=1e-5)


def test_sdpa_asked_for_where_there_is_none(tiny):
    kind, folder, model = tiny
    if kind == "mistral":
        assert choose_attn_implementation(model.config, "sdpa") == "sdpa"
        return
    with pytest.raises(CatchtagError, match="does not support sdpa"):
        load_model(folder, attn_implementation="sdpa")
    assert load_model(folder, attn_implementation="eager").hf.config._attn_implementation == "eager"


def test_bos_is_not_doubled_on_a_tokenizer_that_adds_one(tiny):
    _, _, model = tiny
    plain = capture(model, "The cat sat. The dog ran.", resid=False, progress=False)[0]
    given = capture(model, "<bos>The cat sat. The dog ran.", resid=False, progress=False)[0]
    assert plain.tokens[:2] == ["<bos>", "The"]
    assert torch.equal(plain.input_ids, given.input_ids)
    assert given.offsets[0] == (0, 5)  # the text's own <bos>


def test_unsupported_architecture_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    assert main(["sinks", "--model", str(tmp_path), "--text", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and str(tmp_path) in err
    with pytest.raises(CatchtagError):
        load_model(str(tmp_path))


def test_visible_queries_of_a_mask_from_the_model(tiny):
    """The mask the model passes (sdpa: Mistral) gives the same counts as its window."""
    kind, _, model = tiny
    cap = capture(model, TEXT, layers=[0], resid=False, progress=False)[0]
    ai = cap.attn_inputs[0]
    T = cap.n_tokens
    counts = visible_queries(T, ai.sliding_window, ai.mask)
    assert counts.tolist() == torch.arange(T, 0, -1).double().clamp_max(WINDOW).tolist()


@pytest.mark.parametrize("chunk", [5, 256])
def test_census_forward_equals_capture_path(tiny, chunk):
    """The census inside the forward (softcap, sliding window, sink logits, GQA, in blocks of a few
    queries whose window cuts the first keys, or one block) against the capture path, and one
    layer alone (the other running the model's own attention) against all layers."""
    from catchtag.census_attention import census_forward

    kind, _, model = tiny
    ref = sink_stats(capture(model, TEXT, resid=False, progress=False)[0], min_queries=0)
    st = census_forward(model, TEXT, min_queries=0, chunk=chunk)
    assert st.tokens == ref.tokens and len(st.tokens) > 3 * WINDOW
    assert torch.equal(torch.isnan(st.received), torch.isnan(ref.received))
    assert (st.received.nan_to_num() - ref.received.nan_to_num()).abs().max() <= 1e-6
    assert (st.row_sum - ref.row_sum).abs().max() <= 1e-5
    assert torch.equal(st.top_key, ref.top_key)
    assert (st.top_value - ref.top_value).abs().max() <= 1e-5
    if kind == "gptoss":
        assert float(st.row_sum.max()) < 1 - 1e-3
    one = census_forward(model, TEXT, layers=[1], min_queries=0, chunk=chunk)
    assert (one.received[0].nan_to_num() - st.received[1].nan_to_num()).abs().max() <= 1e-6
