"""The `remote` parameter: "local" runs the remote code path offline and must give the same results
as a local run; True needs NDIF_API_KEY and says so; the key never leaks into results or output."""

import pickle

import pytest
import torch

from catchtag.capture import attention_probs, capture
from catchtag.errors import CatchtagError
from catchtag.remote import check_remote, trace_kwargs
from catchtag.sinks import average_sinks_per_head, sink_stats

TEXT = "The cat sat on the mat. Then the dog ran to the door, and the bird flew away."
DUMMY_KEY = "ndif-dummy-KEY-7f3a9c1e-do-not-leak"


@pytest.fixture()
def no_key(monkeypatch):
    monkeypatch.delenv("NDIF_API_KEY", raising=False)


@pytest.fixture()
def dummy_key(monkeypatch):
    monkeypatch.setenv("NDIF_API_KEY", DUMMY_KEY)


def test_local_dry_run_matches_local(smollm):
    a = capture(smollm, TEXT, resid=True, progress=False)[0]
    b = capture(smollm, TEXT, resid=True, progress=False, remote="local")[0]
    assert a.layers == b.layers and a.tokens == b.tokens
    for layer in a.layers:
        torch.testing.assert_close(attention_probs(a.attn_inputs[layer]), attention_probs(b.attn_inputs[layer]), rtol=0, atol=1e-6)
    torch.testing.assert_close(a.resid_post, b.resid_post, rtol=0, atol=1e-5)
    sa, sb = sink_stats(a), sink_stats(b)
    assert torch.equal(sa.sinks(0.2), sb.sinks(0.2))
    assert torch.equal(sa.caught(0.2), sb.caught(0.2))
    assert average_sinks_per_head([sa]) == average_sinks_per_head([sb])


@pytest.mark.parametrize("bad", [1, 0, "ndif", None, 2.0])
def test_invalid_remote_values(bad):
    with pytest.raises(CatchtagError, match="remote="):
        check_remote(bad)


def test_remote_true_without_key_is_a_clear_error(no_key, smollm):
    for call in (lambda: check_remote(True), lambda: trace_kwargs(True),
                 lambda: capture(smollm, TEXT, progress=False, remote=True)):
        with pytest.raises(CatchtagError, match="NDIF_API_KEY"):
            call()
    from catchtag.models import load_model

    with pytest.raises(CatchtagError, match="NDIF_API_KEY"):
        load_model("Qwen/Qwen2.5-Math-1.5B", remote=True)


def test_key_never_leaks(dummy_key, smollm, capsys):
    from catchtag.models import load_model

    seen = []
    check_remote(True)
    kw = trace_kwargs(True)
    assert kw == {"remote": True}
    seen.append(repr(kw))
    # an offline checkpoint cannot go to NDIF: the error names the fix, not the key
    with pytest.raises(CatchtagError) as err:
        load_model("smollm2-135m", remote=True)
    seen.append(str(err.value))
    # the remote code path run offline, with the key set: nothing returned carries it
    cap = capture(smollm, TEXT, progress=False, remote="local")[0]
    seen.append(pickle.dumps(cap))
    seen.append(repr(cap.__dict__.keys()) + repr(cap.text) + repr(cap.tokens))
    # a registry model (local weights) sent to NDIF fails before anything leaves the machine;
    # whatever the error, it must not carry the key
    try:
        capture(smollm, TEXT, progress=False, remote=True)
    except Exception as exc:  # noqa: BLE001 - any error type, the point is its text
        seen.append(f"{type(exc).__name__}: {exc!s} {exc!r}")
    out = capsys.readouterr()
    seen += [out.out, out.err]
    for item in seen:
        blob = item if isinstance(item, bytes) else str(item).encode()
        assert DUMMY_KEY.encode() not in blob
