"""Release: the edited capture path agrees with capture(), the edits change exactly the sink's
contribution (after Gemma's post-attention norm), a planted retrieval head loses its segment when
the tag goes, the bootstrap and the verdict."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from _planted import PLANTED_TEXT, planted_model
from catchtag.capture import attention_probs, attention_rms, capture, head_writes, to_residual
from catchtag.errors import CatchtagError
from catchtag.release import (
    CONDITIONS,
    bootstrap_ci,
    capture_edited,
    choose_dot_sinks,
    dot_sinks,
    edit_site,
    effect_summary,
    model_release_finding,
    release_edits,
    release_test,
    segment_contrast,
    verdict_release,
)
from catchtag.sinks import sink_stats

DOT = 6


@pytest.fixture(scope="module")
def planted():
    m = planted_model()
    cap = capture(m, PLANTED_TEXT, progress=False)[0]
    return m, cap, sink_stats(cap)


def _logits(model, ids):
    with torch.no_grad():
        return model.hf(ids[None]).logits[0].float()


def test_clean_edited_capture_is_capture(planted):
    m, cap, st = planted
    logits, attn = capture_edited(m, cap.input_ids, [{}], layers=[0, 1])
    full = capture(m, PLANTED_TEXT, logits=True, progress=False)[0]
    assert torch.allclose(logits[0], full.logits, atol=1e-5)
    for l in (0, 1):
        a, b = attn[l][0], full.attn_inputs[l]
        for f in ("q", "k", "v"):
            assert torch.equal(getattr(a, f), getattr(b, f))
        assert a.scaling == b.scaling and a.sink_logits is None and b.sink_logits is None
        assert (a.mask is None) == (b.mask is None)
        assert torch.allclose(attention_probs(a), attention_probs(b))


def test_planted_dot_sink_is_found_and_edits_remove_its_tag(planted):
    m, cap, st = planted
    table = dot_sinks([cap], [st])
    assert set(map(tuple, table[["position", "layer", "head"]].to_numpy())) == {(DOT, 0, 0)}
    chosen = choose_dot_sinks(table)
    assert chosen.iloc[0].heads == [(0, 0)] and chosen.iloc[0].position == DOT
    other = {(0, 0): cap.attn_inputs[0].v[0, 0] * 0.5}
    edits = release_edits(m, cap, st, DOT, [(0, 0)], other_value=other, seed=1)
    assert set(edits) == set(CONDITIONS)
    o = head_writes(m, cap, 0)[0]  # planted: no post-attention norm, the head output itself
    rows = list(range(DOT + 1, len(cap.tokens)))
    A = attention_probs(cap.attn_inputs[0])[0]
    v = cap.attn_inputs[0].v[0]  # head 0's values: "<s>" on dim 0, "." on dim 1 (after the input norm)
    e_dot = torch.zeros(16); e_dot[3] = 1
    edited = o + edits["removed"][0].float()
    assert edited[rows] @ e_dot == pytest.approx(torch.zeros(len(rows)), abs=1e-5)  # the "." tag is gone
    assert torch.allclose(edited[rows], o[rows] - A[rows, DOT, None] * e_dot * v[DOT, 1], atol=1e-5)
    assert edits["removed"][0][: DOT + 1].abs().max() == 0  # tokens the sink does not catch: untouched
    r, t = edits["random"][0][rows], edits["removed"][0][rows]
    assert torch.allclose(r.norm(dim=-1), t.norm(dim=-1), atol=1e-6)  # same norm per token
    assert r[:, [3, 4]].norm(dim=-1) == pytest.approx(r.norm(dim=-1), rel=1e-6)  # in W_O^0's columns
    # swap first: the "." value replaced by "<s>"'s: the tag of "<s>" (e_4, value 3) appears
    sf = o + edits["swap first"][0].float()
    assert torch.allclose(sf[rows, 4], o[rows, 4] + A[rows, DOT] * v[0, 0], atol=1e-5)


def test_planted_retrieval_head_loses_the_tagged_segment(planted):
    m, cap, st = planted
    chosen = choose_dot_sinks(dot_sinks([cap], [st]))
    eff, per_head = release_test(m, [cap], [st], chosen, seed=0, progress=False)
    ph = per_head[(per_head.layer == 1) & (per_head["head"] == 0)].set_index("condition")
    assert ph.loc["removed", "contrast_clean"] > 0.5  # layer 1 head 0 reads the "." segment
    assert ph.loc["removed", "dcontrast"] < -0.5  # ... and loses it once the tag is gone
    rand = []  # in a 2-d column space a random direction can overlap the tag: average over seeds
    for seed in range(4):
        _, p2 = release_test(m, [cap], [st], chosen, seed=seed, progress=False)
        rand.append(abs(p2[(p2.layer == 1) & (p2["head"] == 0) & (p2.condition == "random")].dcontrast.item()))
    assert np.mean(rand) < 0.6 * abs(ph.loc["removed", "dcontrast"])
    assert set(eff.condition) == {"removed", "swap first", "random"}  # one prompt: no other "."
    assert torch.equal(_logits(m, cap.input_ids), capture(m, PLANTED_TEXT, logits=True, progress=False)[0].logits)


def test_release_test_needs_a_sink(planted):
    m, cap, st = planted
    with pytest.raises(CatchtagError):
        release_test(m, [cap], [st], choose_dot_sinks(dot_sinks([cap], [st], min_caught=100)), progress=False)


def test_segment_contrast_by_hand():
    A = torch.zeros(1, 5, 5)
    A[0, 3] = torch.tensor([0.1, 0.6, 0.0, 0.3, 0.0])  # query 3: before (1) 0.6, after (3) 0.3
    A[0, 4] = torch.tensor([0.0, 0.2, 0.0, 0.4, 0.4])  # query 4: before 0.2, after 0.8
    assert segment_contrast(A, 2).item() == pytest.approx(((0.3 - 0.6) + (0.8 - 0.2)) / 2)


def test_bootstrap_and_verdict_by_hand():
    m, lo, hi = bootstrap_ci([1.0, 2.0, 3.0, 4.0], seed=0)
    assert m == 2.5 and 1.0 <= lo < 2.5 < hi <= 4.0
    assert bootstrap_ci([1.0, 2.0, 3.0, 4.0], seed=0) == (m, lo, hi)
    assert math.isnan(bootstrap_ci([1.0])[1])
    eff = pd.DataFrame([dict(prompt=p, condition=c, shift=v + 0.01 * p, dloss=0.0, dcontrast=0.0)
                        for p in range(5) for c, v in zip(CONDITIONS, (1.0, 0.5, 0.5, 0.1))])
    s = effect_summary(eff).set_index(["measure", "contrast"])
    assert s.loc[("shift", "removed - random"), "mean"] == pytest.approx(0.9)
    assert model_release_finding(effect_summary(eff)) == "retrieval"
    eff.loc[eff.condition == "random", "shift"] = 2.0
    assert model_release_finding(effect_summary(eff)) == "none"
    assert model_release_finding(None) == "untested"
    assert verdict_release({"a": "retrieval", "b": "retrieval"}) == "reproduced"
    assert verdict_release({"a": "retrieval", "b": "untested"}) == "partly"
    assert verdict_release({"a": "none", "b": "untested"}) == "not reproduced"
    assert verdict_release({"a": "retrieval", "b": "none"}) == "partly"
    assert verdict_release({"a": "none"}) == "not reproduced"
    assert verdict_release({"a": "untested"}) == "not testable offline"
    with pytest.raises(CatchtagError):
        verdict_release({})


@pytest.mark.slow
def test_gemma_edits_land_after_the_post_attention_norm(gemma):
    """The edited residual write of a Gemma head is its write (through the norm, clean rms) without
    the sink's share, and capture_edited adds it after the norm, as a plain torch hook there does."""
    text = "The cat sat on the mat. The dog lay by the fire. The bird sang in its cage."
    cap = capture(gemma, text, progress=False)[0]
    st = sink_stats(cap)
    layer = 5
    caught = st.caught(0.2)[layer]
    h = int(torch.argmax((caught == 0).sum(-1)))
    rows = [i for i in range(1, len(cap.tokens)) if int(caught[h, i]) == 0]
    assert len(rows) >= 3
    edits = release_edits(gemma, cap, st, 0, [(layer, h)])
    ai = cap.attn_inputs[layer]
    A = attention_probs(ai)[h].double()
    z_without = A @ ai.v[h].double() - A[:, :1] * ai.v[h, :1].double()  # sink's share removed
    w = gemma.hf.model.layers[layer].self_attn.o_proj.weight.detach().double()
    dh = gemma.head_dim
    expected = to_residual(gemma, layer, z_without @ w[:, h * dh:(h + 1) * dh].T,
                           attention_rms(gemma, cap, layer).double())
    got = head_writes(gemma, cap, layer)[h].double() + edits["removed"][layer]
    assert torch.allclose(got[rows], expected[rows], atol=1e-4 * expected[rows].abs().max())
    assert edit_site(gemma, layer) is gemma.lm.model.layers[layer].post_attention_layernorm
    logits, _ = capture_edited(gemma, cap.input_ids, [{layer: edits["removed"][layer]}])
    norm = gemma.hf.model.layers[layer].post_attention_layernorm
    handle = norm.register_forward_hook(lambda mod, inp, out: out + edits["removed"][layer].to(out.dtype)[None])
    try:
        hooked = _logits(gemma, cap.input_ids)
    finally:
        handle.remove()
    assert torch.allclose(logits[0], hooked, atol=2e-3)
    assert not torch.allclose(logits[0], _logits(gemma, cap.input_ids), atol=1e-2)


