"""Plot helpers shared by the chapters: the figures' look lives here, their choices in the chapters."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

# One colour per sink in segment plots; grey for tokens no sink catches.
SINK_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
UNCAUGHT = "#d9d9d9"
# First-token sinks grey, prompt-dependent ("other") sinks orange, in the catch chapter's figures.
KIND_COLOURS = {"first": "0.4", "other": "tab:orange"}


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


def sink_examples(panels: dict, attn: dict, eps: float):
    """The sinks chapter's first figure: one row per model, the first-token head on the left and
    the strongest punctuation or line-break head on the right, each as `attention_heatmap` on its
    panel's token window. `panels`: {model: census_views.example_panels(...)}; `attn`: {model:
    census_views.panel_attention(...)}, (tokens, A) per panel. Returns the figure."""
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 5.2 * len(panels)), squeeze=False)
    for r, (name, pan) in enumerate(panels.items()):
        for c, key in enumerate(("first", "other")):
            p, ax = pan[key], axes[r, c]
            if p is None:
                ax.text(0.5, 0.5, f"no punctuation or line-break sink\nat ε = {eps} under the rule", ha="center")
                ax.axis("off")
                continue
            tokens, A = attn[name][key]
            lo, hi = p["lo"], p["hi"]
            what = (f"first-token sink (α = {p['received']:.2f})" if key == "first" else
                    f"sink at {tokens[p['position']]!r} (position {p['position']}, α = {p['received']:.2f})")
            attention_heatmap(ax, A[lo:hi, lo:hi], tokens[lo:hi],
                              f"{name}: layer {p['layer']}, head {p['head']}, tokens {lo}–{hi - 1}\n{what}")
    fig.tight_layout()
    return fig


def symlog_bars(ax, counts, width: int, colour: str = "tab:orange"):
    """Bars of `counts` in bins of `width` (bin i starts at i * width) on a symmetric-log y axis
    (linear below 1), with whole-number ticks 0, 1, 3, 10, ... up to the largest count."""
    counts = np.asarray(counts)
    ax.bar(np.arange(len(counts)) * width, counts, width=width, align="edge", color=colour, edgecolor="white", lw=0.3)
    ax.set_yscale("symlog", linthresh=1)
    ticks = [t for t in (0, 1, 3, 10, 30, 100, 300, 1000, 3000, 10000) if t <= max(1, counts.max(initial=0))]
    ax.set_yticks(ticks, [str(t) for t in ticks])


def segment_map(ax, data: dict, title: str = ""):
    """The catch chapter's segment map from `census_views.segment_map_data`: one row per head, one
    column per token, coloured by the sink that catches it (grey: the first token; white: not
    caught); the heads' own sinks as black dots; a legend of the catching sinks (at most 15 others)."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    other, tokens = data["other_sinks"], data["tokens"]
    palette = plt.cm.tab20(np.linspace(0, 1, 20))
    cmap = ListedColormap([[1, 1, 1, 1], [0.6, 0.6, 0.6, 1]] + [palette[i % 20] for i in range(len(other))])
    ax.imshow(data["codes"], cmap=cmap, vmin=0, vmax=len(cmap.colors) - 1, aspect="auto", interpolation="nearest")
    for r, ks in enumerate(data["sinks"]):
        ax.scatter(ks, [r] * len(ks), s=6, c="k", marker="o")
    ax.set_yticks(range(len(data["rows"])), [f"L{l} H{h}" for l, h in data["rows"]], fontsize=6)
    ax.set_xticks(range(len(tokens)), [t.replace("\n", "\\n") for t in tokens], rotation=90, fontsize=6)
    ax.set_title(title)
    handles = [Patch(color=(0.6, 0.6, 0.6), label=f"first token {tokens[0]!r}")]
    handles += [Patch(color=palette[j % 20], label=f"{tokens[k]!r} (position {k})") for j, k in enumerate(other[:15])]
    handles += [Patch(facecolor="white", edgecolor="0.7", label="not caught")]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0), title="caught by")


