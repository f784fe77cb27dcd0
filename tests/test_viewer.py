"""The attention viewer: self-contained HTML with the tokens and the data, and no network."""

import json
import re

import numpy as np
import pytest

from catchtag.book.viewer import attention_viewer, viewer_html

TOKENS = ["The", " cat", " sat", ".", " <b>", "\n"]


def causal(T, seed=0):
    rng = np.random.default_rng(seed)
    A = np.tril(rng.random((T, T)))
    return A / A.sum(1, keepdims=True)


def test_contains_tokens_and_data():
    A = causal(len(TOKENS))
    caught = [-1, 0, 0, 0, 3, 3]
    out = viewer_html(TOKENS, A, caught, title="layer 1, head 2")
    for tok in ("The", " cat", " sat"):
        assert f">{tok}</span>" in out
    assert "&lt;b&gt;" in out and "<b>" not in out.split('class="ct-data"')[0]  # escaped in the markup
    data = json.loads(re.search(r'class="ct-data">(.*?)</script>', out, re.S).group(1))
    assert data["tokens"] == TOKENS
    assert data["caught"] == caught
    assert [len(r) for r in data["attn"]] == list(range(1, len(TOKENS) + 1))  # causal rows only
    assert data["attn"][4][3] == pytest.approx(A[4, 3], abs=1e-3)
    assert set(data["colors"]) == {"0", "3"}


def test_no_network_and_unique_ids():
    out = viewer_html(TOKENS, causal(len(TOKENS)), None)
    assert not re.search(r"<script[^>]*\ssrc=", out)
    assert not re.search(r"<link[^>]*href=", out)
    assert "http://" not in out and "https://" not in out
    other = viewer_html(TOKENS, causal(len(TOKENS), seed=1), None)
    ids = [re.search(r'<div id="([^"]+)"', o).group(1) for o in (out, other)]
    assert ids[0] != ids[1]


def test_script_cannot_be_closed_by_a_token():
    out = viewer_html(["a", "</script><script>alert(1)"], causal(2), [-1, 0])
    assert out.count("</script>") == 2  # only the data script and the code script end


def test_html_object_and_shape_errors():
    h = attention_viewer(TOKENS, causal(len(TOKENS)), [-1] * len(TOKENS))
    assert "catchtag-viewer" in h.data
    with pytest.raises(ValueError):
        viewer_html(TOKENS, causal(3), None)
    with pytest.raises(ValueError):
        viewer_html(TOKENS, causal(len(TOKENS)), [0])


def test_accepts_torch():
    torch = pytest.importorskip("torch")
    A = torch.tensor(causal(3), dtype=torch.float32)
    out = viewer_html(["a", "b", "c"], A, torch.tensor([-1, 0, 0]))
    assert '"caught":[-1,0,0]' in out