def test_summary_text_and_later_head_table():
    eff = pd.DataFrame([dict(prompt=p, condition=c, shift=v + 0.01 * p, dloss=0.0, dcontrast=0.0)
                        for p in range(5) for c, v in zip(CONDITIONS, (1.0, 0.5, 0.5, 0.1))])
    from catchtag.release import later_head_table, release_summary_text

    text = release_summary_text(effect_summary(eff), 5)
    assert text.startswith("5 prompts") and "1.020" in text and "0.120" in text and "0.900" in text
    assert "not tested" in release_summary_text(None)
    ph = pd.DataFrame(dict(condition=["removed"] * 4, layer=[1, 1, 1, 1], head=[0, 0, 1, 1], prompt=[0, 1, 0, 1],
                           dcontrast=[0.1, 0.3, 0.0, 0.0], contrast_clean=[0.5, 0.5, 0.0, 0.2]))
    t = later_head_table(ph)
    assert t.dcontrast.tolist() == pytest.approx([0.2, 0.0]) and t.contrast_clean.tolist() == pytest.approx([0.5, 0.1])


def _tiny_gpt_oss():
    """A random-initialised two-layer gpt-oss (learned sink logits, a sliding layer), built here."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import GptOssConfig, GptOssForCausalLM, PreTrainedTokenizerFast

    from _planted import PLANTED_VOCAB
    from catchtag.models import _wrap

    cfg = GptOssConfig(vocab_size=len(PLANTED_VOCAB), hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=2,
                       num_experts_per_tok=1, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                       max_position_embeddings=64, attn_implementation="eager")
    torch.manual_seed(0)
    hf = GptOssForCausalLM(cfg).float()
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.sinks.copy_(torch.randn_like(layer.self_attn.sinks))
    tk = Tokenizer(WordLevel({t: i for i, t in enumerate(PLANTED_VOCAB)}, unk_token="a"))
    tk.pre_tokenizer = WhitespaceSplit()
    return _wrap("tiny-gpt-oss", hf, PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="a"), False, None,
                 source="tests/test_release.py")


def test_edited_capture_keeps_sink_logits_on_gpt_oss():
    """Issue 12 item 3: the edited runs must keep the learned sink logits (one capture path)."""
    m = _tiny_gpt_oss()
    text = "<s> a b c d e . f a b c d e f a b"
    cap = capture(m, text, logits=True, progress=False)[0]
    logits, attn = capture_edited(m, cap.input_ids, [{}, {0: torch.ones(len(cap.tokens), 64)}], layers=[0, 1])
    assert torch.allclose(logits[0], cap.logits, atol=1e-5)
    for l in (0, 1):
        a, b = attn[l][0], cap.attn_inputs[l]
        assert a.sink_logits is not None and torch.equal(a.sink_logits, b.sink_logits)
        assert a.sliding_window == b.sliding_window
        assert torch.allclose(attention_probs(a), attention_probs(b), atol=1e-6)
        assert float(attention_probs(a).sum(-1).max()) < 1.0  # rows sum below 1, as the model computes
    o_proj = m.hf.model.layers[0].self_attn.o_proj
    handle = o_proj.register_forward_hook(lambda mod, inp, out: out + 1.0)
    try:
        hooked = _logits(m, cap.input_ids)
    finally:
        handle.remove()
    assert torch.allclose(logits[1], hooked, atol=1e-5) and not torch.allclose(logits[1], logits[0], atol=1e-3)


# --------------------------------------------------------------------------------------------------
# The chapter's steps (issue 14): planted model and numbers by hand


def test_scan_and_release_run_on_the_planted_model(planted):
    """`scan` is capture + sink_stats + dot_sinks + choose_dot_sinks; `release_run` runs the test
    only with enough passages; the quantities the chapter glues come out of both."""
    from catchtag.release import release_quantities, release_run, scan, scan_quantities

    m, cap, st = planted
    run = scan(m, [PLANTED_TEXT, PLANTED_TEXT], batch_size=2)
    assert len(run["caps"]) == 2 and torch.allclose(run["caps"][1].attn_inputs[0].q, cap.attn_inputs[0].q, atol=1e-5)
    assert list(run["chosen"].position) == [DOT, DOT] and run["chosen"].heads.iloc[0] == [(0, 0)]
    values, specs = scan_quantities(run["chosen"], min_prompts=3)
    assert values == dict(n_with_sink=2, heads_per_prompt=1.0, first_edit_layer_median=0.0, tested="no")
    assert specs["heads_per_prompt"] == ".1f"
    assert release_run(run, min_prompts=3) == dict(effects=None, per_head=None, summary=None)
    none, _ = release_quantities(dict(effects=None, summary=None), 2)
    assert none["finding"] == "untested" and none["shift_removed"] is None and none["shift_removed_ci"] == "n/a"
    run.update(release_run(run, min_prompts=2, progress=False))
    values, specs = release_quantities(run, 2)
    e = run["effects"]
    assert values["shift_removed"] == pytest.approx(e[e.condition == "removed"]["shift"].mean())
    assert values["dloss_removed_minus_random"] == pytest.approx(
        (e[e.condition == "removed"].dloss.to_numpy() - e[e.condition == "random"].dloss.to_numpy()).mean())
    assert values["shift_removed_ci"].startswith("[") and specs["shift_removed"] == ".3f"
    assert values["clean_loss"] == pytest.approx(e.clean_loss.mean())


def test_catching_grid_points_and_later_head_grids_by_hand():
    from catchtag.release import catching_grid, contrast_names, later_head_grids, quantity_key, summary_points

    chosen = pd.DataFrame(dict(prompt=[0, 1], position=[3, 4], token=[".", "."], n_heads=[2, 1],
                               heads=[[(0, 1), (1, 0)], [(0, 1)]]))
    g = catching_grid(chosen, 2, 2)
    assert g.tolist() == [[0, 2], [1, 0]]
    assert quantity_key("shift", "swap first - random") == "shift_swap_first_minus_random"
    assert len(contrast_names()) == 2 * len(CONDITIONS) - 1
    s = pd.DataFrame([dict(measure="shift", contrast="removed", mean=0.5, low=0.4, high=0.6, n=3),
                      dict(measure="shift", contrast="removed - random", mean=0.1, low=0.0, high=0.2, n=3),
                      dict(measure="dloss", contrast="random", mean=1.0, low=0.9, high=1.1, n=3)])
    assert summary_points(s, "shift") == [("removed", 0.5, 0.4, 0.6)]
    ph = pd.DataFrame(dict(condition=["removed", "removed", "random", "random"], layer=[1, 2, 1, 2], head=[0, 0, 0, 0],
                           prompt=[0, 0, 0, 0], dcontrast=[-0.3, 0.1, 0.05, 0.0], contrast_clean=[0.5] * 4))
    grids, lim = later_head_grids(ph)
    assert list(grids) == ["removed", "random"] and lim == pytest.approx(0.3)
    assert grids["removed"].loc[0, 1] == pytest.approx(-0.3) and list(grids["random"].columns) == [1, 2]