def catch_bars(ax, summary, title: str = ""):
    """Stacked bars per token from `tags.token_catch_summary`: share of heads where the token is
    caught by the first token, by another sink, not caught, and (black line) where it is a sink."""
    x = np.arange(len(summary))
    ax.bar(x, summary.caught_first, color="0.6", label="caught by the first token")
    ax.bar(x, summary.caught_other, bottom=summary.caught_first, color="tab:orange", label="caught by another sink")
    ax.bar(x, summary.not_caught, bottom=summary.caught_first + summary.caught_other, color="white",
           edgecolor="0.85", lw=0.3, label="not caught")
    ax.plot(x, summary.is_sink, "k.-", lw=0.8, ms=3, label="is a sink itself")
    ax.set_xticks(x, [t.replace("\n", "\\n") for t in summary.token], rotation=90, fontsize=6)
    ax.set_ylabel("share of heads")
    ax.set_ylim(0, 1)
    ax.set_title(title)


def ccdf(ax, values, **kwargs):
    """The share of `values` at or above x (a complementary cumulative distribution), as a line."""
    v = np.sort(np.asarray(values, dtype=float))
    if len(v):
        ax.plot(v, 1 - np.arange(len(v)) / len(v), **kwargs)


# --------------------------------------------------------------------------------------------------
# The tag chapter's figures

SINK_SERIES = ["0.45", "tab:orange", "tab:green", "tab:purple", "tab:red", "tab:brown"]


def tag_cosine_hist(ax, cos, title: str = ""):
    """Densities of cos(o_i, t_s) from `tags.tag_cosine_table`: caught by a first-token sink, caught
    by another sink, not caught by this sink, and the baseline on the caught rows (cos(o_i, t_j),
    another token's value in the same head), when the table has it."""
    bins = np.linspace(-1, 1, 61)
    first = cos.sink == 0
    series = [(cos.cos[cos.caught & first], "caught, first-token sink", "0.4", "-"),
              (cos.cos[cos.caught & ~first], "caught, other sink", "tab:orange", "-"),
              (cos.cos[~cos.caught], "not caught by this sink", "tab:blue", "-")]
    if "cos_other" in cos:
        series.append((cos.cos_other[cos.caught].dropna(), "caught, another token's value (baseline)", "k", ":"))
    for x, label, colour, ls in series:
        if len(x):
            ax.hist(x, bins=bins, density=True, histtype="step", lw=1.5, color=colour, ls=ls, label=label)
    ax.set_xlabel(r"cos($o_i$, $t_s$)")
    ax.set_ylabel("density of (token, sink) pairs")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left")


