"""catchtag.qknorm: query/key norms and alignment at sinks, QK-norm bounds, the §6 census."""

import numpy as np
import pandas as pd
import pytest

from catchtag import qknorm as Q
from catchtag.capture import attention_logits, capture
from catchtag.errors import CatchtagError
from catchtag.sinks import census, sink_stats

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


def test_prenorm_read_in_the_capture_pass(small):
    """measure's local path reads the pre-norm norms in the capture's own forward: the same numbers
    as prenorm_norms' separate pass, and the same captures."""
    import torch

    model, caps, stats, pre, t = small
    caps2, pre2 = Q._capture_with_prenorm(model, [TEXT])
    assert torch.equal(pre2[0]["q"], pre[0]["q"]) and torch.equal(pre2[0]["k"], pre[0]["k"])
    for layer in caps[0].layers:
        a, b = caps[0].attn_inputs[layer], caps2[0].attn_inputs[layer]
        assert torch.equal(a.q, b.q) and torch.equal(a.k_kv, b.k_kv) and torch.equal(a.v_kv, b.v_kv)


def test_window_sums():
    """qk_table's sums over the queries that see each key, against the masked T x T sum."""
    import torch

    x = torch.randn(2, 9, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    i, j = torch.arange(9)[:, None], torch.arange(9)[None, :]
    for window in (1, 4, 9, 20):
        sees = (i >= j) & (i - j < window)  # [i, j]: query i sees key j
        want = torch.einsum("ij,hid->hjd", sees.double(), x)
        assert torch.allclose(Q._window_sums(x, window), want, atol=1e-12)


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
    c = census(stats)
    assert c["sinks_per_head"] == pytest.approx(c["first_share"] + c["other_per_head"])
    assert Q.other_share(c) == pytest.approx(c["other_per_head"] / c["sinks_per_head"])


def census_of(sph, other):
    return dict(sinks_per_head=sph, other_per_head=other, first_share=sph - other)


@pytest.mark.parametrize("qk_sph, verdict", [(1.0, "reproduced"), (1.2, "reproduced"), (0.8, "reproduced"),
                                             (1.3, "partly"), (0.7, "partly"), (1.6, "not reproduced"),
                                             (0.5, "not reproduced")])
def test_verdict_total(qk_sph, verdict):
    v = Q.compare_census(census_of(1.0, 0.2), census_of(qk_sph, 0.1))
    assert v["verdict_total"] == verdict
    assert v["sph_ratio"] == pytest.approx(qk_sph)
    assert f"ratio {qk_sph:.2f}" in v["total_summary"]


def test_verdict_other_and_errors():
    from catchtag.book.reproduction import VERDICTS

    more = Q.compare_census(census_of(1.0, 0.1), census_of(1.0, 0.3))
    less = Q.compare_census(census_of(1.0, 0.3), census_of(1.0, 0.1))
    assert more["verdict_other"] == "reproduced" and less["verdict_other"] == "not reproduced"
    assert more["other_share_no"] == pytest.approx(0.1) and more["other_share_qk"] == pytest.approx(0.3)
    assert "10% of sinks" in more["other_summary"] and more["other_summary"].startswith("more common")
    assert {more[k] for k in ("verdict_total", "verdict_other")} | {less["verdict_other"]} <= set(VERDICTS)
    with pytest.raises(CatchtagError):
        Q.compare_census(census_of(0.0, 0.0), census_of(1.0, 0.1))
    with pytest.raises(CatchtagError):
        Q.compare_census(dict(sinks_per_head=1.0), census_of(1.0, 0.1))


def test_separation():
    t = pd.DataFrame(dict(prompt=0, layer=0, head=[0] * 4 + [1] * 4,
                          sink=[True, False, False, False] * 2, x=[5.0, 1, 2, 3, 0.0, 1, 2, 3]))
    assert Q.separation(t, "x") == pytest.approx(0.5)  # head 0: 1.0, head 1: 0.0
    assert Q.separation(t[t["head"] == 0], "x") == 1.0
    assert np.isnan(Q.separation(t[~t["sink"]], "x"))
