"""Release: the ablation edits, their effect on a planted retrieval head, that nnsight leaves the
model unchanged, the confidence intervals, and a fast run on SmolLM2."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from catchtag.capture import capture, head_outputs
from catchtag.errors import CatchtagError
from catchtag.release import (
    CONDITIONS,
    ablation_deltas,
    ablation_effects,
    ablation_experiment,
    effect_table,
    mean_ci,
    query_tag_alignment,
    run_edited,
)
from catchtag.sinks import sink_stats
from catchtag.tags import PLANTED_TEXT, head_tags, planted_model, prompts

DOT = 6


@pytest.fixture(scope="module")
def planted():
    m = planted_model()
    cap = capture(m, PLANTED_TEXT, progress=False)[0]
    return m, cap, sink_stats(cap)


def _logits(model, ids):
    with torch.no_grad():
        return model.hf(ids[None]).logits[0].float()


def test_deltas_remove_exactly_the_tag_component(planted):
    m, cap, st = planted
    ab = ablation_deltas(m, cap, st, 0, 0)
    T = len(cap.tokens)
    assert ab.members == [i for i in range(1, T) if i != DOT]
    assert ab.control_head == 1 and not ab.control_has_sink
    o = head_outputs(m, cap, 0)[0]
    edited = o + ab.deltas["tag"]
    # planted outputs lie entirely in the tag plane: removing it leaves nothing at the members
    assert edited[ab.members].abs().max() < 1e-5
    assert torch.equal(ab.deltas["tag"][[0, DOT]], torch.zeros(2, m.d_model))  # sinks untouched
    # random: same norm per token, one direction
    assert torch.allclose(ab.deltas["random"][ab.members].norm(dim=-1), ab.deltas["tag"][ab.members].norm(dim=-1), atol=1e-5)
    assert ab.removed_norm["random"] == pytest.approx(ab.removed_norm["tag"], rel=1e-5)
    # control: the uniform head's outputs live on dims 8..15, so its edit does too
    assert ab.deltas["control"][:, :8].abs().max() < 1e-6


def test_no_sink_head_raises(planted):
    m, cap, st = planted
    with pytest.raises(CatchtagError):
        ablation_deltas(m, cap, st, 0, 1)


def test_run_edited_matches_a_plain_torch_hook_and_leaves_the_model_unchanged(planted):
    m, cap, st = planted
    ab = ablation_deltas(m, cap, st, 0, 0)
    ids = cap.input_ids
    before = _logits(m, ids)
    o_proj = m.hf.model.layers[0].self_attn.o_proj
    hooks_before = (len(o_proj._forward_hooks), len(o_proj._forward_pre_hooks))
    for remote in (False, "local"):
        logits, attn = run_edited(m, ids, 0, [torch.zeros_like(ab.deltas["tag"]), ab.deltas["tag"]], [1], remote=remote)
        assert torch.allclose(logits[0], before, atol=1e-5)  # the zero edit is the clean run
        handle = o_proj.register_forward_hook(lambda mod, inp, out: out + ab.deltas["tag"][None])
        try:
            expected = _logits(m, ids)
        finally:
            handle.remove()
        assert torch.allclose(logits[1], expected, atol=1e-4)
        assert not torch.allclose(logits[1], before, atol=1e-3)
        assert len(attn[1]) == 2
    assert torch.equal(_logits(m, ids), before)  # nothing left behind
    assert (len(o_proj._forward_hooks), len(o_proj._forward_pre_hooks)) == hooks_before


def test_planted_retrieval_head_loses_the_tagged_tokens(planted):
    m, cap, st = planted
    ab = ablation_deltas(m, cap, st, 0, 0)
    summary, per_head = ablation_effects(m, cap, ab)
    r = per_head[(per_head.layer == 1) & (per_head["head"] == 0)].set_index("condition")
    assert r.loc["tag", "mass_clean"] > 0.8  # layer 1 head 0 attends to the tokens "." tagged
    assert r.loc["tag", "dmass"] < -0.5  # ... and loses them once the tag is gone
    assert abs(r.loc["control", "dmass"]) < 1e-3
    # in 16 dimensions a random direction often overlaps the key direction: average over seeds
    rand = []
    for seed in range(4):
        _, ph = ablation_effects(m, cap, ablation_deltas(m, cap, st, 0, 0, seed=seed))
        rand.append(abs(ph[(ph.layer == 1) & (ph["head"] == 0) & (ph.condition == "random")].dmass.item()))
    assert np.mean(rand) < 0.5 * abs(r.loc["tag", "dmass"])
    assert summary["tag"]["tv"] > summary["control"]["tv"]


def test_query_alignment_finds_the_retrieval_head(planted):
    m, cap, st = planted
    tag = head_tags(m, cap, st, 0)[0]["tags"][1]  # the "." tag
    qa = query_tag_alignment(m, cap, 0, tag, n_random=16)
    r = qa[(qa.layer == 1) & (qa["head"] == 0)].iloc[0]
    assert r.cos_tag == pytest.approx(1.0, abs=1e-4)  # planted: queries and the tag's key coincide
    # (z is meaningless here: every key of the planted layer 1 lies on one dimension, so a random
    # direction's cosine is +-1; on the real models the random cosines spread out)
    assert qa[(qa.layer == 1) & (qa["head"] == 1)].cos_tag.abs().max() < 1e-6  # head 1 has no query
    assert len(qa) == m.n_heads


def test_mean_ci_by_hand():
    m, lo, hi = mean_ci([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)  # t_{0.975, 2} * sd / sqrt(n), sd = 1
    assert m == 2.0 and lo == pytest.approx(2 - half) and hi == pytest.approx(2 + half)
    assert math.isnan(mean_ci([1.0])[1])
    eff = pd.DataFrame([dict(prompt=p, layer=0, head=0, condition=c, dloss=v, tv=v, dmass_abs=v)
                        for p in range(3) for c, v in zip(CONDITIONS, (p + 1.0, 0.0, 1.0))])
    t = effect_table(eff).set_index(["measure", "contrast"])
    assert t.loc[("dloss", "tag"), "mean"] == 2.0
    assert t.loc[("dloss", "tag - random"), "mean"] == 2.0 and t.loc[("dloss", "tag - control"), "mean"] == 1.0


def test_smollm_ablation_runs_and_model_is_unchanged(smollm):
    caps = capture(smollm, prompts(1), progress=False)
    st = sink_stats(caps[0])
    before = _logits(smollm, caps[0].input_ids)
    eff, per_head = ablation_experiment(smollm, caps, [(10, 1)], stats=[st], progress=False)
    assert set(eff.condition) == set(CONDITIONS)
    assert np.isfinite(eff[["dloss", "tv", "dmass_abs", "removed_norm"]].to_numpy()).all()
    assert (eff.tv >= 0).all() and eff.set_index("condition").loc["tag", "removed_norm"] > 0
    assert per_head.layer.min() == 11 and per_head.layer.max() == smollm.n_layers - 1
    assert torch.equal(_logits(smollm, caps[0].input_ids), before)
