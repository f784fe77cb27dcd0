"""Plot helpers shared by the chapters: the figures' look lives here, their choices in the chapters."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

# One colour per sink in segment plots; grey for tokens no sink catches.
SINK_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
UNCAUGHT = "#d9d9d9"


def show_token(tok: str) -> str:
    """A token as a readable tick label: line breaks and leading spaces made visible."""
    return tok.replace("\n", "\\n").replace(" ", "\u00b7") or "\u2205"


def attention_heatmap(ax, A, tokens, title: str = "", vmax: float | None = None):
    """Heatmap of one head's (T, T) attention with token labels on both axes."""
    A = np.asarray(A, dtype=float)
    im = ax.imshow(A, cmap="viridis", vmin=0, vmax=vmax or 1.0, aspect="auto")
    labels = [show_token(t) for t in tokens]
    ax.set_xticks(range(len(tokens)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(tokens)), labels, fontsize=7)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query")
    ax.set_title(title, fontsize=10)
    return im


def layer_head_heatmap(ax, grid, title: str = "", label: str = "", cmap: str = "magma", vmin=None, vmax=None, fmt=None):
    """(layers, heads) grid as a heatmap, layer 0 at the top; annotated when small enough."""
    grid = np.asarray(grid, dtype=float)
    im = ax.imshow(grid, cmap=cmap, aspect="auto", vmin=vmin, vmax=vmax)
    L, H = grid.shape
    ax.set_xticks(range(H))
    ax.set_yticks(range(0, L, max(1, L // 10)))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    if fmt and L * H <= 300:
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=6,
                        color="white" if v < np.nanmax(grid) * 0.6 else "black")
    cb = plt.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    cb.set_label(label)
    return im


def token_strip(ax, tokens, caught_row, title: str = "", wrap: int = 24):
    """Tokens laid out as text, each boxed in the colour of the sink that caught it (grey: none).
    Sinks themselves are drawn with a thick black edge."""
    caught_row = list(caught_row)
    sinks = sorted({c for c in caught_row if c >= 0})
    colour = {s: SINK_COLOURS[i % len(SINK_COLOURS)] for i, s in enumerate(sinks)}
    x = y = 0
    for i, tok in enumerate(tokens):
        if x >= wrap:
            x, y = 0, y + 1
        c = caught_row[i]
        face = colour.get(c, UNCAUGHT)
        if i in colour:
            face = colour[i]
        ax.text(x, -y, show_token(tok), fontsize=8, ha="left", va="center", family="monospace",
                bbox=dict(boxstyle="round,pad=0.2", fc=face, ec="black" if i in colour else face,
                          lw=2 if i in colour else 0.5, alpha=0.85))
        x += max(len(show_token(tok)), 2) * 0.55 + 0.6
        if x > wrap:
            x, y = 0, y + 1
    ax.set_xlim(-0.5, wrap + 4)
    ax.set_ylim(-y - 0.8, 0.8)
    ax.axis("off")
    ax.set_title(title, fontsize=10, loc="left")
    return colour