def two_sink_panels(ax_pca, ax_plane, d: dict | None, name: str):
    """The tag chapter's figure for one model from `tags.two_sink_figure`: the head's outputs in
    the plane of their top two principal components, coloured by catching sink, with the tags as
    arrows (left, the paper's Fig. 2), and in the plane of the two tags (right, Fig. 1b)."""
    if d is None:
        for ax in (ax_pca, ax_plane):
            ax.text(0.5, 0.5, "no head with two catching sinks", ha="center")
        return
    pc, toks, (s1, s2) = d["pca"], d["tokens"], d["sinks"]
    colour_of = {s: SINK_SERIES[sorted(pc["sinks"]).index(s) % len(SINK_SERIES)] for s in pc["sinks"]}
    for sink in sorted(set(pc["label"].tolist())):
        sel = pc["label"] == sink
        ax_pca.scatter(pc["xy"][sel, 0], pc["xy"][sel, 1], s=14, color="lightgrey" if sink < 0 else colour_of[sink],
                       label="not caught" if sink < 0 else f"caught by {toks[sink]!r} ({sink})")
    scale = np.abs(pc["xy"]).max() / max(np.linalg.norm(pc["tag_xy"], axis=1).max(), 1e-9)
    for k, sink in enumerate(pc["sinks"]):
        ax_pca.annotate("", xy=pc["origin_xy"] + pc["tag_xy"][k] * scale * 0.8, xytext=pc["origin_xy"],
                        arrowprops=dict(arrowstyle="->", color=colour_of[sink], lw=2))
    ax_pca.set_title(f"{name}: head L{d['layer']} H{d['head']}, prompt {d['prompt']}: PCA of head outputs\n"
                     f"(PC1+PC2 = {pc['explained']:.0%} of variance; arrows: tags, scaled)", fontsize=9)
    ax_pca.set_xlabel("PC1")
    ax_pca.set_ylabel("PC2")
    ax_pca.legend(fontsize=7)
    xy, lab, txy = d["plane_xy"], d["plane_label"], d["plane_tags"]
    for k, sink in enumerate((s1, s2)):
        ax_plane.scatter(xy[lab == sink, 0], xy[lab == sink, 1], s=16, color=colour_of[sink], label=f"caught by {toks[sink]!r}")
        ax_plane.annotate("", xy=txy[k], xytext=(0, 0), arrowprops=dict(arrowstyle="->", color=colour_of[sink], lw=2))
        ax_plane.text(*txy[k], f" tag of {toks[sink]!r}", fontsize=8, color=colour_of[sink])
        ax_plane.scatter(*txy[k], s=0)  # keep the arrow tip inside the axes
    rest = (lab != s1) & (lab != s2)
    ax_plane.scatter(xy[rest, 0], xy[rest, 1], s=10, color="lightgrey", label="other tokens")
    ax_plane.axhline(0, color="k", lw=0.5)
    ax_plane.axvline(0, color="k", lw=0.5)
    ax_plane.set_xlabel(f"along tag of {toks[s1]!r}")
    ax_plane.set_ylabel(f"along tag of {toks[s2]!r}, orthogonalised")
    ax_plane.set_title(f"{name}: the same tokens in the plane of the two tags (Fig. 1b from data)", fontsize=9)
    ax_plane.legend(fontsize=7)


VE_STYLES = dict(tags=("k", "-"), mean_value=("tab:blue", "--"), random_token=("tab:orange", "-."),
                 random_subspace=("0.6", ":"))


def ve_hist(ax, ve, labels: dict, title: str = ""):
    """Densities of the paper's VE per head (`tags.value_space_ev`) for the tags and each baseline
    (`labels`: measure -> legend text), with the paper's 20%–40% band and 70% line."""
    bins = np.linspace(0, 1, 41)
    ax.axvspan(0.2, 0.4, color="gold", alpha=0.3, label="paper: 20%–40% typical")
    ax.axvline(0.7, color="tab:green", lw=1.5, label="paper: up to 70%")
    for k, label in labels.items():
        colour, ls = VE_STYLES[k]
        ax.hist(ve[f"ve_{k}"].dropna(), bins=bins, histtype="step", lw=1.8, color=colour, ls=ls, density=True, label=label)
    ax.set_xlabel("VE (paper's norm ratio), per head, pooled over prompts")
    ax.set_ylabel("density of heads")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


GEOMETRY_KINDS = [("same head", "sinks of one head", "tab:red"), ("same layer", "heads of one layer", "tab:blue"),
                  ("across layers", "across layers", "0.5")]


def geometry_hist(ax, pairs, sinks, cos_random: float, title: str = ""):
    """Densities of |cos| between tags (`tags.tag_geometry` pairs, by kind) and between a tag and
    the representations entering its layer (median per sink), with the random-direction scale."""
    bins = np.linspace(0, 1, 41)
    for kind, label, colour in GEOMETRY_KINDS:
        x = pairs[pairs.kind == kind].cos.abs()
        if len(x):
            ax.hist(x, bins=bins, histtype="step", density=True, lw=1.6, color=colour, label=f"tag vs tag: {label}")
    ax.hist(sinks.cos_tokens.dropna(), bins=bins, histtype="step", density=True, lw=1.6, color="tab:green",
            label="tag vs representations (median per sink)")
    ax.axvline(cos_random, color="k", ls=":", label="two random directions (median)")
    ax.set_xlabel("|cos| in the residual stream")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
