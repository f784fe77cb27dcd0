"""catchtag.qknorm: query/key norms and alignment at sinks, QK-norm bounds, the §6 census."""

import numpy as np
import pandas as pd
import pytest

from catchtag import qknorm as Q
from catchtag.capture import attention_logits, capture
from catchtag.sinks import sink_stats

TEXT = "The storm rolled in over the hills. Farmers hurried home, and the rain began."


@pytest.fixture(scope="module")
def small(any_model):
    caps = capture(any_model, TEXT, resid=False, progress=False)
    stats = [sink_stats(c) for c in caps]
    pre = Q.prenorm_norms(any_model, [TEXT], progress=False)
    return any_model, caps, stats, pre, Q.qk_table(caps, stats, pre=pre)


def test_qk_table_values(small):
    model, caps, stats, pre, t = small
    ai = caps[0].attn_inputs[3]
    T = ai.n_tokens
    assert set(t["layer"]) == set(range(model.n_layers))
    assert t["cos"].between(-1 - 1e-9, 1 + 1e-9).all()
    row = t[(t["layer"] == 3) & (t["head"] == 1) & (t["position"] == 2)].iloc[0]
    assert row["k_norm"] == pytest.approx(float(ai.k[1, 2].norm()), rel=1e-5)
    logits = attention_logits(ai)[1, 2:, 2]  # queries 2..T-1 on key 2
    assert row["logit"] == pytest.approx(float(logits.mean()), rel=1e-4, abs=1e-4)
    q = ai.q[1, 2:] / ai.q[1, 2:].norm(dim=-1, keepdim=True)
    k = ai.k[1, 2] / ai.k[1, 2].norm()
    assert row["cos"] == pytest.approx(float((q @ k).mean()), abs=1e-5)
    # positions seen by too few queries have no alpha and no row
    assert t["position"].max() < T - 4
    assert (t["sink"] == (t["received"] > 0.2)).all()


def test_prenorm_equals_postnorm_without_qk_norm(small):
    model, caps, stats, pre, t = small
    if model.qk_norm:
        # QK-norm pulls key norms together: the spread after the norm is far smaller than before
        spread = lambda x: float(np.log(x).std())
        assert spread(t["k_norm"]) < spread(t["k_pre"])
        b = Q.norm_bounds(model)
        assert len(b) == model.n_layers
        assert (t.groupby("layer")["k_norm"].max().to_numpy() <= b["k_max"].to_numpy() * (1 + 1e-4)).all()
    else:
        # RoPE is a rotation: without QK-norm the k_proj output has the key's norm
        np.testing.assert_allclose(t["k_pre"], t["k_norm"], rtol=1e-4)
        np.testing.assert_allclose(t["q_pre"], t["q_norm"], rtol=1e-4)
        assert Q.norm_bounds(model).empty


def test_mechanism_summary_and_census(small):
    model, caps, stats, pre, t = small
    ms = Q.mechanism_summary(t)
    assert list(ms.index) == ["first-token sink", "other sink", "not a sink"]
    assert ms["n"].fillna(0).sum() == len(t)
    c = Q.sink_census(stats)
    assert c["n_heads"] == model.n_layers * model.n_heads
    assert c["sinks_per_head"] == pytest.approx(c["first_per_head"] + c["other_per_head"])


def test_separation():
    t = pd.DataFrame(dict(prompt=0, layer=0, head=[0] * 4 + [1] * 4,
                          sink=[True, False, False, False] * 2, x=[5.0, 1, 2, 3, 0.0, 1, 2, 3]))
    assert Q.separation(t, "x") == pytest.approx(0.5)  # head 0: 1.0, head 1: 0.0
    assert Q.separation(t[t["head"] == 0], "x") == 1.0
    assert np.isnan(Q.separation(t[~t["sink"]], "x"))
