"""An interactive view of one head's attention, for the rendered book (no network, no CDN).

`attention_viewer(tokens, attn, caught)` returns an `IPython.display.HTML` object: the prompt as a
row of tokens. Hovering a token (or clicking it, which pins the choice; click again to release)
shades every token by the attention the hovered query gives it, and outlines the sink that caught
the query (`caught[i]`, the sink's position or -1, as from `SinkStats.caught`). All the data, the
CSS and the JavaScript are inline in the returned HTML, so the page works offline and the static
heatmap figure beside it remains the reference for print.
"""

from __future__ import annotations

import hashlib
import html
import json

PALETTE = ["#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]

_CSS = """
#{id} {{ font-family: system-ui, sans-serif; font-size: 13px; line-height: 2.1; margin: 0.5em 0; }}
#{id} .ct-title {{ font-weight: 600; margin-bottom: 0.2em; }}
#{id} .ct-tokens {{ display: flex; flex-wrap: wrap; gap: 2px 1px; }}
#{id} .ct-tok {{ font-family: ui-monospace, monospace; white-space: pre; padding: 0 2px;
  border-radius: 3px; cursor: pointer; border-bottom: 3px solid transparent;
  background: rgba(31, 119, 180, 0); outline-offset: 1px; }}
#{id} .ct-tok.ct-query {{ outline: 2px solid #000; }}
#{id} .ct-tok.ct-catcher {{ outline: 3px solid var(--ct-sink, #d62728); font-weight: 700; }}
#{id} .ct-info {{ min-height: 1.6em; color: #333; font-size: 12px; }}
#{id} .ct-help {{ color: #666; font-size: 11px; }}
"""

_JS = """
(function () {{
  var root = document.getElementById("{id}");
  if (!root) return;
  var data = JSON.parse(root.querySelector("script.ct-data").textContent);
  var toks = root.querySelectorAll(".ct-tok");
  var info = root.querySelector(".ct-info");
  var pinned = -1;
  function show(i) {{
    var row = data.attn[i], c = data.caught[i];
    for (var j = 0; j < toks.length; j++) {{
      var w = j < row.length ? row[j] : 0;
      toks[j].style.backgroundColor = "rgba(31, 119, 180, " + Math.min(1, w).toFixed(3) + ")";
      toks[j].style.color = w > 0.55 ? "#fff" : "";
      toks[j].classList.toggle("ct-query", j === i);
      toks[j].classList.toggle("ct-catcher", j === c);
      if (j === c) toks[j].style.setProperty("--ct-sink", data.colors[c] || "#d62728");
    }}
    var top = 0;
    for (var k = 1; k < row.length; k++) if (row[k] > row[top]) top = k;
    var msg = "query " + i + " " + JSON.stringify(data.tokens[i]) + ": most attention on " + top +
      " " + JSON.stringify(data.tokens[top]) + " (" + row[top].toFixed(2) + ")";
    msg += c >= 0 ? "; caught by the sink at " + c + " " + JSON.stringify(data.tokens[c]) +
      " (" + row[c].toFixed(2) + ")" : "; not caught by any sink";
    info.textContent = msg + (pinned >= 0 ? "  [pinned: click again to release]" : "");
  }}
  function clear() {{
    for (var j = 0; j < toks.length; j++) {{
      toks[j].style.backgroundColor = "";
      toks[j].style.color = "";
      toks[j].classList.remove("ct-query", "ct-catcher");
    }}
    info.textContent = "";
  }}
  toks.forEach(function (el) {{
    var i = parseInt(el.getAttribute("data-i"), 10);
    el.addEventListener("mouseover", function () {{ if (pinned < 0) show(i); }});
    el.addEventListener("click", function () {{ pinned = pinned === i ? -1 : i; show(i); }});
  }});
  root.querySelector(".ct-tokens").addEventListener("mouseleave", function () {{
    if (pinned < 0) clear(); else show(pinned);
  }});
}})();
"""


def _display_token(tok: str) -> str:
    return tok.replace("\n", "\u23ce").replace("\t", "\u21e5") or "\u2205"


def viewer_html(tokens, attn, caught=None, title: str = "", decimals: int = 3) -> str:
    """The viewer as an HTML string (see `attention_viewer`)."""
    import numpy as np

    A = np.asarray(attn.detach().cpu() if hasattr(attn, "detach") else attn, dtype=float)
    T = len(tokens)
    if A.shape != (T, T):
        raise ValueError(f"attn must be {T}x{T} for {T} tokens, got {A.shape}")
    c = [-1] * T if caught is None else [int(x) for x in (caught.tolist() if hasattr(caught, "tolist") else caught)]
    if len(c) != T:
        raise ValueError(f"caught must have {T} entries, got {len(c)}")
    rows = [[round(float(w), decimals) for w in A[i, : i + 1]] for i in range(T)]  # causal rows
    sinks = sorted({s for s in c if s >= 0})
    colors = {s: PALETTE[k % len(PALETTE)] for k, s in enumerate(sinks)}
    data = {"tokens": list(tokens), "attn": rows, "caught": c, "colors": {str(s): v for s, v in colors.items()}}
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    uid = "ctv-" + hashlib.sha1((payload + title).encode()).hexdigest()[:10]
    payload = payload.replace("</", "<\\/")  # never close the data script early
    spans = []
    for i, tok in enumerate(tokens):
        style = f' style="border-bottom-color:{colors[i]}"' if i in colors else ""
        spans.append(f'<span class="ct-tok" data-i="{i}" title="position {i}"{style}>'
                     f"{html.escape(_display_token(tok))}</span>")
    legend = ("Hover over a token to see where it looks: shading is the attention it gives each earlier "
              "token, the black box is the token itself, the thick coloured box is the sink that caught it "
              "(underlined tokens are sinks, one colour each). Click to pin a token.")
    return (
        f'<div id="{uid}" class="catchtag-viewer">'
        f"<style>{_CSS.format(id=uid)}</style>"
        + (f'<div class="ct-title">{html.escape(title)}</div>' if title else "")
        + f'<div class="ct-tokens">{"".join(spans)}</div>'
        f'<div class="ct-info"></div><div class="ct-help">{legend}</div>'
        f'<script type="application/json" class="ct-data">{payload}</script>'
        f"<script>{_JS.format(id=uid)}</script></div>"
    )


def attention_viewer(tokens, attn, caught=None, title: str = ""):
    """An `IPython.display.HTML` viewer of one head's attention.

    tokens: the T token strings; attn: the head's (T, T) attention (rows are queries, causal);
    caught: for each query, the position of the sink that caught it or -1 (None: no sinks shown).
    """
    from IPython.display import HTML

    return HTML(viewer_html(tokens, attn, caught, title))
